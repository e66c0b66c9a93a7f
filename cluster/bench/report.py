"""Human-readable summary (laid out like vLLM's `bench serve`) and the JSON result file."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.bench.metrics import BenchResult, Stats

WIDTH = 50


def _line(label: str, value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40}{value:>10}"


def _stats_block(title: str, name: str, s: Stats) -> list[str]:
    return [
        title.center(WIDTH, "-"),
        _line(f"Mean {name} (ms):", s.mean),
        _line(f"Median {name} (ms):", s.p50),
        _line(f"P90 {name} (ms):", s.p90),
        _line(f"P99 {name} (ms):", s.p99),
    ]


def summary_text(r: BenchResult) -> str:
    c = r.config
    drive = f"concurrency {c.get('concurrency')}" if c.get("concurrency") else "unbounded"
    if c.get("rate"):
        drive += f", Poisson {c['rate']} req/s"
    lines = [
        f" fleetlm bench {c.get('workload')} ".center(WIDTH, "="),
        _line("Server:", str(c.get("url"))),
        _line("Model:", str(c.get("model"))),
        _line("Driven by:", drive),
        _line("Successful requests:", r.completed),
        _line("Failed requests:", r.failed),
        _line("Benchmark duration (s):", r.duration_s),
        _line("Total input tokens:", r.total_input_tokens),
        _line("Total generated tokens:", r.total_output_tokens),
        _line("Request throughput (req/s):", r.request_throughput),
        _line("Output token throughput (tok/s):", r.output_throughput),
        _line("Total token throughput (tok/s):", r.total_token_throughput),
        _line(f"Goodput (req/s) [{_slo_text(r)}]:", r.goodput),
    ]
    if r.prefix_cache_hit_rate is not None:
        lines.append(_line("Prefix cache hit rate (%):", 100 * r.prefix_cache_hit_rate))
    lines += _stats_block("Time to First Token", "TTFT", r.ttft_ms)
    lines += _stats_block("Time per Output Token (excl. 1st token)", "TPOT", r.tpot_ms)
    lines += _stats_block("Inter-token Latency", "ITL", r.itl_ms)
    lines += _stats_block("End-to-end Latency", "E2E", r.e2e_ms)
    if r.by_tag and len(r.by_tag) <= 8:
        lines.append("By tag: mean TTFT ms / mean E2E ms / decode tok/s".center(WIDTH, "-"))
        for tag, d in r.by_tag.items():
            figs = f"{d['mean_ttft_ms']:.1f}/{d['mean_e2e_ms']:.1f}/{d['decode_tok_s']:.1f}"
            lines.append(_line(f"{tag} (n={int(d['count'])}):", figs))
    if r.errors:
        lines.append("First errors".center(WIDTH, "-"))
        lines += [f"  {e}" for e in r.errors]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _slo_text(r: BenchResult) -> str:
    parts = []
    if r.slo.ttft_ms is not None:
        parts.append(f"TTFT<={r.slo.ttft_ms:g}ms")
    if r.slo.tpot_ms is not None:
        parts.append(f"TPOT<={r.slo.tpot_ms:g}ms")
    if r.slo.e2e_ms is not None:
        parts.append(f"E2E<={r.slo.e2e_ms:g}ms")
    return ",".join(parts) or "no SLO"


def sweep_text(results: list[BenchResult]) -> str:
    """One row per run of a rate sweep: where latency and goodput break (W3's saturation point)."""
    head = (
        f"{'rate':>7} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'TPOT p50':>9} {'TPOT p99':>9} {'goodput':>8} {'failed':>6}"
    )
    rows = [head]
    for r in results:
        rate = r.config.get("rate")
        rows.append(
            f"{rate if rate is not None else 'inf':>7} {r.request_throughput:>7.2f} "
            f"{r.output_throughput:>10.1f} {r.ttft_ms.p50:>9.1f} {r.ttft_ms.p99:>9.1f} "
            f"{r.tpot_ms.p50:>9.1f} {r.tpot_ms.p99:>9.1f} {r.goodput:>8.2f} {r.failed:>6}"
        )
    return "\n".join(rows)


def write_json(
    r: BenchResult | list[BenchResult], path: str | Path, include_requests: bool = True
) -> Path:
    """Write a result (or a sweep's results, as {"sweep": [...]}) as JSON.

    Per-request rows are included unless `include_requests` is False.
    """

    def one(x: BenchResult) -> dict:
        d = x.to_dict()
        if not include_requests:
            d.pop("requests")
        return d

    doc = {"sweep": [one(x) for x in r]} if isinstance(r, list) else one(r)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2) + "\n")
    return p
