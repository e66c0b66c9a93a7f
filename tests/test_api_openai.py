"""The OpenAI API end to end on a real local Ray Serve: 2 replicas of demo-small behind the ingress,
driven with the official ``openai`` client (and httpx where the client hides what we check).

One app is deployed for the whole module (replica start-up dominates the runtime).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import httpx
import openai
import pytest
from served_app import openai_client, served_app

pytestmark = pytest.mark.ray

APP = "fleetlm-api-test"
PREFIX = "/apitest"
KEY = "test-key-123"
MODEL = "tiny"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def api(ray_session):
    models = [
        {
            "name": MODEL,
            "model": "demo-small",
            "num_replicas": 2,
            "engine": {
                "num_kv_blocks": 96,
                "max_num_seqs": 4,
                "max_model_len": MAX_MODEL_LEN,
                "num_threads": 1,
            },
            "max_queued_requests": 3,
            "resources_per_replica": {"num_cpus": 1},
            "caches": {"exact": {"enabled": False}},
        },
        {  # the same model with its response cache on
            "name": "tiny-cached",
            "model": "demo-small",
            "num_replicas": 1,
            "engine": {"num_kv_blocks": 32, "max_model_len": 256, "num_threads": 1},
            "resources_per_replica": {"num_cpus": 1},
        },
    ]
    cluster = {
        "models": models,
        # imbalance 2: a replica 3+ requests busier than the other loses its affinity.
        "router": {"policy": "prefix_aware", "stats_period_s": 0.5, "imbalance": 2},
        "api_keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
    }
    with served_app(ray_session, cluster, APP, PREFIX) as base:
        yield base


@pytest.fixture(scope="module")
def client(api):
    return openai_client(api, KEY, timeout=60)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _replica_stats() -> dict[str, dict]:
    """record_routing_stats() of every LLMServer replica of the test app, by replica id."""
    import ray

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if name.startswith(f"SERVE_REPLICA::{APP}#LLMServer-{MODEL}#"):
            actor = ray.get_actor(name, namespace=a["namespace"])
            out[name.rsplit("#", 1)[1]] = ray.get(actor.record_routing_stats.remote())
    return out


# -- completions ------------------------------------------------------------------------------
def test_completion_usage_and_headers(client):
    raw = client.completions.with_raw_response.create(
        model=MODEL,
        prompt="The quick brown fox",
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert raw.headers["x-request-id"]
    assert raw.headers["x-fleetlm-replica"]
    c = raw.parse()
    assert c.object == "text_completion" and c.model == MODEL
    assert c.choices[0].finish_reason == "length" and c.choices[0].text
    assert c.usage.completion_tokens == 8
    assert c.usage.total_tokens == c.usage.prompt_tokens + 8
    assert c.id.endswith(raw.headers["x-request-id"])


def test_streaming_matches_non_streaming_and_reports_usage(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    full = client.completions.create(**kw, extra_body={"ignore_eos": True})
    chunks = list(
        client.completions.create(
            **kw,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_prompt_as_token_ids_and_as_list_of_texts(client):
    ids = client.completions.create(model=MODEL, prompt=[5, 17, 99, 300], max_tokens=3)
    assert ids.usage.prompt_tokens == 4
    two = client.completions.create(
        model=MODEL, prompt=["a b c", "d e f g"], max_tokens=3, n=2, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]
    assert two.usage.completion_tokens == 12
    # Choices 0-1 answer the first prompt, 2-3 the second; prompt tokens count once per prompt.
    one = client.completions.create(model=MODEL, prompt="a b c", max_tokens=1)
    other = client.completions.create(model=MODEL, prompt="d e f g", max_tokens=1)
    assert two.usage.prompt_tokens == one.usage.prompt_tokens + other.usage.prompt_tokens


def test_stop_string_cuts_output(client):
    kw = dict(model=MODEL, prompt="Hello there", max_tokens=24, temperature=0)
    full = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip())
    cut = client.completions.create(**kw, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model=MODEL, prompt="Random", max_tokens=16, temperature=1.0)
    extra = {"ignore_eos": True}
    a = client.completions.create(**kw, seed=1234, extra_body=extra).choices[0].text
    b = client.completions.create(**kw, seed=1234, extra_body=extra).choices[0].text
    c = client.completions.create(**kw, seed=4321, extra_body=extra).choices[0].text
    assert a == b
    assert a != c


def test_n_choices_and_usage(client):
    r = client.completions.create(
        model=MODEL,
        prompt="Pick",
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1  # distinct seeds per choice
    assert r.usage.completion_tokens == 18
    single = client.completions.create(model=MODEL, prompt="Pick", max_tokens=1)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # counted once, not per choice
    stream = client.completions.create(
        model=MODEL,
        prompt="Pick",
        max_tokens=4,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts: dict[int, str] = {0: "", 1: ""}
    usage = None
    for ch in stream:
        for c in ch.choices:
            texts[c.index] += c.text
        usage = ch.usage or usage
    assert all(texts.values()) and usage.completion_tokens == 8


def test_logprobs(client):
    r = client.completions.create(
        model=MODEL, prompt="Log", max_tokens=5, logprobs=2, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    # Greedy: the sampled token is the best one.
    pairs = zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    assert all(abs(max(t.values()) - v) < 1e-4 for t, v in pairs)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)


# -- chat -------------------------------------------------------------------------------------
def test_chat_streaming_matches_non_streaming(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"}],
        max_completion_tokens=10,
        temperature=0,
    )
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens > 0 and 1 <= full.usage.completion_tokens <= 10
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


# -- errors -----------------------------------------------------------------------------------
def test_bad_field_is_400_naming_it(client, api):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", top_p=5)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", extra_body={"max_tokenz": 3})
    assert e.value.body["param"] == "max_tokenz"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", n=0)
    assert e.value.body["param"] == "n"
    r = httpx.post(api + "/v1/completions", content=b"{not json", headers=_auth())
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-request-id"]


def test_unsupported_parameter_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", echo=True)
    assert "echo" in e.value.body["message"]


def test_bad_or_missing_key_is_401(api):
    bad = openai.OpenAI(base_url=api + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    r = httpx.get(api + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


def test_prompt_too_long_is_400_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[7] * (MAX_MODEL_LEN + 10), max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[7] * 100, max_tokens=MAX_MODEL_LEN)
    assert e.value.body["code"] == "context_length_exceeded"


def test_models_health_metrics(client, api):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert httpx.get(api + "/health").json() == {"status": "ok"}
    r = httpx.get(api + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


# -- replicas: routing, disconnect, overload --------------------------------------------------
def test_shared_prefix_lands_on_one_replica(client):
    prefix = list(range(100, 196))  # 6 full blocks of 16
    replicas = set()
    for i in range(6):
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt=prefix + [400 + i, 500 + i], max_tokens=2
        )
        replicas.add(raw.headers["x-fleetlm-replica"])
    assert len(replicas) == 1
    # The prefix is cached there: later requests report cached prompt tokens.
    r = client.completions.create(model=MODEL, prompt=prefix + [7, 8], max_tokens=1)
    assert r.usage.prompt_tokens_details.cached_tokens >= 80


def test_overloaded_replica_is_skipped_despite_affinity(api, client):
    prefix = list(range(600, 664))  # 4 full blocks, cached on one replica by the first request
    warm = client.completions.with_raw_response.create(
        model=MODEL, prompt=prefix + [1], max_tokens=1
    )
    home = warm.headers["x-fleetlm-replica"]

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:

            async def one(i):
                body = {
                    "model": MODEL,
                    "prompt": prefix + [2 + i],
                    "max_tokens": 150,
                    "ignore_eos": True,
                    "stream": True,
                }
                async with http.stream(
                    "POST", api + "/v1/completions", json=body, headers=_auth()
                ) as r:
                    assert r.status_code == 200, (r.status_code, await r.aread())
                    replica = r.headers["x-fleetlm-replica"]
                    async for _ in r.aiter_lines():
                        pass
                    return replica

            return await asyncio.gather(*(one(i) for i in range(6)))

    replicas = asyncio.run(main())
    assert replicas.count(home) >= 2  # affinity while the load allows it
    assert len(set(replicas)) == 2  # then the busy replica is skipped


def test_disconnect_mid_stream_frees_blocks(api):
    body = {
        "model": MODEL,
        "prompt": list(range(50, 90)),
        "max_tokens": 450,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", api + "/v1/completions", json=body, headers=_auth(), timeout=30) as r:
        assert r.status_code == 200
        replica = r.headers["x-fleetlm-replica"]
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert _replica_stats()[replica]["num_running"] == 1  # still generating
    # The connection is closed: the replica must abort the request and free its blocks.
    deadline = time.monotonic() + 15
    while True:
        s = _replica_stats()[replica]
        if s["num_running"] == 0 and s["num_waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"request still running after disconnect: {s}"
        time.sleep(0.2)
    assert s["num_free_blocks"] == s["num_total_blocks"]


def test_a_request_id_already_in_flight_is_a_400_and_the_first_request_is_unharmed(api):
    body = {"model": MODEL, "prompt": list(range(50, 60)), "max_tokens": 40, "ignore_eos": True}
    headers = {**_auth(), "x-request-id": "dup-1"}
    with httpx.stream(
        "POST", api + "/v1/completions", json={**body, "stream": True}, headers=headers, timeout=30
    ) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        assert next(lines).startswith("data: ")
        second = httpx.post(api + "/v1/completions", json=body, headers=headers, timeout=30)
        assert second.status_code == 400
        err = second.json()["error"]
        assert err["param"] == "x-request-id" and "already in flight" in err["message"]
        rest = [ln for ln in lines if ln.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_exact_cache_hit_header(api):
    c = openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0)
    kw = dict(model="tiny-cached", prompt="cache me", max_tokens=4, temperature=0)
    first = c.completions.with_raw_response.create(**kw)
    second = c.completions.with_raw_response.create(**kw)
    assert first.headers["x-fleetlm-cache"] == "miss"
    assert second.headers["x-fleetlm-cache"] == "exact"
    assert second.parse().choices[0].text == first.parse().choices[0].text
    stream = list(c.completions.create(**kw, stream=True))
    assert (
        "".join(ch.choices[0].text for ch in stream if ch.choices) == first.parse().choices[0].text
    )


def test_full_queues_give_429_with_retry_after(api):
    async def main():
        async with httpx.AsyncClient(timeout=120) as http:

            async def one(i):
                body = {
                    "model": MODEL,
                    "prompt": [9, i + 1, 3],
                    "max_tokens": 120,
                    "ignore_eos": True,
                }
                return await http.post(api + "/v1/completions", json=body, headers=_auth())

            return await asyncio.gather(*(one(i) for i in range(30)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    limited = [r for r in responses if r.status_code == 429]
    assert limited, codes
    assert all(r.headers.get("retry-after") for r in limited)
    assert json.loads(limited[0].text)["error"]["type"] == "rate_limit_error"
    assert codes.count(200) >= 8  # the replicas' capacity was used, not refused up front
