"""`fleetlm down` and SIGTERM of a foreground `fleetlm up` with streams in flight: every stream
drains (completes) within the grace period (http.drain_timeout_s) or ends with a clean error, new
requests meanwhile get a 503 'server is shutting down', and no process of the cluster (Ray's, the
replicas', their engine processes) is left behind.

    flock /tmp/fleetlm-bench.lock .venv/bin/python -m bench.reliability_cli --json cli.json

Each scenario starts its own `fleetlm up` (own Ray head, own state directory, a free HTTP port).
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
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.reliability_load import streaming_load, tally

KEY = "reliability-key"
MODEL = "tiny"


def session_pids(sid: int) -> set[int]:
    """Processes of one session (the Ray head `fleetlm up` starts runs in a session of its own)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    out.add(int(d.name))
            except OSError:
                continue
    return out


def write_config(tmp: Path, port: int, drain_timeout_s: float) -> Path:
    cfg = {
        "models": [
            {
                "name": MODEL,
                "model": "demo-small",
                "num_replicas": 1,
                "engine": {"max_num_seqs": 8, "max_model_len": 512, "num_threads": 1},
                "resources_per_replica": {"num_cpus": 1},
            }
        ],
        "http": {"host": "127.0.0.1", "port": port, "drain_timeout_s": drain_timeout_s},
        "api_keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
        "ray": {"num_cpus": 4},
    }
    p = tmp / "cluster.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def fleetlm(*args: str, env: dict[str, str], **kw: Any) -> subprocess.Popen:
    exe = str(Path(sys.executable).with_name("fleetlm"))
    return subprocess.Popen([exe, *args], env=env, **kw)


def run(kind: str, streams: int, max_tokens: int, drain_timeout_s: float) -> dict[str, Any]:
    """kind: "down" (`fleetlm up --detach`, then `fleetlm down`) or "sigterm" (SIGTERM to a
    foreground `fleetlm up`)."""
    from cluster.ray_runtime import free_port

    tmp = Path(tempfile.mkdtemp(prefix=f"fleetlm-rel-{kind}-"))
    port = free_port()
    env = {**os.environ, "FLEETLM_STATE_DIR": str(tmp / "state")}
    cfg = write_config(tmp, port, drain_timeout_s)
    log = open(tmp / "up.log", "wb")
    up_args = ["up", "-c", str(cfg), "--ray-port", str(free_port())]
    up = fleetlm(*up_args, *(["--detach"] if kind == "down" else []), env=env, stdout=log,
                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + 600
    ping = {"model": MODEL, "prompt": "ok", "max_tokens": 1}
    while True:  # serving: a completion answers (/health answers before the model is up)
        try:
            r = httpx.post(base + "/v1/completions", json=ping, headers=headers, timeout=10)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or (kind == "down" and up.poll() not in (None, 0)):
            return {"error": f"fleetlm up not serving; log {tmp / 'up.log'}"}
        time.sleep(1.0)
    state = json.loads((tmp / "state" / "cluster.json").read_text())
    sid = os.getsid(state["head_pid"])
    before = session_pids(sid)

    async def main():
        load = asyncio.create_task(
            streaming_load(base, MODEL, headers, streams, streams, max_tokens, limit_s=180)
        )
        await asyncio.sleep(2.0)
        t_stop = time.monotonic()
        if kind == "down":
            stopping = asyncio.create_task(asyncio.to_thread(
                subprocess.run, [str(Path(sys.executable).with_name("fleetlm")), "down"],
                env=env, capture_output=True, timeout=300,
            ))  # fmt: skip
        else:
            up.send_signal(signal.SIGTERM)
            stopping = asyncio.create_task(asyncio.to_thread(up.wait, 300))
        probe_statuses = await probe_while(base, headers, stopping)
        stop = await stopping
        stop_rc = stop.returncode if kind == "down" else stop
        return await load, time.monotonic() - t_stop, stop_rc, probe_statuses

    outcomes, stop_s, stop_rc, probes = asyncio.run(main())
    deadline = time.monotonic() + 90  # the head drains its node for up to 30 s on SIGTERM
    while any(process_alive(p) for p in before) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = sorted(p for p in before if process_alive(p))
    t = tally(outcomes)
    return {
        "completed": t.completed,
        "clean_errors": t.clean_errors,
        "failed_fast": t.failed_fast,
        "lost": t.lost,
        "recovery_s": None,  # the cluster is stopped on purpose
        "stop_s": round(stop_s, 1),
        "stop_exit_code": stop_rc,
        "drain_timeout_s": drain_timeout_s,
        "new_requests_while_stopping": probes,
        "processes_before": len(before),
        "processes_left": len(left),
        "left": [_cmd(p) for p in left][:10],
        "details": t.to_dict(),
    }


async def probe_while(base: str, headers: dict[str, str], stopping: asyncio.Task) -> dict:
    """New requests while the cluster stops, one started every 0.5 s (each on its own, so one
    waiting for a slot doesn't hold the next back): how each was answered (a 503 'server is
    shutting down' while draining, then no connection once Serve is gone)."""
    out: dict[str, int] = {}
    body = {"model": MODEL, "prompt": "new", "max_tokens": 4}

    async def one(http: httpx.AsyncClient) -> None:
        try:
            r = await http.post(base + "/v1/completions", json=body, headers=headers)
            try:
                code = (r.json().get("error") or {}).get("code") if r.status_code != 200 else None
            except ValueError:
                code = "non-JSON"
            key = f"{r.status_code} {code}" if code else str(r.status_code)
        except httpx.HTTPError as e:
            key = type(e).__name__
        out[key] = out.get(key, 0) + 1

    async with httpx.AsyncClient(timeout=60) as http:
        tasks = []
        while not stopping.done():
            tasks.append(asyncio.create_task(one(http)))
            await asyncio.sleep(0.5)
        await asyncio.gather(*tasks)
    return out


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="down,sigterm")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="http.drain_timeout_s")
    ap.add_argument("--max-tokens", type=int, default=150)
    ap.add_argument("--json", help="write {fleetlm_down: ..., fleetlm_up_sigterm: ...} here")
    args = ap.parse_args()
    names = {"down": "fleetlm_down", "sigterm": "fleetlm_up_sigterm"}
    out = {}
    for kind in args.only.split(","):
        out[names[kind]] = run(kind, args.streams, args.max_tokens, args.drain_timeout)
        print(json.dumps({names[kind]: out[names[kind]]}, default=str), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
