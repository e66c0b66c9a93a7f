"""Paged attention in plain torch: the reference the Triton kernels are tested against, and the
implementation used off CUDA.

KV cache per layer: ``[num_blocks * block_size, Hkv, D]``; slot = block_id * block_size + offset.
A request's block table row lists its blocks in order; position p of the request lives in slot
``table[p // block_size] * block_size + p % block_size``. GQA: query head h reads KV head
``h // (H // Hkv)`` (as transformers' repeat_kv).
"""

from __future__ import annotations

import torch


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; -1 = padding, written nowhere
) -> None:
    if bool((slot_mapping < 0).any()):  # a host sync: this path runs off CUDA only
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _context_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[B, length] slots of positions 0..length-1 of every row."""
    pos = torch.arange(length, device=block_tables.device)
    blocks = block_tables.long().index_select(1, pos // block_size)
    return blocks * block_size + pos % block_size


def paged_decode(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32; 0 = a padding row (output zeros)
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """One query token per row attending to its first context_len cached positions."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    longest = int(context_lens.max()) if b else 0  # a host sync: this path runs off CUDA only
    length = max(1, -(-longest // block_size)) * block_size
    slots = _context_slots(block_tables, length, block_size)  # [B, L]
    k = k_cache[slots].float().permute(0, 2, 1, 3)  # [B, Hkv, L, D]
    v = v_cache[slots].float().permute(0, 2, 1, 3)
    qg = q.float().view(b, hkv, h // hkv, d)  # [B, Hkv, G, D]
    s = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    valid = torch.arange(length, device=q.device) < context_lens.view(b, 1).long()  # [B, L]
    s = s.masked_fill(~valid.view(b, 1, 1, length), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # an empty row (padding) gives zeros
    o = torch.matmul(p, v)  # [B, Hkv, G, D]
    return o.reshape(b, h, d).to(q.dtype)


def paged_prefill(
    q: torch.Tensor,  # [T, H, D]: every sequence's new tokens back to back
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [N, max_blocks] int32
    query_start_loc: torch.Tensor,  # [N + 1] int32
    seq_lens: torch.Tensor,  # [N] int32: cached context + new tokens
    block_size: int,
    scale: float,
    max_query_len: int | None = None,  # the Triton kernel's launch hint; unused here
) -> torch.Tensor:
    """Causal attention over cached context: query j of sequence i sits at position
    seq_len_i - q_len_i + j and attends to positions <= it. The new K/V are already stored."""
    out = torch.zeros_like(q)
    h = q.shape[1]
    hkv = k_cache.shape[1]
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = starts[i], starts[i + 1]
        n = q1 - q0
        if n == 0 or seq_len == 0:
            continue
        slots = _context_slots(block_tables[i : i + 1], seq_len, block_size)[0]
        k = k_cache[slots].float().transpose(0, 1)  # [Hkv, L, D]
        v = v_cache[slots].float().transpose(0, 1)
        qi = q[q0:q1].float().transpose(0, 1).reshape(hkv, h // hkv, n, -1)  # [Hkv, G, n, D]
        s = torch.matmul(qi, k.unsqueeze(1).transpose(-1, -2)) * scale  # [Hkv, G, n, L]
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device).view(n, 1)
        allowed = torch.arange(seq_len, device=q.device).view(1, seq_len) <= q_pos
        s = s.masked_fill(~allowed, float("-inf"))
        o = torch.matmul(torch.softmax(s, dim=-1), v.unsqueeze(1))  # [Hkv, G, n, D]
        out[q0:q1] = o.reshape(h, n, -1).transpose(0, 1).to(q.dtype)
    return out
