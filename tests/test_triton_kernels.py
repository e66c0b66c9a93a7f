"""The Triton paged-attention kernels under Triton's interpreter, in a pytest subprocess.

TRITON_INTERPRET=1 must be set before triton is first imported (triton's library functions are
decorated at import), and it would make any later Triton use in this process interpreted; so the
cases (tests/triton_kernel_cases.py) run in a child pytest with the variable set, and this session
neither imports triton nor sees the variable. The compiled path (no GPU needed to compile) runs in
another child: tests/triton_kernel_compile.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import engine.kernels as kernels
from engine.kernels import reference

ROOT = Path(__file__).resolve().parent.parent
CASES = "tests/triton_kernel_cases.py"
COMPILE = "tests/triton_kernel_compile.py"


def needs_triton() -> None:
    """Skip without triton (the "test" extra installs it), without importing it here."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton (pip install -e '.[test]' installs it)")


def test_dispatch_off_cuda_is_the_torch_reference():
    assert kernels.backend(torch.device("cpu")) is reference
    assert kernels.backend_name(torch.device("cpu")) == "torch"
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") is None


def test_paged_attention_decode_route_equals_varlen():
    """The varlen entry: one query row per sequence with max_query_len=1 takes the decode path;
    the result equals the general (prefill) path's, padding rows (seq_len 0) included."""
    g = torch.Generator().manual_seed(0)
    block_size, hkv, h, d = 4, 2, 6, 8
    k_cache = torch.randn(20 * block_size, hkv, d, generator=g)
    v_cache = torch.randn(20 * block_size, hkv, d, generator=g)
    seq_lens = torch.tensor([5, 0, 13, 1], dtype=torch.int32)
    tables = torch.randperm(20, generator=g)[:16].view(4, 4).to(torch.int32)
    q = torch.randn(4, h, d, generator=g)
    qsl = torch.arange(5, dtype=torch.int32)
    args = (q, k_cache, v_cache, tables, qsl, seq_lens, block_size, 0.3)
    fast = kernels.paged_attention(*args, max_query_len=1)
    general = reference.paged_prefill(*args)
    torch.testing.assert_close(fast, general, rtol=1e-6, atol=1e-6)
    assert torch.all(fast[1] == 0)
    torch.testing.assert_close(kernels.paged_attention(*args), general, rtol=1e-6, atol=1e-6)


def test_triton_kernels_under_interpreter(tmp_path):
    needs_triton()
    report = tmp_path / "cases.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            CASES,
            f"--junitxml={report}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    suite = ET.parse(report).getroot().find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0, tail
    assert int(suite.get("skipped")) == 0 and ran >= 12, tail  # every case ran
    assert os.environ.get("TRITON_INTERPRET") is None or "TRITON_INTERPRET" in env


def test_triton_kernels_compile_for_h100():
    """The compiled path the interpreter skips: every kernel through ptxas for sm_90, no spills."""
    needs_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; 1 is its default
    proc = subprocess.run(
        [sys.executable, COMPILE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert proc.stdout.count("ok   sm_90") == 12, out[-4000:]
