"""`fleetlm up --detach` end to end, as a user runs it: its own Ray head (token auth), the openai
client with an API key read from the environment, `fleetlm status`, `fleetlm down`.

Isolation from other Ray instances on the machine: RAY_TMPDIR points at a private directory (so
this head's ray_current_cluster is never joined by a plain ray.init() elsewhere), every port is
free-picked, and FLEETLM_STATE_DIR keeps the cluster record out of ~/.cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster import ray_runtime
from cluster.ray_runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "e2e-secret-key"


def fleetlm(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from cluster.cli import main; sys.exit(main())", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").partition("=")[::2] for kv in raw if b"=" in kv)


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc's parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_up_detach_serves_openai_clients_then_status_and_down():
    import openai

    # Short path: Ray's unix socket paths must stay under ~107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="flt", dir="/tmp"))
    http_port = free_port()
    cfg = tmp / "cluster.yaml"
    cfg.write_text(
        "models:\n"
        "  - name: tiny\n"
        "    model: demo-small\n"
        "    engine: {num_kv_blocks: 128, max_num_seqs: 8}\n"
        "    resources_per_replica: {num_cpus: 1}\n"
        "api_keys:\n"
        "  - env: FLEETLM_E2E_KEY\n"
        "http: {host: 127.0.0.1, port: " + str(http_port) + "}\n"
        "ray: {num_cpus: 2}\n"
    )
    env = {
        **os.environ,
        "RAY_TMPDIR": str(tmp),
        "FLEETLM_STATE_DIR": str(tmp / "state"),
        "FLEETLM_E2E_KEY": API_KEY,
    }
    env.pop("RAY_ADDRESS", None)
    head_pid = None
    try:
        t0 = time.monotonic()
        up = fleetlm(env, "up", "-c", str(cfg), "--detach", "--ray-port", str(free_port()))
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{http_port}/v1" in up.stdout
        assert "curl " in up.stdout and "Authorization: Bearer" in up.stdout
        assert "running: " in up.stdout  # the progress display reached the running state
        state = json.loads((tmp / "state" / "cluster.json").read_text())
        head_pid = state["head_pid"]
        assert ray_runtime.pid_is_head(head_pid) and state["auth_mode"] == "token"
        # Our head recorded itself in the private RAY_TMPDIR only.
        assert state["address_file"] == str(tmp / "ray" / "ray_current_cluster")
        print(f"up took {time.monotonic() - t0:.1f}s")

        base = f"http://127.0.0.1:{http_port}/v1"
        client = openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0, timeout=120)
        out = client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=4, temperature=0
        )
        assert out.usage.completion_tokens <= 4 and out.usage.prompt_tokens > 0
        assert isinstance(out.choices[0].text, str)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        # Streamed through Serve's proxy, which talks gRPC to the ingress on a head `fleetlm up`
        # started (cluster/ray_runtime.serving_env): the same greedy text (in one chunk or several:
        # tokens that pile up before the stream starts travel together).
        proxies = [pid for pid in descendants(head_pid) if "ProxyActor" in cmdline(pid)]
        assert proxies
        for pid in proxies:
            assert environ(pid).get(ray_runtime.PROXY_GRPC_ENV) == "1"
        chunks = client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=4, temperature=0, stream=True
        )
        texts = [c.choices[0].text for c in chunks if c.choices]
        assert texts and "".join(texts) == out.choices[0].text

        st = fleetlm(env, "status", "--json", timeout=120)
        assert st.returncode == 0, st.stderr
        report = json.loads(st.stdout)
        assert report["app"]["status"] == "RUNNING"
        assert report["deployments"]["LLMServer-tiny"]["replicas"] == {"RUNNING": 1}

        t1 = time.monotonic()
        down = fleetlm(env, "down", timeout=180)
        print(f"down took {time.monotonic() - t1:.1f}s")
        assert down.returncode == 0, down.stderr
        assert not ray_runtime.pid_is_head(head_pid)
        assert not (tmp / "state" / "cluster.json").exists()
        assert not (tmp / "ray" / "ray_current_cluster").exists()
        head_pid = None
    finally:
        if head_pid is not None:  # a failed assertion must not leave the head running
            ray_runtime.stop_head(head_pid)
        shutil.rmtree(tmp, ignore_errors=True)
