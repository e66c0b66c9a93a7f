"""Cases for the Triton paged-attention kernels (engine/kernels/triton_attention.py), run on CPU
tensors by Triton's interpreter, against SDPA over explicitly gathered K/V and the torch reference
(engine/kernels/reference.py). Shapes are small: the interpreter runs each program in numpy.

TRITON_INTERPRET must be set before triton is first imported (triton's own library functions are
decorated at its import), so tests/test_triton_kernels.py runs this file in a pytest subprocess with
the variable set; nothing in the main test session imports triton or sees the variable. Run alone:

    TRITON_INTERPRET=1 python -m pytest -q tests/triton_kernel_cases.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":  # compiled kernels need a GPU; CPU tensors fault
    pytest.skip(
        "needs TRITON_INTERPRET=1 (tests/test_triton_kernels.py sets it)", allow_module_level=True
    )

from engine.kernels import reference  # noqa: E402
from engine.kernels import triton_attention as TA  # noqa: E402


def test_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(TA._paged_decode_kernel, InterpretedFunction)


def make_cache(num_blocks, block_size, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks * block_size, hkv, d)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def block_tables_for(lens, block_size, num_blocks, max_blocks, seed=1):
    """Distinct shuffled blocks per row (unused entries 0), as the block manager hands out."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    for i, n in enumerate(lens):
        need = -(-n // block_size)
        table[i, :need] = torch.tensor(perm[:need], dtype=torch.int32)
        perm = perm[need:]
    return table


def gather(cache, table_row, length, block_size):
    pos = torch.arange(length)
    return cache[table_row.long()[pos // block_size] * block_size + pos % block_size]  # [L,Hkv,D]


def sdpa_decode(q, k_cache, v_cache, table, lens, block_size, scale):
    """Row by row: SDPA of one query over its gathered context (GQA by enable_gqa)."""
    out = torch.zeros_like(q)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        k = gather(k_cache, table[b], n, block_size).transpose(0, 1).unsqueeze(0).float()
        v = gather(v_cache, table[b], n, block_size).transpose(0, 1).unsqueeze(0).float()
        o = F.scaled_dot_product_attention(
            q[b].float().unsqueeze(0).unsqueeze(2), k, v, scale=scale, enable_gqa=True
        )
        out[b] = o[0, :, 0].to(q.dtype)
    return out


def sdpa_prefill(q, k_cache, v_cache, table, q_lens, seq_lens, block_size, scale):
    out = torch.zeros_like(q)
    start = 0
    for i, (n, length) in enumerate(zip(q_lens, seq_lens, strict=True)):
        k = gather(k_cache, table[i], length, block_size).transpose(0, 1).unsqueeze(0).float()
        v = gather(v_cache, table[i], length, block_size).transpose(0, 1).unsqueeze(0).float()
        qi = q[start : start + n].float().transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        mask = torch.arange(length).view(1, -1) <= torch.arange(length - n, length).view(-1, 1)
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + n] = o[0].transpose(0, 1).to(q.dtype)
        start += n
    return out


def test_store_kv_writes_its_slots_and_skips_padding():
    k_cache, v_cache = make_cache(6, 4, 3, 24)  # Hkv 3, D 24: neither a power of two
    want_k, want_v = k_cache.clone(), v_cache.clone()
    g = torch.Generator().manual_seed(2)
    k = torch.randn(5, 3, 24, generator=g)
    v = torch.randn(5, 3, 24, generator=g)
    slots = torch.tensor([7, -1, 0, 23, -1], dtype=torch.int64)
    TA.store_kv(k, v, k_cache, v_cache, slots)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s], want_v[s] = k[t], v[t]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    ref_k, ref_v = make_cache(6, 4, 3, 24)
    reference.store_kv(k, v, ref_k, ref_v, slots)
    assert torch.equal(ref_k, want_k) and torch.equal(ref_v, want_v)


def test_store_kv_reads_strided_views():
    """K and V as views of a fused QKV projection (rows strided, last dim dense)."""
    k_cache, v_cache = make_cache(4, 4, 2, 16)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(3, 8, 16)  # [T, H + 2 * Hkv, D] with H = 4
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    slots = torch.tensor([3, 9, 12])
    TA.store_kv(k, v, k_cache, v_cache, slots)
    want_k[slots], want_v[slots] = k, v
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize(
    "block_size,heads,kv_heads,head_dim",
    [(16, 4, 4, 32), (4, 6, 2, 16), (8, 4, 1, 24), (5, 14, 2, 16)],
    ids=["mha-bs16", "gqa3-bs4", "mqa-bs8-d24", "gqa7-bs5"],
)
def test_paged_decode_matches_sdpa(block_size, heads, kv_heads, head_dim):
    lens = [1, 37, 0, 16, 3]  # ragged, one padding row (0), one a whole number of blocks
    max_blocks = -(-max(lens) // block_size) + 1  # a spare column, as a wider table has
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim)
    table = block_tables_for(lens, block_size, num_blocks, max_blocks)
    q = torch.randn(len(lens), heads, head_dim, generator=torch.Generator().manual_seed(3))
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = head_dim**-0.5
    got = TA.paged_decode(q, k_cache, v_cache, table, ctx, block_size, scale, block_n=16)
    want = sdpa_decode(q, k_cache, v_cache, table, lens, block_size, scale)
    ref = reference.paged_decode(q, k_cache, v_cache, table, ctx, block_size, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[2] == 0)  # the padding row: zeros, not NaN


def test_paged_decode_bfloat16_cache():
    block_size, lens = 4, [9, 2, 14]
    k_cache, v_cache = make_cache(12, block_size, 2, 16, dtype=torch.bfloat16)
    table = block_tables_for(lens, block_size, 12, 4)
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = TA.paged_decode(q, k_cache, v_cache, table, ctx, block_size, 0.25, block_n=16)
    want = sdpa_decode(q, k_cache, v_cache, table, lens, block_size, 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "block_size,heads,kv_heads,head_dim",
    [(16, 4, 2, 16), (4, 3, 1, 24), (5, 4, 4, 16)],
    ids=["gqa2-bs16", "mqa-bs4-d24", "mha-bs5"],
)
def test_paged_prefill_over_cached_context_matches_sdpa(block_size, heads, kv_heads, head_dim):
    # (new tokens, whole sequence): nothing cached; a chunk after cached context spanning two
    # query tiles; one token after a long context; a chunk ending on a block boundary.
    q_lens = [7, 21, 1, 8]
    seq_lens = [7, 30, 19, 16]
    max_blocks = -(-max(seq_lens) // block_size) + 1
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim)
    table = block_tables_for(seq_lens, block_size, num_blocks, max_blocks)
    t = sum(q_lens)
    q = torch.randn(t, heads, head_dim, generator=torch.Generator().manual_seed(5))
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    got = TA.paged_prefill(
        q, k_cache, v_cache, table, qsl, sl, block_size, scale, block_m=16, block_n=16
    )
    want = sdpa_prefill(q, k_cache, v_cache, table, q_lens, seq_lens, block_size, scale)
    ref = reference.paged_prefill(q, k_cache, v_cache, table, qsl, sl, block_size, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)


def test_store_then_prefill_then_decode_is_causal_attention():
    """A layer's work over two steps, kernels only: a prompt's K/V stored through its slots and
    attended causally, then one more token decoded; equal to SDPA over the whole sequence."""
    block_size, heads, kv_heads, d, n = 4, 4, 2, 16, 11
    k_cache = torch.zeros(10 * block_size, kv_heads, d)
    v_cache = torch.zeros_like(k_cache)
    table = torch.tensor([[7, 2, 5, 0]], dtype=torch.int32)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(n + 1, heads, d, generator=g)
    k = torch.randn(n + 1, kv_heads, d, generator=g)
    v = torch.randn(n + 1, kv_heads, d, generator=g)
    pos = torch.arange(n + 1)
    slots = table[0].long()[pos // block_size] * block_size + pos % block_size
    TA.store_kv(k[:n], v[:n], k_cache, v_cache, slots[:n])
    pre = TA.paged_prefill(
        q[:n],
        k_cache,
        v_cache,
        table,
        torch.tensor([0, n], dtype=torch.int32),
        torch.tensor([n], dtype=torch.int32),
        block_size,
        d**-0.5,
        block_m=16,
        block_n=16,
    )
    TA.store_kv(k[n:], v[n:], k_cache, v_cache, slots[n:])
    dec = TA.paged_decode(
        q[n:],
        k_cache,
        v_cache,
        table,
        torch.tensor([n + 1], dtype=torch.int32),
        block_size,
        d**-0.5,
    )
    full = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        is_causal=True,
        enable_gqa=True,
    )[0].transpose(0, 1)
    torch.testing.assert_close(torch.cat([pre, dec]), full, atol=1e-5, rtol=1e-5)
