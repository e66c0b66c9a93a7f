"""W4 (load step) on a real local Ray Serve: the fleetlm policy beside Ray Serve's default
`target_ongoing_requests` policy, equal replica bounds, one run.

    python -m bench.autoscaling [--time-scale 1] [--json out.json] [--png out.png]

Capacity model: on a 2-core machine real model replicas stop adding capacity past two, so each
replica is bench/autoscaling_replica.CapacityReplica: at most --max-running requests at once,
each producing --tok-s tokens/s asleep (not on the CPU). N replicas serve N times one replica's
load, as on N machines. Requests go through a Serve handle (Serve's router and queue, streaming);
TTFT is timed by the client from send to the first streamed chunk, so it includes every queue.

Figures per policy: scale_up_s (step start -> first added replica RUNNING), p99 TTFT of requests
sent during the step, replica-seconds (every replica that exists, starting and draining included,
integrated over the run), failed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from autoscaling.policy_file import parse_policy
from autoscaling.simulate import percentile, w4_trace

MODEL = "w4bench"
LIVE_STATES = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "STOPPING")

POLICY_YAML = f"""
models:
  {MODEL}:
    target_queue_depth: {{target}}
    min_replicas: 1
    max_replicas: {{max_replicas}}
    scale_up_window_s: 1
    scale_down_window_s: 20
    scale_up_cooldown_s: 2
    scale_down_cooldown_s: 10
    max_step_up: 4
    max_step_down: 1
    ttft_slo_s: {{slo}}
