"""Client-visible request metrics recorded by the ingress (TTFT, ITL, TPOT, E2E, outcomes).

Recorded through deployments/metrics.py (Ray metrics export) when present; never fails a request.
"""

import logging
import time
from typing import Any

logger = logging.getLogger("ray.serve")


class RequestTimer:
    """Client-visible latency metrics of one request (TTFT, ITL, TPOT, E2E), recorded at the end."""

    def __init__(self, model: str, t0: float) -> None:
        self.model = model
        self.t0 = t0
        self.first: float | None = None
        self.last = t0
        self.num_tokens = 0
        self.gaps: list[float] = []

    def chunk(self, num_tokens: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.num_tokens += num_tokens

    def done(self, finish_reason: str | None) -> None:
        m = rt_metrics(self.model)
        m.latency(self)
        m.success(finish_reason or "stop")


class _IngressMetrics:
    """Thin wrapper: deployments/metrics.py when present, otherwise nothing is recorded."""

    def __init__(self, model: str) -> None:
        self.model = model
        try:
            from deployments.metrics import get_metrics

            self.m: Any = get_metrics()
        except ModuleNotFoundError:
            self.m = None

    def _safe(self, fn: str, name: str, value: float, **labels: Any) -> None:
        if self.m is None:
            return
        try:
            getattr(self.m, fn)(name, value, model=self.model, **labels)
        except Exception:  # metrics must never fail a request
            logger.exception("metric %s failed", name)

    def error(self, status: int) -> None:
        self._safe("inc", "request_errors_total", 1, status=status)

    def success(self, finish_reason: str) -> None:
        self._safe("inc", "request_success_total", 1, finish_reason=finish_reason)

    def cache_hit(self, kind: str, seconds: float) -> None:
        self._safe("inc", "response_cache_hits_total", 1, kind=kind)
        self._safe("observe", "response_cache_hit_latency_seconds", seconds, kind=kind)

    def latency(self, t: RequestTimer) -> None:
        if t.first is None:
            return
        ttft = t.first - t.t0
        self._safe("observe", "time_to_first_token_seconds", ttft)
        self._safe("observe", "e2e_request_latency_seconds", t.last - t.t0)
        for g in t.gaps:
            self._safe("observe", "inter_token_latency_seconds", g)
        if t.num_tokens > 1:
            tpot = (t.last - t.first) / (t.num_tokens - 1)
            self._safe("observe", "request_time_per_output_token_seconds", tpot)


_metrics_by_model: dict[str, _IngressMetrics] = {}


def rt_metrics(model: str) -> _IngressMetrics:
    m = _metrics_by_model.get(model)
    if m is None:
        m = _metrics_by_model[model] = _IngressMetrics(model)
    return m
