"""Paged attention in Triton: K/V are read in place through block tables (no gathered copy).

Layouts (engine/kernels/reference.py has the same functions in torch, the reference):
- KV cache per layer ``[num_blocks * block_size, Hkv, D]`` (last dim contiguous); the slot of
  position p of a request is ``table[p // block_size] * block_size + p % block_size``;
- GQA: query head h reads KV head ``h // (H // Hkv)``.

Kernels keep running softmax statistics in float32 (online softmax): a running max ``m``, a
running sum ``l`` and an unnormalised output ``acc``; each KV tile rescales them by
``exp(m_old - m_new)``. Masked scores are -inf; a row that saw no valid score keeps ``m = -inf``
and is guarded (``m_safe``), so padding rows and empty tiles produce zeros, not NaN.

With ``TRITON_INTERPRET=1`` set before this module is imported, the same kernels run on CPU
tensors (tests/test_triton_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ct,
    stride_ch,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slots = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot
    mask = (h[:, None] < HKV) & (d[None, :] < D) & (slots >= 0)  # slot -1: padding
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = slots * stride_ct + h[:, None] * stride_ch + d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_ct,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size (any value; tiles below need not align)
    BLOCK_N: tl.constexpr,  # context positions per tile
):
    """One program per (request row, query head): a dot product per position (no tl.dot, so any
    head count and tile size works); decode is bound by reading K/V."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    ctx = tl.load(context_lens_ptr + b)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=d_mask, other=0.0).to(tl.float32)
    q = q * scale
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_mask = pos < ctx
        block = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=p_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = slot[:, None] * stride_ct + kvh * stride_ch + d[None, :]
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[None, :] * k, axis=1)  # [BLOCK_N]
        s = tl.where(p_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)  # ctx 0 (a padding row): zeros
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_ct,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # context positions per tile
    IEEE: tl.constexpr,  # float32 inputs: exact float32 dots (no TF32)
):
    """One program per (sequence, query head, tile of BLOCK_M new tokens); flash attention over
    the sequence's cached context, causal at the tile's end."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(query_start_loc_ptr + i)
    q_len = tl.load(query_start_loc_ptr + i + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + i)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < q_len
    q_pos = seq_len - q_len + rows  # absolute positions of this tile's queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q_off = (q_start + rows).to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=r_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Positions past the tile's last query are masked for every row: stop there. A tile past the
    # sequence's new tokens reads nothing.
    kv_end = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_M)
    kv_end = tl.where(tile * BLOCK_M < q_len, kv_end, 0)
    for start in range(0, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_mask = pos < seq_len
        block = tl.load(block_tables_ptr + i * stride_bt + pos // BLOCK_SIZE, mask=p_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = slot[:, None] * stride_ct + kvh * stride_ch + d[None, :]
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        allowed = (pos[None, :] <= q_pos[:, None]) & p_mask[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_off = (q_start + rows).to(tl.int64)[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(
        out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :]
    )


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache / v_cache: [slots, Hkv, D] with equal strides, last dim dense")


def _dense_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; -1 writes nowhere
) -> None:
    _check_cache(k_cache, v_cache)
    k, v = _dense_last(k), _dense_last(v)
    t, hkv, d = k.shape
    if t == 0:
        return
    _store_kv_kernel[(t,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        HKV=hkv,
        D=d,
        BLOCK_H=triton.next_power_of_2(hkv),
        BLOCK_D=triton.next_power_of_2(d),
    )


def paged_decode(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    block_size: int,
    scale: float,
    block_n: int = 32,
) -> torch.Tensor:
    _check_cache(k_cache, v_cache)
    q = _dense_last(q)
    b, h, d = q.shape
    out = torch.empty_like(q)
    if b == 0:
        return out
    _paged_decode_kernel[(b, h)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        float(scale),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        GROUP=h // k_cache.shape[1],
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
    )
    return out


def paged_prefill(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [N, max_blocks] int32
    query_start_loc: torch.Tensor,  # [N + 1] int32
    seq_lens: torch.Tensor,  # [N] int32
    block_size: int,
    scale: float,
    max_query_len: int | None = None,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """``max_query_len``: the longest sequence's new-token count (read from query_start_loc, a
    host sync, when not given)."""
    _check_cache(k_cache, v_cache)
    q = _dense_last(q)
    t, h, d = q.shape
    n = seq_lens.shape[0]
    out = torch.empty_like(q)
    if t == 0 or n == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    grid = (n, h, triton.cdiv(max_query_len, block_m))
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        float(scale),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        GROUP=h // k_cache.shape[1],
        D=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),  # tl.dot needs every dim >= 16
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32,
    )
    return out
