"""W2 routing in simulated time: the real router and the real engine scheduler and block manager.

No Ray, no model: each replica is an engine Scheduler + BlockManager whose steps take
``step_s + token_s * scheduled tokens`` of simulated time (sampled tokens are random); the router
is router.router_state.RouterState with a policy from router/registry.py, fed with the replicas'
routing stats (router/replica_stats.py) every ``stats_period_s``, ``stats_lag_s`` after they were
taken. A closed loop keeps ``concurrency`` requests in flight, as bench/routing.py's client does.
A run takes about a second, so policies, parameters and cache sizes can be compared over many
seeds; bench/routing.py measures the served system.

Besides hit rate and mean TTFT, it splits every request's prefix outcome: hit (the whole shared
prefix was cached), first (its group's first request on that replica), same_step (another request
of its group was admitted in the same step, so neither found it cached) and evicted (the replica
had it before). It also counts decisions by reason and the groups that ran on both replicas.

    python -m bench.routing_sim --kv 308 372 --imbalance 8 16 --seeds 8
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
from collections import Counter
from typing import Any

from cluster.bench.workloads import make_workload
from engine.block_hash import block_hashes
from engine.block_manager import BlockManager
from engine.outputs import EngineStats
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request
from router.registry import make_policy
from router.replica_stats import ReplicaCacheTracker
from router.router_state import RouterState

BLOCK_SIZE = 16


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Replica:
    def __init__(self, rid: str, kv_blocks: int, eviction: str = "lru") -> None:
        self.rid = rid
        self.bm = BlockManager(kv_blocks, BLOCK_SIZE, eviction=eviction)
        self.sch = Scheduler(self.bm, 64, 2048, 4096)
        self.tracker = ReplicaCacheTracker(BLOCK_SIZE)
        self.busy = False
        self.groups: Counter[str] = Counter()  # requests per group sent here
        self.seen: set[str] = set()  # groups admitted here so far


def simulate(
    policy: str = "prefix_aware",
    kv_blocks: int = 372,
    replicas: int = 2,
    seed: int = 0,
    assumed_ttl_s: float = 30.0,
    stats_period_s: float = 1.0,
    stats_lag_s: float = 0.3,
    step_s: float = 0.02,
    token_s: float = 0.0006,
    groups: int = 16,
    prompts_per_group: int = 16,
    prefix_len: int = 512,
    question_len: int = 64,
    output_len: int = 64,
    concurrency: int = 16,
    eviction: str = "lru",
    **policy_params: Any,
) -> dict[str, Any]:
    rng = random.Random(seed)
    clock = _Clock()
    wl = make_workload(
        "W2",
        seed=seed,
        groups=groups,
        prompts_per_group=prompts_per_group,
        prefix_len=prefix_len,
        question_len=question_len,
        output_len=output_len,
        concurrency=concurrency,
    )
    state = RouterState(make_policy(policy, **policy_params), assumed_ttl_s, clock)
    reps = [_Replica(f"r{i}", kv_blocks, eviction) for i in range(replicas)]
    by_id = {r.rid: r for r in reps}
    ids = [r.rid for r in reps]
    events: list[tuple[float, int, str, Any]] = []
    counter = 0

    def push(t: float, kind: str, data: Any) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (t, counter, kind, data))

    todo = list(wl.requests)
    tags: dict[str, str] = {}
    sent_at: dict[str, float] = {}
    ttft: list[float] = []
    reasons: Counter[str] = Counter()
    outcome: Counter[str] = Counter()
    admitted_ids: set[str] = set()

    def send() -> None:
        if not todo:
            return
        spec = todo.pop(0)
        rid = f"q{len(wl.requests) - len(todo)}"
        d = state.choose(rid, block_hashes(spec.prompt, BLOCK_SIZE), ids)
        reasons[state.on_routed(rid, d.replica_id) or "?"] += 1
        r = by_id[d.replica_id]
        r.groups[spec.tag] += 1
        tags[rid], sent_at[rid] = spec.tag, clock.t
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        r.sch.add(Request(rid, list(spec.prompt), params, BLOCK_SIZE))
        if not r.busy:
            r.busy = True
            push(clock.t, "step", r)

    for _ in range(concurrency):
        send()
    for i, r in enumerate(reps):
        push(stats_period_s * (i + 1) / (replicas + 1), "stats", r)
    while events:
        t, _, kind, data = heapq.heappop(events)
        clock.t = t
        if kind == "stats":
            r = data
            if not todo and not any(x.sch.has_unfinished() for x in reps):
                continue
            r.tracker.apply_events(r.bm.pop_events())
            stats = EngineStats(
                len(r.sch.waiting),
                len(r.sch.running),
                r.bm.num_free_blocks,
                kv_blocks,
                0,
                0,
                0,
                0,
                0,
            )
            push(t + stats_lag_s, "report", (r.rid, r.tracker.routing_stats(stats)))
            push(t + stats_period_s, "stats", r)
        elif kind == "report":
            state.update_stats(*data)
        elif kind == "step":
            r = data
            if not r.sch.has_unfinished():
                r.busy = False
                continue
            out, scheduled = r.sch.schedule()
            admitted: Counter[str] = Counter()
            for req in scheduled:
                if req.request_id not in admitted_ids:
                    admitted_ids.add(req.request_id)
                    g = tags[req.request_id]
                    if req.num_cached_tokens >= prefix_len // BLOCK_SIZE * BLOCK_SIZE:
                        outcome["hit"] += 1
                    elif g not in r.seen:
                        outcome["first"] += 1
                    elif admitted[g]:
                        outcome["same_step"] += 1
                    else:
                        outcome["evicted"] += 1
                    admitted[g] += 1
                    r.seen.add(g)
            dt = step_s + token_s * sum(out.num_scheduled_tokens)
            push(t + dt, "done", (r, out, scheduled))
        elif kind == "done":
            r, out, scheduled = data
            sampled = []
            for req, sample in zip(scheduled, out.sample, strict=True):
                if sample and req.num_output_tokens == 0 and req.num_preemptions == 0:
                    ttft.append(t - sent_at[req.request_id])
                sampled.append([rng.randrange(16, 4096)] if sample else [])
            for req in r.sch.update(scheduled, out.num_scheduled_tokens, sampled):
                state.on_completed(req.request_id)
                send()
            push(t, "step", r)
    query = sum(r.bm.query_tokens for r in reps)
    return {
        "hit_rate": sum(r.bm.hit_tokens for r in reps) / query,
        "mean_ttft_s": statistics.fmean(ttft),
        "duration_s": clock.t,
        "preemptions": sum(r.sch.num_preemptions for r in reps),
        "decisions": dict(reasons),
        "prefix_outcome": dict(outcome),
        "groups_per_replica": [len(r.groups) for r in reps],
        "groups_on_every_replica": sum(
            1 for g in {t for r in reps for t in r.groups} if all(r.groups[g] for r in reps)
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policies", default="prefix_aware,pow2,round_robin")
    p.add_argument("--kv", type=int, nargs="+", default=[372], help="KV blocks per replica")
    p.add_argument("--imbalance", type=int, nargs="+", default=[8], help="prefix_aware only")
    p.add_argument("--assumed-ttl-s", type=float, default=30.0)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument(
        "--eviction",
        nargs="+",
        default=["lru"],
        choices=["lru", "slru"],
        help="the replicas' prefix-cache eviction (EngineConfig.prefix_cache_eviction)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="every run, not just means")
    a = p.parse_args(argv)
    for kv, ev in itertools.product(a.kv, a.eviction):
        for policy in [s.strip() for s in a.policies.split(",") if s.strip()]:
            imbalances = a.imbalance if policy == "prefix_aware" else [None]
            for imb in imbalances:
                params = {"imbalance": imb} if imb is not None else {}
                rows = [
                    simulate(
                        policy, kv, seed=s, assumed_ttl_s=a.assumed_ttl_s, eviction=ev, **params
                    )
                    for s in range(a.seeds)
                ]
                if a.verbose:
                    for row in rows:
                        print(row)
                bal = statistics.fmean(r["decisions"].get("balance", 0) for r in rows)
                print(
                    f"kv={kv} {ev} {policy}{'' if imb is None else f' imbalance={imb}'}: hit rate "
                    f"{statistics.fmean(r['hit_rate'] for r in rows):.3f}, mean TTFT "
                    f"{statistics.fmean(r['mean_ttft_s'] for r in rows):.3f} s, balance "
                    f"decisions {bal:.1f}, split groups "
                    f"{statistics.fmean(r['groups_on_every_replica'] for r in rows):.1f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
