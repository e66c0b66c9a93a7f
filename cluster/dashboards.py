"""Grafana dashboards for fleetlm, built in code from the metric specs (``cluster.metrics``).

Four dashboards: overview, engine, router, autoscaling. Each is a plain dict in Grafana's
dashboard JSON model (schemaVersion ``SCHEMA_VERSION``), with a Prometheus datasource variable and a
multi-valued ``model`` variable, so the same JSON works for ``fleetlm dashboards push``, a file
export, and the Grafana sidecar ConfigMap in k8s/. Every query selects ``model=~"$model"`` and
rates over ``$__rate_interval``; ``substitute`` fills those in for Prometheus' HTTP API, which is
what the Prometheus test evaluates.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from cluster.metrics import get_spec, prom_name

SCHEMA_VERSION = 41  # Grafana 12.x
TAG = "fleetlm"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model=~"$model"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Q:
    """One PromQL target: expression and legend."""

    expr: str
    legend: str


@dataclass(frozen=True)
class P:
    """One panel: a title, unit, queries; ``kind`` is a Grafana panel type."""

    title: str
    unit: str
    queries: tuple[Q, ...]
    kind: str = "timeseries"
    description: str = ""


def _m(name: str, suffix: str = "") -> str:
    return prom_name(name, suffix)


def rate(name: str, by: str = "model") -> str:
    """Per-second rate of a counter, summed by ``by`` (label list)."""
    get_spec(name)
    return f"sum by ({by}) (rate({_m(name)}{{{SEL}}}[{RATE}]))"


def quantile(q: float, name: str, by: str = "model") -> str:
    """Quantile ``q`` of a histogram over the rate window, by ``by``."""
    return (
        f"histogram_quantile({q}, sum by (le, {by}) (rate({_m(name, '_bucket')}{{{SEL}}}[{RATE}])))"
    )


def gauge(name: str, by: str = "model", agg: str = "sum") -> str:
    get_spec(name)
    return f"{agg} by ({by}) ({_m(name)}{{{SEL}}})"


def ratio(num: str, den: str, by: str = "model") -> str:
    """rate(num)/rate(den) by ``by``; no series (not NaN) while the denominator is 0."""
    return f"{rate(num, by)} / ({rate(den, by)} > 0)"


def _pq(title: str, name: str, unit: str = "s") -> P:
    return P(
        title,
        unit,
        tuple(Q(quantile(q, name), f"p{int(q * 100)} {{{{model}}}}") for q in (0.5, 0.9, 0.99)),
    )


OVERVIEW = (
    P(
        "Requests/s by finish reason",
        "reqps",
        (Q(rate("request_success_total", "model, finish_reason"), "{{model}} {{finish_reason}}"),),
    ),
    P(
        "Errors/s by status",
        "reqps",
        (Q(rate("request_errors_total", "model, status"), "{{model}} {{status}}"),),
        description="Requests answered with an HTTP error, by status code.",
    ),
    _pq("Time to first token", "time_to_first_token_seconds"),
    _pq("Time per output token (TPOT)", "request_time_per_output_token_seconds"),
    _pq("Inter-token latency", "inter_token_latency_seconds"),
    _pq("End-to-end request latency", "e2e_request_latency_seconds"),
    P(
        "Tokens/s",
        "short",
        (
            Q(rate("prompt_tokens_total"), "prompt {{model}}"),
            Q(rate("generation_tokens_total"), "generated {{model}}"),
        ),
    ),
)

ENGINE = (
    P(
        "Requests waiting, per replica",
        "short",
        (Q(gauge("num_requests_waiting", "model, replica"), "{{replica}}"),),
    ),
    P(
        "Requests running, per replica",
        "short",
        (Q(gauge("num_requests_running", "model, replica"), "{{replica}}"),),
    ),
    P(
        "KV cache usage, per replica",
        "percentunit",
        (Q(gauge("kv_cache_usage_perc", "model, replica", "max"), "{{replica}}"),),
    ),
    P(
        "Prefix cache hit rate (tokens)",
        "percentunit",
        (
            Q(ratio("prefix_cache_hits_total", "prefix_cache_queries_total"), "{{model}}"),
            Q(
                ratio("prefix_cache_hits_total", "prefix_cache_queries_total", "model, replica"),
                "{{replica}}",
            ),
        ),
    ),
    P(
        "Preemptions/s",
        "short",
        (Q(rate("num_preemptions_total", "model, replica"), "{{replica}}"),),
        description="Requests whose KV was freed for lack of blocks (recomputed later).",
    ),
    P(
        "Generated tokens/s, per replica",
        "short",
        (Q(rate("generation_tokens_total", "model, replica"), "{{replica}}"),),
    ),
    P(
        "Speculative decoding acceptance rate",
        "percentunit",
        (
            Q(
                ratio(
                    "spec_decode_num_accepted_tokens_total", "spec_decode_num_draft_tokens_total"
                ),
                "{{model}}",
            ),
        ),
        description="Accepted draft tokens / proposed draft tokens.",
    ),
)

ROUTER = (
    P(
        "Routing decisions/s by reason",
        "reqps",
        (Q(rate("router_decisions_total", "model, policy, reason"), "{{policy}} {{reason}}"),),
    ),
    P(
        "Share of decisions by reason",
        "percentunit",
        (
            Q(
                f"{rate('router_decisions_total', 'model, reason')} "
                f"/ ignoring(reason) group_left() ({rate('router_decisions_total')} > 0)",
                "{{reason}}",
            ),
        ),
    ),
    P(
        "Load per replica (waiting + running)",
        "short",
        (
            Q(
                f"{gauge('num_requests_waiting', 'model, replica')} "
                f"+ {gauge('num_requests_running', 'model, replica')}",
                "{{replica}}",
            ),
        ),
    ),
    P(
        "Response cache hits and misses/s",
        "reqps",
        (
            Q(rate("response_cache_hits_total", "model, kind"), "hit {{kind}}"),
            Q(rate("response_cache_misses_total", "model, kind"), "miss {{kind}}"),
        ),
    ),
    P(
        "Response cache hit latency p50",
        "s",
        (Q(quantile(0.5, "response_cache_hit_latency_seconds", "model, kind"), "{{kind}}"),),
    ),
)

AUTOSCALING = (
    P(
        "Replicas: current vs target",
        "short",
        (
            Q(gauge("replicas_current", agg="max"), "current {{model}}"),
            Q(gauge("replicas_target", agg="max"), "target {{model}}"),
        ),
    ),
    P(
        "Queue depth",
        "short",
        (
            Q(gauge("autoscaling_queue_depth", agg="max"), "policy view {{model}}"),
            Q(
                f"{gauge('num_requests_waiting')} + {gauge('num_requests_running')}",
                "engines {{model}}",
            ),
        ),
        description="Waiting + running requests; the autoscaling policy scales on this.",
    ),
    P(
        "Autoscaling decisions/s by reason",
        "short",
        (Q(rate("autoscaling_decisions_total", "model, reason"), "{{reason}}"),),
    ),
    P(
        "Decisions in the last hour by reason",
        "short",
        (
            Q(
                f"sum by (model, reason) (increase({_m('autoscaling_decisions_total')}"
                f"{{{SEL}}}[1h]))",
                "{{reason}}",
            ),
        ),
        kind="bargauge",
    ),
)

DASHBOARDS: dict[str, tuple[str, tuple[P, ...]]] = {
    # uid -> (title, panels)
    "fleetlm-overview": ("fleetlm / Overview", OVERVIEW),
    "fleetlm-engine": ("fleetlm / Engine", ENGINE),
    "fleetlm-router": ("fleetlm / Router", ROUTER),
    "fleetlm-autoscaling": ("fleetlm / Autoscaling", AUTOSCALING),
}


def _variables() -> list[dict]:
    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
        },
        {
            "name": "model",
            "label": "Model",
            "type": "query",
            "datasource": DS,
            "definition": f"label_values({_m('num_requests_running')}, model)",
            "query": {
                "query": f"label_values({_m('num_requests_running')}, model)",
                "refId": "model",
            },
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "refresh": 2,
            "sort": 1,
            "hide": 0,
        },
    ]


def _panel_json(panel: P, pid: int) -> dict:
    # Two panels per row, 12 of Grafana's 24 columns wide, 8 rows high.
    col, row = (pid - 1) % 2, (pid - 1) // 2
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"x": 12 * col, "y": 8 * row, "w": 12, "h": 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DS,
                "expr": q.expr,
                "legendFormat": q.legend,
                "range": True,
            }
            for i, q in enumerate(panel.queries)
        ],
    }


def build_dashboard(uid: str) -> dict:
    """The dashboard JSON model for ``uid`` (a key of DASHBOARDS); ValueError if unknown."""
    if uid not in DASHBOARDS:
        raise ValueError(f"dashboard: unknown uid {uid!r}; known: {sorted(DASHBOARDS)}")
    title, panels = DASHBOARDS[uid]
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "tags": [TAG],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "templating": {"list": _variables()},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": [TAG], "asDropdown": True, "title": "fleetlm"}],
        "panels": [_panel_json(p, i + 1) for i, p in enumerate(panels)],
    }


def build_all() -> dict[str, dict]:
    """uid -> dashboard JSON, for every dashboard."""
    return {uid: build_dashboard(uid) for uid in DASHBOARDS}


def substitute(expr: str, rate_interval: str = "1m", model: str = ".*") -> str:
    """``expr`` with Grafana's variables replaced, ready for Prometheus' HTTP API."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$model", model)
    leftover = re.findall(r"\$\w+", out)
    assert not leftover, f"unsubstituted variables {leftover} in {expr}"
    return out


def panel_exprs(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(panel title, raw PromQL) for every target of every panel."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
