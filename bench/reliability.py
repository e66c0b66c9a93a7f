"""Reliability scenarios on a real local Ray Serve: fuzzing, injected faults under streaming load,
overload, a disconnect storm and a short soak; the figures of RELIABILITY.md.

    flock /tmp/fleetlm-bench.lock .venv/bin/python -m bench.reliability --json rel.json
    ... --only fuzz,replica_kill --fuzz-cases 2000 --streams 16

Writes ``{"fuzz": {cases, server_errors, non_openai_errors, hangs}, "faults": {NAME: {completed,
clean_errors, failed_fast, lost, recovery_s}}, "overload": {sent, completed, rejected_429,
other_errors, admitted_p99_ttft_ms}, "disconnects": {clients, leaked_blocks}, "soak": {duration_s,
requests, errors, max_rss_growth_pct}}`` (plus details per section). Each request's outcome is
completed, clean error (an OpenAI error object, as the response or as an SSE error event), failed
fast (the connection dropped, or an error response that is no OpenAI object: seen by the client at
once) or lost (a silent truncation, or hung): see bench/reliability_load.py.

Faults: ``replica_kill`` (SIGKILL of a model replica mid-stream; its streams must end with an error
event within 2 s, the others complete, Serve replaces it, survivors leak no KV blocks),
``tp_worker_kill`` (SIGKILL of a tensor-parallel worker of a TP=2 replica), ``ingress_kill``
(SIGKILL of the ingress replica), ``node_loss`` (a second Ray node started on this machine with
``ray start --address``, holding a replica, stopped), ``policy_scale_down`` (a live policy edit
that scales an autoscaled model from 2 replicas to 1 under load), ``fleetlm_down`` and
``fleetlm_up_sigterm`` (streams in flight while the cluster is stopped: they drain or end with a
clean error, and no process of the cluster is left; bench/reliability_cli.py).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.reliability_load import percentile, streaming_load, tally

KEY = "reliability-key"
MODEL = "tiny"
HEADERS = {"Authorization": f"Bearer {KEY}"}
ENGINE = {"num_kv_blocks": 128, "max_num_seqs": 8, "max_model_len": 512, "num_threads": 1}


# -- Ray glue -------------------------------------------------------------------------------------
def start_ray(num_cpus: int) -> str:
    import ray
    from ray import serve

    from cluster.ray_runtime import free_port

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def cluster_config(
    replicas: int | None = 2,
    autoscaling: dict | None = None,
    http: dict | None = None,
    **model: Any,
):
    from cluster.config import ClusterConfig

    m: dict[str, Any] = {
        "name": MODEL,
        "model": "demo-small",
        "engine": dict(ENGINE),
        "max_queued_requests": 8,
        "resources_per_replica": {"num_cpus": 1},
        "caches": {"exact": {"enabled": False}},
        **model,
    }
    if autoscaling is not None:
        m["autoscaling"] = autoscaling
    else:
        m["num_replicas"] = replicas
    return ClusterConfig.model_validate(
        {
            "models": [m],
            "api_keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
            "http": http or {},
        }
    )


def deploy(root: str, app: Any, name: str) -> str:
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")
    base = f"{root}/{name}"
    wait_ok(base, 120)
    return base


def wait_ok(base: str, timeout_s: float) -> float:
    """Seconds until a tiny completion succeeds."""
    t0 = time.monotonic()
    body = {"model": MODEL, "prompt": "ok", "max_tokens": 1}
    while True:
        try:
            r = httpx.post(base + "/v1/completions", json=body, headers=HEADERS, timeout=10)
            if r.status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{base} not answering after {timeout_s:.0f}s")
        time.sleep(0.25)


def actors(prefix: str) -> list[dict[str, Any]]:
    """Alive actors whose name starts with ``prefix``: name, pid, node id."""
    from ray._private.state import actors as actor_table

    out = []
    for info in actor_table().values():
        if info["State"] == "ALIVE" and info["Name"].startswith(prefix):
            out.append(
                {"name": info["Name"], "pid": info["Pid"], "node": info["Address"]["NodeID"]}
            )
    return out


def replica_prefix(app: str, deployment: str) -> str:
    return f"SERVE_REPLICA::{app}#{deployment}#"


def routing_stats(app: str, deployment: str) -> dict[str, dict]:
    import ray

    out = {}
    for a in actors(replica_prefix(app, deployment)):
        h = ray.get_actor(a["name"], namespace="serve")
        out[a["name"]] = ray.get(h.record_routing_stats.remote(), timeout=30)
    return out


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or deployment not in st.deployments:
        return 0
    states = st.deployments[deployment].replica_states
    return sum(v for k, v in states.items() if str(getattr(k, "value", k)) == "RUNNING")


def wait_recovered(
    base: str, app: str, deployment: str, replicas: int, t0: float, gone: str | None = None
) -> float:
    """Seconds from ``t0`` until the actor ``gone`` is dead, and then the deployment runs
    ``replicas`` again and answers."""
    deadline = time.monotonic() + 180
    while gone is not None and any(a["name"] == gone for a in actors(gone)):
        if time.monotonic() > deadline:
            return float("nan")
        time.sleep(0.1)
    # A replacement is up: as many live replica actors as before, none of them the dead one.
    prefix = replica_prefix(app, deployment)
    while (
        len([a for a in actors(prefix) if a["name"] != gone]) < replicas
        or running_replicas(app, deployment) < replicas
    ):
        if time.monotonic() > deadline:
            return float("nan")
        time.sleep(0.25)
    wait_ok(base, 120)
    return time.monotonic() - t0


def leaked_blocks(app: str, deployment: str, settle_s: float = 30.0) -> int:
    """KV blocks still held once every replica is idle (cached prefixes count as free)."""
    deadline = time.monotonic() + settle_s
    while True:
        stats = routing_stats(app, deployment)
        busy = sum(s["num_running"] + s["num_waiting"] for s in stats.values())
        leaked = sum(s["num_total_blocks"] - s["num_free_blocks"] for s in stats.values())
        if (busy == 0 and leaked == 0) or time.monotonic() > deadline:
            return leaked
        time.sleep(0.5)


def client_connections(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` on local ``port`` (a proxy's clients)."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return 0
    for f in fds:
        try:
            link = os.readlink(f)
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link.removeprefix("socket:[").rstrip("]"))
    n = 0
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            # local address "IP:PORT" (hex), state 01 = ESTABLISHED, inode in column 10
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01" and f[9] in inodes:
                n += 1
    return n


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


# -- scenarios ------------------------------------------------------------------------------------
running_at_kill: dict[str, int] = {}  # requests each replica ran when the last fault struck
# (seconds after the kill, requests the model's live replicas run)
running_after_kill: list[tuple[float, int]] = []
victim_tree: list[int] = []  # the killed process and its descendants


def _orphans(wait_s: float = 15.0) -> int:
    """Processes of the killed one's tree still alive ``wait_s`` later (an engine process must
    follow its replica)."""
    deadline = time.monotonic() + wait_s
    alive = list(victim_tree)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and _not_zombie(p)]
        time.sleep(0.5)
    victim_tree.clear()
    return len(alive)


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _take_running_at_kill() -> dict[str, int]:
    out = dict(running_at_kill)
    running_at_kill.clear()
    return out


def kill_during_load(
    base: str,
    app: str,
    dep: str,
    victim_fn: Any,
    streams: int,
    max_tokens: int,
    kill: Any = lambda pid: os.kill(pid, signal.SIGKILL),
) -> tuple[list, float, str]:
    """Run streaming load; once the model's replicas are generating, SIGKILL the process
    ``victim_fn(routing stats by replica actor name)`` returns as (pid, actor name). Returns the
    outcomes, the monotonic time of the kill and the victim's actor name."""

    async def main():
        load = asyncio.create_task(
            streaming_load(base, MODEL, HEADERS, streams, streams, max_tokens, limit_s=120)
        )
        deadline = time.monotonic() + 60
        while True:  # streams in flight: some replica is generating
            stats = await asyncio.to_thread(routing_stats, app, dep)
            if sum(st["num_running"] for st in stats.values()) >= max(1, streams // 2):
                break
            if time.monotonic() > deadline or load.done():
                raise RuntimeError(f"the load never got going: {stats}")
            await asyncio.sleep(0.1)
        pid, name = await asyncio.to_thread(victim_fn, stats)
        from bench.soak import process_tree

        victim_tree[:] = process_tree(pid)  # e.g. a replica and its engine process
        t_kill = time.monotonic()
        kill(pid)
        running_at_kill.update({k.rsplit("#", 1)[-1]: v["num_running"] for k, v in stats.items()})
        sampler = asyncio.create_task(_sample_running(app, dep, t_kill, load))
        outcomes = await load
        await sampler
        return outcomes, t_kill, name

    return asyncio.run(main())


async def _sample_running(app: str, dep: str, t_kill: float, load: asyncio.Task) -> None:
    """Requests the model's live replicas run, every 0.5 s from the kill until the load ends and
    at least 15 s after the kill: whether the requests of a dead caller are freed, or run to
    their end for nobody."""
    running_after_kill.clear()
    while not load.done() or time.monotonic() - t_kill < 15:
        try:
            stats = await asyncio.wait_for(asyncio.to_thread(routing_stats, app, dep), 5)
            n = sum(st["num_running"] for st in stats.values())
        except Exception:  # noqa: BLE001 - a replica dying right now: skip this sample
            n = -1
        running_after_kill.append((round(time.monotonic() - t_kill, 1), n))
        await asyncio.sleep(0.5)


def _after(outcomes: list, kind: str, t_kill: float) -> list[float]:
    """Seconds from the kill to the end of each request of ``kind`` that ended after it."""
    return sorted(round(o.ended - t_kill, 2) for o in outcomes if o.kind == kind)


def fault_row(outcomes: list, t_kill: float, recovery_s: float, **extra: Any) -> dict[str, Any]:
    t = tally(outcomes)
    errs = _after(outcomes, "clean_error", t_kill)
    fast = _after(outcomes, "failed_fast", t_kill)
    return {
        "completed": t.completed,
        "clean_errors": t.clean_errors,
        "failed_fast": t.failed_fast,
        "lost": t.lost,
        "recovery_s": round(recovery_s, 2),
        "max_error_after_kill_s": errs[-1] if errs else None,
        "max_failed_fast_after_kill_s": fast[-1] if fast else None,
        "errors_after_kill_s": errs,
        "failed_fast_after_kill_s": fast,
        "running_at_kill": _take_running_at_kill(),
        "running_after_kill": list(running_after_kill),
        "orphans": _orphans(),
        **extra,
        "details": t.to_dict(),
    }


def replica_kill(root: str, args: argparse.Namespace) -> dict[str, Any]:
    from deployments.app import build_app, server_name

    app, dep = "rel-kill", server_name(MODEL)
    base = deploy(root, build_app(cluster_config(2)), app)

    def pick(stats: dict[str, dict]) -> tuple[int, str]:
        name = max(stats, key=lambda k: stats[k]["num_running"])  # the busiest replica
        return next(a["pid"] for a in actors(name)), name

    outcomes, t_kill, victim = kill_during_load(base, app, dep, pick, args.streams, args.max_tokens)
    recovery = wait_recovered(base, app, dep, 2, t_kill, gone=victim)
    survivors = [k for k in routing_stats(app, dep) if k != victim]
    leaked = leaked_blocks(app, dep)
    _delete(app)
    return fault_row(outcomes, t_kill, recovery, leaked_blocks=leaked, replicas=len(survivors))


def ingress_kill(root: str, args: argparse.Namespace) -> dict[str, Any]:
    from deployments.app import INGRESS_NAME, build_app, server_name

    app, n = "rel-ingress", args.ingress_replicas
    base = deploy(root, build_app(cluster_config(1, http={"ingress_replicas": n})), app)

    def pick(stats: dict[str, dict]) -> tuple[int, str]:
        a = actors(replica_prefix(app, INGRESS_NAME))[0]
        return a["pid"], a["name"]

    outcomes, t_kill, victim = kill_during_load(
        base, app, server_name(MODEL), pick, args.streams, args.max_tokens
    )
    recovery = wait_recovered(base, app, INGRESS_NAME, n, t_kill, gone=victim)
    leaked = leaked_blocks(app, server_name(MODEL))
    _delete(app)
    return fault_row(outcomes, t_kill, recovery, leaked_blocks=leaked, ingress_replicas=n)


def tp_worker_kill(root: str, args: argparse.Namespace) -> dict[str, Any]:
    from deployments.app import build_app, server_name
    from deployments.tp_worker import WORKER_NAME_PREFIX

    app, dep = "rel-tp", server_name(MODEL)
    cfg = cluster_config(1, tensor_parallel_size=2, resources_per_replica={"num_cpus": 2})
    base = deploy(root, build_app(cfg), app)

    def pick(stats: dict[str, dict]) -> tuple[int, str]:
        # The worker dies; the replica it serves must be replaced (recovery counts until then).
        return actors(WORKER_NAME_PREFIX)[0]["pid"], next(iter(stats))

    outcomes, t_kill, victim = kill_during_load(base, app, dep, pick, args.streams, args.max_tokens)
    recovery = wait_recovered(base, app, dep, 1, t_kill, gone=victim)
    leaked = leaked_blocks(app, dep)
    _delete(app)
    return fault_row(outcomes, t_kill, recovery, leaked_blocks=leaked)


def node_loss(root: str, args: argparse.Namespace) -> dict[str, Any]:
    """A second Ray node on this machine holds one of two replicas; it is stopped mid-stream."""
    import ray

    from deployments.app import build_app, server_name

    gcs = ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    worker = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", f"--address={gcs}", "--num-cpus=2",
         "--block", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if time.monotonic() > deadline or worker.poll() is not None:
                return {"completed": 0, "clean_errors": 0, "lost": 0, "recovery_s": None,
                        "skipped": "the second Ray node did not join"}  # fmt: skip
            time.sleep(0.5)
        worker_node = next(
            n["NodeID"] for n in ray.nodes() if n["Alive"] and not n.get("Resources", {}).get(
                "node:__internal_head__")
        )  # fmt: skip
        app, dep = "rel-node", server_name(MODEL)
        base = deploy(root, build_app(cluster_config(2)), app)
        placed = [a["node"] for a in actors(replica_prefix(app, dep))]
        if worker_node not in placed:
            _delete(app)
            return {"completed": 0, "clean_errors": 0, "lost": 0, "recovery_s": None,
                    "skipped": "Serve placed no replica on the second node"}  # fmt: skip

        port = int(root.rsplit(":", 1)[1])
        at_kill: dict[str, int] = {}

        def pick(stats: dict[str, dict]) -> tuple[int, str]:
            on_node = next(a for a in actors(replica_prefix(app, dep)) if a["node"] == worker_node)
            # Serve's proxies bind the HTTP port with SO_REUSEPORT: with two nodes on one
            # machine the kernel spreads client connections over both proxies, and those held
            # by the lost node's proxy are cut with it.
            for a in actors("SERVE_PROXY_ACTOR"):
                where = "lost_node" if a["node"] == worker_node else "head_node"
                at_kill[f"client_connections_{where}_proxy"] = client_connections(a["pid"], port)
            return worker.pid, on_node["name"]

        # SIGKILL to every process of the node at once (`ray start`, its raylet and the workers
        # the raylet started: the replica, Serve's proxy there), as a crashed machine vanishes.
        # The process group is not enough: the raylet's workers are not in it, and they lived on
        # for seconds after their raylet, still serving.
        def kill_node(pid: int) -> None:
            from bench.soak import process_tree

            for p in process_tree(pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass

        outcomes, t_kill, victim = kill_during_load(
            base, app, dep, pick, args.streams, args.max_tokens, kill=kill_node
        )
        recovery = wait_recovered(base, app, dep, 2, t_kill, gone=victim)
        leaked = leaked_blocks(app, dep)
        _delete(app)
        return fault_row(outcomes, t_kill, recovery, leaked_blocks=leaked, **at_kill)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)


def policy_scale_down(root: str, args: argparse.Namespace) -> dict[str, Any]:
    """An autoscaled model at 2 replicas; under load a live policy edit caps it at 1: the
    scale-down drains, nothing fails."""
    from autoscaling.policy_file import Policy
    from deployments.app import build_app, server_name
    from deployments.autoscaling_policy import put_policy

    app, dep = "rel-policy", server_name(MODEL)
    put_policy(Policy.from_dict({"default": {"min_replicas": 2, "max_replicas": 2}}), "bench")
    cfg = cluster_config(None, {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 2})
    base = deploy(root, build_app(cfg), app)

    async def main():
        load = asyncio.create_task(
            streaming_load(
                base, MODEL, HEADERS, args.streams * 3, args.streams, args.max_tokens,
                spacing_s=0.2,
            )
        )  # fmt: skip
        await asyncio.sleep(2.0)
        t_edit = time.monotonic()
        policy = {
            "default": {
                "min_replicas": 1,
                "max_replicas": 1,
                "scale_down_window_s": 0.5,
                "scale_down_cooldown_s": 0.0,
            }
        }
        await asyncio.to_thread(put_policy, Policy.from_dict(policy), "bench: live edit")
        return await load, t_edit

    outcomes, t_edit = asyncio.run(main())
    deadline = time.monotonic() + 120
    while running_replicas(app, dep) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    scaled = time.monotonic() - t_edit
    leaked = leaked_blocks(app, dep)
    _delete(app)
    row = fault_row(outcomes, t_edit, scaled, leaked_blocks=leaked)
    row["replicas_after"] = 1 if scaled < 120 else 2
    return row


def overload(root: str, args: argparse.Namespace) -> dict[str, Any]:
    """A burst at 10x what the replicas run plus queue: admitted ones complete, the rest 429."""
    from deployments.app import INGRESS_NAME, build_app, server_name

    app, dep = "rel-overload", server_name(MODEL)
    base = deploy(root, build_app(cluster_config(2)), app)
    capacity = 2 * (ENGINE["max_num_seqs"] + 8)
    sent = 10 * capacity
    pids = [a["pid"] for a in actors(replica_prefix(app, dep))]
    pids += [a["pid"] for a in actors(replica_prefix(app, INGRESS_NAME))]
    rss0 = {p: rss_mb(p) for p in pids}
    peak: dict[str, int] = {}  # most requests seen waiting in each replica's engine

    async def main():
        load = asyncio.create_task(
            streaming_load(base, MODEL, HEADERS, sent, sent, args.max_tokens // 2, limit_s=300)
        )
        while not load.done():
            for name, st in (await asyncio.to_thread(routing_stats, app, dep)).items():
                peak[name] = max(peak.get(name, 0), st["num_waiting"])
            await asyncio.sleep(0.2)
        return await load

    outcomes = asyncio.run(main())
    rss1 = {p: rss_mb(p) for p in pids}
    ttfts = [o.first_token_s for o in outcomes if o.kind == "completed" and o.first_token_s]
    rejected = sum(1 for o in outcomes if o.status == 429)
    retry_after_ok = all(o.status != 429 or o.kind == "clean_error" for o in outcomes)
    completed = sum(1 for o in outcomes if o.kind == "completed")
    leaked = leaked_blocks(app, dep)
    _delete(app)
    p99 = percentile(ttfts, 0.99)
    return {
        "sent": sent,
        "completed": completed,
        "rejected_429": rejected,
        "other_errors": sent - completed - rejected,
        "admitted_p99_ttft_ms": round(p99 * 1000, 1) if p99 is not None else None,
        "capacity": capacity,
        "max_waiting_per_replica": max(peak.values(), default=0),
        "queue_limit_per_replica": 8,
        "rejections_are_error_objects": retry_after_ok,
        "max_rss_growth_mb": round(max(rss1[p] - rss0[p] for p in pids), 1),
        "leaked_blocks": leaked,
    }


def disconnects(root: str, args: argparse.Namespace) -> dict[str, Any]:
    """``clients`` streams that hang up after a random number of chunks (0..20)."""
    from deployments.app import build_app, server_name

    app, dep = "rel-disconnect", server_name(MODEL)
    base = deploy(root, build_app(cluster_config(2, max_queued_requests=64)), app)
    outcomes = asyncio.run(
        streaming_load(
            base, MODEL, HEADERS, args.clients, min(args.clients, 128), 200, limit_s=300,
            hang_up=(1, 20), seed=7,
        )
    )  # fmt: skip
    t0 = time.monotonic()
    leaked = leaked_blocks(app, dep, settle_s=60)
    stats = routing_stats(app, dep)
    _delete(app)
    t = tally(outcomes)
    return {
        "clients": args.clients,
        "leaked_blocks": leaked,
        "running_after": sum(s["num_running"] for s in stats.values()),
        "waiting_after": sum(s["num_waiting"] for s in stats.values()),
        "settle_s": round(time.monotonic() - t0, 1),
        "outcomes": t.to_dict(),
    }


def fuzz_section(root: str, args: argparse.Namespace) -> dict[str, Any]:
    from bench.fuzz_api import fuzz
    from deployments.app import build_app

    app = "rel-fuzz"
    # A short context keeps the fuzzer's valid generations short (thousands of cases).
    engine = {**ENGINE, "max_model_len": 96}
    base = deploy(root, build_app(cluster_config(1, engine=engine)), app)
    per_run = max(1, args.fuzz_cases // 4)  # two POST operations x two modes carry the cases
    res = fuzz(base, KEY, per_run, model=MODEL).to_dict()
    _delete(app)
    return res


def _delete(app: str) -> None:
    from ray import serve

    serve.delete(app)


def fleetlm_down(root: str, args: argparse.Namespace) -> dict[str, Any]:
    from bench.reliability_cli import run

    return run("down", args.streams, args.max_tokens, args.drain_timeout)


def fleetlm_up_sigterm(root: str, args: argparse.Namespace) -> dict[str, Any]:
    from bench.reliability_cli import run

    return run("sigterm", args.streams, args.max_tokens, args.drain_timeout)


FAULTS = {
    "replica_kill": replica_kill,
    "tp_worker_kill": tp_worker_kill,
    "ingress_kill": ingress_kill,
    "node_loss": node_loss,
    "policy_scale_down": policy_scale_down,
    "fleetlm_down": fleetlm_down,
    "fleetlm_up_sigterm": fleetlm_up_sigterm,
}
SECTIONS = ["fuzz", *FAULTS, "overload", "disconnects", "soak"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--num-cpus", type=int, default=8, help="CPUs of the local Ray head")
    ap.add_argument("--fuzz-cases", type=int, default=2000)
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams during a fault")
    ap.add_argument("--max-tokens", type=int, default=400, help="tokens per streamed request")
    ap.add_argument("--ingress-replicas", type=int, default=1, help="for ingress_kill")
    ap.add_argument(
        "--drain-timeout", type=float, default=30.0, help="http.drain_timeout_s for fleetlm_*"
    )
    ap.add_argument("--clients", type=int, default=500, help="disconnect storm clients")
    ap.add_argument("--soak-s", type=float, default=120.0, help="soak duration (bench/soak.py)")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else SECTIONS
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = start_ray(args.num_cpus)
    out: dict[str, Any] = {"faults": {}}
    for name in only:
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            if name == "fuzz":
                out["fuzz"] = fuzz_section(root, args)
            elif name in FAULTS:
                out["faults"][name] = FAULTS[name](root, args)
            elif name == "overload":
                out["overload"] = overload(root, args)
            elif name == "disconnects":
                out["disconnects"] = disconnects(root, args)
            elif name == "soak":
                from bench.soak import soak

                out["soak"] = soak(root, args.soak_s)
        except Exception as e:  # noqa: BLE001 - one scenario's failure is its result
            result = {"error": f"{type(e).__name__}: {e}"}
            if name in FAULTS:
                out["faults"][name] = result
            else:
                out[name] = result
        took = time.monotonic() - t0
        section = out["faults"].get(name) if name in FAULTS else out.get(name)
        print(json.dumps({name: section, "took_s": round(took, 1)}, default=str)[:2000], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
