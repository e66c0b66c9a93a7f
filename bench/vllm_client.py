"""fleetlm as a user starts it, measured with vLLM's own benchmark client (`vllm bench serve`),
against vLLM's OpenAI server on the same model, one server at a time.

    flock /tmp/fleetlm-bench.lock python bench/vllm_client.py --model demo --json out.json

Workloads (streaming completions, ignore_eos):
- W1: random 128 prompt / 64 output tokens, concurrency 32 (``--num-prompts`` of them);
- W2: prefix repetition (16 prefixes of 512 tokens, 64-token suffixes, 64 output), concurrency 16.

fleetlm runs as `fleetlm up --model MODEL --detach` (only the ports are chosen, so nothing else on
the machine collides), vLLM as bench/vllm_server.py starts it. The client is vLLM's
``vllm.benchmarks.serve`` run with the vLLM venv's Python (its ``vllm`` console script needs the
package metadata, which a source install may lack). Where this differs from bench/routing.py (our
own client): see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import served_steps  # noqa: E402
from vllm_server import DEFAULT_VLLM_PYTHON, VLLMServer, free_port, resolve_model_dir  # noqa: E402

CLIENT = """
import argparse, sys
from vllm.benchmarks.serve import add_cli_args, main
p = argparse.ArgumentParser()
add_cli_args(p)
main(p.parse_args(sys.argv[1:]))
"""

WORKLOADS = {
    "W1": [
        "--dataset-name", "random", "--random-input-len", "128", "--random-output-len", "64",
        "--max-concurrency", "32",
    ],
    "W2": [
        "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "512",
        "--prefix-repetition-suffix-len", "64", "--prefix-repetition-num-prefixes", "16",
        "--prefix-repetition-output-len", "64", "--max-concurrency", "16",
    ],
}  # fmt: skip
KEYS = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_itl_ms")
# Prompt tokens looked up in / found in the prefix cache, from each server's /metrics (fleetlm's
# engine counters as Ray exports them; vLLM's own).
HIT_METRICS = {
    "fleetlm": ("ray_fleetlm_prefix_cache_hits_total", "ray_fleetlm_prefix_cache_queries_total"),
    "vllm": ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
}
METRICS_LAG_S = 6.0  # Ray exports a replica's metrics every few seconds


def prefix_cache_counts(base_url: str, server: str) -> tuple[float, float]:
    """(hit tokens, queried tokens) so far, from the server's /metrics ((0, 0) if unreadable:
    the hit rate is then left out, the run still counts)."""
    try:
        text = urllib.request.urlopen(base_url + "/metrics", timeout=10).read().decode()
    except OSError as e:
        print(f"   /metrics unreadable: {e!r}")
        return 0.0, 0.0
    return prefix_cache_sums(text, server)


def prefix_cache_sums(text: str, server: str) -> tuple[float, float]:
    """(hit tokens, queried tokens) in Prometheus text, summed over every series of the two
    counters (with or without the "_total" suffix)."""
    hits_name, queries_name = (n.removesuffix("_total") for n in HIT_METRICS[server])
    sums = {hits_name: 0.0, queries_name: 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0].removesuffix("_total")
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums[hits_name], sums[queries_name]


def run_client(args, base_url: str, model: str, tokenizer: str, workload: str, server: str) -> dict:
    h0, q0 = prefix_cache_counts(base_url, server)
    out = tempfile.mkdtemp(prefix="vllm-bench-")
    cmd = [
        args.vllm_python, "-c", CLIENT, "--backend", "openai", "--base-url", base_url,
        "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
        "--num-prompts", str(args.num_prompts), "--ignore-eos", "--seed", "0",
        "--save-result", "--result-dir", out, "--result-filename", "r.json",
        *WORKLOADS[workload],
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=out, stdout=subprocess.DEVNULL)
    r = json.loads(Path(out, "r.json").read_text())
    row = {k: r.get(k) for k in KEYS}
    time.sleep(METRICS_LAG_S if server == "fleetlm" else 0.5)
    h1, q1 = prefix_cache_counts(base_url, server)
    row["prefix_cache_hit_rate"] = (h1 - h0) / (q1 - q0) if q1 > q0 else None
    print(f"   {workload}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if v is not None))
    return row


def run_fleetlm(args, model_dir: str) -> dict:
    port, ray_port = free_port(), free_port()
    fleetlm = str(Path(sys.executable).parent / "fleetlm")
    env = dict(os.environ, FLEETLM_STATE_DIR=tempfile.mkdtemp(prefix="fleetlm-state-"))
    if args.step_trace:
        env["FLEETLM_STEP_TRACE"] = args.step_trace
    source = ["--config", args.config] if args.config else ["--model", args.model]
    up = [fleetlm, "up", *source, "--port", str(port), "--ray-port", str(ray_port)]
    print(f"\n== fleetlm: {' '.join(up[1:])} --detach")
    subprocess.run([*up, "--detach"], check=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        name = json.loads(
            subprocess.run(
                ["curl", "-s", url + "/v1/models"], capture_output=True, text=True, check=True
            ).stdout
        )["data"][0]["id"]
        return {w: run_client(args, url, name, model_dir, w, "fleetlm") for w in args.workloads}
    finally:
        subprocess.run([fleetlm, "down"], env=env, check=False)
        if args.step_trace:
            prefix = Path(args.step_trace)
            for path in sorted(prefix.parent.glob(prefix.name + ".*")):
                summary = served_steps.summarize(served_steps.load(path))
                print(f"   steps {path}: {served_steps.describe(summary)}")


def run_vllm(args, model_dir: str) -> dict:
    print("\n== vLLM's OpenAI server (bench/vllm_server.py)")
    with VLLMServer(args.model, vllm_python=args.vllm_python) as srv:
        return {
            w: run_client(args, srv.url, srv.model_name, model_dir, w, "vllm")
            for w in args.workloads
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="demo, demo-small or a local HF folder")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=sorted(WORKLOADS))
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument(
        "--config",
        help="start fleetlm with this cluster file instead of --model (its model must be --model)",
    )
    p.add_argument(
        "--step-trace",
        help="PREFIX: the engine core writes its step trace to PREFIX.<pid> (summed up after the "
        "run; bench/served_steps.py); one run per prefix",
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    result: dict = {"command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    result["fleetlm"] = run_fleetlm(args, model_dir)
    if not args.skip_vllm:
        result["vllm"] = run_vllm(args, model_dir)
        result["ratio_output_throughput"] = {
            w: result["fleetlm"][w]["output_throughput"] / result["vllm"][w]["output_throughput"]
            for w in args.workloads
        }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
