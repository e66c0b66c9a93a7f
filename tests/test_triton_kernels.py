"""The Triton paged-attention kernels under Triton's interpreter, in a pytest subprocess.

TRITON_INTERPRET=1 must be set before triton is first imported (triton's library functions are
decorated at import), and it would make any later Triton use in this process interpreted; so the
cases (tests/triton_kernel_cases.py) run in a child pytest with the variable set, and this session
neither imports triton nor sees the variable.
"""

from __future__ import annotations

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


def test_dispatch_off_cuda_is_the_torch_reference():
    assert kernels.backend(torch.device("cpu")) is reference
    assert kernels.backend_name(torch.device("cpu")) == "torch"
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") is None


def test_triton_kernels_under_interpreter(tmp_path):
    pytest.importorskip("triton")  # the "test" extra installs it
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
