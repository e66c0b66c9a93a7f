"""Tensor parallelism without Ray: layout checks, sharded forward == whole forward (shards as
threads over real gloo groups), and the engine with TP=2 (a second process) token-for-token equal to
TP=1 with prefix hits and preemption; a killed worker fails the step at once, never hangs."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from transformers import AutoConfig

from engine.async_engine import EngineDeadError
from engine.config import EngineConfig
from engine.engine_core import EngineCoreClient
from engine.llm_engine import LLMEngine
from engine.model_runner import ModelRunner
from engine.outputs import SchedulerOutput
from engine.sampling_params import SamplingParams
from engine.tensor_parallel import TPGroup, open_store, plan_heads
from engine.tp_runner import local_launcher, make_llm_engine


def _cfg(**kw):
    base = {"num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 1408}
    return AutoConfig.for_model("llama", **{**base, **kw})


# -- layout -----------------------------------------------------------------------------------
def test_plan_heads_splits_heads_and_mlp():
    s = plan_heads(_cfg(), 2, rank=1)
    assert (s.local_heads, s.local_kv_heads, s.kv_head_start) == (4, 2, 2)


def test_plan_heads_replicates_kv_heads_when_shards_outnumber_them():
    # 8 query heads, 2 KV heads, 4 shards: shards 0,1 read KV head 0; shards 2,3 KV head 1.
    cfg = _cfg(num_key_value_heads=2)
    starts = [plan_heads(cfg, 4, r).kv_head_start for r in range(4)]
    assert starts == [0, 0, 1, 1]
    assert all(plan_heads(cfg, 4, r).local_kv_heads == 1 for r in range(4))


@pytest.mark.parametrize(
    "kw,n,field",
    [
        ({}, 3, "num_attention_heads=8"),
        (
            {"num_attention_heads": 12, "num_key_value_heads": 4, "hidden_size": 768},
            6,
            "num_key_value_heads=4",
        ),
        ({"intermediate_size": 1410}, 4, "intermediate_size=1410"),
    ],
)
def test_plan_heads_refuses_impossible_layouts(kw, n, field):
    with pytest.raises(ValueError, match="tensor_parallel_size") as e:
        plan_heads(_cfg(**kw), n)
    assert field in str(e.value)


def test_engine_refuses_bad_layout_before_starting_workers():
    def launcher(init):  # must never be called
        raise AssertionError("workers started for an impossible layout")

    cfg = EngineConfig(model="demo-small", tensor_parallel_size=3, num_kv_blocks=16)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide"):
        make_llm_engine(cfg, launcher)


# -- sharded forward, shards as threads ----------------------------------------------------------
def _step(prompts: list[list[int]], block_size: int) -> SchedulerOutput:
    tables, first = [], 0
    for p in prompts:
        nb = -(-len(p) // block_size)
        tables.append(list(range(first, first + nb)))
        first += nb
    return SchedulerOutput(
        req_ids=[str(i) for i in range(len(prompts))],
        num_scheduled_tokens=[len(p) for p in prompts],
        num_computed_tokens=[0] * len(prompts),
        block_tables=tables,
        sample=[True] * len(prompts),
        spec_token_ids=[[] for _ in prompts],
    )


def _sharded_logits(cfg: EngineConfig, path: str, n: int, steps) -> list[torch.Tensor]:
    """Run ``steps`` [(SchedulerOutput, token_ids)] on n shards (threads); shard 0's logits."""
    store, port = open_store(n)
    out: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def shard(rank: int) -> None:
        try:
            if rank == 0:
                group = TPGroup(store, 0, n, torch.device("cpu"), timeout_s=30)
            else:
                group = TPGroup.join("127.0.0.1", port, rank, n, torch.device("cpu"), 30)
            runner = ModelRunner(cfg, path, tp_group=group)
            assert runner.kv_cache.k[0].shape[1] == plan_heads(runner.hf_config, n).local_kv_heads
            for sched, ids in steps:
                logits = runner.forward(sched, ids)
                if rank == 0:
                    out.append(logits)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=shard, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return out


# 4 shards > 2 KV heads: KV heads replicated. Our model code and transformers' modules.
@pytest.mark.parametrize("n,impl", [(2, "fleetlm"), (4, "fleetlm"), (2, "transformers")])
def test_sharded_forward_matches_whole_model(n, impl, tmp_path):
    from tiny_models import tiny_qwen2  # q/k/v biases, GQA 4 heads / 2 KV heads

    path = tiny_qwen2(tmp_path / "qwen2")
    cfg = EngineConfig(model=path, num_kv_blocks=32, block_size=4, num_threads=1, model_impl=impl)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 4000, (k,), generator=g).tolist() for k in (5, 9, 1)]
    prefill = _step(prompts, 4)
    # One decode step over the cached prompts (reads K/V of each shard's own heads back).
    nxt = [p + [7] for p in prompts]
    decode = SchedulerOutput(
        req_ids=prefill.req_ids,
        num_scheduled_tokens=[1] * 3,
        num_computed_tokens=[len(p) for p in prompts],
        block_tables=_step(nxt, 4).block_tables,
        sample=[True] * 3,
        spec_token_ids=[[] for _ in prompts],
    )
    steps = [(prefill, prompts), (decode, nxt)]
    whole = ModelRunner(cfg, path)
    want = [whole.forward(s, ids) for s, ids in steps]
    got = _sharded_logits(cfg, path, n, steps)
    for w, g_ in zip(want, got, strict=True):
        assert w.shape == g_.shape
        torch.testing.assert_close(g_, w, rtol=1e-4, atol=1e-4)


