"""Paged attention for our own model code: one call per layer over the whole flat step.

Each layer first stores the step's new K/V in their slots (``slot_mapping``; -1 writes nowhere),
then attends:
- ``paged`` requests (decode, prefill after cached context, speculative verification): their query
  rows read K/V in place through the block tables (varlen, causal), one kernel call for all of them:
  the C++ kernel on CPU (engine/csrc/paged_attention.cpp), the Triton kernels on CUDA when
  ``engine.kernels`` is present, else a torch reference (gather + SDPA per request);
- ``fresh`` prefill chunks (nothing cached before them): one causal SDPA each over the step's own
  K/V (no gather; a matmul-based kernel beats a per-row loop on long prompts).

KV cache per layer: ``[num_blocks * block_size, Hkv, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class FreshChunk:
    start: int  # first row in the flat step
    num_tokens: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, -1 = write nowhere (padding)
    block_size: int
    # Paged part: requests whose query rows read K/V through block tables.
    block_tables: torch.Tensor | None = None  # [N, max_blocks] int32
    query_start_loc: torch.Tensor | None = None  # [N + 1] int32, rows relative to ``paged_rows``
    seq_lens: torch.Tensor | None = None  # [N] int32, tokens in KV after this step
    max_query_len: int | None = None  # longest query of the paged requests (1: decode)
    # Rows of the paged requests in the flat step: None = every row (no fresh chunk this step).
    paged_rows: torch.Tensor | slice | None = None
    fresh: list[FreshChunk] = field(default_factory=list)


class PagedAttention:
    """Device-specific kernels, chosen once per runner."""

    def __init__(self, device: torch.device, dtype: torch.dtype, block_size: int) -> None:
        self.block_size = block_size
        self.cpu = None
        self.triton = None
        if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            from engine.cpu_kernels import paged_decode_kernel

            self.cpu = paged_decode_kernel()
        elif device.type == "cuda":
            try:  # Triton kernels ship with the GPU parts; the torch reference runs without them
                from engine import kernels as triton_kernels
            except ImportError:
                triton_kernels = None
            self.triton = triton_kernels

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        """k, v: [T, Hkv, D] into their slots; slot -1 writes nowhere."""
        if self.cpu is not None:
            self.cpu.store_kv(k, v, k_cache, v_cache, slot_mapping)
        elif self.triton is not None:
            self.triton.store_kv(k, v, k_cache, v_cache, slot_mapping)
        else:
            valid = slot_mapping >= 0
            if not bool(valid.all()):
                k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
            k_cache.index_copy_(0, slot_mapping, k)
            v_cache.index_copy_(0, slot_mapping, v)

    def paged(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        """q [T, H, D] of the paged requests -> [T, H, D]; see the module docstring."""
        args = (q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens)
        if self.cpu is not None:
            return self.cpu.paged_attention(*args, self.block_size, scale)
        if self.triton is not None:
            return self.triton.paged_attention(
                *args, self.block_size, scale, max_query_len=meta.max_query_len
            )
        return paged_reference(*args, self.block_size, scale)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        """q [T, H, D], k/v [T, Hkv, D] of this step -> [T, H, D]."""
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k, v, k_cache, v_cache, meta, scale)

    def attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        """``forward`` after the step's K/V are in their slots (a fused op stored them)."""
        if not meta.fresh:
            return self.paged(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        if meta.block_tables is not None:
            rows = meta.paged_rows
            out[rows] = self.paged(q[rows], k_cache, v_cache, meta, scale)
        group = q.shape[1] // k.shape[1]
        for c in meta.fresh:
            rows = slice(c.start, c.start + c.num_tokens)
            # [1, H, n, D]: with a batch dim CPU SDPA takes its flash kernel (3-D inputs fall
            # back to the math path: masked bmm + softmax, ~10% of a W1 prefill's CPU time).
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None],
                k[rows].transpose(0, 1)[None],
                v[rows].transpose(0, 1)[None],
                is_causal=True,
                scale=scale,
                enable_gqa=group > 1,
            )
            out[rows] = o[0].transpose(0, 1)
        return out


def paged_reference(
    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, block_size, scale
):
    """Torch reference of the varlen paged kernel (gather + SDPA per request; host syncs)."""
    out = torch.zeros_like(q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    group = q.shape[1] // k_cache.shape[1]
    for n, seq_len in enumerate(lens):
        a, b = qsl[n], qsl[n + 1]
        if b == a or seq_len == 0:
            continue
        pos = torch.arange(seq_len, device=q.device)
        slots = block_tables[n, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].transpose(0, 1)  # [Hkv, L, D]
        v = v_cache[slots].transpose(0, 1)
        q_pos = torch.arange(seq_len - (b - a), seq_len, device=q.device)
        mask = pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [n, L]
        o = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1
        )
        out[a:b] = o.transpose(0, 1)
    return out
