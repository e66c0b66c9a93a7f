"""Response caches through the real served path (Ray Serve ingress + one demo-small replica):
exact and semantic hits say so in `x-fleetlm-cache`, replay as SSE when streamed, and never cross
API keys (tenants)."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.ray

APP = "fleetlm-cache-test"
PREFIX = "/cachetest"
KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"
MODEL = "cached"


@pytest.fixture(scope="module")
def base(ray_session):
    from ray import serve

    from cluster.config import ClusterConfig
    from deployments.app import build_app

    cfg = ClusterConfig.model_validate(
        {
            "models": [
                {
                    "name": MODEL,
                    "model": "demo-small",
                    "num_replicas": 1,
                    "engine": {"num_kv_blocks": 32, "max_model_len": 256, "num_threads": 1},
                    "resources_per_replica": {"num_cpus": 1},
                    "caches": {
                        "exact": {"max_entries": 64, "ttl_s": 600},
                        "semantic": {"enabled": True, "max_entries": 64, "ttl_s": 600},
                    },
                }
            ],
            "api_keys": [
                {"sha256": hashlib.sha256(k.encode()).hexdigest()} for k in (KEY_A, KEY_B)
            ],
        }
    )
    serve.run(build_app(cfg), name=APP, route_prefix=PREFIX)
    url = ray_session + PREFIX
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "ingress never became healthy"
        time.sleep(0.5)
    yield url
    serve.delete(APP)


def ask(base: str, key: str, q: str, **kw) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": q}],
        "temperature": 0,
        "max_tokens": 6,
        **kw,
    }
    r = httpx.post(
        base + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r


def content(r: httpx.Response) -> str:
    return r.json()["choices"][0]["message"]["content"]


def test_exact_semantic_miss_and_tenants(base):
    q, para = "What is the capital of France?", "Which city is the capital of France?"
    first = ask(base, KEY_A, q)
    assert first.headers["x-fleetlm-cache"] == "miss"
    again = ask(base, KEY_A, q)
    assert again.headers["x-fleetlm-cache"] == "exact" and content(again) == content(first)
    sem = ask(base, KEY_A, para)
    assert sem.headers["x-fleetlm-cache"] == "semantic" and content(sem) == content(first)
    # A hit says how long the ingress spent on it (ms), the figure bench/cache.py reports.
    timing = sem.headers["server-timing"]
    assert timing.startswith("cache;dur=") and float(timing.split("=")[1]) > 0
    assert "server-timing" not in first.headers
    # Another tenant gets nothing of tenant A's, neither exact nor semantic.
    assert ask(base, KEY_B, q).headers["x-fleetlm-cache"] == "miss"
    # A near-miss with a different answer is generated, not served from the cache.
    assert ask(base, KEY_A, "What is the capital of Germany?").headers["x-fleetlm-cache"] == "miss"
    # Sampled requests bypass the caches.
    hot = [ask(base, KEY_A, q, temperature=0.8) for _ in range(2)]
    assert [r.headers["x-fleetlm-cache"] for r in hot] == ["miss", "miss"]


def test_semantic_hit_streams_like_a_normal_response(base):
    q, para = "How many legs does a spider have?", "How many legs do spiders have?"
    first = ask(base, KEY_A, q)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": para}],
        "temperature": 0,
        "max_tokens": 6,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        base + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY_A}"},
        timeout=120,
    ) as r:
        assert r.headers["x-fleetlm-cache"] == "semantic"
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == content(first)
