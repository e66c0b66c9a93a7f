"""Response-cache benchmark (W5 of WORKLOADS.md): a question stream with 40% paraphrased repeats.

Stream (fixed seed): every base question once, two paraphrases of each (the repeats: 40% of the
stream with the default set), one near-miss per base (same shape, different answer) and unrelated
extra questions, shuffled so that a base always comes before its paraphrases and its near-miss.
A miss "generates" the question's own answer and stores it; a hit is checked against the answer
the question should get. A false hit is any hit that serves another question's answer (a
first-time question can't correctly hit at all).

Peers in the same run: an exact-only cache and a semantic cache with the same threshold but no
lexical guard (what a plain embedding-threshold cache does).

  python -m bench.cache --json out.json                    # the cache layer in-process
  python -m bench.cache --set heldout                      # questions never used for tuning
  python -m bench.cache --dtype float32                    # reference-precision embedder
  python -m bench.cache --serve                            # served path, local Ray Serve
  python -m bench.cache --url http://127.0.0.1:8000 --api-key KEY --model demo   # a cluster

Figures: hit_fraction (hits / requests), hit_p50_ms (lookup latency of hits; over HTTP, the
whole request as the client sees it), false_hits. Targets: >= 0.30, <= 10 ms, 0. Over HTTP also
hit_ingress_p50_ms (the ingress's own time for a hit, from its Server-Timing header) and
models_get_p50_ms (GET /v1/models: the served path's floor, a request that does no work).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.cache_questions import BASES, EXTRAS, HELDOUT_BASES, HELDOUT_EXTRAS


@dataclass
class Item:
    text: str
    answer: str  # the answer id this question must get
    kind: str  # base | paraphrase | near_miss | extra


def build_stream(set_name: str, seed: int) -> list[Item]:
    bases, extras = (BASES, EXTRAS) if set_name == "main" else (HELDOUT_BASES, HELDOUT_EXTRAS)
    rng = random.Random(seed)
    groups: list[list[Item]] = []
    for i, (q, paras, near) in enumerate(bases):
        groups.append(
            [Item(q, f"b{i}", "base")]
            + [Item(p, f"b{i}", "paraphrase") for p in paras]
            + [Item(near, f"n{i}", "near_miss")]
        )
    groups += [[Item(x, f"x{i}", "extra")] for i, x in enumerate(extras)]
    # Random positions, then each group's base takes its group's earliest position.
    slots = list(range(sum(len(g) for g in groups)))
    rng.shuffle(slots)
    stream: list[Item | None] = [None] * len(slots)
    pos = 0
    for g in groups:
        mine = sorted(slots[pos : pos + len(g)])
        pos += len(g)
        rest = g[1:]
        rng.shuffle(rest)
        for s, item in zip(mine, [g[0], *rest], strict=True):
            stream[s] = item
    return [it for it in stream if it is not None]


def response(answer: str) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


def chat(model: str, text: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": 16,
    }


def summarize(rows: list[dict[str, Any]], n: int) -> dict[str, Any]:
    hits = [r for r in rows if r["kind"] != "miss"]
    lat = [r["ms"] for r in hits]
    by_item: dict[str, dict[str, int]] = {}
    for r in rows:
        d = by_item.setdefault(r["item"], {"n": 0, "hits": 0, "false": 0})
        d["n"] += 1
        d["hits"] += r["kind"] != "miss"
        d["false"] += r["false"]
    return {
        "requests": n,
        "hit_fraction": round(len(hits) / n, 4),
        "hit_p50_ms": round(statistics.median(lat), 3) if lat else None,
        "hit_p90_ms": round(statistics.quantiles(lat, n=10)[-1], 3) if len(lat) >= 2 else None,
        "hit_cpu_p50_ms": (
            round(statistics.median(r["cpu_ms"] for r in hits), 3)
            if hits and "cpu_ms" in hits[0]
            else None
        ),
        "miss_p50_ms": round(statistics.median([r["ms"] for r in rows if r["kind"] == "miss"]), 3),
        "false_hits": sum(r["false"] for r in rows),
        "hits_by_kind": {k: sum(r["kind"] == k for r in rows) for k in ("exact", "semantic")},
        "by_question_kind": by_item,
    }


async def run_layer(
    stream: list[Item], cfg_dict: dict[str, Any], concurrency: int, embedder: Any
) -> dict[str, Any]:
    from deployments.response_cache.config import CacheConfig
    from deployments.response_cache.layer import ResponseCacheLayer

    layer = ResponseCacheLayer(CacheConfig.model_validate(cfg_dict), "bench", embedder=embedder)
    rows: list[dict[str, Any]] = []
    queue = list(enumerate(stream))

    async def one(item: Item) -> None:
        body = chat("bench", item.text)
        t0, c0 = time.perf_counter(), time.process_time()
        got = await layer.lookup("tenant", body)
        # CPU time of the whole process (embed thread included): the cost of a lookup apart from
        # waiting for a core; meaningful at concurrency 1, where nothing else runs meanwhile.
        ms, cpu_ms = (time.perf_counter() - t0) * 1000.0, (time.process_time() - c0) * 1000.0
        row = {"item": item.kind, "kind": "miss", "ms": ms, "cpu_ms": cpu_ms, "false": 0}
        if got is None:
            await layer.store("tenant", body, response(item.answer))
        else:
            served = got[1]["choices"][0]["message"]["content"]
            row.update(kind=got[0], false=int(served != item.answer))
            if row["false"]:
                print(f"  false hit ({got[0]}): {item.text!r} got the answer of {served}")
        rows.append(row)

    # Waves of `concurrency` requests: a wave's lookups are concurrent (and batched together).
    while queue:
        wave, queue = queue[:concurrency], queue[concurrency:]
        await asyncio.gather(*[one(it) for _, it in wave])
    out = summarize(rows, len(stream))
    out["cache_stats"] = layer.stats()
    layer.close()
    return out


async def run_http(stream: list[Item], url: str, api_key: str, model: str) -> dict[str, Any]:
    import httpx

    rows: list[dict[str, Any]] = []
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    seen_answers: set[str] = set()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        for item in stream:
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=chat(model, item.text))
            ms = (time.perf_counter() - t0) * 1000.0
            r.raise_for_status()
            kind = r.headers.get("x-fleetlm-cache", "miss")
            # Over HTTP the served text is the model's, so correctness is judged by the stream:
            # a hit is right only if this question's answer group was asked before.
            wrong = int(kind != "miss" and item.answer not in seen_answers)
            seen_answers.add(item.answer)
            row = {"item": item.kind, "kind": kind, "ms": ms, "false": wrong}
            ingress_ms = _server_timing(r.headers.get("server-timing", ""), "cache")
            if ingress_ms is not None:
                row["ingress_ms"] = ingress_ms
            rows.append(row)
        # The floor of the served path: an authenticated request that does no work at all
        # (client, HTTP, Serve's proxy, the ingress replica and back).
        floor = []
        for _ in range(60):
            t0 = time.perf_counter()
            (await client.get("/v1/models")).raise_for_status()
            floor.append((time.perf_counter() - t0) * 1000.0)
    out = summarize(rows, len(stream))
    ingress = [r["ingress_ms"] for r in rows if "ingress_ms" in r]
    out["hit_ingress_p50_ms"] = round(statistics.median(ingress), 3) if ingress else None
    out["models_get_p50_ms"] = round(statistics.median(floor), 3)
    return out


def _server_timing(header: str, name: str) -> float | None:
    """`dur` in ms of metric `name` in a Server-Timing header ("cache;dur=4.2, db;dur=1")."""
    for metric in header.split(","):
        parts = [p.strip() for p in metric.split(";")]
        if parts[0] == name:
            for p in parts[1:]:
                if p.startswith("dur="):
                    try:
                        return float(p[4:])
                    except ValueError:
                        return None
    return None


def serve_locally(key: str, dtype: str = "auto") -> tuple[str, Any]:
    """Start a local Ray Serve with one demo-small replica behind the ingress, semantic cache on
    (default threshold). Returns (base URL, stop function)."""
    import hashlib
    import socket

    import httpx
    import ray
    from ray import serve

    from cluster.config import ClusterConfig
    from deployments.app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ClusterConfig.model_validate(
        {
            "models": [
                {
                    "name": "demo",
                    "model": "demo-small",
                    "num_replicas": 1,
                    "engine": {"num_kv_blocks": 64, "max_model_len": 256, "num_threads": 1},
                    "resources_per_replica": {"num_cpus": 1},
                    "caches": {"semantic": {"enabled": True, "embed_dtype": dtype}},
                }
            ],
            "api_keys": [{"sha256": hashlib.sha256(key.encode()).hexdigest()}],
        }
    )
    serve.run(build_app(cfg), name="bench-cache", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("ingress never became healthy")
        time.sleep(0.5)
    # Load the ingress's embedding model before measuring (one throwaway semantic miss).
    httpx.post(
        url + "/v1/chat/completions",
        json=chat("demo", "warm up the cache embedder"),
        headers={"authorization": f"Bearer {key}"},
        timeout=300,
    ).raise_for_status()

    def stop() -> None:
        serve.shutdown()
        ray.shutdown()

    return url, stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--set", choices=["main", "heldout"], default="main")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=None, help="default: CacheConfig's")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "int8"],
        default="auto",
        help="embedding model matmul precision (embed_dtype)",
    )
    ap.add_argument("--runs", type=int, default=3, help="repeat the layer run; medians reported")
    ap.add_argument("--url", default=None, help="fleetlm HTTP base URL: measure the served path")
    ap.add_argument(
        "--serve",
        action="store_true",
        help="start a local Ray Serve app (demo-small, semantic cache on) and measure through it",
    )
    ap.add_argument("--api-key", default="")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    stream = build_stream(args.set, args.seed)
    n_para = sum(it.kind == "paraphrase" for it in stream)
    share = n_para / len(stream)
    print(f"stream: {len(stream)} requests, {n_para} paraphrased repeats ({share:.0%})")
    result: dict[str, Any] = {"set": args.set, "seed": args.seed, "requests": len(stream)}
    result["load_average_1m"] = os.getloadavg()[0]  # shared machine: latency depends on it

    if args.url or args.serve:
        url, stop, key = args.url, None, args.api_key
        if args.serve:
            key = key or "bench-cache-key"
            url, stop = serve_locally(key, args.dtype)
            args.model = "demo"
        try:
            result["http"] = asyncio.run(run_http(stream, url, key, args.model))
        finally:
            if stop is not None:
                stop()
        main_fig = result["http"]
        print(
            f"http               hit_fraction={main_fig['hit_fraction']:.3f} "
            f"hit_p50_ms={main_fig['hit_p50_ms']} (in the ingress: "
            f"{main_fig['hit_ingress_p50_ms']}; GET /v1/models: {main_fig['models_get_p50_ms']}) "
            f"miss_p50_ms={main_fig['miss_p50_ms']} "
            f"false_hits={main_fig['false_hits']} hits={main_fig['hits_by_kind']}"
        )
    else:
        import torch

        from deployments.response_cache.embedder import MiniLMEmbedder

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        emb = MiniLMEmbedder(num_threads=1, dtype=args.dtype)
        emb.embed(["warm up"])
        result["embedder_load_s"] = round(time.perf_counter() - t0, 3)
        result["dtype"] = emb.dtype
        sem: dict[str, Any] = {"enabled": True}
        if args.threshold is not None:
            sem["threshold"] = args.threshold
        configs = {
            "semantic": {"semantic": sem},
            "semantic_no_guard": {"semantic": {**sem, "guard": False}},
            "exact_only": {},
        }
        for name, cfg in configs.items():
            runs = [
                asyncio.run(run_layer(stream, cfg, args.concurrency, emb))
                for _ in range(args.runs if name == "semantic" else 1)
            ]
            fig = runs[0]
            if len(runs) > 1:
                fig["hit_p50_ms_runs"] = [r["hit_p50_ms"] for r in runs]
                fig["hit_p50_ms"] = statistics.median(r["hit_p50_ms"] for r in runs)
            result[name] = fig
            print(
                f"{name:18s} hit_fraction={fig['hit_fraction']:.3f} "
                f"hit_p50_ms={fig['hit_p50_ms']} hit_cpu_p50_ms={fig['hit_cpu_p50_ms']} "
                f"false_hits={fig['false_hits']} "
                f"hits={fig['hits_by_kind']}"
            )
        main_fig = result["semantic"]
    result.update(
        hit_fraction=main_fig["hit_fraction"],
        hit_p50_ms=main_fig["hit_p50_ms"],
        false_hits=main_fig["false_hits"],
    )
    print(json.dumps({k: result[k] for k in ("hit_fraction", "hit_p50_ms", "false_hits")}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
