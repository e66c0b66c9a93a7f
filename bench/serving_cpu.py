"""Where the CPU goes while one replica serves W1: CPU seconds per process (Serve proxy, ingress,
replica, engine core, the client) per run and per 1,000 streamed tokens, for each engine mode
(``--modes``: the engine core in its own process or on a thread of the replica; "-mainloop":
Serve runs our code on each replica's main event loop; "process-spin": the engine core's OpenMP
threads spin before they sleep, libgomp's default; "thread-passive": the replica's sleep at once,
as the engine core's do; "process-actorcalls": Serve's proxy reaches the ingress through Ray
actor calls, Serve's default, where ``serving_env`` has it talk gRPC; "process-haproxy": HAProxy
in place of Serve's proxy, forwarding to the ingress replica's own HTTP server; "process-direct":
the client talks to that server itself (``http.direct_ingress``); "process-tput":
Serve's throughput-optimized pieces without direct ingress; "-nice": proxy, ingress and replica
reniced to 10 after start), each run on a fresh Ray instance, runs interleaved (A B A B ...) so
machine noise hits every mode alike. ``--workloads N`` measures N W1 workloads back to back per
run (W1 alone lasts a few seconds).

    flock /tmp/fleetlm-bench.lock python bench/serving_cpu.py --repeats 3 --json out.json
    python bench/serving_cpu.py --burn 2 ...   # with two busy-looping processes beside it

Each run reports output tok/s, p50 inter-token latency, wall time, and per process kind CPU
seconds (user + system, from /proc) over the run and per 1,000 output tokens; "busy" is all CPU
seconds over wall time (2.0 = both cores of this machine). Every run (and its unmeasured run
before) sends prompts of its own, so none hits the prefix cache another filled. ``--burn N``
starts N processes that spin at nice 0 for the whole command: a busy machine, made repeatable.
``--env KEY=VALUE`` sets a variable in every process of the Ray instance (e.g. an OpenMP wait
policy). ``--profile DIR`` runs py-spy on the proxy, ingress, replica and engine core over each
measured run and adds each one's top frames to the JSON (those runs' CPU includes py-spy's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing import cluster_config, deploy_and_wait, free_port, warm_up  # noqa: E402

from cluster.bench.client import run_workload  # noqa: E402
from cluster.bench.workloads import make_workload  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
# Serve's user code (our deployments) on each replica's main event loop, and its router on the
# caller's loop: what Serve's throughput-optimized mode sets, without its direct ingress.
_MAIN_LOOP = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
# The engine core starts with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep at once); libgomp's
# default instead spins 300,000 times first, which GOMP_SPINCOUNT brings back.
_SPIN = {"GOMP_SPINCOUNT": "300000"}
_SPIN_SHORT = {"GOMP_SPINCOUNT": "10000"}  # a few microseconds of spinning, then sleep
_PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
# The proxy reaches the ingress over Serve's inter-deployment gRPC server instead of Ray actor
# calls (one gRPC stream per HTTP request instead of a Ray streaming generator).
_GRPC = {"RAY_SERVE_PROXY_USE_GRPC": "1"}  # the default now (cluster/ray_runtime.serving_env)
_ACTOR_CALLS = {"RAY_SERVE_PROXY_USE_GRPC": "0"}  # Serve's own default: Ray streaming generators
# HAProxy (C) in place of Serve's Python proxy on the same port, forwarding HTTP to the ingress
# replica's own HTTP server (direct ingress): Serve's high-throughput mode (ports set per run).
_HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
_DIRECT: dict[str, str] = {}  # http.direct_ingress: the client talks to the ingress replica's port
# Serve's throughput-optimized mode without its direct ingress: user code and routers on the
# main loops, the proxy over gRPC, access logs buffered, no log copies to stderr.
_TPUT = {
    **_MAIN_LOOP,
    **_GRPC,
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}
NICE = 10  # "-nice" modes: the proxy, ingress and replica at this niceness, the engine core at 0
# mode -> (engine_process, environment of every process of the mode's Ray instance, niceness of
# the serving processes: proxy, ingress, replica)
MODES: dict[str, tuple[bool, dict[str, str], int]] = {
    "process": (True, {}, 0),
    "thread": (False, {}, 0),
    "process-mainloop": (True, _MAIN_LOOP, 0),
    "thread-mainloop": (False, _MAIN_LOOP, 0),
    "process-spin": (True, _SPIN, 0),
    "process-spin10k": (True, _SPIN_SHORT, 0),
    "thread-passive": (False, _PASSIVE, 0),
    "process-grpc": (True, _GRPC, 0),
    "process-actorcalls": (True, _ACTOR_CALLS, 0),
    "process-haproxy": (True, _HAPROXY, 0),
    "process-direct": (True, _DIRECT, 0),
    "process-tput": (True, _TPUT, 0),
    "process-nice": (True, {}, NICE),
    "process-tput-nice": (True, _TPUT, NICE),
}


def proc_table() -> list[tuple[int, int, str, float]]:
    """(pid, parent pid, command line, CPU seconds) of every process of this machine (/proc)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK  # utime + stime
        out.append((int(pid), int(fields[1]), cmd, cpu))
    return out


