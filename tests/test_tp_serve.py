"""A tensor-parallel (TP=2) replica on a real local Ray Serve: its worker actor sits in the
replica's placement group, it answers the openai client with the same greedy tokens as a one-shard
engine, and killing the worker mid-request ends that request with a clear error, after which Serve
replaces the replica and it serves again."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.ray

APP = "fleetlm-tp-test"
PREFIX = "/tptest"
MODEL = "tp2"
ENGINE = {"num_kv_blocks": 64, "max_num_seqs": 4, "max_model_len": 512, "num_threads": 1}
PROMPT = [11, 250, 37, 4000, 999, 5, 77, 1234, 81, 3000, 17, 640]


@pytest.fixture(scope="module")
def api(ray_session):
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
                    "tensor_parallel_size": 2,
                    "engine": ENGINE,
                    "resources_per_replica": {"num_cpus": 1},
                    "caches": {"exact": {"enabled": False}},
                }
            ]
        }
    )
    serve.run(build_app(cfg), name=APP, route_prefix=PREFIX)
    base = ray_session + PREFIX
    _wait_healthy(base, 120)
    yield base
    serve.delete(APP)


def _wait_healthy(base: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:  # the proxy learns the new route shortly after serve.run returns
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "ingress never became healthy"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api + "/v1", api_key="unused", max_retries=0, timeout=120)


def _workers() -> dict[str, object]:
    """Live TP worker actors by name."""
    import ray

    from deployments.tp_worker import WORKER_NAME_PREFIX

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(WORKER_NAME_PREFIX):
            try:
                out[a["name"]] = ray.get_actor(a["name"], namespace=a["namespace"])
            except ValueError:  # died between the listing and the lookup
                pass
    return out


def _expected_text(max_tokens: int) -> str:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model="demo-small", **ENGINE))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return engine.generate([PROMPT], params)[0].text


def test_tp2_replica_serves_openai_with_worker_in_its_placement_group(client):
    c = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert c.usage.completion_tokens == 16
    assert c.choices[0].text == _expected_text(16)

    import ray

    workers = _workers()
    assert len(workers) == 1, workers
    (worker,) = workers.values()
    pg_id = ray.get(worker.placement_group_id.remote())
    pg = ray.util.placement_group_table()[pg_id]
    # Serve names a replica's placement group after the replica actor.
    assert pg["name"].startswith(f"SERVE_REPLICA::{APP}#LLMServer-{MODEL}#"), pg["name"]
    assert pg["strategy"] == "PACK" and pg["state"] == "CREATED"
    assert [b.get("CPU") for b in pg["bundles"].values()] == [0.5, 0.5]


def test_killed_worker_fails_request_cleanly_and_replica_comes_back(client, api):
    import ray

    (old_name, worker), *_ = _workers().items()
    got = 0
    t0 = time.monotonic()
    with pytest.raises(openai.APIError) as err:
        stream = client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=400,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            got += len(chunk.choices[0].text) if chunk.choices else 0
            if got and worker is not None:
                ray.kill(worker, no_restart=True)  # mid-request
                worker = None
    assert worker is None, "the stream ended before the worker was killed"
    assert time.monotonic() - t0 < 60, "the failed request hung"
    assert "error" in str(err.value).lower()

    # Serve's health check sees the lost shard and replaces the replica (and its worker).
    deadline = time.monotonic() + 240
    while True:
        try:
            c = client.completions.create(
                model=MODEL,
                prompt=PROMPT,
                max_tokens=8,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            break
        except openai.APIError:
            assert time.monotonic() < deadline, "the TP replica never came back"
            time.sleep(2)
    assert c.choices[0].text == _expected_text(8)
    assert set(_workers()) and old_name not in _workers()


def test_build_app_refuses_more_shards_than_the_cluster_can_place(ray_session):
    from cluster.config import ClusterConfig
    from deployments.app import build_app

    big = {"name": "big", "model": "demo-small", "tensor_parallel_size": 4}
    too_many = ClusterConfig.model_validate(
        {"models": [{**big, "resources_per_replica": {"num_cpus": 64}}]}
    )
    with pytest.raises(ValueError, match="tensor_parallel_size=4 cannot be placed"):
        build_app(too_many)
    strict = ClusterConfig.model_validate(
        {"models": [{**big, "placement_strategy": "STRICT_PACK"}]}
    )
    build_app(strict)  # 4 bundles of 0.25 CPU fit the one local node
