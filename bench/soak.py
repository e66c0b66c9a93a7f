"""Soak: W3-like streaming load at about 70% of the replicas' batch capacity for a bounded time,
every 10th client hanging up early, a live policy edit halfway; then every process's resident
memory growth after warm-up, and the KV blocks back at baseline.

    flock /tmp/fleetlm-bench.lock .venv/bin/python -m bench.soak --duration 1200 --json soak.json

Targets (RELIABILITY.md): 0 unexpected errors, RSS growth <= 10% per process after warm-up,
0 leaked blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from bench.reliability_load import completion_body, stream_request, tally

REPLICAS = 2
LOAD_FRACTION = 0.7


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (a replica's engine process, TP workers started as children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        # Each thread lists the children it started (a replica starts its engine process from a
        # worker thread, not the main one).
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(k) for k in (task / "children").read_text().split())
            except OSError:
                continue
    return out


def soak(root: str, duration_s: float, max_tokens: int = 128) -> dict[str, Any]:
    from autoscaling.policy_file import Policy
    from bench.reliability import (
        ENGINE,
        HEADERS,
        MODEL,
        actors,
        cluster_config,
        deploy,
        leaked_blocks,
        replica_prefix,
        rss_mb,
    )
    from deployments.app import INGRESS_NAME, build_app, server_name
    from deployments.autoscaling_policy import put_policy

    app, dep = "rel-soak", server_name(MODEL)
    base = deploy(root, build_app(cluster_config(REPLICAS)), app)
    pids: list[int] = []
    names: dict[int, str] = {}
    # Replicas (and their engine processes), the ingress, Serve's proxy and controller.
    prefixes = (replica_prefix(app, dep), replica_prefix(app, INGRESS_NAME), "SERVE_PROXY_ACTOR",
                "SERVE_CONTROLLER_ACTOR")  # fmt: skip
    for prefix in prefixes:
        for a in actors(prefix):
            for p in process_tree(a["pid"]):
                pids.append(p)
                names[p] = a["name"].split("#", 1)[-1] if p == a["pid"] else f"child of {a['pid']}"
    concurrency = max(1, int(LOAD_FRACTION * REPLICAS * ENGINE["max_num_seqs"]))
    warmup_s = min(60.0, duration_s * 0.2)
    t_start = time.monotonic()
    deadline = t_start + duration_s
    rss_warm: dict[int, float] = {}
    samples: list[dict[str, Any]] = []  # RSS (MB) per process every sample_s: the trend
    sample_s = max(10.0, duration_s / 20)
    outcomes: list = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        i = c
        while time.monotonic() < deadline:
            cut = 3 if i % 10 == 0 else None  # periodic disconnects
            body = completion_body(MODEL, i, max_tokens)
            o = await stream_request(http, base + "/v1/completions", body, HEADERS, 120, cut)
            outcomes.append(o)
            i += concurrency

    async def monitor() -> None:
        edited, next_sample = False, t_start
        while time.monotonic() < deadline:
            now = time.monotonic()
            if not rss_warm and now - t_start >= warmup_s:
                rss_warm.update({p: rss_mb(p) for p in pids})
            if now >= next_sample:
                next_sample += sample_s
                samples.append(
                    {"t_s": round(now - t_start), "rss_mb": [round(rss_mb(p), 1) for p in pids]}
                )
            if not edited and now - t_start >= duration_s / 2:
                edited = True
                policy = Policy.from_dict({"default": {"target_queue_depth": 6}})
                await asyncio.to_thread(put_policy, policy, "soak: live edit")
            await asyncio.sleep(1.0)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            await asyncio.gather(monitor(), *(client(c, http) for c in range(concurrency)))

    asyncio.run(main())
    rss_end = {p: rss_mb(p) for p in pids}
    growth_by_pid = {
        p: 100.0 * (rss_end[p] - rss_warm[p]) / rss_warm[p]
        for p in pids
        if rss_warm.get(p) and rss_end.get(p)
    }
    growth = list(growth_by_pid.values())
    leaked = leaked_blocks(app, dep, settle_s=60)
    from ray import serve

    serve.delete(app)
    t = tally(outcomes)
    return {
        "duration_s": round(duration_s, 1),
        "requests": len(outcomes),
        "errors": t.clean_errors + t.failed_fast + t.lost,
        "max_rss_growth_pct": round(max(growth), 2) if growth else None,
        "processes": len(pids),
        "concurrency": concurrency,
        "leaked_blocks": leaked,
        "outcomes": t.to_dict(),
        "per_process": [
            {
                "pid": p,
                "name": names.get(p, ""),
                "rss_warm_mb": round(rss_warm.get(p, 0), 1),
                "rss_end_mb": round(rss_end.get(p, 0), 1),
                "growth_pct": round(growth_by_pid[p], 2) if p in growth_by_pid else None,
            }
            for p in pids
        ],
        "rss_samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--duration", type=float, default=1200.0, help="seconds of load (default 20 min)"
    )
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-cpus", type=int, default=8)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bench.reliability import start_ray

    res = soak(start_ray(args.num_cpus), args.duration, args.max_tokens)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
