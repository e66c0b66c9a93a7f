"""Paged attention ops over the KV cache, picked by the cache's device: Triton kernels on CUDA
(engine/kernels/triton_attention.py), the torch implementation elsewhere
(engine/kernels/reference.py, also the tests' reference). Triton is imported only on first use on
CUDA, so CPU processes never load it.

    store_kv(k, v, k_cache, v_cache, slot_mapping)
    paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size, scale) -> [B, H, D]
    paged_prefill(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, block_size,
                  scale, max_query_len=None) -> [T, H, D]
    paged_attention(...same as paged_prefill...) -> [T, H, D]

``paged_attention`` is the varlen entry of engine/csrc/paged_attention.cpp's signature (decode,
prefill over cached context and verification rows in one call): on CUDA it takes the decode
kernel when every sequence has exactly one query row (``max_query_len == 1`` and T == N; the
runner knows this without a device sync, as a captured decode graph needs) and the prefill kernel
otherwise. Layouts and semantics: reference.py's docstrings.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

from engine.kernels import reference

logger = logging.getLogger(__name__)


_triton_disabled = False


def disable_triton() -> None:
    """From now on CUDA runs the torch reference too (a diagnostic fallback: bench/gpu_check.py
    uses it when the kernels' own check fails, so the other checks still run)."""
    global _triton_disabled
    _triton_disabled = True


@functools.cache
def _triton_module() -> ModuleType | None:
    try:
        from engine.kernels import triton_attention
    except ImportError as e:  # a CUDA torch without triton: the torch path still works
        logger.warning("triton unavailable (%s): paged attention runs in torch on CUDA", e)
        return None
    return triton_attention


def backend(device: torch.device) -> ModuleType:
    """The module whose functions serve ``device``: triton_attention on CUDA when triton imports,
    reference otherwise."""
    if device.type == "cuda" and not _triton_disabled:
        mod = _triton_module()
        if mod is not None:
            return mod
    return reference


def backend_name(device: torch.device) -> str:
    return "triton" if backend(device) is not reference else "torch"


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    backend(k_cache.device).store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    return backend(k_cache.device).paged_decode(
        q, k_cache, v_cache, block_tables, context_lens, block_size, scale
    )


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    max_query_len: int | None = None,
) -> torch.Tensor:
    return backend(k_cache.device).paged_prefill(
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        block_size,
        scale,
        max_query_len=max_query_len,
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    max_query_len: int | None = None,
) -> torch.Tensor:
    mod = backend(k_cache.device)
    if max_query_len == 1 and q.shape[0] == seq_lens.shape[0]:
        # One query row per sequence, in order: decode (seq_len 0 rows are padding: zeros).
        return mod.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale)
    return mod.paged_prefill(
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        block_size,
        scale,
        max_query_len=max_query_len,
    )
