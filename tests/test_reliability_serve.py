"""Bad input, limits, per-key rate limits, a short schemathesis pass, a disconnect storm and a
replica killed mid-stream, against the served app: real Ray Serve (the session instance), real
HTTP through Serve's proxy, two demo-small replicas.

The rule these tests hold the server to: an error in one request's data ends that request with a
4xx OpenAI error object naming the field, and every other request on that replica completes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import httpx
import pytest
from served_app import served_app

pytestmark = pytest.mark.ray

APP = "fleetlm-reliability-test"
PREFIX = "/reltest"
KEY = "rel-key"
LIMITED_KEY = "rel-limited-key"  # 3 requests per minute
MODEL = "tiny"
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def api(ray_session):
    cluster = {
        "models": [
            {
                "name": MODEL,
                "model": "demo-small",
                "num_replicas": 2,  # one is killed by the last test
                "engine": {
                    "num_kv_blocks": 64,
                    "max_num_seqs": 8,
                    "max_model_len": MAX_MODEL_LEN,
                    "num_threads": 1,
                },
                "resources_per_replica": {"num_cpus": 1},
                "caches": {"exact": {"enabled": False}},
            }
        ],
        "api_keys": [
            {"sha256": hashlib.sha256(KEY.encode()).hexdigest()},
            {
                "sha256": hashlib.sha256(LIMITED_KEY.encode()).hexdigest(),
                "requests_per_minute": 3,
            },
        ],
    }
    with served_app(ray_session, cluster, APP, PREFIX) as base:
        yield base


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "content-type": "application/json"}


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_a_huge_seed_is_a_400_and_the_replicas_other_streams_complete(api):
    async def main():
        async with httpx.AsyncClient(timeout=60) as http:

            async def stream(i):
                body = {
                    "model": MODEL,
                    "prompt": [5, 6, 7, i + 10],
                    "max_tokens": 120,
                    "ignore_eos": True,
                    "stream": True,
                }
                events = []
                async with http.stream(
                    "POST", api + "/v1/completions", json=body, headers=auth()
                ) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                return events

            async def poison():
                await asyncio.sleep(0.3)  # while the streams run
                bad = []
                for body in (
                    {"model": MODEL, "prompt": "x", "seed": 2**80},
                    {"model": MODEL, "prompt": "x", "seed": -(2**70), "temperature": 1},
                    {"model": MODEL, "prompt": "x", "repetition_penalty": 1e-300},
                    {"model": MODEL, "prompt": "x", "stop_token_ids": [2**70]},
                ):
                    bad.append(await http.post(api + "/v1/completions", json=body, headers=auth()))
                return bad

            return await asyncio.gather(poison(), *(stream(i) for i in range(4)))

    bad, *streams = asyncio.run(main())
    assert [r.status_code for r in bad] == [400] * 4
    assert [error_of(r)["param"] for r in bad] == [
        "seed",
        "seed",
        "repetition_penalty",
        "stop_token_ids",
    ]
    for events in streams:
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # The replica still serves new requests.
    r = httpx.post(
        api + "/v1/completions",
        json={"model": MODEL, "prompt": "ok", "max_tokens": 2, "seed": 2**63 - 1},
        headers=auth(),
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_lone_surrogates_are_a_400_naming_the_field(api):
    # Raw bytes: the JSON escape \ud800 decodes to a lone surrogate (invalid Unicode text).
    cases = [
        (b'{"model": "tiny", "prompt": "hi \\ud800"}', "/v1/completions", "prompt"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
            "/v1/chat/completions",
            "messages.0.content",
        ),
        (b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', "/v1/completions", "stop.0"),
        # A field name that isn't text: nothing to name, the message says what is wrong.
        (b'{"model": "tiny", "prompt": "x", "\\ud800": 1}', "/v1/completions", None),
        (b'{"model": "\\ud800", "prompt": "x"}', "/v1/completions", "model"),  # 404 unknown
    ]
    for raw, path, param in cases:
        r = httpx.post(api + path, content=raw, headers=auth(), timeout=30)
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
        assert error_of(r)["param"] == param, (raw, r.text)
        assert param is not None or "unicode" in error_of(r)["message"].lower()


def test_a_50mb_body_is_a_413_at_once(api):
    big = b'{"model": "tiny", "prompt": "' + b"a" * (50 * 2**20) + b'"}'
    t0 = time.monotonic()
    r = httpx.post(api + "/v1/completions", content=big, headers=auth(), timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == 413, r.text[:300]
    assert error_of(r)["code"] == "request_too_large"
    assert took < 10, f"413 took {took:.1f}s"

    def chunks():  # no Content-Length: the ingress counts the bytes as they arrive
        for _ in range(50):
            yield b"a" * 2**20

    t0 = time.monotonic()
    r = httpx.post(api + "/v1/completions", content=chunks(), headers=auth(), timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == 413, r.text[:300]
    assert took < 10, f"chunked 413 took {took:.1f}s"


def test_limits_before_work(api):
    t0 = time.monotonic()
    r = httpx.post(
        api + "/v1/completions",
        json={"model": MODEL, "prompt": "word " * 400_000, "max_tokens": 1},  # 2M characters
        headers=auth(),
        timeout=30,
    )
    took = time.monotonic() - t0
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    assert error_of(r)["param"] == "prompt"
    assert took < 3, f"a 2M-character prompt took {took:.1f}s to refuse"
    for extra, param in (
        ({"stop": [f"s{i}" for i in range(1000)]}, "stop"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"n": 17}, "n"),
        ({"logprobs": 30}, "logprobs"),
        ({"stop_token_ids": list(range(1000))}, "stop_token_ids"),
    ):
        r = httpx.post(
            api + "/v1/completions",
            json={"model": MODEL, "prompt": "x", **extra},
            headers=auth(),
            timeout=30,
        )
        assert r.status_code == 400, (extra, r.text)
        assert error_of(r)["param"] == param


def test_per_key_requests_per_minute_gives_429_with_openai_headers(api):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    codes = []
    for _ in range(4):
        r = httpx.post(api + "/v1/completions", json=body, headers=auth(LIMITED_KEY), timeout=60)
        codes.append(r.status_code)
    assert codes == [200, 200, 200, 429]
    assert error_of(r)["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    # The other key is not limited by this one's use.
    ok = httpx.post(api + "/v1/completions", json=body, headers=auth(), timeout=60)
    assert ok.status_code == 200


def test_openapi_is_served_and_a_short_schemathesis_pass_finds_nothing(api):
    doc = httpx.get(api + "/openapi.json", timeout=30).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(doc["paths"])
    from bench.fuzz_api import fuzz

    res = fuzz(api, KEY, cases_per_run=12, model=MODEL)
    print(res.to_dict())
    assert res.cases >= 50, res.to_dict()
    assert res.server_errors == 0 and res.hangs == 0, res.to_dict()
    assert res.non_openai_errors == 0 and res.leaks == 0, res.to_dict()
    assert res.check_failures == 0 and res.harness_errors == 0, res.to_dict()
    assert res.by_status.get(400) and res.by_status.get(200), res.to_dict()


# -- faults (short versions of bench/reliability.py's scenarios) -------------------------------
def replica_stats() -> dict[str, dict]:
    """record_routing_stats() of each LLMServer replica of this app, by replica id."""
    import ray

    from bench.reliability import actors, replica_prefix

    out = {}
    for a in actors(replica_prefix(APP, f"LLMServer-{MODEL}")):
        h = ray.get_actor(a["name"], namespace="serve")
        out[a["name"].rsplit("#", 1)[1]] = {**ray.get(h.record_routing_stats.remote()), **a}
    return out


def wait_idle(deadline_s: float) -> dict[str, dict]:
    deadline = time.monotonic() + deadline_s
    while True:
        stats = replica_stats()
        idle = all(
            s["num_running"] == 0
            and s["num_waiting"] == 0
            and s["num_free_blocks"] == s["num_total_blocks"]
            for s in stats.values()
        )
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.3)


def test_a_disconnect_storm_leaves_no_request_or_block_behind(api):
    from bench.reliability_load import streaming_load

    outcomes = asyncio.run(
        streaming_load(api, MODEL, auth(), 60, 30, 200, limit_s=120, hang_up=(1, 12), seed=3)
    )
    assert all(o.kind == "completed" for o in outcomes), [o.detail for o in outcomes][:5]
    stats = wait_idle(30)
    for s in stats.values():
        assert s["num_running"] == 0 and s["num_waiting"] == 0, s
        assert s["num_free_blocks"] == s["num_total_blocks"], s


def test_a_replica_killed_mid_stream_ends_its_streams_with_an_error_event(api):
    """SIGKILL of one replica: its streams end with an SSE error event within 2 s, the other
    replica's streams complete and leak no blocks. Runs last: it kills a replica of the app."""
    import os
    import signal

    from bench.reliability_load import stream_request
    from bench.soak import process_tree

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:

            async def one(i):
                body = {
                    "model": MODEL,
                    "prompt": [100 + i, 9, 8, 7],
                    "max_tokens": 240,
                    "ignore_eos": True,
                    "stream": True,
                }
                return await stream_request(http, api + "/v1/completions", body, auth(), limit_s=60)

            tasks = [asyncio.create_task(one(i)) for i in range(8)]
            deadline = time.monotonic() + 30
            while True:  # kill a replica while it streams
                stats = await asyncio.to_thread(replica_stats)
                busy = [k for k, v in stats.items() if v["num_running"] > 0]
                if busy:
                    break
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.05)
            victim_id = busy[0]
            survivor_id = next(k for k in stats if k != victim_id)
            both_busy = len(busy) == 2
            tree[:] = process_tree(stats[victim_id]["pid"])  # the replica and its engine process
            t_kill = time.monotonic()
            os.kill(stats[victim_id]["pid"], signal.SIGKILL)
            return await asyncio.gather(*tasks), t_kill, survivor_id, both_busy

    tree: list[int] = []
    outcomes, t_kill, survivor_id, both_busy = asyncio.run(main())
    kinds = [o.kind for o in outcomes]
    assert "lost" not in kinds, [o.detail for o in outcomes]
    assert kinds.count("clean_error") >= 1, kinds
    if both_busy:  # the other replica's streams were running at the kill: they complete
        assert kinds.count("completed") >= 1, kinds
    for o in outcomes:
        if o.kind == "clean_error":
            assert o.ended - t_kill < 2.0, f"error event {o.ended - t_kill:.1f}s after the kill"
    deadline = time.monotonic() + 15
    while [p for p in tree if os.path.exists(f"/proc/{p}")]:  # nothing of the victim outlives it
        assert time.monotonic() < deadline, [open(f"/proc/{p}/cmdline").read() for p in tree]
        time.sleep(0.3)
    deadline = time.monotonic() + 30
    while True:  # the survivor finishes its streams and frees every block
        s = replica_stats_of(survivor_id)
        if s["num_running"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.3)


def replica_stats_of(replica_id: str) -> dict:
    import ray

    from bench.reliability import replica_prefix

    name = replica_prefix(APP, f"LLMServer-{MODEL}") + replica_id
    return ray.get(ray.get_actor(name, namespace="serve").record_routing_stats.remote())
