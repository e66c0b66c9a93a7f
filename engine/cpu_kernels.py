"""Optional CPU kernels, compiled once on first use with torch's C++ extension builder (cached under
``~/.cache/torch_extensions``). When no compiler is present, or ``FLEETLM_CPU_KERNELS=0``, the
engine uses the pure-torch attention path, which gives the same results."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_module = None
_failed = False


def paged_decode_kernel():
    """The compiled module (``paged_attention``, ``paged_decode``, ``store_kv``; see
    csrc/paged_attention.cpp) or None."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("FLEETLM_CPU_KERNELS", "1") == "0":
        _failed = True
        return None
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load

                src = Path(__file__).parent / "csrc" / "paged_attention.cpp"
                _module = load(
                    name="fleetlm_cpu_kernels",
                    sources=[str(src)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as e:  # no compiler, no ninja, ...: fall back, say why once
                logger.warning("CPU paged-attention kernels unavailable (%s); using torch ops", e)
                _failed = True
    return _module


_fused_module = None
_fused_failed = False


def fused_ops_kernel():
    """The compiled fused elementwise ops (``rotary_store_kv``; see csrc/fused_ops.cpp) or None
    (no compiler, or ``FLEETLM_CPU_KERNELS=0``: the model code runs its torch ops instead, with
    the same results)."""
    global _fused_module, _fused_failed
    if _fused_module is not None or _fused_failed:
        return _fused_module
    if os.environ.get("FLEETLM_CPU_KERNELS", "1") == "0":
        _fused_failed = True
        return None
    with _lock:
        if _fused_module is None and not _fused_failed:
            try:
                from torch.utils.cpp_extension import load

                src = Path(__file__).parent / "csrc" / "fused_ops.cpp"
                _fused_module = load(
                    name="fleetlm_fused_ops",
                    sources=[str(src)],
                    # No contracted multiply-adds: results must equal torch's op-by-op ones.
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as e:  # no compiler, no ninja, ...: fall back, say why once
                logger.warning("CPU fused ops unavailable (%s); using torch ops", e)
                _fused_failed = True
    return _fused_module
