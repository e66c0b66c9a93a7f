"""Presenting a replay (autoscaling/simulate.py): a table over time and a PNG."""

from __future__ import annotations

from pathlib import Path

from autoscaling.simulate import SimResult


def format_rows(result: SimResult, every_s: float = 10.0) -> str:
    lines = [
        f"{'t(s)':>6} {'replicas':>8} {'serving':>7} {'queued':>6} {'running':>7} "
        f"{'arr/s':>5} {'p99 TTFT':>9} {'SLO viol':>8}"
    ]
    for r in result.rows:
        if abs(r.t / every_s - round(r.t / every_s)) > 1e-6:
            continue
        p99 = "-" if r.p99_ttft_s is None else f"{r.p99_ttft_s:.2f}s"
        lines.append(
            f"{r.t:6.0f} {r.target:8d} {r.serving:7d} {r.queued:6d} {r.running:7d} "
            f"{r.arrivals:5d} {p99:>9} {r.slo_violations:8d}"
        )
    return "\n".join(lines)


def plot(result: SimResult, path: str | Path, title: str = "autoscaling replay") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r.t for r in result.rows]
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    a1.step(t, [r.target for r in result.rows], where="post", label="replicas decided")
    a1.step(t, [r.serving for r in result.rows], where="post", label="replicas serving")
    a1.set_ylabel("replicas")
    a1b = a1.twinx()
    a1b.plot(t, [r.arrivals for r in result.rows], color="grey", alpha=0.4, label="arrivals/s")
    a1b.set_ylabel("arrivals/s")
    a1.legend(loc="upper left")
    a2.plot(t, [r.queued for r in result.rows], label="queued")
    a2.plot(t, [r.queued + r.running for r in result.rows], label="queued + running")
    a2.set_ylabel("requests")
    a2.legend(loc="upper left")
    a3.scatter([a for a, _ in result.ttfts], [x for _, x in result.ttfts], s=3, label="TTFT")
    a3.axhline(result.slo_s, color="red", linestyle="--", label=f"SLO {result.slo_s:g}s")
    a3.set_ylabel("TTFT (s)")
    a3.set_xlabel("time (s)")
    a3.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
