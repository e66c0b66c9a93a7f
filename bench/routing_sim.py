"""Routing in simulated time: the real router and the real engine scheduler and block manager.

No Ray, no model: each replica is an engine Scheduler + BlockManager whose steps take
``step_s + token_s * scheduled tokens`` of simulated time (sampled tokens are random); the router
is router.router_state.RouterState with a policy from router/registry.py, fed with the replicas'
routing stats (router/replica_stats.py) every ``stats_period_s``, ``stats_lag_s`` after they were
taken. A run takes about a second, so policies, parameters and cache sizes can be compared over
many seeds; bench/routing.py measures the served system.

Two workloads:
- W2 (``simulate``): a closed loop keeps ``concurrency`` requests in flight, as bench/routing.py's
  client does. Besides hit rate and mean TTFT, it splits every request's prefix outcome: hit (the
  whole shared prefix was cached), first (its group's first request on that replica), same_step
  (another request of its group was admitted in the same step, so neither found it cached) and
  evicted (the replica had it before). It also counts decisions by reason and the groups that ran
  on both replicas.
- W6 (``simulate_w6``, bench/w6.py): Poisson arrivals on a ramp of rates, any number of replicas;
  per rate: mean/p90 TTFT, output tok/s, hit rate and the ideal, failed requests (TTFT over
  ``timeout_s``) and every replica's queue depth over time. Each step starts once the previous
  one has drained, as bench/routing.py's client runs them. Ray Serve's PrefixCacheAffinityRouter
  runs here as ``ray_prefix_affinity``: Ray's own PrefixTree class (a plain class; Ray wraps it in
  an actor only to share it between routers) driven by the decision procedure of Ray's router
  (RayPrefixAffinitySim), with replica queue lengths taken exact and fresh (as good as Ray's
  probes can be). ``--shift`` runs the W6 tenants' prompts for the first half of the requests and
  a new set of tenants for the second (prefix_cache_eviction lru vs slru).

    python -m bench.routing_sim --kv 372 --imbalance 8 16 --seeds 8
    python -m bench.routing_sim --workload w6 --replicas 8 32 --rates 4 8 16
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.w6 import W6, ideal_hit_rates, tenant_of
from cluster.bench.workloads import RequestSpec, make_workload
from engine.block_hash import block_hashes
from engine.block_manager import BlockManager
from engine.outputs import EngineStats
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request
from router.prefix_index import DEFAULT_ASSUMED_TTL_S
from router.registry import make_policy
from router.replica_stats import ReplicaCacheTracker
from router.router_state import RouterState

BLOCK_SIZE = 16
W6_POLICIES = ("prefix_aware", "ray_prefix_affinity", "pow2", "round_robin")


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Replica:
    def __init__(self, rid: str, kv_blocks: int, eviction: str) -> None:
        self.rid = rid
        self.kv_blocks = kv_blocks
        self.bm = BlockManager(kv_blocks, BLOCK_SIZE, eviction=eviction)
        self.sch = Scheduler(self.bm, 64, 2048, 4096)
        self.tracker = ReplicaCacheTracker(BLOCK_SIZE)
        self.busy = False
        self.outstanding = 0  # requests sent here and not finished (Ray's queue length)
        self.groups: Counter[str] = Counter()  # requests per group sent here
        self.seen: set[str] = set()  # groups admitted here so far

    def engine_stats(self) -> EngineStats:
        return EngineStats(
            len(self.sch.waiting),
            len(self.sch.running),
            self.bm.num_free_blocks,
            self.kv_blocks,
            0,
            0,
            0,
            0,
            0,
        )


class FleetlmRouter:
    """router.router_state.RouterState with a router/registry.py policy, fed by stats reports."""

    def __init__(self, policy: str, assumed_ttl_s: float, clock: _Clock, **params: Any) -> None:
        self.state = RouterState(make_policy(policy, **params), assumed_ttl_s, clock)
        self.reasons: Counter[str] = Counter()

    def route(self, rid: str, spec: RequestSpec, replicas: Sequence[_Replica]) -> str:
        ids = [r.rid for r in replicas]
        d = self.state.choose(rid, block_hashes(spec.prompt, BLOCK_SIZE), ids)
        self.reasons[self.state.on_routed(rid, d.replica_id) or "?"] += 1
        return d.replica_id

    def report(self, replica_id: str, stats: dict[str, Any]) -> None:
        self.state.update_stats(replica_id, stats)

    def completed(self, rid: str) -> None:
        self.state.on_completed(rid)


class RayPrefixAffinitySim:
    """Ray Serve 2.60's PrefixCacheAffinityRouter decision, on Ray's own PrefixTree class.

    Per request (ray/llm/_internal/serve/routing_policies/prefix_aware/prefix_aware_router.py):
    the pow2 fallback pair is drawn first; if max - min queue length over the candidates is at
    most ``imbalanced_threshold`` (default inf), the tree's longest text match picks the replicas
    sharing it, or, under ``match_rate_threshold`` of the prompt, the replicas with the fewest
    characters in the tree; otherwise the pow2 pair. Among those, the lowest queue length wins
    (the earliest on ties), and the prompt is inserted into the tree under the chosen replica.
    Queue length = requests sent to the replica and not finished.
    """

    def __init__(
        self,
        clock: _Clock,
        seed: int = 0,
        imbalanced_threshold: float = float("inf"),
        match_rate_threshold: float = 0.1,
    ) -> None:
        from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree

        from deployments.ray_prefix_router import routing_text

        self._text = routing_text

        self.tree = PrefixTree()
        self.clock = clock
        self.rng = random.Random(seed)
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold
        self.reasons: Counter[str] = Counter()
        self._known: set[str] = set()

    def route(self, rid: str, spec: RequestSpec, replicas: Sequence[_Replica]) -> str:
        new = [r.rid for r in replicas if r.rid not in self._known]
        if new:
            self.tree.add_tenants(new, self.clock())
            self._known.update(new)
        text = self._text(list(spec.prompt))
        loads = {r.rid: r.outstanding for r in replicas}
        ids = [r.rid for r in replicas]
        chosen = self.rng.sample(ids, 2) if len(ids) > 1 else ids
        reason = "pow2"
        if max(loads.values()) - min(loads.values()) <= self.imbalanced_threshold:
            matched, tenants = self.tree.prefix_match(text, ids)
            if len(matched) / len(text) < self.match_rate_threshold:
                smallest = self.tree.get_smallest_tenants()
                if smallest:
                    chosen, reason = smallest, "smallest_tenant"
            elif tenants:
                chosen, reason = tenants, "prefix_match"
        best = min(chosen, key=lambda rid_: loads[rid_])  # min() keeps the earliest on ties
        self.tree.insert(text, best, self.clock())
        self.reasons[reason] += 1
        return best

    def report(self, replica_id: str, stats: dict[str, Any]) -> None:
        pass  # Ray's router reads no replica stats, only queue lengths

    def completed(self, rid: str) -> None:
        pass


class _Sim:
    """Replicas stepping in simulated time, a router, and stats reports between them."""

    def __init__(
        self,
        router_factory: Callable[[_Clock], Any],
        replicas: int,
        kv_blocks: int,
        eviction: str,
        seed: int,
        stats_period_s: float,
        stats_lag_s: float,
        step_s: float,
        token_s: float,
    ) -> None:
        self.rng = random.Random(seed)
        self.clock = _Clock()
        self.router = router_factory(self.clock)
        self.reps = [_Replica(f"r{i}", kv_blocks, eviction) for i in range(replicas)]
        self.by_id = {r.rid: r for r in self.reps}
        self.stats_period_s, self.stats_lag_s = stats_period_s, stats_lag_s
        self.step_s, self.token_s = step_s, token_s
        self._events: list[tuple[float, int, str, Any]] = []
        self._n = 0
        self.sent_at: dict[str, float] = {}
        self.ttft: dict[str, float] = {}
        self.finished_at: dict[str, float] = {}
        self.cached: dict[str, int] = {}  # prompt tokens cached at first admission
        self.tags: dict[str, str] = {}
        self.on_finish: Callable[[str], None] = lambda rid: None
        self.on_admit: Callable[[_Replica, list[Request]], None] = lambda r, reqs: None
        self.queue_depth: list[tuple[float, list[int]]] = []  # (t, waiting + running per replica)
        for i, r in enumerate(self.reps):
            self.push(stats_period_s * (i + 1) / (replicas + 1), "stats", r)

    def push(self, t: float, kind: str, data: Any) -> None:
        self._n += 1
        heapq.heappush(self._events, (t, self._n, kind, data))

    def send(self, rid: str, spec: RequestSpec) -> None:
        r = self.by_id[self.router.route(rid, spec, self.reps)]
        r.outstanding += 1
        r.groups[spec.tag] += 1
        self.tags[rid], self.sent_at[rid] = spec.tag, self.clock.t
        params = SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True)
        r.sch.add(Request(rid, list(spec.prompt), params, BLOCK_SIZE))
        if not r.busy:
            r.busy = True
            self.push(self.clock.t, "step", r)

    def idle(self) -> bool:
        return not any(r.sch.has_unfinished() for r in self.reps)

    def run(self, until_idle: Callable[[], bool]) -> None:
        """Process events until ``until_idle()`` holds while every replica is idle."""
        while self._events:
            if self.idle() and until_idle():
                return
            t, _, kind, data = heapq.heappop(self._events)
            self.clock.t = t
            if kind == "call":
                data()
            elif kind == "stats":
                r = data
                r.tracker.apply_events(r.bm.pop_events())
                stats = r.tracker.routing_stats(r.engine_stats())
                self.push(t + self.stats_lag_s, "report", (r.rid, stats))
                self.push(t + self.stats_period_s, "stats", r)
                if r is self.reps[0]:
                    self.queue_depth.append(
                        (t, [len(x.sch.waiting) + len(x.sch.running) for x in self.reps])
                    )
            elif kind == "report":
                self.router.report(*data)
            elif kind == "step":
                r = data
                if not r.sch.has_unfinished():
                    r.busy = False
                    continue
                out, scheduled = r.sch.schedule()
                fresh = [q for q in scheduled if q.request_id not in self.cached]
                for q in fresh:
                    self.cached[q.request_id] = q.num_cached_tokens
                self.on_admit(r, fresh)
                dt = self.step_s + self.token_s * sum(out.num_scheduled_tokens)
                self.push(t + dt, "done", (r, out, scheduled))
            elif kind == "done":
                r, out, scheduled = data
                sampled = []
                for req, sample in zip(scheduled, out.sample, strict=True):
                    if sample and req.request_id not in self.ttft:
                        self.ttft[req.request_id] = t - self.sent_at[req.request_id]
                    sampled.append([self.rng.randrange(16, 4096)] if sample else [])
                for req in r.sch.update(scheduled, out.num_scheduled_tokens, sampled):
                    r.outstanding -= 1
                    self.finished_at[req.request_id] = t
                    self.router.completed(req.request_id)
                    self.on_finish(req.request_id)
                self.push(t, "step", r)


def _router_factory(
    policy: str, assumed_ttl_s: float, seed: int, params: dict[str, Any]
) -> Callable[[_Clock], Any]:
    if policy == "ray_prefix_affinity":
        return lambda clock: RayPrefixAffinitySim(clock, seed=seed, **params)
    if policy == "pow2":
        params = {"seed": seed, **params}
    return lambda clock: FleetlmRouter(policy, assumed_ttl_s, clock, **params)


def simulate(
    policy: str = "prefix_aware",
    kv_blocks: int = 372,
    replicas: int = 2,
    seed: int = 0,
    assumed_ttl_s: float = DEFAULT_ASSUMED_TTL_S,
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
    eviction: str = "slru",
    **policy_params: Any,
) -> dict[str, Any]:
    """W2 with a closed loop of ``concurrency`` requests (module docstring)."""
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
    sim = _Sim(
        _router_factory(policy, assumed_ttl_s, seed, policy_params),
        replicas,
        kv_blocks,
        eviction,
        seed,
        stats_period_s,
        stats_lag_s,
        step_s,
        token_s,
    )
    todo = list(wl.requests)
    outcome: Counter[str] = Counter()
    full_prefix = prefix_len // BLOCK_SIZE * BLOCK_SIZE

    def send_next(_: str = "") -> None:
        if todo:
            sim.send(f"q{len(wl.requests) - len(todo) + 1}", todo.pop(0))

    def admitted(r: _Replica, reqs: list[Request]) -> None:
        same: Counter[str] = Counter()
        for req in reqs:
            g = sim.tags[req.request_id]
            if req.num_cached_tokens >= full_prefix:
                outcome["hit"] += 1
            elif g not in r.seen:
                outcome["first"] += 1
            elif same[g]:
                outcome["same_step"] += 1
            else:
                outcome["evicted"] += 1
            same[g] += 1
            r.seen.add(g)

    sim.on_finish = send_next
    sim.on_admit = admitted
    for _ in range(concurrency):
        send_next()
    sim.run(lambda: not todo)
    reps = sim.reps
    query = sum(r.bm.query_tokens for r in reps)
    return {
        "hit_rate": sum(r.bm.hit_tokens for r in reps) / query,
        "mean_ttft_s": statistics.fmean(sim.ttft.values()),
        "p90_ttft_s": float(np.percentile(list(sim.ttft.values()), 90)),
        "duration_s": sim.clock.t,
        "preemptions": sum(r.sch.num_preemptions for r in reps),
        "decisions": dict(sim.router.reasons),
        "prefix_outcome": dict(outcome),
        "groups_per_replica": [len(r.groups) for r in reps],
        "groups_on_every_replica": sum(
            1 for g in {t for r in reps for t in r.groups} if all(r.groups[g] for r in reps)
        ),
    }


def shift_steps(w6: W6) -> list[Any]:
    """W6's steps with the second half of the requests drawn from a new set of tenants."""
    first = w6.steps()
    second = W6(**{**w6.__dict__, "seed": w6.seed + 1000}).steps()
    out = []
    for a, b in zip(first, second, strict=True):
        half = len(a.requests) // 2
        a.requests = a.requests[:half] + [
            RequestSpec(s.prompt, s.max_tokens, s.prompt_len, tag="new" + s.tag)
            for s in b.requests[half:]
        ]
        out.append(a)
    return out