def own_processes() -> list[tuple[int, str, float]]:
    """(pid, command line, CPU seconds) of this command's descendants: the Ray instance it
    started (GCS, raylet, workers) and their children (engine cores); not other Ray instances
    on a shared machine."""
    table = proc_table()
    children: dict[int, list[int]] = {}
    for pid, ppid, _, _ in table:
        children.setdefault(ppid, []).append(pid)
    mine, todo = set(), [os.getpid()]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in mine:
                mine.add(c)
                todo.append(c)
    return [(pid, cmd, cpu) for pid, _, cmd, cpu in table if pid in mine]


def kind(cmd: str) -> str | None:
    if "engine.engine_core" in cmd:
        return "engine_core"
    for tag, k in (
        ("LLMServer", "replica"),
        ("OpenAIIngress", "ingress"),
        ("ProxyActor", "proxy"),
        ("HAProxyManager", "proxy"),
        ("haproxy", "proxy"),
        ("ServeController", "controller"),
        ("raylet", "ray_system"),
        ("gcs_server", "ray_system"),
    ):
        if tag in cmd:
            return k
    return None


def renice_serving(niceness: int) -> None:
    """Every thread of the proxy, ingress and replica processes to ``niceness`` (Linux keeps a
    niceness per thread; threads started later inherit their creator's); the engine core, a
    process of its own, keeps its niceness."""
    for pid, cmd, _ in own_processes():
        if kind(cmd) not in ("proxy", "ingress", "replica"):
            continue
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, niceness)


def cpu_by_kind() -> dict[str, float]:
    out: dict[str, float] = {}
    for _, cmd, cpu in own_processes():
        k = kind(cmd)
        if k is not None:
            out[k] = out.get(k, 0.0) + cpu
    t = os.times()
    out["client"] = t.user + t.system
    return out


PROFILED = ("proxy", "ingress", "replica", "engine_core")
PY_SPY = str(Path(sys.executable).parent / "py-spy")


def start_profiles(out_dir: Path, tag: str) -> list[tuple[subprocess.Popen, Path]]:
    """py-spy (100 Hz) on each serving process, only samples of the thread holding the GIL: the
    Python CPU (threads blocked in Ray's native code would otherwise look busy)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid, cmd, _ in own_processes():
        k = kind(cmd)
        if k in PROFILED:
            path = out_dir / f"{tag}-{k}-{pid}.txt"
            cmd_ = [PY_SPY, "record", "-p", str(pid), "-r", "100", "-f", "raw", "-o", str(path)]
            procs.append((subprocess.Popen([*cmd_, "--gil"], **_QUIET), path))
    time.sleep(1.0)  # py-spy attaches
    return procs


_QUIET = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}


def stop_profiles(procs: list[tuple[subprocess.Popen, Path]]) -> dict[str, list]:
    """SIGINT each py-spy (it writes its file then) and summarize: per file, the samples and
    the top functions by own samples (the frame a sample ends in)."""
    for p, _ in procs:
        p.send_signal(signal.SIGINT)
    out = {}
    for p, path in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        if path.exists():
            out[path.name] = top_frames(path.read_text())
    return out


def top_frames(collapsed: str, n: int = 12) -> dict[str, Any]:
    """Collapsed stacks ("f1;f2;...;leaf count" per line) -> total samples, the ``n`` leaf
    frames with the most samples ("top", native frames included) and the ``n`` innermost Python
    functions ("top_py": the Python code a sample was in, with the native code it called)."""
    leaves: dict[str, int] = {}
    pys: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)", ")", f) for f in stack.split(";")]
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + int(count)
        py = next((f for f in reversed(frames) if ".py)" in f), "(no Python frame)")
        pys[py] = pys.get(py, 0) + int(count)
        total += int(count)

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [
            (f, round(c / max(total, 1), 3))
            for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:n]
        ]

    return {"samples": total, "top": top(leaves), "top_py": top(pys)}


def one_run(
    url: str, model: str, seed: int, profile: tuple[Path, str] | None = None, workloads: int = 1
) -> dict:
    """``workloads`` W1 workloads one after another (seeds ``seed``, ``seed + 1``, ...) measured as
    one run: a longer window than W1's few seconds."""
    procs = start_profiles(*profile) if profile else []
    before, t0 = cpu_by_kind(), time.perf_counter()
    results = [
        asyncio.run(run_workload(url, model, make_workload("W1", seed=seed + i), progress=False))
        for i in range(workloads)
    ]
    wall, after = time.perf_counter() - t0, cpu_by_kind()
    profiles = stop_profiles(procs) if procs else None
    cpu = {k: round(after[k] - before.get(k, 0.0), 2) for k in after}
    tokens = sum(r.total_output_tokens for r in results)
    k_tokens = tokens / 1000
    busy_s = sum(r.total_output_tokens / r.output_throughput for r in results)  # each W1's span
    return {
        "tok_s": round(tokens / busy_s, 1),
        "itl_p50_ms": round(statistics.median(r.itl_ms.p50 for r in results), 1),
        "wall_s": round(wall, 2),
        "cpu_s": cpu,
        "cpu_s_per_1k_tokens": {k: round(v / k_tokens, 3) for k, v in cpu.items()},
        "busy": round(sum(cpu.values()) / wall, 2),
        **({"profiles": profiles} if profiles else {}),
    }


