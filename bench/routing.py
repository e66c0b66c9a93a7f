"""Routing policies on W2 (shared prefix) through the served path, plus W1 over HTTP against vLLM.

One run, same machine, same model, same prompts:
- W2 on ``--replicas`` (2) replicas, once per policy (prefix_aware, pow2, round_robin), each on a
  freshly deployed app (cold caches). Each replica's KV cache has room for ``--kv-fraction`` (0.6)
  of the distinct prefix tokens G x S (WORKLOADS.md) plus, beside it, the own blocks (question +
  output) of ``--room-requests`` running requests (concurrency / replicas), so the running requests
  don't take the prefix share: prefixes can't all fit on every replica, so where requests go
  decides the hit rate. Decisions are counted by reason from the ingress's /metrics.
- W1 at concurrency 32 through HTTP: one fleetlm replica with every core (``--w1-threads``), then
  vLLM's CPU OpenAI server (when ``--vllm-python`` is given), one server at a time on the same
  cores, ``--w1-repeats`` runs each (median), each after one unmeasured run and once the machine
  is quiet (CPU busy < 15%). Every run sends prompts of its own (seed + run), so no run hits the
  prefix cache the run before filled; every server gets the same prompts. Output tok/s and the
  p50 inter-token latency (``W1_itl_p50_ms``) per server. W1 runs before W2, on the fresh Ray
  instance. ``fleetlm`` is the default path (through Serve's proxy, the default engine mode);
  ``--w1-engine-thread`` / ``--w1-engine-process`` add the engine loop on a replica thread / in a
  process of its own; ``--w1-direct-ingress`` adds fleetlm with ``http.direct_ingress`` (Serve's
  throughput-optimized mode, no proxy hop) on a second Ray instance; ``fleetlm_offline`` is the
  same engine on the same prompts with no server (LLMEngine.generate in a process of its own).

    python bench/routing.py --json out/routing.json [--vllm-python /work/vllm-venv/bin/python]
    python bench/routing.py --groups 8 --prompts-per-group 8 --skip-w1     # a quicker look
    python bench/routing.py --skip-w2 --w1-direct-ingress --vllm-python ...   # W1 only

W6 (``--workload w6``, bench/w6.py; W1 and W2 are not run): many tenants whose prefixes overflow
the cluster's cache, Poisson arrivals on a ramp of ``--rates`` (one ``--step-s`` step each, in
order, on the same replicas; each step drains before the next), once per policy on freshly
deployed replicas: round_robin, pow2, Ray Serve's PrefixCacheAffinityRouter as it ships
(``ray_prefix_affinity``) and with its imbalanced_threshold set to ``--imbalance``
(``ray_prefix_affinity_tuned``), fleetlm's prefix_aware. Per policy and rate: mean/p90 TTFT,
output tok/s, hit rate, the ideal hit rate, failed requests (no first token within
``--request-timeout-s``), each replica's queue depth over time (from the ingress's /metrics). The
JSON's "W6" holds each policy's figures at the highest rate at which pow2 completed every request;
``--png`` draws p90 TTFT against rate, one line per policy.

    python bench/routing.py --workload w6 --json out/w6.json --png out/w6.png

Targets (issue 3): prefix_aware >= 2x pow2's prefix-cache hit rate and <= 0.6x its mean TTFT;
fleetlm >= 1.2x vLLM's server on W1 output tok/s, served / offline >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from cluster.bench.client import run_workload
from cluster.bench.metrics import BenchResult
from cluster.bench.workloads import make_workload
from cluster.config import ClusterConfig
from cluster.serve_config import APP_NAME

POLICIES = ("prefix_aware", "pow2", "round_robin")
W6_POLICIES = (
    "round_robin",
    "pow2",
    "ray_prefix_affinity",
    "ray_prefix_affinity_tuned",
    "prefix_aware",
)
_QUEUE_RE = re.compile(r"^ray_fleetlm_num_requests_(waiting|running)\{([^}]*)\}\s+([0-9.eE+-]+)")
BLOCK_SIZE = 16  # EngineConfig's default; the KV sizing below counts in these blocks
_DECISION_RE = re.compile(r"^ray_fleetlm_router_decisions_total\{([^}]*)\}\s+([0-9.eE+-]+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def w2_kv_blocks(
    groups: int,
    prefix_len: int,
    fraction: float,
    request_tokens: int,
    room_requests: int,
) -> tuple[int, int]:
    """(prefix blocks, running-request blocks) per replica.

    The prefix part holds ``fraction`` of the distinct prefix tokens G x S. Beside it, room for
    ``room_requests`` running requests' own blocks (question + output: what a request needs beyond
    its cached prefix), so running requests don't eat the share meant for cached prefixes. The
    replica's KV cache is the sum; with room_requests=0 the whole cache is the prefix share.
    """
    prefix = math.ceil(fraction * groups * prefix_len / BLOCK_SIZE)
    own = math.ceil(request_tokens / BLOCK_SIZE) - prefix_len // BLOCK_SIZE
    room = room_requests * own
    # Whatever the fraction, one whole request must fit.
    prefix = max(prefix, math.ceil(request_tokens / BLOCK_SIZE) + 1 - room)
    return prefix, room


def cluster_config(
    model: str,
    port: int,
    replicas: int,
    policy: str,
    imbalance: int,
    engine: dict[str, Any],
    cpus_per_replica: float,
    engine_process: bool | None = None,
    ray_imbalanced_threshold: int | None = None,
) -> ClusterConfig:
    """``engine_process`` None: ModelConfig's default (what a user gets)."""
    model_cfg: dict[str, Any] = {
        "name": model,
        "model": model,
        "num_replicas": replicas,
        "engine": engine,
        "resources_per_replica": {"num_cpus": cpus_per_replica},
        # Every W2 prompt is unique, but keep the response cache out of the figures.
        "caches": {"exact": {"enabled": False}},
    }
    if engine_process is not None:
        model_cfg["engine_process"] = engine_process
    return ClusterConfig.model_validate(
        {
            "models": [model_cfg],
            "router": {
                "policy": policy,
                "imbalance": imbalance,
                "stats_period_s": 1.0,
                "ray_imbalanced_threshold": ray_imbalanced_threshold,
            },
            "http": {"host": "127.0.0.1", "port": port},
        }
    )