def simulate_w6(
    policy: str,
    w6: W6,
    replicas: int = 2,
    assumed_ttl_s: float = DEFAULT_ASSUMED_TTL_S,
    stats_period_s: float = 1.0,
    stats_lag_s: float = 0.3,
    step_s: float = 0.02,
    token_s: float = 0.0006,
    timeout_s: float = 60.0,
    eviction: str = "slru",
    shift: bool = False,
    **policy_params: Any,
) -> dict[str, Any]:
    """W6 on ``replicas`` replicas, each with ``w6.kv_blocks()`` blocks (module docstring)."""
    steps = shift_steps(w6) if shift else w6.steps()
    ideal = ideal_hit_rates(steps, w6.prefix_len)
    kv = sum(w6.kv_blocks())
    sim = _Sim(
        _router_factory(policy, assumed_ttl_s, w6.seed, policy_params),
        replicas,
        kv,
        eviction,
        w6.seed,
        stats_period_s,
        stats_lag_s,
        step_s,
        token_s,
    )
    rng = random.Random(w6.seed + 2)
    rows = []
    for k, wl in enumerate(steps):
        start = sim.clock.t
        rids = [f"s{k}q{i}" for i in range(len(wl.requests))]
        t = start
        for rid, spec in zip(rids, wl.requests, strict=True):
            sim.push(t, "call", lambda rid=rid, spec=spec: sim.send(rid, spec))
            t += rng.expovariate(wl.rate)
        last_arrival = t
        sim.run(lambda last_arrival=last_arrival: sim.clock.t >= last_arrival)
        end = max(sim.finished_at[r] for r in rids)
        ttft = [sim.ttft[r] for r in rids]
        half = len(rids) // 2
        rows.append(
            {
                "rate": wl.rate,
                "requests": len(rids),
                "failed": sum(1 for x in ttft if x > timeout_s),
                "mean_ttft_ms": 1000 * statistics.fmean(ttft),
                "p90_ttft_ms": 1000 * float(np.percentile(ttft, 90)),
                "output_tok_s": len(rids) * w6.output_len / (end - start),
                "hit_rate": sum(sim.cached[r] for r in rids) / (len(rids) * w6.prompt_len),
                "second_half_hit_rate": sum(sim.cached[r] for r in rids[half:])
                / ((len(rids) - half) * w6.prompt_len),
                "ideal_hit_rate": ideal[k],
                # in arrival order, tenths of the step's requests (the shift is at the middle)
                "hit_rate_tenths": [
                    sum(sim.cached[r] for r in part) / (len(part) * w6.prompt_len)
                    for part in np.array_split(np.array(rids), 10)
                    if len(part)
                ],
                "duration_s": end - start,
            }
        )
    tenants = {r.rid: {tenant_of(g) for g in r.groups} for r in sim.reps}
    return {
        "steps": rows,
        "decisions": dict(sim.router.reasons),
        "tenants_per_replica": [len(v) for v in tenants.values()],
        "queue_depth": sim.queue_depth,
        "kv_blocks_per_replica": kv,
    }


