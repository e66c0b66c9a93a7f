"""What `fleetlm status` shows: Serve's replica states plus engine gauges from the ingress /metrics.

The report is a plain dict (also printed as JSON with --json):
``{"url", "ray_address", "app": {"status", "message"}, "deployments": {name: {"status", "replicas":
{state: n}}}, "replicas": [{"model", "replica", "waiting", "running", "kv_cache_usage"}],
"models": {model: {"prefix_cache_hit_rate", "prefix_cache_hits", "prefix_cache_queries"}},
"metrics_error": str | None}``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from cluster.state import ClusterState

# Engine gauges per replica (names as in cluster/metrics.py; Ray exports them with a "ray_" prefix).
_REPLICA_GAUGES = {
    "fleetlm_num_requests_waiting": "waiting",
    "fleetlm_num_requests_running": "running",
    "fleetlm_kv_cache_usage_perc": "kv_cache_usage",
}
_HITS, _QUERIES = "fleetlm_prefix_cache_hits", "fleetlm_prefix_cache_queries"


def collect_status(state: ClusterState, timeout_s: float = 5.0) -> dict[str, Any]:
    """Needs a connected Ray driver (for serve.status()); reads /metrics over HTTP."""
    from ray import serve

    report: dict[str, Any] = {"url": state.url, "ray_address": state.ray_address}
    app = serve.status().applications.get(state.app_name)
    report["app"] = {
        "status": str(app.status.value) if app else "NOT_STARTED",
        "message": app.message if app else "",
    }
    report["deployments"] = {
        name: {
            "status": str(d.status.value),
            "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
        }
        for name, d in sorted((app.deployments if app else {}).items())
    }
    report["replicas"], report["models"], report["metrics_error"] = [], {}, None
    try:
        import httpx

        r = httpx.get(f"{state.url}/metrics", timeout=timeout_s)
        r.raise_for_status()
        report["replicas"], report["models"] = parse_metrics(r.text)
    except Exception as e:  # noqa: BLE001 - status must still show Serve's view
        report["metrics_error"] = f"{type(e).__name__}: {e}"
    return report


def parse_metrics(text: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Prometheus text → per-replica gauges and per-model prefix-cache hit rate."""
    from prometheus_client.parser import text_string_to_metric_families

    replicas: dict[tuple[str, str], dict[str, Any]] = {}
    hits: dict[str, float] = defaultdict(float)
    queries: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = _strip_ray_prefix(sample.name)
            labels = sample.labels
            model = labels.get("model", "")
            if name in _REPLICA_GAUGES:
                key = (model, labels.get("replica", ""))
                row = replicas.setdefault(key, {"model": key[0], "replica": key[1]})
                row[_REPLICA_GAUGES[name]] = sample.value
            elif name in (_HITS, _HITS + "_total"):
                hits[model] += sample.value
            elif name in (_QUERIES, _QUERIES + "_total"):
                queries[model] += sample.value
    models = {
        m: {
            "prefix_cache_hits": hits[m],
            "prefix_cache_queries": q,
            "prefix_cache_hit_rate": hits[m] / q if q else None,
        }
        for m, q in queries.items()
    }
    return [replicas[k] for k in sorted(replicas)], models


def _strip_ray_prefix(name: str) -> str:
    return name[len("ray_") :] if name.startswith("ray_fleetlm_") else name


def format_status(report: dict[str, Any]) -> str:
    lines = [
        f"fleetlm at {report['url']}  (Ray {report['ray_address']})",
        f"app: {report['app']['status']}",
    ]
    if report["app"]["message"] and report["app"]["status"] != "RUNNING":
        lines.append(f"  {report['app']['message'].strip().splitlines()[-1]}")
    for name, d in report["deployments"].items():
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(d["replicas"].items()))
        lines.append(f"  {name}: {d['status'].lower()} ({states or 'no replicas'})")
    if report["replicas"]:
        head = f"  {'model':<20} {'replica':<24} {'waiting':>7} {'running':>7} {'KV used':>8}"
        lines.append(head)
        for r in report["replicas"]:
            kv = r.get("kv_cache_usage")
            kv_s = f"{100 * kv:7.1f}%" if kv is not None else "      -"
            lines.append(
                f"  {r['model']:<20} {r['replica'][-24:]:<24} {_n(r.get('waiting')):>7} "
                f"{_n(r.get('running')):>7} {kv_s:>8}"
            )
    for model, m in report["models"].items():
        rate = m["prefix_cache_hit_rate"]
        rate_s = f"{100 * rate:.1f}%" if rate is not None else "-"
        lines.append(
            f"  {model}: prefix cache hit rate {rate_s} "
            f"({m['prefix_cache_hits']:.0f} of {m['prefix_cache_queries']:.0f} prompt tokens)"
        )
    if report["metrics_error"]:
        lines.append(f"  (metrics unavailable: {report['metrics_error']})")
    return "\n".join(lines)


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"