def deploy_and_wait(cfg: ClusterConfig) -> str:
    from cluster.cmd_serve import deploy, wait_until_ready

    deploy(cfg)
    wait_until_ready(APP_NAME, timeout_s=900)
    return f"http://127.0.0.1:{cfg.http.port}"


def undeploy() -> None:
    from ray import serve

    serve.delete(APP_NAME)


def cpu_busy_fraction(interval_s: float = 1.0) -> float:
    """The machine's CPU busy fraction over ``interval_s`` (Linux /proc/stat; 0.0 elsewhere)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals), idle

    try:
        t0, i0 = sample()
        time.sleep(interval_s)
        t1, i1 = sample()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_quiet(max_busy: float = 0.15, timeout_s: float = 60.0) -> float:
    """Before a measured W1 run: until the (idle) servers' machine is quiet, e.g. replicas of an
    earlier app finished shutting down. Returns the last busy fraction seen."""
    deadline = time.monotonic() + timeout_s
    busy = cpu_busy_fraction()
    while busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy_fraction()
    return busy


def warm_up(url: str, model: str, n: int) -> None:
    """A few short requests, so one-off costs (first forward, allocator) stay out of the figures.

    Their token ids (1..) share no block with the workload's prompts (drawn from 16 upwards).
    """

    async def go() -> None:
        async with httpx.AsyncClient(timeout=300) as c:
            rs = await asyncio.gather(
                *(
                    c.post(
                        f"{url}/v1/completions",
                        json={"model": model, "prompt": [1 + i % 8] * 20, "max_tokens": 4},
                    )
                    for i in range(n)
                )
            )
            for r in rs:
                r.raise_for_status()

    asyncio.run(go())


def router_decisions(url: str, policy: str, expect: int, wait_s: float) -> dict[str, int]:
    """Decisions by reason for ``policy`` from the ingress's /metrics (Ray exports every few s)."""
    deadline = time.monotonic() + wait_s
    counts: dict[str, int] = {}
    while True:
        try:
            text = httpx.get(f"{url}/metrics", timeout=10).text
        except httpx.HTTPError:
            text = ""
        counts = {}
        for line in text.splitlines():
            m = _DECISION_RE.match(line)
            if not m:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("policy") == policy:
                reason = labels.get("reason", "?")
                counts[reason] = counts.get(reason, 0) + int(float(m.group(2)))
        if sum(counts.values()) >= expect or time.monotonic() > deadline:
            return counts
        time.sleep(1.0)