def test_shard_loads_its_own_slice_of_merged_projections(tmp_path):
    """Shard 1 of 2 (and shard 3 of 4, whose KV head is replicated) holds exactly its rows of q,
    k, v (biases too) and gate/up, and its columns of o_proj and down_proj."""
    from safetensors.torch import load_file
    from tiny_models import tiny_qwen2

    from engine.models import build_model

    path = tiny_qwen2(tmp_path / "qwen2")
    full = load_file(f"{path}/model.safetensors")
    hf = AutoConfig.from_pretrained(path)
    d = hf.hidden_size // hf.num_attention_heads
    for n, rank in ((2, 1), (4, 3)):
        split = plan_heads(hf, n, rank)
        m = build_model(hf, path, torch.device("cpu"), torch.float32, split, tp_group=None)
        attn, mlp = m.layers[1].self_attn, m.layers[1].mlp
        pre = "model.layers.1."
        q = slice(rank * split.local_heads * d, (rank + 1) * split.local_heads * d)
        kv = slice(split.kv_head_start * d, (split.kv_head_start + split.local_kv_heads) * d)
        inter = hf.intermediate_size // n
        ff = slice(rank * inter, (rank + 1) * inter)
        for kind in ("weight", "bias"):
            want = torch.cat(
                [
                    full[f"{pre}self_attn.{p}_proj.{kind}"][s]
                    for p, s in (("q", q), ("k", kv), ("v", kv))
                ]
            )
            assert torch.equal(getattr(attn.qkv_proj, kind), want)
        assert torch.equal(attn.o_proj.weight, full[f"{pre}self_attn.o_proj.weight"][:, q])
        want = torch.cat([full[f"{pre}mlp.{p}_proj.weight"][ff] for p in ("gate", "up")])
        assert torch.equal(mlp.gate_up_proj.weight, want)
        assert torch.equal(mlp.down_proj.weight, full[f"{pre}mlp.down_proj.weight"][:, ff])


# -- the engine, TP=2 in a second process -------------------------------------------------------
def _mixed_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(10, 4000, (k,), generator=g).tolist() for k in (1, 7, 17, 64, 129, 300)
    ]
    shared = torch.randint(10, 4000, (90,), generator=g).tolist()  # prefix of 3 prompts
    return prompts + [shared + torch.randint(10, 4000, (k,), generator=g).tolist() for k in (3, 40)]


GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# 32 blocks of 16 tokens is less than the batch needs at once: preemption happens.
ENGINE = {
    "model": "demo-small",
    "num_kv_blocks": 32,
    "max_num_batched_tokens": 256,
    "max_num_seqs": 8,
    "num_threads": 1,
}


def _run_rounds(engine: LLMEngine) -> list[list[int]]:
    prompts = _mixed_prompts()
    first = [r.token_ids for r in engine.generate(prompts, GREEDY)]
    # Second round: the shared prefix and whole prompts are cached now (prefix hits).
    second = [r.token_ids for r in engine.generate(prompts[-3:] + prompts[:2], GREEDY)]
    return first + second


@pytest.fixture(scope="module")
def tp1_tokens():
    engine = LLMEngine(EngineConfig(**ENGINE))
    tokens = _run_rounds(engine)
    s = engine.stats()
    assert s.num_preemptions > 0 and s.prefix_cache_hit_tokens > 0, s
    return tokens


def test_tp2_greedy_equals_tp1_with_prefix_hits_and_preemption(tp1_tokens):
    engine = make_llm_engine(EngineConfig(**ENGINE, tensor_parallel_size=2))
    try:
        assert engine.runner.num_blocks == 32
        tokens = _run_rounds(engine)
        s = engine.stats()
        assert s.num_preemptions > 0 and s.prefix_cache_hit_tokens > 0, s
        assert engine.runner.comm_s > 0
    finally:
        engine.runner.shutdown()
    assert len(tokens) == len(tp1_tokens)
    for i, (a, b) in enumerate(zip(tokens, tp1_tokens, strict=True)):
        assert a == b, f"prompt {i}: TP=2 {a} != TP=1 {b}"
    # Clean shutdown: the worker process left its loop and exited.
    assert engine.runner.workers.dead() is not None
    assert all(p.exitcode == 0 for p in engine.runner.workers.procs)


