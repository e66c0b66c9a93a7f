"""Decode batch buckets, padding and the graph runner's eager path (engine/cuda_graph.py): what
runs on CPU of the CUDA-graph path. The capture itself needs CUDA (bench/gpu_check.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import kernels
from engine.config import EngineConfig
from engine.cuda_graph import DecodeGraphRunner, batch_buckets, bucket_for


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


class ToyDecoder:
    """One attention layer over a paged cache that reads only its static buffers (as the model
    runner's decode does): embed, store K/V through the slots, paged decode, project to logits.
    ``fill`` pads like the runner: token 0 at position 0, slot -1, sequence length 0."""

    def __init__(self, max_rows, max_blocks, k_cache, v_cache, block_size, vocab=50):
        g = torch.Generator().manual_seed(1)
        self.heads, self.kv_heads, self.d = 4, 2, 8
        width = self.heads * self.d
        self.k_cache, self.v_cache, self.block_size = k_cache, v_cache, block_size
        self.emb = torch.randn(vocab, width, generator=g)
        self.pos = torch.randn(256, width, generator=g)
        self.wk = torch.randn(width, self.kv_heads * self.d, generator=g) / 6
        self.wv = torch.randn(width, self.kv_heads * self.d, generator=g) / 6
        self.out = torch.randn(width, vocab, generator=g)
        self.input_ids = torch.zeros(max_rows, dtype=torch.long)
        self.positions = torch.zeros(max_rows, dtype=torch.long)
        self.slot_mapping = torch.zeros(max_rows, dtype=torch.long)
        self.seq_lens = torch.zeros(max_rows, dtype=torch.int32)
        self.block_tables = torch.zeros(max_rows, max_blocks, dtype=torch.int32)
        self.calls: list[int] = []

    def load(self, ctx_lens: list[int], seed: int = 0) -> int:
        """Put a decode step in rows [0, n): requests at these lengths (new token included)."""
        rng = np.random.default_rng(seed)
        n, w = len(ctx_lens), self.block_tables.shape[1]
        perm = torch.from_numpy(rng.permutation(n * w).astype(np.int32) + 1)  # block 0 unused
        for i, c in enumerate(ctx_lens):
            used = -(-c // self.block_size)
            self.block_tables[i, :used] = perm[i * w : i * w + used]
            block = int(self.block_tables[i, (c - 1) // self.block_size])
            self.slot_mapping[i] = block * self.block_size + (c - 1) % self.block_size
        self.input_ids[:n] = torch.from_numpy(rng.integers(1, 50, n))
        self.positions[:n] = torch.tensor(ctx_lens) - 1
        self.seq_lens[:n] = torch.tensor(ctx_lens, dtype=torch.int32)
        return n

    def fill(self, num_real: int, num_padded: int) -> None:
        rows = slice(num_real, num_padded)
        self.input_ids[rows] = 0
        self.positions[rows] = 0
        self.slot_mapping[rows] = -1
        self.seq_lens[rows] = 0

    def forward(self, b: int) -> torch.Tensor:
        self.calls.append(b)
        x = self.emb[self.input_ids[:b]] + self.pos[self.positions[:b]]
        k = (x @ self.wk).view(b, self.kv_heads, self.d)
        v = (x @ self.wv).view(b, self.kv_heads, self.d)
        kernels.store_kv(k, v, self.k_cache, self.v_cache, self.slot_mapping[:b])
        o = kernels.paged_attention(
            x.view(b, self.heads, self.d),
            self.k_cache,
            self.v_cache,
            self.block_tables[:b],
            torch.arange(b + 1, dtype=torch.int32),
            self.seq_lens[:b],
            self.block_size,
            self.d**-0.5,
            max_query_len=1,
        )
        return o.reshape(b, -1) @ self.out


def test_padded_step_equals_unpadded_step():
    block_size, max_blocks = 4, 8
    num_slots = (16 * max_blocks + 1) * block_size  # load(): blocks 1..rows * max_blocks
    g = torch.Generator().manual_seed(2)
    k0 = torch.randn(num_slots, 2, 8, generator=g)  # earlier tokens' K/V: random
    v0 = torch.randn(num_slots, 2, 8, generator=g)
    lens = [3, 17, 9, 1, 30]  # 5 rows -> bucket 8

    k_ref, v_ref = k0.clone(), v0.clone()
    ref = ToyDecoder(5, max_blocks, k_ref, v_ref, block_size)
    want = ref.forward(ref.load(lens))  # unpadded, eager

    k, v = k0.clone(), v0.clone()
    toy = ToyDecoder(16, max_blocks, k, v, block_size)
    runner = DecodeGraphRunner(toy.forward, toy.fill, 16, torch.device("cpu"), use_graphs=True)
    assert not runner.use_graphs and runner.capture() == 0.0  # CPU: no graphs, eager "replay"
    toy.seq_lens.fill_(99)  # stale rows from an earlier, larger step
    toy.slot_mapping.fill_(5)
    got = runner(toy.load(lens))
    assert toy.calls == [8] and runner.num_eager == 1  # ran the padded bucket
    assert toy.slot_mapping[5:8].tolist() == [-1] * 3 and toy.seq_lens[5:8].tolist() == [0] * 3
    assert got.shape[0] == 8
    torch.testing.assert_close(got[:5], want, rtol=1e-6, atol=1e-6)
    assert torch.all(got[5:] == 0)  # padding rows attend to nothing
    # Only the real rows' slots changed (padding wrote nothing), to the unpadded step's values.
    for cache, before, after in ((k, k0, k_ref), (v, v0, v_ref)):
        changed = (cache != before).flatten(1).any(1).nonzero().flatten().tolist()
        assert changed == sorted(toy.slot_mapping[:5].tolist())
        torch.testing.assert_close(cache, after, rtol=1e-6, atol=1e-6)

    # A larger step, then a smaller one: each runs its own bucket.
    runner(toy.load([4, 8, 12, 2, 6, 10, 14, 7, 5, 3, 11], seed=3))
    assert toy.calls[-1] == 16
    runner(toy.load([3, 17], seed=4))
    assert toy.calls[-1] == 2


def test_step_beyond_the_buckets_runs_unpadded():
    toy = ToyDecoder(32, 4, torch.zeros(200, 2, 8), torch.zeros(200, 2, 8), 4)
    runner = DecodeGraphRunner(toy.forward, toy.fill, 6, torch.device("cpu"), use_graphs=False)
    assert runner.buckets == [1, 2, 4, 6]
    out = runner(toy.load([2] * 9))
    assert toy.calls == [9] and out.shape[0] == 9


def test_reallocated_buffers_drop_graphs():
    key = [1]
    runner = DecodeGraphRunner(
        lambda b: torch.zeros(b),
        lambda n, b: None,
        8,
        torch.device("cpu"),
        use_graphs=False,
        buffers_key=lambda: key[0],
    )
    runner.graphs[8] = (None, torch.zeros(8))  # stands for a captured graph
    runner._check_buffers()
    assert 8 in runner.graphs
    key[0] = 2
    runner._check_buffers()
    assert runner.graphs == {}


def test_enforce_eager_option():
    assert EngineConfig().enforce_eager is False
    assert EngineConfig.from_dict({"enforce_eager": True}).enforce_eager is True
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(enforce_eager="yes")


def test_engine_decode_through_the_graph_runner_equals_plain_decode(tmp_path):
    """The model runner's decode steps padded to buckets by DecodeGraphRunner (eager on CPU: the
    path CUDA replays) give the same greedy tokens as its plain decode; batches of 3 and 5
    requests pad to 4 and 8, and requests finishing at different steps shrink the batch."""
    from tiny_models import tiny_qwen2

    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    path = tiny_qwen2(tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 4000, (n,), generator=g).tolist() for n in (5, 40, 17, 3, 64)]
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 3, 12, 6, 7)
    ]

    def run(graph_runner: bool):
        eng = LLMEngine(EngineConfig(model=path, max_num_seqs=8))
        assert eng.runner.own and eng.runner.graph_runner is None  # CPU: plain decode
        sizes = []
        if graph_runner:
            gr = eng.runner.use_decode_graphs(True)
            assert not gr.use_graphs  # no CUDA here: eager over the padded buffers
            forward = gr.forward
            gr.forward = lambda b: sizes.append(b) or forward(b)
        tokens = [r.token_ids for r in eng.generate(prompts[:3], params[:3])]
        tokens += [r.token_ids for r in eng.generate(prompts, params)]
        return tokens, sizes

    want, _ = run(False)
    got, sizes = run(True)
    assert got == want
    assert 4 in sizes and 8 in sizes and set(sizes) <= {1, 2, 4, 8}
