"""fleetlm metrics as ``ray.util.metrics`` objects, created lazily from ``cluster.metrics.SPECS``.

Recording through Ray (not prometheus_client) sends every process's samples to its node's Ray
metrics agent, which Ray's Prometheus service discovery
(``/tmp/ray/prom_metrics_service_discovery.json``, or the KubeRay PodMonitor on the metrics port)
already scrapes. Ray 2.60 exports ``fleetlm_x`` as ``ray_fleetlm_x`` and adds its own labels
(Component, NodeAddress, SessionName, Version, WorkerId). A histogram's ``_sum`` is approximate:
Ray adds the midpoint of the observed value's bucket, not the value; quantiles from ``_bucket`` are
what dashboards should use.

    m = get_metrics()
    m.observe("time_to_first_token_seconds", 0.12, model="demo")
    m.inc("prompt_tokens_total", 128, model="demo", replica=replica_id)
    m.set("num_requests_waiting", 3, model="demo", replica=replica_id)
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from typing import Any

from cluster.metrics import PREFIX, RAY_EXPORT_PREFIX, MetricSpec, check_labels, get_spec

# Prometheus text lines served by the ingress's GET /metrics.
EXPORTED_PREFIXES = (RAY_EXPORT_PREFIX + PREFIX, "ray_serve_")


class Metrics:
    """One per process. Metric objects are created on first use: a process that never records a
    family never registers it (so the export holds only families some process actually records)."""

    def __init__(self) -> None:
        self._objs: dict[str, Any] = {}
        # name -> (spec, its label names): the per-call path skips the spec lookup (hot: ITL is
        # observed per streamed chunk).
        self._known: dict[str, tuple[MetricSpec, frozenset[str]]] = {}
        self._lock = threading.Lock()  # engine thread and event loop may record concurrently

    def _obj(self, spec: MetricSpec) -> Any:
        obj = self._objs.get(spec.name)
        if obj is not None:
            return obj
        from ray.util import metrics as rm

        with self._lock:
            obj = self._objs.get(spec.name)
            if obj is None:
                if spec.kind == "counter":
                    obj = rm.Counter(spec.full_name, description=spec.help, tag_keys=spec.labels)
                elif spec.kind == "gauge":
                    obj = rm.Gauge(spec.full_name, description=spec.help, tag_keys=spec.labels)
                else:
                    obj = rm.Histogram(
                        spec.full_name,
                        description=spec.help,
                        boundaries=list(spec.buckets),
                        tag_keys=spec.labels,
                    )
                self._objs[spec.name] = obj
        return obj

    def _prepare(self, name: str, kind: str, labels: dict[str, Any]) -> tuple[Any, dict[str, str]]:
        known = self._known.get(name)
        if known is None:
            spec = get_spec(name)
            known = self._known[name] = (spec, frozenset(spec.labels))
        spec, names = known
        if spec.kind != kind:
            raise ValueError(f"metric name: {spec.full_name} is a {spec.kind}, not a {kind}")
        if labels.keys() != names:
            check_labels(spec, labels)
        tags = {k: v if type(v) is str else str(v) for k, v in labels.items()}
        return self._obj(spec), tags

    def inc(self, name: str, value: float = 1.0, **labels: Any) -> None:
        """Add ``value`` (>= 0) to a counter; 0 is a no-op."""
        if value < 0:
            raise ValueError(f"value: counters only go up, got {value} for {name}")
        obj, tags = self._prepare(name, "counter", labels)
        if value > 0:
            obj.inc(value, tags=tags)

    def set(self, name: str, value: float, **labels: Any) -> None:
        obj, tags = self._prepare(name, "gauge", labels)
        obj.set(float(value), tags=tags)

    def observe(self, name: str, value: float, **labels: Any) -> None:
        obj, tags = self._prepare(name, "histogram", labels)
        obj.observe(float(value), tags=tags)


_metrics: Metrics | None = None
_metrics_lock = threading.Lock()


def get_metrics() -> Metrics:
    """This process's Metrics (created once)."""
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = Metrics()
    return _metrics


_export_port: int | None = None


def metrics_export_port() -> int:
    """This node's metrics agent export port (a blocking GCS call, cached)."""
    global _export_port
    if _export_port is None:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id and node.get("Alive"):
                _export_port = int(node["MetricsExportPort"])
                break
        else:
            raise RuntimeError(f"node {node_id} not found in ray.nodes()")
    return _export_port


def filter_exposition(text: str, prefixes: tuple[str, ...] = EXPORTED_PREFIXES) -> str:
    """Keep samples and # HELP/# TYPE lines of the families whose name starts with a prefix."""
    out = []
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split(" ", 3)[2]
        elif line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
        else:
            continue
        if name.startswith(prefixes):
            out.append(line)
    return "\n".join(out) + ("\n" if out else "")


def _fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.read().decode("utf-8")


async def prometheus_text(port: int | None = None, timeout_s: float = 5.0) -> str:
    """This node's fleetlm_ and Serve metrics, in Prometheus text format (for GET /metrics).

    Only this node's metrics agent is read: on a multi-node cluster, scrape every node's agent
    (Ray's service discovery file, or the k8s PodMonitor) rather than the ingress.
    """
    if port is None:
        port = await asyncio.to_thread(metrics_export_port)
    text = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{port}/metrics", timeout_s)
    return filter_exposition(text)