def summarize(r: BenchResult) -> dict[str, Any]:
    return {
        "hit_rate": r.prefix_cache_hit_rate,
        "mean_ttft_ms": r.ttft_ms.mean,
        "p99_ttft_ms": r.ttft_ms.p99,
        "output_tok_s": r.output_throughput,
        "completed": r.completed,
        "failed": r.failed,
        "duration_s": r.duration_s,
    }


def run_w2(args: argparse.Namespace, port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """({policy: figures}, the setup they were measured on)."""
    wl_kwargs = dict(
        groups=args.groups,
        prompts_per_group=args.prompts_per_group,
        prefix_len=args.prefix_len,
        question_len=args.question_len,
        output_len=args.output_len,
        concurrency=args.concurrency,
    )
    request_tokens = args.prefix_len + args.question_len + args.output_len
    room_requests = (
        args.room_requests
        if args.room_requests is not None
        else math.ceil(args.concurrency / args.replicas)
    )
    prefix_blocks, room_blocks = w2_kv_blocks(
        args.groups, args.prefix_len, args.kv_fraction, request_tokens, room_requests
    )
    kv_blocks = prefix_blocks + room_blocks
    engine = {
        "num_kv_blocks": kv_blocks,
        "max_model_len": max(1024, request_tokens),
        "num_threads": args.threads_per_replica,
        "prefix_cache_eviction": args.eviction,
    }
    setup = {
        "kv_blocks_per_replica": kv_blocks,
        "kv_tokens_per_replica": kv_blocks * BLOCK_SIZE,
        "prefix_share_blocks": prefix_blocks,
        "running_room_blocks": room_blocks,
        "running_room_requests": room_requests,
        "distinct_prefix_tokens": args.groups * args.prefix_len,
        "replicas": args.replicas,
        "threads_per_replica": args.threads_per_replica,
        "prefix_cache_eviction": args.eviction,
        "workload": wl_kwargs,
    }
    out: dict[str, Any] = {}
    for policy in args.policies:
        cfg = cluster_config(
            args.model, port, args.replicas, policy, args.imbalance, engine, args.cpus_per_replica
        )
        print(
            f"\n== W2, {policy}: deploying {args.replicas} replicas ({kv_blocks} KV blocks each:"
            f" {prefix_blocks} for prefixes + {room_blocks} for {room_requests} running requests)"
        )
        url = deploy_and_wait(cfg)
        # Ray's metric outlives an app: earlier apps' decisions (W1's) are subtracted.
        before = router_decisions(url, policy, 0, 0.0)
        warm_up(url, args.model, 2 * args.replicas)
        wl = make_workload("W2", seed=args.seed, **wl_kwargs)
        res = asyncio.run(run_workload(url, args.model, wl, progress=not args.no_progress))
        row = summarize(res)
        after = router_decisions(
            url, policy, sum(before.values()) + res.completed, args.metrics_wait_s
        )
        row["decisions"] = {
            k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)
        }
        out[policy] = row
        print(f"   {json.dumps(row)}")
        undeploy()
    return out, setup


def w1_seeds(args: argparse.Namespace) -> list[int]:
    """One workload seed per W1 run: the unmeasured first run, then ``--w1-repeats`` measured ones.

    Every run sends prompts of its own, so no run finds the one before in the prefix cache; every
    server (and the offline engine) gets the same list.
    """
    return [args.seed + i for i in range(args.w1_repeats + 1)]


def w1_runs(url: str, model: str, args: argparse.Namespace, label: str) -> dict:
    """W1 on a warm server: one unmeasured run, then the measured ones (each after the machine is
    quiet). {"median": tok/s, "runs": [...], "itl_p50_ms": median of the runs' p50 ITL, ...}."""
    seeds = w1_seeds(args)
    asyncio.run(run_workload(url, model, make_workload("W1", seed=seeds[0]), progress=False))
    runs, itl = [], []
    for seed in seeds[1:]:
        wait_for_quiet()
        res = asyncio.run(run_workload(url, model, make_workload("W1", seed=seed), progress=False))
        print(
            f"   {label} W1: {res.output_throughput:.0f} output tok/s, p50 ITL"
            f" {res.itl_ms.p50:.1f} ms, hit rate {res.prefix_cache_hit_rate} ({res.failed} failed)"
        )
        runs.append(res.output_throughput)
        itl.append(res.itl_ms.p50)
    return {
        "median": statistics.median(runs),
        "runs": runs,
        "itl_p50_ms": statistics.median(itl),
        "itl_p50_runs": itl,
    }


