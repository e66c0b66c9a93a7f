"""`fleetlm up` keeps its SIGTERM handler once it is a Ray driver: ray.init() installs its own
(sys.exit(15)), which skipped the CLI's teardown (drain, stop Serve, then the head, exit 0)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A driver as `fleetlm up` is one: its own SIGTERM handler, then ray_runtime.connect(), then a
# SIGTERM. Exit 0 only when our handler ran and the driver disconnected.
DRIVER = """
import os, signal, sys, time
from cluster import ray_runtime

def stop(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, stop)
ray_runtime.connect(sys.argv[1], ray_runtime.auth_mode_for_join())
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
except KeyboardInterrupt:
    ray_runtime.disconnect()
    print("stopped by our handler")
    sys.exit(0)
sys.exit(3)
"""


@pytest.mark.ray
def test_connect_keeps_the_callers_sigterm_handler(ray_session):
    import ray

    gcs = ray.get_runtime_context().gcs_address
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, gcs], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "stopped by our handler" in r.stdout


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    ("grace_s", "streams", "max_tokens"),
    # The streams finish within the grace period (long enough that new requests meet the drain) /
    # outlast it (4 run, 12 wait for a slot).
    [(120.0, 4, 400), (0.5, 16, 400)],
    ids=["drained", "grace-over"],
)
def test_sigterm_to_a_foreground_up_drains_stops_the_cluster_and_exits_0(
    grace_s, streams, max_tokens
):
    import asyncio
    import tempfile

    import httpx

    from bench.reliability_cli import probe_while, process_alive, session_pids
    from bench.reliability_load import streaming_load, tally
    from cluster.ray_runtime import free_port, pid_is_head

    tmp = Path(tempfile.mkdtemp(prefix="flt", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    (tmp / "cluster.yaml").write_text(
        "models:\n  - name: tiny\n    model: demo-small\n"
        "    engine: {num_kv_blocks: 64, max_num_seqs: 4, num_threads: 1}\n"
        "    resources_per_replica: {num_cpus: 1}\n"
        f"http: {{host: 127.0.0.1, port: {port}, drain_timeout_s: {grace_s}}}\n"
        "ray: {num_cpus: 2}\n"
    )
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "FLEETLM_STATE_DIR": str(tmp / "state")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-c", "import sys; from cluster.cli import main; sys.exit(main())"]
    up = subprocess.Popen(
        [*cmd, "up", "-c", str(tmp / "cluster.yaml"), "--ray-port", str(free_port())],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    head = None
    try:
        deadline = time.monotonic() + 300
        body = {"model": "tiny", "prompt": "ok", "max_tokens": 1}
        while True:  # serving (not only /health: the model replica too)
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            try:
                url = f"http://127.0.0.1:{port}/v1/completions"
                if httpx.post(url, json=body, timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "fleetlm up never served"
            time.sleep(1.0)
        head = json.loads((tmp / "state" / "cluster.json").read_text())["head_pid"]
        cluster = session_pids(os.getsid(head))
        assert len(cluster) > 3  # GCS, raylet, Serve's actors, the replicas
        base = f"http://127.0.0.1:{port}"

        async def streams_then_sigterm():
            load = streaming_load(base, "tiny", {}, streams, streams, max_tokens, limit_s=150)
            load = asyncio.create_task(load)
            await asyncio.sleep(1.5)  # the streams are in flight
            up.send_signal(signal.SIGTERM)
            probes = await probe_while(base, {}, asyncio.create_task(asyncio.to_thread(up.wait)))
            return await load, probes

        outcomes, probes = asyncio.run(streams_then_sigterm())
        out = up.stdout.read() if up.stdout else ""
        assert up.returncode == 0, out[-3000:]
        assert "Draining" in out and "Stopped." in out, out[-3000:]
        t = tally(outcomes)
        if grace_s > 100:
            assert "Drained in" in out, out[-3000:]
            assert t.completed == streams, t.to_dict()  # drained: every stream ran to its end
        else:  # the streams still running at the deadline end with an error event, none is cut
            assert "Grace period over" in out, out[-3000:]
            assert t.clean_errors >= 1 and t.completed + t.clean_errors == streams, t.to_dict()
            errors = [o.detail for o in outcomes if o.kind == "clean_error"]
            assert all("shutting down" in d for d in errors), errors
        # New requests while draining: the 503 naming the reason; after Serve: no connection.
        assert probes.get("503 server_shutting_down", 0) >= 1, (probes, out[-2000:])
        # A request admitted before the drain began completes (200); one that reaches the proxy
        # while Serve itself stops may see its connection close (ReadError).
        allowed = {"200", "503 server_shutting_down", "ConnectError", "ReadError"}
        assert set(probes) <= allowed | {"RemoteProtocolError"}, (probes, out[-2000:])
        assert not pid_is_head(head)
        deadline = time.monotonic() + 30
        while (left := [p for p in cluster if process_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == [], "processes of the cluster left behind"
        assert not (tmp / "state" / "cluster.json").exists()
        head = None
    finally:
        if up.poll() is None:
            up.kill()
        if head is not None:
            from cluster.ray_runtime import stop_head

            stop_head(head)
        shutil.rmtree(tmp, ignore_errors=True)
