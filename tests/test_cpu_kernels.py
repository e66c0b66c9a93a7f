"""The C++ paged-decode kernel against the torch path it replaces (gather + SDPA), on a paged layout
with scattered blocks, ragged context lengths and grouped-query heads."""

import pytest
import torch
import torch.nn.functional as F

from engine.cpu_kernels import paged_decode_kernel

kernel = paged_decode_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C++ compiler: torch path is used")


def _case(seed: int, batch: int, kv_heads: int, group: int, head_dim: int, block: int = 16):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k = torch.randn(num_blocks * block, kv_heads, head_dim, generator=g)
    v = torch.randn(num_blocks * block, kv_heads, head_dim, generator=g)
    q = torch.randn(batch, kv_heads, group, head_dim, generator=g)
    lens = torch.randint(1, 5 * block, (batch,), generator=g)
    lmax = int(lens.max())
    perm = torch.randperm(num_blocks, generator=g)
    per_seq = -(-lmax // block)
    slots = torch.zeros(batch, lmax, dtype=torch.long)
    for b in range(batch):
        blocks = perm[(b * per_seq) % num_blocks :][:per_seq]
        if len(blocks) < per_seq:
            blocks = perm[:per_seq]
        pos = torch.arange(lmax)
        slots[b] = blocks[pos // block] * block + pos % block
    return q, k, v, slots, lens


def _reference(q, k, v, slots, lens, scale):
    mask = (torch.arange(slots.shape[1]).unsqueeze(0) < lens.unsqueeze(1)).view(len(lens), 1, 1, -1)
    kk = k[slots].transpose(1, 2)  # [B, Hkv, L, D]
    vv = v[slots].transpose(1, 2)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)


@pytest.mark.parametrize(
    "seed,batch,kv_heads,group,head_dim",
    [(0, 1, 1, 1, 8), (1, 5, 4, 2, 64), (2, 32, 4, 2, 64), (3, 7, 2, 4, 32), (4, 3, 8, 1, 16)],
)
def test_kernel_matches_gather_and_sdpa(seed, batch, kv_heads, group, head_dim):
    q, k, v, slots, lens = _case(seed, batch, kv_heads, group, head_dim)
    scale = head_dim**-0.5
    got = kernel.paged_decode(q, k, v, slots, lens, scale)
    want = _reference(q, k, v, slots, lens, scale)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_kernel_ignores_padding_past_each_length():
    q, k, v, slots, lens = _case(5, 4, 4, 2, 64)
    scale = 0.125
    before = kernel.paged_decode(q, k, v, slots, lens, scale)
    junk = slots.clone()
    for b, n in enumerate(lens.tolist()):
        junk[b, n:] = 0  # padding points at slot 0, whatever it holds
    k[0] = 1e4
    v[0] = -1e4
    if (slots == 0).logical_and(torch.arange(slots.shape[1]) < lens.unsqueeze(1)).any():
        pytest.skip("slot 0 is a real context slot in this draw")
    after = kernel.paged_decode(q, k, v, junk, lens, scale)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