def test_killed_worker_fails_requests_and_health_promptly():
    """The engine core process drives the shards (started by its parent, as a replica does)."""
    engine = EngineCoreClient(
        EngineConfig(**ENGINE, tensor_parallel_size=2), launcher=local_launcher
    )
    try:
        engine.check_health()
        proc = engine.workers.procs[0]
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

        async def consume() -> tuple[int, BaseException | None]:
            got = 0
            engine.add("r1", [11, 12, 13], long)
            try:
                while True:
                    for out in await engine.outputs():
                        got += len(out.new_token_ids)
                    if got >= 3 and proc.is_alive():
                        proc.kill()  # mid-request
            except EngineDeadError as e:
                return got, e

        t0 = time.monotonic()
        got, err = asyncio.run(asyncio.wait_for(consume(), timeout=60))
        assert err is not None and got < 400, got
        assert "engine core failed" in str(err)
        assert time.monotonic() - t0 < 30
        with pytest.raises(RuntimeError):
            engine.check_health()
    finally:
        engine.shutdown()


# -- the cluster YAML refuses impossible layouts -------------------------------------------------
@pytest.mark.parametrize(
    "entry,needle",
    [
        ({"model": "demo", "tensor_parallel_size": 3}, "num_attention_heads=8"),
        ({"model": "demo-small", "tensor_parallel_size": 8}, "num_attention_heads=4"),
        (
            {"tensor_parallel_size": 2, "resources_per_replica": {"num_gpus": 3}},
            "num_gpus=3.0 must be a multiple of tensor_parallel_size=2",
        ),
    ],
)
def test_cluster_config_refuses_impossible_tp_layouts(entry, needle):
    from cluster.config import ConfigError, parse_cluster_config

    yaml_text = "models:\n- " + "\n  ".join(f"{k}: {v}" for k, v in {"name": "m", **entry}.items())
    with pytest.raises(ConfigError, match="tensor_parallel_size") as e:
        parse_cluster_config(yaml_text.replace("'", '"'), "c.yaml")
    assert needle in str(e.value) and "c.yaml:" in str(e.value)


def test_cluster_config_accepts_replicated_kv_heads():
    from cluster.config import parse_cluster_config

    cfg = parse_cluster_config("models:\n- name: m\n  model: demo-small\n  tensor_parallel_size: 4")
    assert cfg.models[0].engine_config().tensor_parallel_size == 4


# -- placement: more shards than the cluster can place ---------------------------------------------
@pytest.mark.parametrize(
    "bundles,strategy,nodes,ok",
    [
        ([{"CPU": 1}] * 2, "PACK", [{"CPU": 2}], True),
        ([{"CPU": 1}] * 2, "PACK", [{"CPU": 1}, {"CPU": 1}], True),  # PACK is soft: spans nodes
        ([{"CPU": 1}] * 2, "STRICT_PACK", [{"CPU": 1}, {"CPU": 1}], False),
        ([{"CPU": 1, "GPU": 1}] * 4, "PACK", [{"CPU": 8, "GPU": 2}], False),
        ([{"CPU": 1, "GPU": 1}] * 4, "SPREAD", [{"CPU": 8, "GPU": 2}] * 2, True),
        ([{"CPU": 3}], "PACK", [{"CPU": 2}, {"CPU": 2}], False),
    ],
)
def test_placement_problem(bundles, strategy, nodes, ok):
    from deployments.tp_worker import placement_problem

    problem = placement_problem(bundles, strategy, nodes)
    assert (problem is None) == ok, problem


def test_hung_peer_times_out_instead_of_hanging():
    # Shard 1 joins but never takes part in the all-reduce: shard 0 must raise, not wait forever.
    store, port = open_store(2)
    joined = threading.Event()
    release = threading.Event()

    def idle_shard() -> None:
        peer = TPGroup.join("127.0.0.1", port, 1, 2, torch.device("cpu"), timeout_s=1)
        joined.set()
        release.wait(30)  # alive and connected, but silent
        del peer

    t = threading.Thread(target=idle_shard, daemon=True)
    t.start()
    group = TPGroup(store, 0, 2, torch.device("cpu"), timeout_s=1)
    assert joined.wait(30)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="(?i)timed out|timeout"):
        group.all_reduce(torch.ones(4))
    assert 0.9 < time.monotonic() - t0 < 15
    release.set()


def test_tp2_speculative_ngram_equals_tp1():
    # Draft tokens ride in the broadcast windows; verification reads shard 0's logits rows.
    spec = {"method": "ngram", "num_tokens": 3}
    prompt = [5, 6, 7, 8, 9] * 12 + [5, 6]  # repetitive: the n-gram proposer has drafts
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cfg = {**ENGINE, "speculative": spec}
    want = LLMEngine(EngineConfig(**cfg)).generate([prompt, prompt[:20]], params)
    engine = make_llm_engine(EngineConfig(**cfg, tensor_parallel_size=2))
    try:
        got = engine.generate([prompt, prompt[:20]], params)
        assert engine.stats().spec_draft_tokens > 0
    finally:
        engine.runner.shutdown()
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
