"""Optional CPU kernels, compiled once on first use with torch's C++ extension builder (cached under
``~/.cache/torch_extensions``). When no compiler is present, or ``FLEETLM_CPU_KERNELS=0``, the
engine uses the pure-torch attention path, which gives the same results."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_modules: dict[str, object] = {}  # source file -> compiled module
_failed: set[str] = set()  # source files that could not be compiled (said once)
build_dirs: dict[str, Path] = {}  # source file -> its build folder


def _build_dir(name: str, src: Path, flags: list[str]) -> Path:
    """One build folder per (source text, flags, torch version): checkouts with different sources
    never rebuild each other's module, and a changed source builds beside the old one."""
    import torch
    from torch.utils.cpp_extension import _get_build_directory

    key = hashlib.sha256(src.read_bytes())
    key.update(" ".join([*flags, torch.__version__]).encode())
    root = Path(_get_build_directory(name, verbose=False)).parent
    return root / f"{name}_{key.hexdigest()[:12]}"


def _load(source: str, name: str, what: str, extra_cflags: tuple[str, ...] = ()):
    """Compile ``csrc/<source>`` once per process (the build is cached on disk), or None when
    no compiler is present or ``FLEETLM_CPU_KERNELS=0``."""
    if source in _modules or source in _failed:
        return _modules.get(source)
    if os.environ.get("FLEETLM_CPU_KERNELS", "1") == "0":
        _failed.add(source)
        return None
    with _lock:
        if source not in _modules and source not in _failed:
            try:
                from torch.utils.cpp_extension import load

                src = Path(__file__).parent / "csrc" / source
                cflags = ["-O3", "-march=native", "-fopenmp", *extra_cflags]
                build = _build_dir(name, src, cflags)
                build.mkdir(parents=True, exist_ok=True)
                build_dirs[source] = build
                # Processes building or loading the same module take turns on a lock the OS
                # drops when its holder dies. torch's own lock file is a plain file: a build
                # killed midway (Ctrl-C on a first start) leaves it behind and every later load
                # would wait for it forever. While we hold ours, no live builder owns it.
                with open(build / "fleetlm.lock", "w") as held:
                    fcntl.flock(held, fcntl.LOCK_EX)
                    (build / "lock").unlink(missing_ok=True)
                    _modules[source] = load(
                        name=name,
                        sources=[str(src)],
                        extra_cflags=cflags,
                        extra_ldflags=["-fopenmp"],
                        build_directory=str(build),
                        verbose=False,
                    )
            except Exception as e:  # no compiler, no ninja, ...: fall back, say why once
                logger.warning("CPU %s unavailable (%s); using torch ops", what, e)
                _failed.add(source)
    return _modules.get(source)


def paged_decode_kernel():
    """The compiled module (``paged_attention``, ``paged_decode``, ``store_kv``; see
    csrc/paged_attention.cpp) or None."""
    return _load("paged_attention.cpp", "fleetlm_cpu_kernels", "paged-attention kernels")


def fused_ops_kernel():
    """The compiled fused elementwise ops (``rotary_store_kv``; see csrc/fused_ops.cpp) or None
    (no compiler, or ``FLEETLM_CPU_KERNELS=0``: the model code runs its torch ops instead, with
    the same results)."""
    # No contracted multiply-adds: results must equal torch's op-by-op ones.
    return _load("fused_ops.cpp", "fleetlm_fused_ops", "fused ops", ("-ffp-contract=off",))
