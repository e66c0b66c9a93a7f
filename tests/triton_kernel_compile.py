"""Compile the Triton paged-attention kernels for NVIDIA targets without a GPU: Triton's full
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the ptxas its wheel bundles). This catches
what the interpreter cannot (types the compiler rejects, tl.dot shape rules, register spills).
Run by tests/test_triton_kernels.py in a subprocess without TRITON_INTERPRET; prints one line per
kernel and exits non-zero on any failure or spill.

    python tests/triton_kernel_compile.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine.kernels import triton_attention as ta

INT32_PTRS = ("block_tables_ptr", "context_lens_ptr", "query_start_loc_ptr", "seq_lens_ptr")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INT32_PTRS:
            sig[name] = "*i32"
        elif name == "slot_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def spills(cubin: bytes) -> tuple[int, int]:
    """(registers, local memory bytes) from cuobjdump's resource usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    local = int(re.search(r"LOCAL:(\d+)", out).group(1))
    return regs, local


def cases():
    # Qwen2.5-0.5B heads (14 / 2, D 64) and a Llama-8B-like layout (32 / 8, D 128).
    for group, d in ((7, 64), (4, 128)):
        for dtype in ("fp32", "bf16"):
            yield ta._store_kv_kernel, dtype, {"HKV": 2, "D": d, "BLOCK_H": 2, "BLOCK_D": d}
            yield (
                ta._paged_decode_kernel,
                dtype,
                {"GROUP": group, "D": d, "BLOCK_D": d, "BLOCK_SIZE": 16, "BLOCK_N": 32},
            )
            yield (
                ta._paged_prefill_kernel,
                dtype,
                {
                    "GROUP": group,
                    "D": d,
                    "BLOCK_D": d,
                    "BLOCK_SIZE": 16,
                    "BLOCK_M": 32,
                    "BLOCK_N": 32,
                    "IEEE": dtype == "fp32",
                },
            )


def main() -> int:
    failed = 0
    for arch in (90,):  # H100; sm_80 compiled the same way when tried
        target = GPUTarget("cuda", arch, 32)
        for fn, dtype, consts in cases():
            label = f"sm_{arch} {fn.__name__} {dtype} D={consts['D']}"
            try:
                src = ASTSource(fn=fn, signature=signature(fn, dtype, consts), constexprs=consts)
                kernel = triton.compile(src, target=target)
                regs, local = spills(kernel.asm["cubin"])
            except Exception as e:  # report every kernel, then fail
                print(f"FAIL {label}: {type(e).__name__}: {e}"[:2000])
                failed += 1
                continue
            ok = local == 0
            failed += not ok
            print(f"{'ok  ' if ok else 'SPILL'} {label}: {regs} registers, {local} B local")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
