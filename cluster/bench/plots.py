"""PNG plots of one benchmark result, for users without Grafana (matplotlib, Agg backend).

Three panels: latency percentiles (TTFT/TPOT/ITL/E2E at p50/p90/p99), output throughput and requests
in flight over time, and each request's TTFT against its send time (queueing shows as a ramp).
"""

from __future__ import annotations

from pathlib import Path

from cluster.bench.metrics import BenchResult


def write_png(r: BenchResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    _latency_panel(axes[0], r)
    _throughput_panel(axes[1], r)
    _ttft_panel(axes[2], r)
    c = r.config
    fig.suptitle(
        f"{c.get('workload')} on {c.get('model')} @ {c.get('url')}: "
        f"{r.output_throughput:.0f} output tok/s, {r.completed} ok / {r.failed} failed, "
        f"{r.duration_s:.1f} s"
    )
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def write_sweep_png(results: list[BenchResult], path: str | Path) -> Path:
    """A rate sweep: TTFT/TPOT percentiles, output throughput and goodput against offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r.config.get("rate") or 0.0 for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, name, attr in ((axes[0], "TTFT", "ttft_ms"), (axes[1], "TPOT", "tpot_ms")):
        for pct in ("p50", "p90", "p99"):
            ax.plot(rates, [getattr(getattr(r, attr), pct) for r in results], "o-", label=pct)
        slo = results[0].slo.ttft_ms if name == "TTFT" else results[0].slo.tpot_ms
        if slo is not None:
            ax.axhline(slo, color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} vs rate")
        ax.legend()
    ax = axes[2]
    ax.plot(rates, [r.output_throughput for r in results], "o-", color="#4c72b0")
    ax.set_ylabel("output tok/s", color="#4c72b0")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_title("Throughput and goodput vs rate")
    ax2 = ax.twinx()
    ax2.plot(rates, [r.goodput for r in results], "s--", color="#55a868")
    ax2.plot(rates, [r.request_throughput for r in results], ".:", color="grey")
    ax2.set_ylabel("goodput (green) / completed (grey), req/s")
    c = results[0].config
    fig.suptitle(f"{c.get('workload')} rate sweep on {c.get('model')} @ {c.get('url')}")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def _latency_panel(ax, r: BenchResult) -> None:
    names = ["TTFT", "TPOT", "ITL", "E2E"]
    stats = [r.ttft_ms, r.tpot_ms, r.itl_ms, r.e2e_ms]
    width = 0.25
    for k, (pct, color) in enumerate([("p50", "#4c72b0"), ("p90", "#dd8452"), ("p99", "#c44e52")]):
        xs = [i + (k - 1) * width for i in range(len(names))]
        ys = [max(getattr(s, pct), 1e-3) for s in stats]  # log axis: keep empty samples drawable
        ax.bar(xs, ys, width, label=pct, color=color)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("Latency percentiles")
    ax.legend()


def _throughput_panel(ax, r: BenchResult) -> None:
    ts = r.timeseries
    ax.set_title("Throughput over time")
    ax.set_xlabel("s since start")
    if ts is None or not ts.t:
        return
    ax.step(ts.t, ts.output_tok_s, where="post", color="#4c72b0", label="output tok/s")
    ax.set_ylabel("output tok/s", color="#4c72b0")
    ax2 = ax.twinx()
    ax2.step(ts.t, ts.in_flight, where="post", color="#55a868", label="in flight")
    ax2.set_ylabel("requests in flight", color="#55a868")
    ax.axhline(r.output_throughput, color="#4c72b0", linestyle=":", linewidth=1)


def _ttft_panel(ax, r: BenchResult) -> None:
    ok = [q for q in r.requests if q["success"]]
    bad = [q for q in r.requests if not q["success"] and q["send_s"] is not None]
    ax.scatter([q["send_s"] for q in ok], [q["ttft_ms"] for q in ok], s=10, label="TTFT")
    if bad:
        ax.scatter(
            [q["send_s"] for q in bad], [0] * len(bad), marker="x", color="red", label="failed"
        )
    if r.slo.ttft_ms is not None:
        ax.axhline(r.slo.ttft_ms, color="grey", linestyle="--", linewidth=1, label="TTFT SLO")
    ax.set_xlabel("send time (s since start)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT per request")
    ax.legend()
