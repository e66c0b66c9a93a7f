"""The C++ paged-attention kernels against the torch path they replace (gather + SDPA), on a paged
layout with scattered blocks, ragged context lengths and grouped-query heads."""

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


def _varlen_case(seed: int, q_lens, ctx_before, kv_heads=2, group=2, head_dim=32, block=16):
    """Requests with q_lens[i] new tokens after ctx_before[i] cached ones, on scattered blocks."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [a + b for a, b in zip(q_lens, ctx_before, strict=True)]
    num_blocks = max(96, sum(-(-s // block) for s in seq_lens))
    k = torch.randn(num_blocks * block, kv_heads, head_dim, generator=g)
    v = torch.randn(num_blocks * block, kv_heads, head_dim, generator=g)
    max_blocks = max(-(-s // block) for s in seq_lens) + 1
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(q_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for i, s in enumerate(seq_lens):
        nb = -(-s // block)
        tables[i, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), kv_heads * group, head_dim, generator=g)
    return q, k, v, tables, qsl, torch.tensor(seq_lens, dtype=torch.int32), block


@pytest.mark.parametrize(
    "q_lens,ctx_before",
    [
        ([1, 1, 1], [5, 40, 16]),  # decode
        ([7, 1, 20], [0, 33, 17]),  # fresh prefill, decode, prefill after cached context
        ([5], [100]),  # speculative verification rows
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_paged_attention_matches_reference(q_lens, ctx_before, dtype):
    from engine.models.attention import paged_reference

    q, k, v, bt, qsl, lens, block = _varlen_case(len(q_lens), q_lens, ctx_before)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = q.shape[-1] ** -0.5
    got = kernel.paged_attention(q, k, v, bt, qsl, lens, block, scale)
    want = paged_reference(q.float(), k.float(), v.float(), bt, qsl, lens, block, scale)
    tol = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize(
    "kv_heads,group,head_dim",
    [(4, 2, 64), (2, 4, 128), (1, 8, 80), (2, 1, 40), (1, 20, 16)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_head_shapes_and_long_chunks(kv_heads, group, head_dim, dtype):
    """Head dims with a compiled fast path (64, 128), without one (80) and not a multiple of 16
    (40); chunks of more than 16 query vectors (several work items per sequence, causal limits
    inside a tile), a group wider than one item (20 heads per KV head), many sequences (items
    over all KV heads) beside few (one KV head per item)."""
    from engine.models.attention import paged_reference

    q_lens = [37, 1, 1, 9, 1, 1, 1, 1, 1, 1]
    ctx = [50, 130, 17, 0, 1, 64, 15, 16, 33, 190]
    for lens in ((q_lens, ctx), (q_lens[:2], ctx[:2])):
        q, k, v, bt, qsl, sl, block = _varlen_case(
            11, *lens, kv_heads=kv_heads, group=group, head_dim=head_dim
        )
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        scale = head_dim**-0.5
        got = kernel.paged_attention(q, k, v, bt, qsl, sl, block, scale)
        want = paged_reference(q.float(), k.float(), v.float(), bt, qsl, sl, block, scale)
        tol = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got.float(), want, **tol)


def test_varlen_matches_reference_for_any_block_size():
    """Tiles of 16 positions cross block boundaries when blocks are smaller or not a divisor."""
    from engine.models.attention import paged_reference

    for block in (1, 5, 16, 48):
        q, k, v, bt, qsl, sl, _ = _varlen_case(3, [3, 1, 20], [40, 70, 25], block=block)
        got = kernel.paged_attention(q, k, v, bt, qsl, sl, block, 0.17)
        want = paged_reference(q, k, v, bt, qsl, sl, block, 0.17)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_varlen_empty_sequence_gives_zeros_and_store_kv_skips_minus_one():
    q, k, v, bt, qsl, lens, block = _varlen_case(7, [1, 1], [9, 0])
    lens[1] = 0  # a padding row of a static decode batch
    q = torch.cat([q, torch.randn(2, *q.shape[1:])])  # two rows no sequence owns
    out = kernel.paged_attention(q, k, v, bt, qsl, lens, block, 0.2)
    assert torch.count_nonzero(out[1:]) == 0 and torch.count_nonzero(out[0]) > 0
    kc, vc = k.clone(), v.clone()
    new_k = torch.randn(3, *k.shape[1:])
    new_v = torch.randn(3, *k.shape[1:])
    kernel.store_kv(new_k, new_v, kc, vc, torch.tensor([5, -1, 17]))
    assert torch.equal(kc[5], new_k[0]) and torch.equal(vc[17], new_v[2])
    changed = (kc != k).any(dim=(1, 2)).nonzero().flatten().tolist()
    assert changed == [5, 17]


def test_kernels_run_without_the_gil():
    """A serving replica's event loop keeps running Python while the engine thread is inside a
    kernel call: the kernels release the GIL."""
    import threading
    import time

    g = torch.Generator().manual_seed(11)
    batch, kv_heads, group, head_dim, ctx = 64, 4, 2, 64, 2048
    k = torch.randn(batch * ctx, kv_heads, head_dim, generator=g)
    v = torch.randn(batch * ctx, kv_heads, head_dim, generator=g)
    q = torch.randn(batch, kv_heads, group, head_dim, generator=g)
    slots = torch.arange(batch * ctx).view(batch, ctx)
    lens = torch.full((batch,), ctx)
    calls = 0
    done = threading.Event()

    def engine_loop():
        nonlocal calls
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:
            kernel.paged_decode(q, k, v, slots, lens, 0.125)
            calls += 1
        done.set()

    t = threading.Thread(target=engine_loop)
    ticks = 0
    t.start()
    while not done.is_set():
        ticks += 1  # pure Python: runs only while the other thread is not holding the GIL
        time.sleep(0)
    t.join()
    assert calls >= 1
    # Holding the GIL, the loop above would get a tick in only between calls (one per call, at
    # most a few); released, it spins throughout.
    assert ticks > 20 * calls, (ticks, calls)


def test_a_build_killed_midway_does_not_hang_the_next_load():
    """A build killed midway (Ctrl-C on a first start) leaves torch's lock file behind; the next
    process must still load the kernels, not wait for that file forever."""
    import subprocess
    import sys
    from pathlib import Path

    from engine import cpu_kernels

    build = cpu_kernels.build_dirs["paged_attention.cpp"]
    (build / "lock").write_text("")
    code = "from engine.cpu_kernels import paged_decode_kernel as k; assert k() is not None"
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, timeout=300, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (build / "lock").exists()