# Serve's high-throughput mode: HAProxy (C) takes the proxy's port and forwards HTTP to the ingress
# replica's own server (direct ingress); the Python proxy and its per-token Ray messages are gone.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def run_w1_fleetlm(
    args: argparse.Namespace,
    port: int,
    engine_process: bool | None = None,
    direct_port: int = 0,
    how: str = "",
) -> dict:
    """W1 ``--w1-repeats`` times on one deployed replica (see w1_runs). ``engine_process`` None:
    the default path."""
    # The same cores as the vLLM peer: Ray sets a replica's OMP_NUM_THREADS from its num_cpus, and
    # the engine's num_threads sets torch's thread count explicitly.
    engine = {"max_num_seqs": 64, "num_threads": args.w1_threads}
    cfg = cluster_config(
        args.model,
        port,
        1,
        "prefix_aware",
        args.imbalance,
        engine,
        float(args.w1_threads),
        engine_process=engine_process,
    )
    how = {None: "default engine mode", True: "engine core process", False: "engine thread"}[
        engine_process
    ] + how
    if direct_port:
        how += ", direct ingress"
    print(f"\n== W1 over HTTP: fleetlm, 1 replica, {args.w1_threads} CPUs / torch threads, {how}")
    url = deploy_and_wait(cfg)
    if direct_port:
        from cluster.cmd_serve import find_direct_ingress

        direct = find_direct_ingress("127.0.0.1", direct_port)
        if direct is None:
            raise RuntimeError(f"no direct ingress answers from port {direct_port}")
        url = direct
    warm_up(url, args.model, 4)
    out = w1_runs(url, args.model, args, "fleetlm")
    undeploy()
    return out


_OFFLINE_W1 = """
import json, statistics, sys, time
from cluster.bench.workloads import make_workload
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
model, threads, seeds = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
eng = LLMEngine(EngineConfig(model=model, max_num_seqs=64, num_threads=threads))
runs = []
for i, seed in enumerate(seeds):  # the first unmeasured, as for the servers
    wl = make_workload("W1", seed=seed)
    prompts = [r.prompt for r in wl.requests]
    params = [
        SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True)
        for r in wl.requests
    ]
    t = time.perf_counter()
    out = eng.generate(prompts, params)
    if i:
        runs.append(sum(len(o.token_ids) for o in out) / (time.perf_counter() - t))
print(json.dumps(runs))
"""


def run_w1_offline(args: argparse.Namespace) -> dict:
    """The same engine, config, prompts and cores with no server: LLMEngine.generate in a process
    of its own (torch threads as the replica's)."""
    print(f"\n== W1 offline: fleetlm LLMEngine.generate, {args.w1_threads} torch threads")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.w1_threads))
    cmd = [sys.executable, "-c", _OFFLINE_W1, args.model, str(args.w1_threads)]
    wait_for_quiet()
    out = subprocess.run(
        cmd + [",".join(map(str, w1_seeds(args)))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    for r in runs:
        print(f"   fleetlm offline W1: {r:.0f} output tok/s")
    return {"median": statistics.median(runs), "runs": runs}


def run_w1_vllm(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vllm_server import VLLMServer

    print("\n== W1 over HTTP: vLLM CPU server")
    with VLLMServer(args.model, vllm_python=args.vllm_python) as srv:
        warm_up(srv.url, srv.model_name, 4)
        return w1_runs(srv.url, srv.model_name, args, "vLLM")


async def _queue_depths(url: str, period_s: float, stop: asyncio.Event) -> list[dict[str, Any]]:
    """Every replica's waiting + running requests, read from /metrics every ``period_s`` (Ray
    exports gauges every few seconds, so consecutive samples may repeat)."""
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=10) as c:
        while not stop.is_set():
            try:
                text = (await c.get(f"{url}/metrics")).text
            except httpx.HTTPError:
                text = ""
            depth: dict[str, float] = {}
            for line in text.splitlines():
                m = _QUEUE_RE.match(line)
                if m:
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
                    rid = labels.get("replica", "?")
                    depth[rid] = depth.get(rid, 0.0) + float(m.group(3))
            out.append({"t": round(time.perf_counter() - t0, 1), "depth": depth})
            try:
                await asyncio.wait_for(stop.wait(), period_s)
            except TimeoutError:
                pass
    return out


async def _w6_step(
    url: str, model: str, wl: Any, timeout_s: float, seed: int
) -> tuple[BenchResult, list[dict[str, Any]]]:
    stop = asyncio.Event()
    poll = asyncio.create_task(_queue_depths(url, 2.0, stop))
    try:
        res = await run_workload(url, model, wl, timeout_s=timeout_s, seed=seed, progress=False)
    finally:
        stop.set()
    return res, await poll


def _kill_ray_prefix_trees() -> None:
    """Ray's router keeps its tree in a detached actor that outlives the app (Serve kills it only
    on shutdown); the next app must start from an empty tree, not the old replicas' one."""
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"] == "LlmPrefixTreeActor":
            try:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]))
            except ValueError:
                pass


