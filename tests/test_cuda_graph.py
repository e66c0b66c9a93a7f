"""Decode batch buckets, padding and the graph runner's eager path (engine/cuda_graph.py): what
runs on CPU of the CUDA-graph path. The capture itself needs CUDA (bench/gpu_check.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import kernels
from engine.config import EngineConfig
from engine.cuda_graph import (
    DecodeGraphRunner,
    DecodeInputs,
    StaticDecodeBuffers,
    batch_buckets,
    bucket_for,
)


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]
    assert batch_buckets(128)[-3:] == [96, 112, 128]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(1) == [1]
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_bucket_for():
    buckets = batch_buckets(100)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 17, 64, 65, 97, 100)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        24,
        64,
        80,
        100,
        100,
    ]
    assert bucket_for(101, buckets) is None
    with pytest.raises(ValueError):
        bucket_for(0, buckets)


def decode_inputs(ctx_lens: list[int], block_size: int, max_blocks: int, seed: int = 0):
    """Requests at context lengths ``ctx_lens`` (the new token included) over distinct blocks."""
    rng = np.random.default_rng(seed)
    n = len(ctx_lens)
    perm = rng.permutation(n * max_blocks).astype(np.int32) + 1  # block 0 stays untouched
    tables = np.zeros((n, max_blocks), np.int32)
    slots = np.zeros(n, np.int64)
    for i, c in enumerate(ctx_lens):
        used = -(-c // block_size)
        tables[i, :used] = perm[i * max_blocks : i * max_blocks + used]
        slots[i] = tables[i, (c - 1) // block_size] * block_size + (c - 1) % block_size
    return DecodeInputs(
        input_ids=rng.integers(1, 50, n).astype(np.int64),
        positions=np.array(ctx_lens, np.int64) - 1,
        slot_mapping=slots,
        context_lens=np.array(ctx_lens, np.int32),
        block_tables=tables,
    )


def test_padding_rows_write_nowhere_and_attend_to_nothing():
    inp = decode_inputs([3, 17, 9], block_size=4, max_blocks=6)
    pad = inp.padded(8)
    assert pad.num_rows == 8
    for name in ("input_ids", "positions", "slot_mapping", "context_lens", "block_tables"):
        assert np.array_equal(getattr(pad, name)[:3], getattr(inp, name)), name
        assert getattr(pad, name).dtype == getattr(inp, name).dtype, name
    assert pad.slot_mapping[3:].tolist() == [-1] * 5
    assert pad.context_lens[3:].tolist() == [0] * 5
    assert pad.input_ids[3:].tolist() == [0] * 5 and pad.positions[3:].tolist() == [0] * 5
    assert pad.block_tables[3:].shape == (5, 6) and not pad.block_tables[3:].any()
    assert inp.padded(3).num_rows == 3
    with pytest.raises(ValueError):
        inp.padded(2)


def test_fill_copies_rows_in_place():
    buf = StaticDecodeBuffers.allocate(8, 10, torch.device("cpu"))
    ptrs = [t.data_ptr() for t in (buf.input_ids, buf.block_tables)]
    buf.block_tables.fill_(7)
    inp = decode_inputs([5, 2], block_size=4, max_blocks=3).padded(4)
    buf.fill(inp)
    assert [t.data_ptr() for t in (buf.input_ids, buf.block_tables)] == ptrs
    assert buf.input_ids[:4].tolist() == inp.input_ids.tolist()
    assert buf.slot_mapping[:4].tolist() == inp.slot_mapping.tolist()
    assert buf.context_lens.dtype == torch.int32
    assert buf.context_lens[:4].tolist() == inp.context_lens.tolist()
    assert buf.block_tables[:4, :3].tolist() == inp.block_tables.tolist()
    assert (buf.block_tables[:4, 3:] == 7).all()  # past a row's blocks: never read (ctx bound)
    with pytest.raises(ValueError):
        buf.fill(decode_inputs([1] * 9, 4, 3))
    with pytest.raises(ValueError):
        buf.fill(decode_inputs([1], 4, 11))


class ToyDecoder:
    """One attention layer over the paged cache, reading only the static buffers (as the model
    runner's decode does): embed, store K/V through the slots, paged decode, project to logits."""

    def __init__(self, buffers, k_cache, v_cache, block_size, vocab=50, heads=4, kv_heads=2, d=8):
        g = torch.Generator().manual_seed(1)
        self.buf, self.k_cache, self.v_cache = buffers, k_cache, v_cache
        self.block_size, self.heads, self.kv_heads, self.d = block_size, heads, kv_heads, d
        self.emb = torch.randn(vocab, heads * d, generator=g)
        self.pos = torch.randn(256, heads * d, generator=g)
        self.wk = torch.randn(heads * d, kv_heads * d, generator=g) / 6
        self.wv = torch.randn(heads * d, kv_heads * d, generator=g) / 6
        self.out = torch.randn(heads * d, vocab, generator=g)
        self.calls: list[int] = []

    def forward(self, b: int) -> torch.Tensor:
        self.calls.append(b)
        buf = self.buf
        x = self.emb[buf.input_ids[:b]] + self.pos[buf.positions[:b]]
        k = (x @ self.wk).view(b, self.kv_heads, self.d)
        v = (x @ self.wv).view(b, self.kv_heads, self.d)
        kernels.store_kv(k, v, self.k_cache, self.v_cache, buf.slot_mapping[:b])
        o = kernels.paged_decode(
            x.view(b, self.heads, self.d),
            self.k_cache,
            self.v_cache,
            buf.block_tables[:b],
            buf.context_lens[:b],
            self.block_size,
            self.d**-0.5,
        )
        return o.reshape(b, -1) @ self.out


def test_padded_step_equals_unpadded_step():
    block_size, max_blocks = 4, 8
    num_slots = (16 * max_blocks + 1) * block_size  # decode_inputs: blocks 1..rows * max_blocks
    g = torch.Generator().manual_seed(2)
    k0 = torch.randn(num_slots, 2, 8, generator=g)  # earlier tokens' K/V: random
    v0 = torch.randn(num_slots, 2, 8, generator=g)
    inp = decode_inputs([3, 17, 9, 1, 30], block_size, max_blocks)  # 5 rows -> bucket 8

    k_ref, v_ref = k0.clone(), v0.clone()
    ref_buf = StaticDecodeBuffers.allocate(5, max_blocks, torch.device("cpu"))
    ref_buf.fill(inp)
    want = ToyDecoder(ref_buf, k_ref, v_ref, block_size).forward(5)  # unpadded, eager

    k, v = k0.clone(), v0.clone()
    buf = StaticDecodeBuffers.allocate(16, max_blocks, torch.device("cpu"))
    toy = ToyDecoder(buf, k, v, block_size)
    runner = DecodeGraphRunner(toy.forward, buf, max_num_seqs=16, use_graphs=True)
    assert not runner.use_graphs and runner.capture() == 0.0  # CPU: no graphs, eager "replay"
    got = runner.run(inp)
    assert toy.calls == [8] and runner.num_eager == 1  # ran the padded bucket
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # Only the real rows' slots changed (padding wrote nothing), to the unpadded step's values.
    for cache, before, ref in ((k, k0, k_ref), (v, v0, v_ref)):
        changed = (cache != before).flatten(1).any(1).nonzero().flatten().tolist()
        assert changed == sorted(inp.slot_mapping.tolist())
        torch.testing.assert_close(cache, ref, rtol=1e-6, atol=1e-6)
    assert buf.slot_mapping[5:8].tolist() == [-1] * 3

    # A larger step next, then a smaller one: each reads only its own rows.
    inp2 = decode_inputs([4, 8, 12, 2, 6, 10, 14, 7, 5, 3, 11], block_size, max_blocks, seed=3)
    runner.run(inp2)
    assert toy.calls[-1] == 16
    again = runner.run(decode_inputs([3, 17], block_size, max_blocks, seed=4))
    assert toy.calls[-1] == 2 and again.shape[0] == 2
    with pytest.raises(ValueError):
        runner.run(decode_inputs([1] * 17, block_size, max_blocks))
    assert runner.can_run(16) and not runner.can_run(17)


def test_enforce_eager_option():
    assert EngineConfig().enforce_eager is False
    assert EngineConfig.from_dict({"enforce_eager": True}).enforce_eager is True
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(enforce_eager="yes")