def _w2_main(a: argparse.Namespace) -> None:
    for kv, ev in itertools.product(a.kv, a.eviction):
        for policy in a.policies:
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
                    f"{statistics.fmean(r['mean_ttft_s'] for r in rows):.3f} s, p90 TTFT "
                    f"{statistics.fmean(r['p90_ttft_s'] for r in rows):.3f} s, balance "
                    f"decisions {bal:.1f}, split groups "
                    f"{statistics.fmean(r['groups_on_every_replica'] for r in rows):.1f}"
                )


def _w6_rows(a: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(row name, policy parameters) for the W6 policies asked for."""
    out = []
    for policy in a.policies:
        if policy == "prefix_aware":
            out += [(f"prefix_aware imbalance={i}", {"imbalance": i}) for i in a.imbalance]
        elif policy == "ray_prefix_affinity":
            out.append(("ray_prefix_affinity", {}))
            out += [
                (f"ray_prefix_affinity imbalanced_threshold={i}", {"imbalanced_threshold": i})
                for i in a.imbalance
            ]
        else:
            out.append((policy, {}))
    return out


def _w6_main(a: argparse.Namespace) -> None:
    for n, ev in itertools.product(a.replicas, a.eviction):
        # As at 2 replicas: 12 tenants per replica and the whole cluster's cache holding 80% of
        # the distinct prefix tokens (0.4 per replica at 2 replicas).
        w6 = W6(
            tenants=a.tenants if a.tenants else 12 * n,
            rates=tuple(a.rates) if a.rates else tuple(n * r for r in (1.0, 1.5, 2.0)),
            step_s=a.step_s,
            kv_fraction=0.8 / n,
            tenant_skew=a.tenant_skew,
        )
        print(
            f"\n== W6 on {n} replicas ({ev}): {w6.tenants} tenants x {w6.users} users, "
            f"rates {list(w6.rates)}, {w6.step_s:.0f} s steps, "
            f"{sum(w6.kv_blocks())} KV blocks per replica"
        )
        for name, params in _w6_rows(a):
            runs = [
                simulate_w6(
                    name.split()[0],
                    W6(**{**w6.__dict__, "seed": s}),
                    replicas=n,
                    assumed_ttl_s=a.assumed_ttl_s,
                    eviction=ev,
                    shift=a.shift,
                    **params,
                )
                for s in range(a.seeds)
            ]
            for k, rate in enumerate(w6.rates):
                rows = [r["steps"][k] for r in runs]

                def mean(key: str, rows: list[dict[str, Any]] = rows) -> float:
                    return statistics.fmean(r[key] for r in rows)

                print(
                    f"{name:46s} rate {rate:5.1f}: p90 TTFT {mean('p90_ttft_ms'):8.0f} ms, mean "
                    f"{mean('mean_ttft_ms'):8.0f} ms, {mean('output_tok_s'):6.1f} out tok/s, hit "
                    f"{mean('hit_rate'):.3f} (2nd half {mean('second_half_hit_rate'):.3f}, ideal "
                    f"{mean('ideal_hit_rate'):.3f}), failed {mean('failed'):.1f}"
                )
            if a.verbose:
                print(
                    "   decisions", runs[0]["decisions"], "tenants", runs[0]["tenants_per_replica"]
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workload", default="w2", choices=["w2", "w6"])
    p.add_argument("--policies", help="comma-separated (default: every policy of the workload)")
    p.add_argument("--kv", type=int, nargs="+", default=[372], help="W2: KV blocks per replica")
    p.add_argument(
        "--imbalance",
        type=int,
        nargs="+",
        default=[32],
        help="prefix_aware imbalance (W6: also Ray's imbalanced_threshold, one row each)",
    )
    p.add_argument("--assumed-ttl-s", type=float, default=DEFAULT_ASSUMED_TTL_S)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument(
        "--eviction",
        nargs="+",
        default=["slru"],
        choices=["lru", "slru"],
        help="the replicas' prefix-cache eviction (EngineConfig.prefix_cache_eviction)",
    )
    p.add_argument("--replicas", type=int, nargs="+", default=[8, 32], help="W6")
    p.add_argument("--tenants", type=int, help="W6 (default: 12 per replica)")
    p.add_argument("--rates", type=float, nargs="+", help="W6 (default: 1, 1.5, 2 per replica)")
    p.add_argument("--step-s", type=float, default=60.0, help="W6: seconds per rate")
    p.add_argument("--shift", action="store_true", help="W6: new tenants halfway through a step")
    p.add_argument(
        "--tenant-skew",
        type=float,
        default=0.0,
        help="W6: Zipf exponent of tenant popularity (0: uniform, as WORKLOADS.md's W6)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="every run, not just means")
    a = p.parse_args(argv)
    default = W6_POLICIES if a.workload == "w6" else ("prefix_aware", "pow2", "round_robin")
    a.policies = [s.strip() for s in (a.policies or ",".join(default)).split(",") if s.strip()]
    if a.workload == "w6":
        _w6_main(a)
    else:
        _w2_main(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