def w6_from_args(args: argparse.Namespace) -> Any:
    from bench.w6 import W6

    return W6(
        tenants=args.tenants,
        prefix_len=args.w6_prefix_len,
        users=args.users,
        question_len=args.w6_question_len,
        output_len=args.w6_output_len,
        rates=tuple(args.rates),
        step_s=args.step_s,
        seed=args.seed,
        kv_fraction=args.w6_kv_fraction,
        room_requests=args.w6_room_requests,
    )


def run_w6(args: argparse.Namespace, port: int) -> dict[str, Any]:
    """{"steps": {policy: [per rate]}, "setup": ...}: every policy over the whole ramp."""
    from bench.w6 import ideal_hit_rates

    w6 = w6_from_args(args)
    steps = w6.steps()
    ideal = ideal_hit_rates(steps, w6.prefix_len)
    prefix_blocks, room_blocks = w6.kv_blocks()
    kv_blocks = prefix_blocks + room_blocks
    engine = {
        "num_kv_blocks": kv_blocks,
        "max_model_len": max(1024, w6.prompt_len + w6.output_len),
        "num_threads": args.threads_per_replica,
        "prefix_cache_eviction": args.eviction,
    }
    setup = {
        "kv_blocks_per_replica": kv_blocks,
        "prefix_share_blocks": prefix_blocks,
        "running_room_blocks": room_blocks,
        "distinct_prefix_tokens": w6.tenants * w6.prefix_len,
        "replicas": args.replicas,
        "threads_per_replica": args.threads_per_replica,
        "prefix_cache_eviction": args.eviction,
        "request_timeout_s": args.request_timeout_s,
        "workload": {k: v for k, v in w6.__dict__.items()},
        "requests_per_step": [len(wl.requests) for wl in steps],
    }
    out: dict[str, list[dict[str, Any]]] = {}
    for row in args.policies:
        policy = "ray_prefix_affinity" if row.startswith("ray_prefix_affinity") else row
        ray_threshold = args.imbalance if row == "ray_prefix_affinity_tuned" else None
        cfg = cluster_config(
            args.model,
            port,
            args.replicas,
            policy,
            args.imbalance,
            engine,
            args.cpus_per_replica,
            ray_imbalanced_threshold=ray_threshold,
        )
        print(f"\n== W6, {row}: {args.replicas} replicas, {kv_blocks} KV blocks each")
        url = deploy_and_wait(cfg)
        warm_up(url, args.model, 2 * args.replicas)
        rows = []
        for k, wl in enumerate(steps):
            res, depths = asyncio.run(
                _w6_step(url, args.model, wl, args.request_timeout_s, args.seed + k)
            )
            r = {
                "rate": wl.rate,
                "requests": len(wl.requests),
                "completed": res.completed,
                "failed": res.failed,
                "mean_ttft_ms": res.ttft_ms.mean,
                "p90_ttft_ms": res.ttft_ms.p90,
                "output_tok_s": res.output_throughput,
                "hit_rate": res.prefix_cache_hit_rate,
                "ideal_hit_rate": ideal[k],
                "duration_s": res.duration_s,
                "errors": res.errors,
                "queue_depth": depths,
            }
            rows.append(r)
            brief = {k2: v for k2, v in r.items() if k2 not in ("queue_depth", "errors")}
            print(f"   {json.dumps(brief)}")
        out[row] = rows
        undeploy()
        if policy == "ray_prefix_affinity":
            _kill_ray_prefix_trees()
    return {"steps": out, "setup": setup}


