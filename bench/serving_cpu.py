"""Where the CPU goes while one replica serves W1: CPU seconds per process (Serve proxy, ingress,
replica, engine core, the client) for the engine core in its own process and on a thread of the
replica, runs interleaved (A B A B ...) so machine noise hits both alike.

    flock /tmp/fleetlm-bench.lock python bench/serving_cpu.py --repeats 3 --json out.json

Each run reports output tok/s, wall time, and per process kind CPU seconds (user + system, from
/proc) over the run; "busy" is all CPU seconds over wall time (2.0 = both cores of this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing import cluster_config, deploy_and_wait, free_port, undeploy, warm_up  # noqa: E402

from cluster.bench.client import run_workload  # noqa: E402
from cluster.bench.workloads import make_workload  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def proc_table() -> list[tuple[str, float]]:
    """(command line, CPU seconds) of every process of this machine (/proc)."""
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
        out.append((cmd, (int(fields[11]) + int(fields[12])) / CLK))  # utime + stime
    return out


def kind(cmd: str) -> str | None:
    if "engine.engine_core" in cmd:
        return "engine_core"
    for tag, k in (
        ("LLMServer", "replica"),
        ("OpenAIIngress", "ingress"),
        ("ProxyActor", "proxy"),
        ("ServeController", "controller"),
        ("raylet", "ray_system"),
        ("gcs_server", "ray_system"),
    ):
        if tag in cmd:
            return k
    return None


def cpu_by_kind() -> dict[str, float]:
    out: dict[str, float] = {}
    for cmd, cpu in proc_table():
        k = kind(cmd)
        if k is not None:
            out[k] = out.get(k, 0.0) + cpu
    t = os.times()
    out["client"] = t.user + t.system
    return out


def one_run(url: str, model: str) -> dict:
    before, t0 = cpu_by_kind(), time.perf_counter()
    res = asyncio.run(run_workload(url, model, make_workload("W1", seed=0), progress=False))
    wall, after = time.perf_counter() - t0, cpu_by_kind()
    cpu = {k: round(after[k] - before.get(k, 0.0), 2) for k in after}
    return {
        "tok_s": round(res.output_throughput, 1),
        "wall_s": round(wall, 2),
        "cpu_s": cpu,
        "busy": round(sum(cpu.values()) / wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    import ray
    from ray import serve

    from cluster.ray_runtime import WORKER_NICENESS_ENV

    os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    runs: dict[str, list[dict]] = {"process": [], "thread": []}
    try:
        for _ in range(args.repeats):
            for mode in ("process", "thread"):
                engine = {"max_num_seqs": 64, "num_threads": args.threads}
                cfg = cluster_config(
                    args.model, port, 1, "prefix_aware", 8, engine, float(args.threads),
                    engine_process=mode == "process",
                )  # fmt: skip
                url = deploy_and_wait(cfg)
                warm_up(url, args.model, 4)
                asyncio.run(run_workload(url, args.model, make_workload("W1"), progress=False))
                r = one_run(url, args.model)
                print(f"   {mode}: {json.dumps(r)}", flush=True)
                runs[mode].append(r)
                undeploy()
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {m: statistics.median(r["tok_s"] for r in rs) for m, rs in runs.items()}
    result = {"command": " ".join(sys.argv), "median_tok_s": summary, "runs": runs}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
