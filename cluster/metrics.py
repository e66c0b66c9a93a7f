"""Every fleetlm metric in one place: name, help, type, label names, buckets. Ray-free.

Names follow vLLM's where the meaning is the same (``vllm:time_to_first_token_seconds`` becomes
``fleetlm_time_to_first_token_seconds``), so vLLM dashboards read across. Every metric carries a
``model`` label; per-replica metrics also carry ``replica`` (the Serve replica id).

Where each family is recorded (who calls ``deployments.metrics.get_metrics()``):
- ingress (client-visible): latency histograms, request success/errors, response cache;
- replica (engine stats, refreshed each step or on a short timer): tokens, queue, KV, prefix cache,
  preemptions, speculative decoding;
- router (inside the ingress's handle): routing decisions;
- autoscaling policy (in the Serve controller): replicas current/target, decisions.

Prometheus names: Ray's metrics agent exports a custom metric ``fleetlm_x`` as ``ray_fleetlm_x``
(see ``prom_name``); dashboards and alerts must use ``prom_name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "fleetlm_"
# Ray's metrics agent prefixes every application-defined metric with its namespace.
RAY_EXPORT_PREFIX = "ray_"

Kind = Literal["counter", "gauge", "histogram"]

# Bucket boundaries (seconds), after vLLM's (vllm/v1/metrics/loggers.py), trimmed at the top.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0,
)  # fmt: skip
CACHE_HIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

MODEL = ("model",)
PER_REPLICA = ("model", "replica")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without PREFIX, e.g. "time_to_first_token_seconds"
    kind: Kind
    help: str
    labels: tuple[str, ...]  # always starts with "model"
    buckets: tuple[float, ...] = ()  # histograms only, strictly increasing

    @property
    def full_name(self) -> str:
        """The name given to the metrics library (``fleetlm_...``)."""
        return PREFIX + self.name


def _specs(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {s.name: s for s in specs}


SPECS: dict[str, MetricSpec] = _specs(
    # --- request latency (ingress, client-visible) ---
    MetricSpec(
        "time_to_first_token_seconds",
        "histogram",
        "Time from request arrival at the ingress to its first output token.",
        MODEL,
        TTFT_BUCKETS,
    ),
    MetricSpec(
        "inter_token_latency_seconds",
        "histogram",
        "Time between consecutive streamed chunks of one request.",
        MODEL,
        ITL_BUCKETS,
    ),
    MetricSpec(
        "request_time_per_output_token_seconds",
        "histogram",
        "TPOT: (e2e - ttft) / (output tokens - 1), per finished request with >= 2 output tokens.",
        MODEL,
        ITL_BUCKETS,
    ),
    MetricSpec(
        "e2e_request_latency_seconds",
        "histogram",
        "Time from request arrival at the ingress to its last output token.",
        MODEL,
        E2E_BUCKETS,
    ),
    MetricSpec(
        "request_success_total",
        "counter",
        "Finished requests, by finish reason (stop, length, abort).",
        ("model", "finish_reason"),
    ),
    MetricSpec(
        "request_errors_total",
        "counter",
        "Requests answered with an error, by HTTP status code.",
        ("model", "status"),
    ),
    # --- engine (per replica) ---
    MetricSpec(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens processed (prefilled or served from the prefix cache).",
        PER_REPLICA,
    ),
    MetricSpec("generation_tokens_total", "counter", "Output tokens generated.", PER_REPLICA),
    MetricSpec(
        "num_requests_waiting",
        "gauge",
        "Requests waiting to be scheduled (not yet prefilling, or preempted).",
        PER_REPLICA,
    ),
    MetricSpec("num_requests_running", "gauge", "Requests in the running batch.", PER_REPLICA),
    MetricSpec(
        "kv_cache_usage_perc",
        "gauge",
        "Fraction of KV cache blocks in use, 0..1 (cached-but-free blocks count as free).",
        PER_REPLICA,
    ),
    MetricSpec(
        "prefix_cache_queries_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
        PER_REPLICA,
    ),
    MetricSpec(
        "prefix_cache_hits_total",
        "counter",
        "Prompt tokens found in the prefix cache (KV reused, not recomputed).",
        PER_REPLICA,
    ),
    MetricSpec(
        "num_preemptions_total",
        "counter",
        "Requests preempted (KV freed, recomputed later) because KV blocks ran out.",
        PER_REPLICA,
    ),
    MetricSpec("engine_steps_total", "counter", "Engine steps run.", PER_REPLICA),
    MetricSpec(
        "engine_step_seconds_total",
        "counter",
        "Wall time inside engine steps; its rate is the engine's busy fraction, over the steps' "
        "rate the mean step time.",
        PER_REPLICA,
    ),
    MetricSpec(
        "engine_decode_rows_total",
        "counter",
        "Decode rows computed, summed over steps; over the steps' rate the mean decode batch.",
        PER_REPLICA,
    ),
    MetricSpec(
        "engine_prefill_tokens_total",
        "counter",
        "Prompt tokens computed by engine steps (prefix-cache hits excluded, recomputation after "
        "a preemption included).",
        PER_REPLICA,
    ),
    # --- speculative decoding (per replica) ---
    MetricSpec(
        "spec_decode_num_draft_tokens_total",
        "counter",
        "Draft tokens proposed to the target model for verification.",
        PER_REPLICA,
    ),
    MetricSpec(
        "spec_decode_num_accepted_tokens_total",
        "counter",
        "Draft tokens accepted by the target model.",
        PER_REPLICA,
    ),
    # --- router (in the ingress's handle) ---
    MetricSpec(
        "router_decisions_total",
        "counter",
        "Routing decisions, by policy and reason (affinity, balance, cold, ...).",
        ("model", "policy", "reason"),
    ),
    # --- autoscaling (Serve controller) ---
    MetricSpec(
        "replicas_current",
        "gauge",
        "Replicas of the model deployment running now, as the autoscaling policy sees them.",
        MODEL,
    ),
    MetricSpec(
        "replicas_target",
        "gauge",
        "Replica count the autoscaling policy last decided.",
        MODEL,
    ),
    MetricSpec(
        "autoscaling_queue_depth",
        "gauge",
        "Total queue depth (waiting + running, all replicas) the autoscaling policy last saw.",
        MODEL,
    ),
    MetricSpec(
        "autoscaling_decisions_total",
        "counter",
        "Autoscaling policy decisions, by reason (scale_up, scale_down, hold, ...).",
        ("model", "reason"),
    ),
    # --- response cache (ingress) ---
    MetricSpec(
        "response_cache_hits_total",
        "counter",
        "Requests answered from the response cache, by kind (exact, semantic).",
        ("model", "kind"),
    ),
    MetricSpec(
        "response_cache_misses_total",
        "counter",
        "Cacheable requests the response cache could not answer, by kind (exact, semantic).",
        ("model", "kind"),
    ),
    MetricSpec(
        "response_cache_hit_latency_seconds",
        "histogram",
        "Time from request arrival to a complete answer served from the response cache.",
        ("model", "kind"),
        CACHE_HIT_BUCKETS,
    ),
)


def get_spec(name: str) -> MetricSpec:
    """The spec for ``name`` (with or without the ``fleetlm_`` prefix); ValueError if unknown."""
    key = name.removeprefix(PREFIX)
    try:
        return SPECS[key]
    except KeyError:
        raise ValueError(f"metric name: unknown metric {name!r}") from None


def prom_name(name: str, suffix: str = "") -> str:
    """The series name Prometheus sees for metric ``name`` after Ray's export.

    ``suffix`` is "_bucket", "_sum" or "_count" for histograms, "" otherwise.
    """
    spec = get_spec(name)
    if suffix and spec.kind != "histogram":
        raise ValueError(f"suffix: {suffix!r} is for histograms, {name!r} is a {spec.kind}")
    if suffix not in ("", "_bucket", "_sum", "_count"):
        raise ValueError(f"suffix: expected '', '_bucket', '_sum' or '_count', got {suffix!r}")
    return RAY_EXPORT_PREFIX + spec.full_name + suffix


def check_labels(spec: MetricSpec, labels: dict[str, str]) -> None:
    """ValueError unless ``labels`` names exactly the spec's label names."""
    got, want = set(labels), set(spec.labels)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ValueError(
            f"labels: {spec.full_name} needs {sorted(want)}; missing {missing}, unknown {extra}"
        )


def _validate_specs() -> None:
    for s in SPECS.values():
        assert s.labels and s.labels[0] == "model", s.name
        assert (s.kind == "histogram") == bool(s.buckets), s.name
        assert list(s.buckets) == sorted(set(s.buckets)), s.name
        assert s.kind != "counter" or s.name.endswith("_total"), s.name


_validate_specs()