def w6_summary(steps: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each policy's figures at the highest rate at which pow2 completed every request (every
    rate pow2 ran, or the highest rate when pow2 did not run)."""
    any_rows = next(iter(steps.values()))
    rates = [r["rate"] for r in any_rows]
    k = len(rates) - 1
    if "pow2" in steps:
        ok = [i for i, r in enumerate(steps["pow2"]) if r["failed"] == 0]
        k = max(ok) if ok else 0
    out: dict[str, Any] = {
        "ideal_hit_rate": any_rows[k]["ideal_hit_rate"],
        "rates": rates,
        "rate": rates[k],
        "pow2_completed_every_request": "pow2" not in steps or steps["pow2"][k]["failed"] == 0,
    }
    for policy, rows in steps.items():
        r = rows[k]
        out[policy] = {
            key: r[key] for key in ("p90_ttft_ms", "mean_ttft_ms", "hit_rate", "output_tok_s")
        }
    return out


def w6_targets(w6: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    pa = w6.get("prefix_aware")
    if not pa:
        return t
    ray_ = w6.get("ray_prefix_affinity")
    if ray_:
        t["p90_ttft_ratio_vs_ray"] = pa["p90_ttft_ms"] / max(ray_["p90_ttft_ms"], 1e-9)
        t["p90_ttft_vs_ray_met"] = t["p90_ttft_ratio_vs_ray"] <= 0.5
        t["output_tok_s_ratio_vs_ray"] = pa["output_tok_s"] / max(ray_["output_tok_s"], 1e-9)
        t["output_tok_s_vs_ray_met"] = t["output_tok_s_ratio_vs_ray"] >= 1.1
    p2 = w6.get("pow2")
    if p2:
        t["p90_ttft_ratio_vs_pow2"] = pa["p90_ttft_ms"] / max(p2["p90_ttft_ms"], 1e-9)
        t["p90_ttft_vs_pow2_met"] = t["p90_ttft_ratio_vs_pow2"] <= 0.3
    if pa["hit_rate"] is not None and w6["ideal_hit_rate"]:
        t["hit_rate_vs_ideal"] = pa["hit_rate"] / w6["ideal_hit_rate"]
        t["hit_rate_vs_ideal_met"] = t["hit_rate_vs_ideal"] >= 0.9
    return t


def write_w6_png(steps: dict[str, list[dict[str, Any]]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, rows in steps.items():
        ax.plot(
            [r["rate"] for r in rows], [r["p90_ttft_ms"] for r in rows], marker="o", label=policy
        )
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("p90 TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


W1_ROWS = (
    "fleetlm_engine_thread",
    "fleetlm_engine_process",
    "fleetlm_direct_ingress",
    "fleetlm_haproxy",
)


def targets(result: dict[str, Any]) -> dict[str, Any]:
    w2 = result.get("W2", {})
    pa, p2 = w2.get("prefix_aware"), w2.get("pow2")
    t: dict[str, Any] = {}
    if pa and p2 and p2["hit_rate"] is not None and pa["hit_rate"] is not None:
        t["hit_rate_ratio_vs_pow2"] = pa["hit_rate"] / max(p2["hit_rate"], 1e-9)
        t["mean_ttft_ratio_vs_pow2"] = pa["mean_ttft_ms"] / max(p2["mean_ttft_ms"], 1e-9)
        t["hit_rate_target_met"] = t["hit_rate_ratio_vs_pow2"] >= 2.0
        t["ttft_target_met"] = t["mean_ttft_ratio_vs_pow2"] <= 0.6
    w1 = result.get("W1_http", {})
    if w1.get("fleetlm") and w1.get("fleetlm_offline"):
        t["w1_served_over_offline"] = w1["fleetlm"] / w1["fleetlm_offline"]
        for row in W1_ROWS:
            if w1.get(row):
                t[f"w1_{row[len('fleetlm_') :]}_over_offline"] = w1[row] / w1["fleetlm_offline"]
    if w1.get("fleetlm") and w1.get("vllm"):
        t["w1_ratio_vs_vllm"] = w1["fleetlm"] / w1["vllm"]
        t["w1_target_met"] = t["w1_ratio_vs_vllm"] >= 1.2
        for row in W1_ROWS:
            if w1.get(row):
                t[f"w1_{row[len('fleetlm_') :]}_ratio_vs_vllm"] = w1[row] / w1["vllm"]
    return t


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="demo", help="demo, demo-small or a local HF folder")
    p.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="comma-separated (W6 default: " + ",".join(W6_POLICIES) + ")",
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument(
        "--imbalance", type=int, default=32, help="prefix_aware imbalance (W6: Ray's tuned row too)"
    )
    p.add_argument("--kv-fraction", type=float, default=0.6, help="of the distinct prefix tokens")
    p.add_argument(
        "--room-requests",
        type=int,
        help="running requests whose own blocks (question + output) each replica's KV cache gets"
        " beside the prefix share (default: concurrency / replicas; 0: the prefix share is all)",
    )
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--prompts-per-group", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads-per-replica", type=int, default=1, help="torch threads per replica")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray head")
    p.add_argument(
        "--w1-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPUs and torch threads of the W1 fleetlm replica (default: every core, like vLLM)",
    )
    p.add_argument(
        "--eviction",
        default="slru",
        choices=["lru", "slru"],
        help="W2 replicas' prefix-cache eviction (engine prefix_cache_eviction)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-w1", action="store_true", help="only the W2 policy comparison")
    p.add_argument("--skip-w2", action="store_true", help="only W1 over HTTP")
    p.add_argument("--w1-repeats", type=int, default=3, help="W1 runs per server (median)")
    p.add_argument(
        "--w1-direct-ingress",
        action="store_true",
        help="also run W1 with http.direct_ingress (a second Ray instance in Serve's "
        "throughput-optimized mode; the client talks to the ingress replica's own port)",
    )
    p.add_argument(
        "--w1-haproxy",
        action="store_true",
        help="also run W1 with HAProxy in place of Serve's proxy on the same port (a second Ray "
        "instance, RAY_SERVE_ENABLE_HA_PROXY: HAProxy forwards to the ingress replica's own port)",
    )
    p.add_argument(
        "--w1-engine-thread",
        action="store_true",
        help="also run W1 with engine_process off (the engine loop on a thread of the replica)",
    )
    p.add_argument(
        "--w1-engine-process",
        action="store_true",
        help="also run W1 with engine_process on (the engine loop in a process of its own)",
    )
    p.add_argument("--vllm-python", help="Python of a venv with vLLM's CPU build (W1 peer)")
    p.add_argument(
        "--workload",
        default="w2",
        choices=["w2", "w6"],
        help="w2: W1 over HTTP, then W2 (default); w6: the many-tenant ramp only",
    )
    p.add_argument("--tenants", type=int, default=24, help="W6 T")
    p.add_argument("--users", type=int, default=4, help="W6 U: users per tenant")
    p.add_argument("--w6-prefix-len", type=int, default=1024, help="W6 S")
    p.add_argument("--w6-question-len", type=int, default=128, help="W6 Q")
    p.add_argument("--w6-output-len", type=int, default=32, help="W6 O")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 1.5], help="W6 req/s")
    p.add_argument("--step-s", type=float, default=60.0, help="W6: seconds of arrivals per rate")
    p.add_argument("--w6-kv-fraction", type=float, default=0.4, help="W6: of T x S per replica")
    p.add_argument("--w6-room-requests", type=int, default=8, help="W6: running room per replica")
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=60.0,
        help="W6: a request with no token for this long fails (pow2's completion criterion)",
    )
    p.add_argument("--png", help="W6: p90 TTFT against rate, one line per policy")
    p.add_argument("--metrics-wait-s", type=float, default=15.0, help="for decision counts")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.workload == "w6" and args.policies == ",".join(POLICIES):
        args.policies = ",".join(W6_POLICIES)
    args.policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    known = {"prefix_aware", "pow2", "round_robin", "session"}
    if args.workload == "w6":
        known |= {"ray_prefix_affinity", "ray_prefix_affinity_tuned"}
    bad = sorted(set(args.policies) - known)
    if bad:
        p.error(f"--policies: unknown {bad}")
    if args.workload == "w6":
        try:
            w6_from_args(args)
        except ValueError as e:
            p.error(f"W6: {e}")
    if not 0 < args.kv_fraction:
        p.error("--kv-fraction must be > 0")
    if args.room_requests is not None and args.room_requests < 0:
        p.error("--room-requests must be >= 0")
    if args.w1_threads < 1:
        p.error("--w1-threads must be >= 1")
    if args.w1_repeats < 1:
        p.error("--w1-repeats must be >= 1")
    if args.skip_w1 and args.skip_w2 and args.workload == "w2":
        p.error("--skip-w1 and --skip-w2 leave nothing to run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from cluster.ray_runtime import serving_env
    from engine.models.demo import resolve_model

    resolve_model(args.model)  # build the demo model once, before any replica needs it
    port = free_port()
    result: dict[str, Any] = {"command": " ".join(sys.argv)}
    # What `fleetlm up` starts its head with: replicas at Ray's default worker nice 15 would lose
    # the cores to this client process (and to the vLLM peer, at nice 0); the proxy talks gRPC.
    for key, value in serving_env().items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[float]] = {}
    itl: dict[str, float] = {}

    def keep(row: str, w1: dict) -> None:
        result["W1_http"][row] = w1["median"]
        runs[row] = w1["runs"]
        if "itl_p50_ms" in w1:
            itl[row] = w1["itl_p50_ms"]

    if args.workload == "w6":
        try:
            w6 = run_w6(args, port)
        finally:
            serve.shutdown()
            ray.shutdown()
        result["W6"] = w6_summary(w6["steps"])
        result["W6_steps"] = w6["steps"]
        result["W6_setup"] = w6["setup"]
        result["targets"] = w6_targets(result["W6"])
        if args.png:
            write_w6_png(
                w6["steps"],
                args.png,
                f"W6, {args.replicas} replicas, {args.tenants} tenants x {args.users} users",
            )
        return _write(result, args.json)
    try:
        # W1 first, on the fresh Ray instance: the W2 apps' replicas would still be shutting down.
        if not args.skip_w1:
            result["W1_http"] = {"fleetlm": None, "vllm": None}
            keep("fleetlm", run_w1_fleetlm(args, port))
            if args.w1_engine_thread:
                keep("fleetlm_engine_thread", run_w1_fleetlm(args, port, engine_process=False))
            if args.w1_engine_process:
                keep("fleetlm_engine_process", run_w1_fleetlm(args, port, engine_process=True))
        if not args.skip_w2:
            result["W2"], result["W2_setup"] = run_w2(args, port)
    finally:
        serve.shutdown()
        ray.shutdown()
    if not args.skip_w1 and args.w1_direct_ingress:
        # Serve reads the mode from its processes' environment at start: a fresh Ray instance.
        from cluster.ray_runtime import direct_ingress_env

        direct_port = free_port()
        saved = dict(os.environ)
        os.environ.update(direct_ingress_env(direct_port))
        ray.init(
            address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False
        )
        try:
            keep("fleetlm_direct_ingress", run_w1_fleetlm(args, port, direct_port=direct_port))
        finally:
            serve.shutdown()
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)
    if not args.skip_w1 and args.w1_haproxy:
        from cluster.ray_runtime import direct_ingress_env

        saved = dict(os.environ)
        os.environ.update({**direct_ingress_env(free_port()), **HAPROXY_ENV})
        ray.init(
            address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False
        )
        try:
            keep("fleetlm_haproxy", run_w1_fleetlm(args, port, how=", HAProxy"))
        finally:
            serve.shutdown()
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)
    if not args.skip_w1:
        keep("fleetlm_offline", run_w1_offline(args))
    if not args.skip_w1 and args.vllm_python:
        keep("vllm", run_w1_vllm(args))
    if runs:
        result["W1_http_runs"] = runs  # every run; W1_http holds the medians
        # Streamed requests only (not offline): the median over runs of each run's p50 gap
        # between consecutive chunks of a request, at concurrency 32.
        result["W1_itl_p50_ms"] = itl
    result["targets"] = targets(result)
    return _write(result, args.json)


def _write(result: dict[str, Any], path: str | None) -> int:
    text = json.dumps(result, indent=2)
    brief = {k: v for k, v in result.items() if k != "W6_steps"}
    print("\n" + json.dumps(brief, indent=2))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