def _burn() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["process", "thread"], choices=MODES)
    p.add_argument(
        "--workloads", type=int, default=1, help="W1 workloads per measured run (a longer window)"
    )
    p.add_argument("--burn", type=int, default=0, help="busy-looping processes beside the runs")
    p.add_argument(
        "--profile",
        help="folder: py-spy each serving process over every measured run (collapsed stacks);"
        " the figures of such runs include py-spy's own CPU",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set in every process of the Ray instance (replicas, engine cores), e.g."
        " OMP_WAIT_POLICY=PASSIVE",
    )
    p.add_argument("--json")
    args = p.parse_args(argv)
    for kv in args.env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            p.error(f"--env wants KEY=VALUE, got {kv!r}")
        os.environ[key] = value
    import multiprocessing

    import ray
    from ray import serve

    from cluster.cmd_serve import find_direct_ingress
    from cluster.ray_runtime import direct_ingress_env, serving_env

    for key, value in serving_env().items():  # what `fleetlm up` starts its head with
        os.environ.setdefault(key, value)
    port = free_port()
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.burn)]
    for b in burners:
        b.start()
    seed = 0
    try:
        for _ in range(args.repeats):
            for mode in args.modes:
                engine_process, env, niceness = MODES[mode]
                saved = dict(os.environ)
                os.environ.update(env)  # a Ray instance of the mode's own: Serve reads it at start
                direct_port = free_port()
                if env is _HAPROXY or env is _DIRECT:
                    os.environ.update({**direct_ingress_env(direct_port), **env})
                ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
                try:
                    engine = {"max_num_seqs": 64, "num_threads": args.threads}
                    cfg = cluster_config(
                        args.model, port, 1, "prefix_aware", 8, engine, float(args.threads),
                        engine_process=engine_process,
                    )  # fmt: skip
                    url = deploy_and_wait(cfg)
                    if env is _DIRECT:
                        url = find_direct_ingress("127.0.0.1", direct_port) or url
                    if niceness:
                        renice_serving(niceness)
                    warm_up(url, args.model, 4)
                    seed += 1 + args.workloads
                    wl = make_workload("W1", seed=seed)
                    asyncio.run(run_workload(url, args.model, wl, progress=False))
                    tag = f"{mode}{len(runs[mode])}"
                    prof = (Path(args.profile), tag) if args.profile else None
                    r = one_run(url, args.model, seed + 1, prof, args.workloads)
                    print(f"   {mode}: {json.dumps(r)}", flush=True)
                    runs[mode].append(r)
                finally:
                    serve.shutdown()
                    ray.shutdown()
                    os.environ.clear()
                    os.environ.update(saved)
    finally:
        for b in burners:
            b.terminate()
    summary = {m: statistics.median(r["tok_s"] for r in rs) for m, rs in runs.items()}
    per_1k = {
        m: {
            k: round(statistics.median(r["cpu_s_per_1k_tokens"].get(k, 0.0) for r in rs), 3)
            for k in rs[0]["cpu_s_per_1k_tokens"]
        }
        for m, rs in runs.items()
    }
    result = {
        "command": " ".join(sys.argv),
        "median_tok_s": summary,
        "median_cpu_s_per_1k_tokens": per_1k,
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
