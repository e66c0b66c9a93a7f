"""Turn per-request records into benchmark figures, with vLLM `bench serve` meanings.

TTFT = send → first chunk with choices. TPOT = (E2E − TTFT) / (output tokens − 1), only for requests
with more than one output token. ITL = gaps between consecutive chunks of a request (all requests
pooled). E2E = send → last chunk. Throughputs divide by the whole run's wall time. Goodput =
requests per second that met every SLO given. Percentiles: numpy's linear interpolation, as vLLM.
Times inside are seconds; reported latencies are milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cluster.bench.client import RequestRecord

MAX_ERRORS_KEPT = 5
PERCENTILES = (50, 90, 99)


@dataclass
class SLO:
    ttft_ms: float | None = 1000.0
    tpot_ms: float | None = 100.0
    e2e_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"slo {name} must be > 0, got {v}")

    def met(self, ttft_s: float, tpot_s: float, e2e_s: float) -> bool:
        return (
            (self.ttft_ms is None or ttft_s * 1000 <= self.ttft_ms)
            and (self.tpot_ms is None or tpot_s * 1000 <= self.tpot_ms)
            and (self.e2e_ms is None or e2e_s * 1000 <= self.e2e_ms)
        )


@dataclass
class Stats:
    """Summary of one latency in milliseconds; all zero (count 0) for an empty sample."""

    count: int = 0
    mean: float = 0.0
    std: float = 0.0
    min: float = 0.0
    max: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0

    @classmethod
    def of_seconds(cls, values: list[float]) -> Stats:
        if not values:
            return cls()
        a = np.asarray(values, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(np.percentile(a, p)) for p in PERCENTILES)
        return cls(
            count=len(values),
            mean=float(a.mean()),
            std=float(a.std()),
            min=float(a.min()),
            max=float(a.max()),
            p50=p50,
            p90=p90,
            p99=p99,
        )


@dataclass
class TimeSeries:
    """Per-bin figures over the run, bins of `bin_s` seconds starting at the first send."""

    bin_s: float
    t: list[float]  # bin start, seconds since the run started
    output_tok_s: list[float]  # output tokens received in the bin / bin_s
    finished_req_s: list[float]  # successful requests finished in the bin / bin_s
    in_flight: list[float]  # requests sent but not finished, time-averaged over the bin


@dataclass
class BenchResult:
    config: dict[str, Any]
    duration_s: float
    completed: int
    failed: int
    errors: list[str]  # the first few failure messages, in request order
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # req/s
    output_throughput: float  # output tok/s
    total_token_throughput: float  # (input + output) tok/s
    goodput: float  # req/s meeting every SLO
    slo: SLO
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    prefix_cache_hit_rate: float | None  # cached prompt tokens / prompt tokens, if the server said
    by_tag: dict[str, dict[str, float]] = field(default_factory=dict)
    timeseries: TimeSeries | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tpot(r: RequestRecord) -> float:
    return (r.e2e - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def _bin_width(duration_s: float) -> float:
    """About 1 s bins for long runs, at least 20 bins for short ones (never below 10 ms)."""
    return max(0.01, min(1.0, duration_s / 20))


def _timeseries(records: list[RequestRecord], start: float, duration_s: float) -> TimeSeries:
    bin_s = _bin_width(duration_s)
    nbins = max(1, math.ceil(duration_s / bin_s))
    tokens = np.zeros(nbins)
    finished = np.zeros(nbins)
    in_flight = np.zeros(nbins)

    def idx(t: float) -> int:
        return min(nbins - 1, max(0, int((t - start) / bin_s)))

    for r in records:
        if r.success:  # failed requests' tokens count nowhere, as in the throughput figures
            for t, n in zip(r.chunk_times, r.chunk_tokens, strict=True):
                tokens[idx(t)] += n
            finished[idx(r.chunk_times[-1])] += 1
        if r.send_time == 0.0:
            continue  # never sent
        end = r.chunk_times[-1] if r.chunk_times else r.send_time
        for b in range(idx(r.send_time), idx(end) + 1):
            t0 = start + b * bin_s
            in_flight[b] += max(0.0, min(end, t0 + bin_s) - max(r.send_time, t0)) / bin_s
    return TimeSeries(
        bin_s=bin_s,
        t=[b * bin_s for b in range(nbins)],
        output_tok_s=(tokens / bin_s).tolist(),
        finished_req_s=(finished / bin_s).tolist(),
        in_flight=in_flight.tolist(),
    )


def _by_tag(ok: list[RequestRecord]) -> dict[str, dict[str, float]]:
    tags = sorted({r.tag for r in ok if r.tag})
    out = {}
    for tag in tags:
        rs = [r for r in ok if r.tag == tag]
        decode_s = sum(r.e2e - r.ttft for r in rs)
        decoded = sum(r.output_tokens - 1 for r in rs)
        out[tag] = {
            "count": len(rs),
            "mean_ttft_ms": 1000 * float(np.mean([r.ttft for r in rs])),
            "mean_e2e_ms": 1000 * float(np.mean([r.e2e for r in rs])),
            "output_tokens": float(sum(r.output_tokens for r in rs)),
            # tokens after the first / time after the first: per-stream decode speed (W5 at batch 1)
            "decode_tok_s": decoded / decode_s if decode_s > 0 else 0.0,
        }
    return out


def compute_result(
    records: list[RequestRecord],
    duration_s: float,
    start: float,
    slo: SLO,
    config: dict[str, Any],
) -> BenchResult:
    """Figures for one run; `start` is the perf_counter time the run began (for the time series)."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [_tpot(r) for r in ok if r.output_tokens > 1]
    itls = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    e2es = [r.e2e for r in ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(1 for r in ok if slo.met(r.ttft, _tpot(r), r.e2e))
    reported = [r for r in ok if r.cached_tokens is not None]
    hit_prompt = sum(r.prompt_len for r in reported)
    hit_rate = (
        sum(r.cached_tokens or 0 for r in reported) / hit_prompt
        if reported and hit_prompt
        else None
    )
    per_request = [
        {
            "index": r.index,
            "tag": r.tag,
            "success": r.success,
            "prompt_tokens": r.prompt_len,
            "output_tokens": r.output_tokens,
            "cached_tokens": r.cached_tokens,
            "send_s": r.send_time - start if r.send_time else None,
            "ttft_ms": 1000 * r.ttft if r.success else None,
            "e2e_ms": 1000 * r.e2e if r.success else None,
            "num_chunks": len(r.chunk_times),
            "error": r.error,
        }
        for r in records
    ]
    return BenchResult(
        config=config,
        duration_s=duration_s,
        completed=len(ok),
        failed=len(failed),
        errors=[f"request {r.index}: {r.error}" for r in failed[:MAX_ERRORS_KEPT]],
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        goodput=good / duration_s,
        slo=slo,
        ttft_ms=Stats.of_seconds(ttfts),
        tpot_ms=Stats.of_seconds(tpots),
        itl_ms=Stats.of_seconds(itls),
        e2e_ms=Stats.of_seconds(e2es),
        prefix_cache_hit_rate=hit_rate,
        by_tag=_by_tag(ok),
        timeseries=_timeseries(records, start, duration_s),
        requests=per_request,
    )
