"""W1 with one shard vs two tensor-parallel shards (a second local process over gloo), same cores.

TP=1 runs with all ``--threads`` torch threads; each TP=2 shard with half of them (two OpenMP pools
that both want every core run several times slower). Runs are interleaved; figures are medians.
Also checks that both give the same greedy tokens, and splits shard 0's communication time into the
per-step control broadcast and the all-reduces (2 per layer; the time includes waiting for the
slower shard, which is where load imbalance on shared cores shows up).

    python bench/tp.py --json out/tp.json [--model demo] [--repeats 3]

On a 2-core CPU, TP cannot beat TP=1 (same cores, same FLOPs, plus communication); the point is
correctness and the overhead per step. Decode bound for W1 here: ~1,000 output tok/s (WORKLOADS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.demo import resolve_model
from engine.sampling_params import SamplingParams
from engine.tp_runner import make_llm_engine


def w1_prompts(n: int, length: int = 128, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 4000, (length,), generator=g).tolist() for _ in range(n)]


def run(engine: LLMEngine, prompts, out_len: int) -> tuple[float, int, list[list[int]]]:
    """(output tok/s, engine steps, tokens)."""
    engine.block_manager.reset_prefix_cache()  # W1 measures compute, not cache hits
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    steps0 = engine.num_steps
    t = time.perf_counter()
    res = engine.generate(prompts, sp)
    dt = time.perf_counter() - t
    assert all(len(r.token_ids) == out_len for r in res)
    return len(prompts) * out_len / dt, engine.num_steps - steps0, [r.token_ids for r in res]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores to use")
    ap.add_argument("--json", default=None, help="write figures here too")
    args = ap.parse_args()

    path = resolve_model(args.model)
    prompts = w1_prompts(args.num_prompts)
    common = {
        "model": path,
        "max_num_seqs": max(64, args.num_prompts),
        "max_num_batched_tokens": 2048,
        "num_kv_blocks": 2 * args.num_prompts * ((128 + args.output_len) // 16 + 1),
    }
    t0 = time.perf_counter()
    tp2 = make_llm_engine(
        EngineConfig(**common, tensor_parallel_size=2, num_threads=max(1, args.threads // 2))
    )
    start_s = time.perf_counter() - t0
    tp1 = LLMEngine(EngineConfig(**common, num_threads=args.threads))
    group = tp2.runner.group
    try:
        for e in (tp1, tp2):  # warm-up
            run(e, prompts[:4], 4)
        r1, r2, comm, bcast, ar, steps2 = [], [], [], [], [], []
        mismatched = 0
        for _ in range(args.repeats):
            rate, _, tok1 = run(tp1, prompts, args.output_len)
            r1.append(rate)
            c0, b0, a0 = group.comm_s, group.broadcast_s, group.allreduce_s
            rate, n, tok2 = run(tp2, prompts, args.output_len)
            r2.append(rate)
            steps2.append(n)
            comm.append((group.comm_s - c0) / n * 1e3)
            bcast.append((group.broadcast_s - b0) / n * 1e3)
            ar.append((group.allreduce_s - a0) / n * 1e3)
            mismatched = max(mismatched, sum(a != b for a, b in zip(tok1, tok2, strict=True)))
    finally:
        tp2.runner.shutdown()
    result = {
        "tp1_tok_s": statistics.median(r1),
        "tp2_tok_s": statistics.median(r2),
        "comm_ms_per_step": statistics.median(comm),
        "broadcast_ms_per_step": statistics.median(bcast),
        "allreduce_ms_per_step": statistics.median(ar),
        "allreduces_per_step": 2 * tp2.runner.hf_config.num_hidden_layers,
        "steps": statistics.median(steps2),
        "tp2_start_s": start_s,
        "requests_with_different_tokens": mismatched,
        "model": args.model,
        "threads": args.threads,
        "repeats": args.repeats,
    }
    print(
        f"W1 ({args.num_prompts}x128 prompt, {args.output_len} out, greedy, {args.model}, "
        f"{args.threads} threads), median of {args.repeats}:\n"
        f"  TP=1 {result['tp1_tok_s']:8.1f} output tok/s\n"
        f"  TP=2 {result['tp2_tok_s']:8.1f} output tok/s "
        f"({result['tp2_tok_s'] / result['tp1_tok_s']:.2f}x)\n"
        f"  TP=2 communication per step on shard 0: {result['comm_ms_per_step']:.2f} ms "
        f"(broadcast {result['broadcast_ms_per_step']:.2f}, "
        f"{result['allreduces_per_step']} all-reduces {result['allreduce_ms_per_step']:.2f}), "
        f"{result['steps']} steps\n"
        f"  requests whose greedy tokens differ TP=2 vs TP=1: {mismatched} of {len(prompts)}"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