"""


@dataclass
class Run:
    name: str
    ttfts: list[tuple[float, float]] = field(default_factory=list)  # (sent at, ttft s)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, running, live)


def deployment_options(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    from deployments.autoscaling_policy import GRACEFUL_SHUTDOWN_OPTIONS, serve_autoscaling_config

    opts: dict[str, Any] = {
        "name": f"{policy}-{MODEL}",
        "max_ongoing_requests": args.max_running * 2,
        "ray_actor_options": {"num_cpus": 0.01},
        **GRACEFUL_SHUTDOWN_OPTIONS,
    }
    if policy == "fleetlm":
        opts["autoscaling_config"] = serve_autoscaling_config(MODEL, 1, args.max_replicas)
    else:  # Serve's default policy and settings; only the bounds are set, equal to ours
        opts["autoscaling_config"] = {"min_replicas": 1, "max_replicas": args.max_replicas}
    return opts


async def one_request(handle, sent_rel: float, run: Run, tokens: int) -> None:
    t0 = time.monotonic()
    first = None
    try:
        async for _chunk in handle.options(stream=True).stream.remote(tokens):
            if first is None:
                first = time.monotonic() - t0
        assert first is not None, "no chunk"
        run.ttfts.append((sent_rel, first))
    except Exception as e:  # every failure counts; the first few are kept for the report
        run.failed += 1
        if len(run.errors) < 5:
            run.errors.append(repr(e)[:200])


async def watch(app: str, dep: str, start: float, run: Run, stop: asyncio.Event) -> None:
    from ray import serve

    while not stop.is_set():
        st = await asyncio.to_thread(serve.status)
        states = st.applications[app].deployments[dep].replica_states
        live = sum(int(states.get(s, 0)) for s in LIVE_STATES)
        run.timeline.append((time.monotonic() - start, int(states.get("RUNNING", 0)), live))
        await asyncio.sleep(0.5)


def run_policy(policy: str, args: argparse.Namespace, arrivals) -> Run:
    from ray import serve

    from bench.autoscaling_replica import CapacityReplica

    app = f"w4-{policy}"
    opts = deployment_options(policy, args)
    dep = serve.deployment(CapacityReplica).options(**opts)
    handle = serve.run(
        dep.bind(max_running=args.max_running, tokens_per_s_per_request=args.tok_s),
        name=app,
        route_prefix=None,
    )
    run = Run(policy)

    async def drive() -> None:
        # warm the handle's routing path before the clock starts
        await handle.remote(2)
        start = time.monotonic()
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(app, opts["name"], start, run, stop))
        tasks = []
        for a in arrivals:
            delay = a.t - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(handle, a.t, run, a.output_tokens)))
        await asyncio.gather(*tasks)
        # keep counting replica-seconds until the trace's end (the tail is part of W4)
        end = arrivals[-1].t if arrivals else 0.0
        while time.monotonic() - start < end + args.settle_s:
            await asyncio.sleep(0.5)
        stop.set()
        await watcher

    wall0 = time.time()
    asyncio.run(drive())
    if policy == "fleetlm":
        from deployments.autoscaling_policy import get_history

        for e in get_history(opts["name"]).get(opts["name"], []):
            if e["from"] != e["to"] and e["t"] >= wall0:
                print(f"  {e['t'] - wall0:6.1f}s {e['from']}->{e['to']}  {e['reason']}")
    serve.delete(app)
    return run


def summarize(run: Run, step_start: float, step_end: float, initial: int = 1) -> dict[str, Any]:
    up = next((t for t, n, _ in run.timeline if t >= step_start and n > initial), None)
    step_ttfts = [x for s, x in run.ttfts if step_start <= s < step_end]
    p99 = percentile(step_ttfts, 99)
    rs = 0.0
    for (t0, _, live), (t1, _, _) in zip(run.timeline, run.timeline[1:], strict=False):
        rs += live * (t1 - t0)
    return {
        "scale_up_s": None if up is None else round(up - step_start, 2),
        "p99_ttft_ms": None if p99 is None else round(p99 * 1000, 1),
        "replica_seconds": round(rs, 1),
        "failed": run.failed,
        "requests": len(run.ttfts) + run.failed,
        "mean_ttft_step_ms": round(1000 * sum(step_ttfts) / max(1, len(step_ttfts)), 1),
        "max_replicas": max((n for _, n, _ in run.timeline), default=0),
    }


def plot(runs: list[Run], path: str, step: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for r in runs:
        a1.step(
            [t for t, _, _ in r.timeline],
            [n for _, n, _ in r.timeline],
            where="post",
            label=f"{r.name} running",
        )
        a2.scatter([s for s, _ in r.ttfts], [x for _, x in r.ttfts], s=3, label=r.name)
    for a in (a1, a2):
        a.axvspan(*step, color="grey", alpha=0.1)
    a1.set_ylabel("replicas RUNNING")
    a1.legend()
    a2.set_ylabel("TTFT (s)")
    a2.set_yscale("log")
    a2.set_xlabel("time (s)")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply W4's phases (30 s / 120 s / 120 s); < 1 while developing",
    )
    ap.add_argument("--rate", type=float, default=2.0, help="low request rate/s (step: 8x)")
    ap.add_argument("--max-replicas", type=int, default=6)
    ap.add_argument("--max-running", type=int, default=4, help="requests a replica runs at once")
    ap.add_argument("--tok-s", type=float, default=20.0, help="tokens/s of each running request")
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--target", type=float, default=4.0, help="fleetlm target_queue_depth")
    ap.add_argument("--slo", type=float, default=0.5, help="fleetlm ttft_slo_s")
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--policies", default="fleetlm,serve_default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--png", help="plot replica counts and TTFTs here")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from deployments.autoscaling_policy import put_policy

    k = args.time_scale
    low, step_len, tail = 30 * k, 120 * k, 120 * k
    arrivals = w4_trace(args.rate, 8.0, low, step_len, tail, args.output_tokens, args.seed)
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    policy_text = POLICY_YAML.format(
        target=args.target, max_replicas=args.max_replicas, slo=args.slo
    )
    put_policy(parse_policy(policy_text, "bench"), "bench/autoscaling.py")
    cap = args.max_running * args.tok_s / args.output_tokens
    print(
        f"# W4: {len(arrivals)} requests; {args.rate:g} req/s, step to {8 * args.rate:g} req/s "
        f"at {low:g}s for {step_len:g}s, tail {tail:g}s; one replica serves {cap:g} req/s "
        f"({args.max_running} running x {args.tok_s:g} tok/s, {args.output_tokens} tokens); "
        f"replicas 1..{args.max_replicas}"
    )
    runs, out = [], {}
    try:
        for policy in args.policies.split(","):
            t0 = time.time()
            run = run_policy(policy, args, arrivals)
            runs.append(run)
            out[policy] = summarize(run, low, low + step_len)
            print(f"{policy:14s} {json.dumps(out[policy])}  ({time.time() - t0:.0f}s)")
            for e in run.errors:
                print(f"  error: {e}")
    finally:
        serve.shutdown()
        ray.shutdown()
    if "fleetlm" in out and "serve_default" in out:
        a, b = out["fleetlm"], out["serve_default"]
        if a["p99_ttft_ms"] and b["p99_ttft_ms"] and b["replica_seconds"]:
            print(
                f"# fleetlm / serve_default: p99 TTFT in the step "
                f"{a['p99_ttft_ms'] / b['p99_ttft_ms']:.2f}x, replica-seconds "
                f"{a['replica_seconds'] / b['replica_seconds']:.2f}x "
                f"(target <= 0.7x at <= 1.1x)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.png:
        plot(runs, args.png, (low, low + step_len))
    return 0 if all(v["failed"] == 0 for v in out.values()) else 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
