"""Metric specs (Ray-free) and their export through Ray's metrics agent."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.metrics import SPECS, check_labels, get_spec, prom_name
from deployments.metrics import Metrics, filter_exposition


def test_specs_are_consistent():
    for spec in SPECS.values():
        assert spec.full_name.startswith("fleetlm_")
        assert spec.labels[0] == "model"
        if spec.kind == "histogram":
            assert list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets
    # vLLM-named families the dashboards rely on.
    for name in ("time_to_first_token_seconds", "kv_cache_usage_perc", "prefix_cache_hits_total"):
        assert name in SPECS
    assert get_spec("fleetlm_num_requests_waiting").labels == ("model", "replica")


def test_prom_name_and_bad_input():
    assert prom_name("e2e_request_latency_seconds", "_bucket") == (
        "ray_fleetlm_e2e_request_latency_seconds_bucket"
    )
    assert prom_name("prompt_tokens_total") == "ray_fleetlm_prompt_tokens_total"
    with pytest.raises(ValueError, match="metric name"):
        get_spec("nope")
    with pytest.raises(ValueError, match="suffix"):
        prom_name("prompt_tokens_total", "_bucket")
    with pytest.raises(ValueError, match="replica"):
        check_labels(get_spec("num_requests_running"), {"model": "m"})


def test_metrics_rejects_wrong_kind_and_labels():
    m = Metrics()
    with pytest.raises(ValueError, match="not a gauge"):
        m.set("prompt_tokens_total", 1, model="m", replica="r")
    with pytest.raises(ValueError, match="unknown"):
        m.inc("prompt_tokens_total", 1, model="m", replica="r", extra="x")
    with pytest.raises(ValueError, match="only go up"):
        m.inc("prompt_tokens_total", -1, model="m", replica="r")


def test_filter_exposition_keeps_whole_families():
    text = "\n".join(
        [
            "# HELP ray_fleetlm_a_total a",
            "# TYPE ray_fleetlm_a_total counter",
            'ray_fleetlm_a_total{model="m"} 1.0',
            "# HELP ray_node_cpu x",
            "# TYPE ray_node_cpu gauge",
            'ray_node_cpu{x="1"} 3',
            'ray_serve_num_http_requests_total{route="/"} 2',
            "",
        ]
    )
    out = filter_exposition(text).splitlines()
    assert out == [
        "# HELP ray_fleetlm_a_total a",
        "# TYPE ray_fleetlm_a_total counter",
        'ray_fleetlm_a_total{model="m"} 1.0',
        'ray_serve_num_http_requests_total{route="/"} 2',
    ]


@pytest.mark.ray
def test_every_metric_exports_through_ray_agent(ray_session):
    import ray

    from deployments.metrics import prometheus_text

    @ray.remote(num_cpus=0)
    class Recorder:
        def record(self) -> None:
            from deployments.metrics import get_metrics

            m = get_metrics()
            for spec in SPECS.values():
                labels = {k: f"t-{k}" for k in spec.labels}
                labels["model"] = "prom-test"
                if spec.kind == "counter":
                    m.inc(spec.name, 2, **labels)
                elif spec.kind == "gauge":
                    m.set(spec.name, 0.5, **labels)
                else:
                    m.observe(spec.name, 0.2, **labels)

        def text(self) -> str:
            return asyncio.run(prometheus_text())

    rec = Recorder.remote()
    ray.get(rec.record.remote())
    wanted = {prom_name(s.name, "_count" if s.kind == "histogram" else "") for s in SPECS.values()}
    deadline = time.monotonic() + 60
    while True:
        text = ray.get(rec.text.remote())
        found = {
            line.split("{", 1)[0]
            for line in text.splitlines()
            if 'model="prom-test"' in line and not line.startswith("#")
        }
        if wanted <= found or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert wanted - found == set()
    ttft_sum = prom_name("time_to_first_token_seconds", "_sum")
    ttft = [ln for ln in text.splitlines() if ln.startswith(ttft_sum) and 'model="prom-test"' in ln]
    # Ray 2.60 records a histogram's _sum as the midpoint of the observed value's bucket, not the
    # value: 0.2 lands in (0.1, 0.25].
    assert len(ttft) == 1 and 0.1 <= float(ttft[0].rsplit(" ", 1)[1]) <= 0.25, ttft
    ray.kill(rec)
