"""The replica (LLMServer) and the ingress's request path without Ray: a fake engine
(tests/fake_engine.py) behind the replica, a fake handle carrying calls the way Serve would, real
output channels. Admission, 429, errors, cancellation, n > 1, logprobs, a dead engine."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from typing import Any

import pytest
from fake_engine import FAIL_TOKEN, FakeEngine, FakeHandle, token_for

from deployments.llm_server import LLMServer
from deployments.protocol import CompletionRequest
from deployments.replica_call import call_deltas, new_channel_mux, open_call
from engine.sampling_params import SamplingParams

MC = {"name": "m", "model": "demo-small", "engine": {"max_num_seqs": 4, "max_model_len": 64}}


def server(engine: FakeEngine | None = None, max_queued: int = 2) -> tuple[LLMServer, FakeEngine]:
    engine = engine or FakeEngine()
    s = LLMServer({**MC, "max_queued_requests": max_queued}, engine_factory=lambda mc: engine)
    return s, engine


def req(rid: str, prompt=(5, 6, 7), n: int = 1, **sampling: Any) -> dict[str, Any]:
    sampling.setdefault("max_tokens", 4)
    return {"request_id": rid, "prompt_token_ids": list(prompt), "sampling": sampling, "n": n}


async def run(srv: LLMServer, r: dict[str, Any], handle: FakeHandle | None = None):
    """One request through open_call / call_deltas: (tokens per choice, last delta per choice)."""
    handle = handle or FakeHandle(srv)
    mux = new_channel_mux(handle)
    call = await open_call(handle, mux, r, r["request_id"], "m")
    toks: dict[int, list[int]] = {}
    last: dict[int, dict] = {}
    async for items in call_deltas(call):
        for i, d in items:
            toks.setdefault(i, []).extend(d["token_ids"])
            last[i] = d
    await mux.close()
    return toks, last


def expected(prompt, n_tokens, seed=None) -> list[int]:
    p = SamplingParams(max_tokens=n_tokens, seed=seed)
    return [token_for(list(prompt), p, i) for i in range(n_tokens)]


def test_tokens_usage_and_n_choices_with_seeds():
    srv, eng = server()
    toks, last = asyncio.run(run(srv, req("a", n=3, seed=10, temperature=1.0)))
    assert sorted(toks) == [0, 1, 2]
    for i in range(3):  # choice i runs with seed + i
        assert toks[i] == expected((5, 6, 7), 4, seed=10 + i)
        assert last[i]["finish_reason"] == "length" and last[i]["num_output_tokens"] == 4
    assert sorted(eng.added) == ["a-0", "a-1", "a-2"]
    assert srv.num_inflight == 0 and not eng.running


def test_multi_prompt_request_numbers_choices_prompt_major():
    srv, _ = server()
    r = {**req("mp", n=2), "prompts": [[1, 2], [3, 4]]}
    toks, _ = asyncio.run(run(srv, r))
    assert toks[0] == toks[1] == expected((1, 2), 4)  # no seed: both choices of prompt 0
    assert toks[2] == expected((3, 4), 4)


def test_logprobs_reach_the_delta():
    srv, _ = server()
    _, last = asyncio.run(run(srv, req("lp", logprobs=2)))
    lp = last[0]["logprobs"]
    assert len(lp) == 1 and lp[0][1] == -0.5 and len(lp[0][2]) == 2


@pytest.mark.parametrize(
    "sampling,param,code",
    [
        ({"top_p": 0.0}, "top_p", None),
        ({"max_tokens": 100}, "max_tokens", "context_length_exceeded"),
    ],
)
def test_bad_request_is_a_400_naming_the_field(sampling, param, code):
    from deployments.protocol import APIError

    srv, eng = server()
    with pytest.raises(APIError) as e:
        asyncio.run(run(srv, req("bad", **sampling)))
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    assert srv.num_inflight == 0 and eng.added == []


def test_full_replica_is_429_and_a_cancelled_request_is_aborted_at_once():
    from deployments.protocol import APIError

    async def main():
        srv, eng = server(max_queued=2)  # 4 running + 2 queued sequences
        handle = FakeHandle(srv)
        mux = new_channel_mux(handle)
        calls = [
            await open_call(handle, mux, req(f"q{i}", max_tokens=50), f"q{i}", "m")
            for i in range(6)
        ]
        assert srv.num_inflight == 6
        with pytest.raises(APIError) as e:
            await open_call(handle, mux, req("over"), "over", "m")
        assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
        # The client of q0 leaves: its call is cancelled, the replica aborts its sequence.
        calls[0].close()
        for _ in range(100):
            if "q0" in eng.aborted:
                break
            await asyncio.sleep(0.01)
        assert "q0" in eng.aborted and "q0" not in eng.running
        assert srv.num_inflight == 5
        for c in calls[1:]:
            c.close()
        await asyncio.sleep(0.05)
        assert srv.num_inflight == 0 and not eng.running
        await mux.close()

    asyncio.run(main())


def test_a_failed_request_is_a_500_and_others_go_on():
    from deployments.protocol import APIError

    async def main():
        srv, _ = server()
        ok = asyncio.ensure_future(run(srv, req("ok", max_tokens=8)))
        with pytest.raises(APIError) as e:
            await run(srv, req("boom", prompt=(1, FAIL_TOKEN)))
        assert e.value.status == 500 and "boom" in e.value.message
        assert "injected" not in e.value.message  # no internals to the client
        toks, _ = await ok
        assert toks[0] == expected((5, 6, 7), 8)

    asyncio.run(main())


def test_a_dead_engine_fails_requests_in_flight_and_the_replica_is_unhealthy():
    from deployments.protocol import APIError

    async def main():
        srv, eng = server(FakeEngine(step_s=0.02))
        srv.check_health()
        task = asyncio.ensure_future(run(srv, req("r", max_tokens=50)))
        while not eng.num_steps:
            await asyncio.sleep(0.01)
        eng.kill()
        with pytest.raises(APIError) as e:
            await asyncio.wait_for(task, 5)
        assert e.value.status == 503
        with pytest.raises(RuntimeError):
            srv.check_health()
        with pytest.raises(APIError) as e:  # a new request gets a clean error too
            await run(srv, req("r2"))
        assert e.value.status == 503

    asyncio.run(main())


def test_a_duplicate_request_id_is_refused_by_the_replica():
    async def main():
        srv, _ = server()
        first = srv.generate({**req("dup", max_tokens=30), "channel": "c"})
        assert await first.__anext__() == {"replica": "local"}
        msgs = [m async for m in srv.generate({**req("dup"), "channel": "c"})]
        assert msgs[0]["error"]["param"] == "x-request-id"
        await first.aclose()
        assert srv.num_inflight == 0

    asyncio.run(main())


def test_a_call_without_a_channel_is_refused():
    async def main():
        srv, _ = server()
        return [m async for m in srv.generate(req("nc"))]

    msgs = asyncio.run(main())
    assert msgs[0]["error"]["status"] == 400 and msgs[0]["error"]["param"] == "channel"


def test_stats_for_serve():
    async def main():
        srv, _ = server()
        await run(srv, req("s", max_tokens=3))
        a = await srv.record_autoscaling_stats()
        r = await srv.record_routing_stats()
        return a, r

    a, r = asyncio.run(main())
    assert a["queue_depth"] == 0 and a["ttft_samples"] == 1 and a["ttft_max_s"] > 0
    assert all(isinstance(v, int | float) for v in a.values())
    assert r["num_running"] == 0 and "num_free_blocks" in r


def test_engine_metrics_are_published_as_deltas(monkeypatch):
    import deployments.llm_server as ls

    class Rec:
        def __init__(self):
            self.incs: dict[str, float] = {}
            self.sets: dict[str, float] = {}

        def inc(self, name, value, **labels):
            assert labels == {"model": "m", "replica": "local"}
            self.incs[name] = self.incs.get(name, 0) + value

        def set(self, name, value, **labels):
            self.sets[name] = value

    rec = Rec()
    monkeypatch.setattr(ls, "get_metrics", lambda: rec)
    srv, eng = server()
    base = eng.stats()
    base.prompt_tokens_total, base.generation_tokens_total = 5, 7
    eng.stats = lambda: dataclasses.replace(base)  # type: ignore[method-assign]
    srv._publish_metrics()
    base.generation_tokens_total = 10
    srv._publish_metrics()
    assert rec.incs["generation_tokens_total"] == 10 and rec.incs["prompt_tokens_total"] == 5
    assert rec.sets["num_requests_running"] == 0 and 0 <= rec.sets["kv_cache_usage_perc"] <= 1


# -- the ingress in front of it (the real OpenAIIngress class, outside Serve) ------------------
def _ingress(handle: FakeHandle):
    from cluster.config import ClusterConfig
    from deployments.ingress import OpenAIIngress

    cfg = ClusterConfig.model_validate({"models": [MC]})
    # The class under serve.ingress's wrapper: its own __init__, no ASGI replica around it.
    return OpenAIIngress.__mro__[1](cfg.model_dump(mode="json"), {"m": handle})


def _request():
    from starlette.requests import Request

    return Request({"type": "http", "headers": [(b"x-request-id", b"rid-1")], "method": "POST"})


def test_ingress_internal_error_is_500_with_request_id_and_no_trace():
    ing = _ingress(FakeHandle(error=RuntimeError("secret internals")))
    body = CompletionRequest(model="m", prompt=list(range(9)), max_tokens=2)
    resp = asyncio.run(ing._serve(_request(), body, chat=False))
    err = json.loads(resp.body)["error"]
    assert resp.status_code == 500 and "rid-1" in err["message"]
    assert "secret" not in resp.body.decode() and "Traceback" not in resp.body.decode()


def test_ingress_builds_the_body_and_sends_block_hashes():
    from engine.block_hash import block_hashes

    srv, _ = server()
    handle = FakeHandle(srv)
    ing = _ingress(handle)
    body = CompletionRequest(model="m", prompt=list(range(1, 10)), max_tokens=3, logprobs=1)
    resp = asyncio.run(ing._serve(_request(), body, chat=False))
    out = json.loads(resp.body)
    assert resp.status_code == 200 and resp.headers["x-fleetlm-replica"] == "local"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 3 and out["usage"]["prompt_tokens"] == 9
    assert len(out["choices"][0]["logprobs"]["tokens"]) == 3
    sent = handle.reqs[0]
    assert sent["block_hashes"] == block_hashes(list(range(1, 10)), 16)


def test_ingress_stream_closed_early_aborts_the_engine_request():
    srv, eng = server(FakeEngine(step_s=0.01))
    ing = _ingress(FakeHandle(srv))
    body = CompletionRequest(model="m", prompt=[1, 2, 3], max_tokens=40, stream=True)

    async def main():
        resp = await ing._serve(_request(), body, chat=False)
        it = resp.body_iterator
        first = await it.__anext__()
        assert first.startswith("data: ")
        await it.aclose()  # what Starlette does when the client disconnects
        for _ in range(100):
            if eng.aborted:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert eng.aborted == ["rid-1"] and not eng.running and srv.num_inflight == 0


# -- the replica on the real engine (demo-small): in its own process, and on a thread -----------
@pytest.fixture(scope="module", params=["process", "thread"])
def real(request):
    s = LLMServer(
        {
            "name": "tiny",
            "model": "demo-small",
            "engine": {"num_kv_blocks": 64, "max_num_seqs": 4, "max_model_len": 256},
            "max_queued_requests": 2,
            "engine_process": request.param == "process",
        }
    )
    yield s
    s.engine.shutdown()


def test_engine_core_openmp_threads_sleep_when_waiting(real):
    # Spinning OpenMP threads beside the replica, ingress and proxy on the same cores cost the
    # engine core 4x the CPU per token on a busy machine (BENCHMARKS.md, serving path).
    proc = getattr(real.engine, "proc", None)
    if proc is None:
        pytest.skip("the engine loop runs on a thread of this process")
    env = dict(
        kv.split("=", 1) for kv in open(f"/proc/{proc.pid}/environ").read().split("\0") if "=" in kv
    )
    assert env.get("OMP_WAIT_POLICY") == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def test_real_engine_n2_seeded_repeats(real):
    r = req(
        "a", prompt=(5, 6, 7, 8, 9), n=2, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True
    )
    toks, last = asyncio.run(run(real, r))
    assert len(toks[0]) == len(toks[1]) == 8 and toks[0] != toks[1]
    assert last[0]["finish_reason"] == last[1]["finish_reason"] == "length"
    assert last[0]["num_prompt_tokens"] == 5
    again, _ = asyncio.run(run(real, {**r, "request_id": "b"}))
    assert again == toks  # seed + i per choice
    assert real.num_inflight == 0


def test_real_engine_context_length_is_a_400_from_the_replica(real):
    from deployments.protocol import APIError

    with pytest.raises(APIError) as e:
        asyncio.run(run(real, req("long", max_tokens=1000)))
    assert (e.value.status, e.value.code, e.value.param) == (
        400,
        "context_length_exceeded",
        "max_tokens",
    )


def test_real_engine_cancelled_requests_free_their_blocks_at_once(real):

    async def main():
        total = real.engine.stats().num_total_blocks
        r = {"max_tokens": 200, "ignore_eos": True}
        # 4 running + 2 queued fill the replica (admission answers before any token).
        gens = [real.generate({**req(f"q{i}", **r), "channel": "c"}) for i in range(6)]
        assert [await g.__anext__() for g in gens] == [{"replica": "local"}] * 6
        over = [m async for m in real.generate({**req("over"), "channel": "c"})]
        assert over[0]["error"]["status"] == 429
        assert over[0]["error"]["headers"]["Retry-After"] == "1"
        for g in gens:
            await g.aclose()  # what Serve's cancellation does to the call
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            s = real.engine.stats()
            if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == total:
                break
            await asyncio.sleep(0.02)
        s = real.engine.stats()
        assert (s.num_running, s.num_waiting, s.num_free_blocks) == (0, 0, total)
        assert real.num_inflight == 0
        a = await real.record_autoscaling_stats()
        assert a["queue_depth"] == 0 and a["ttft_samples"] >= 1

    asyncio.run(main())


def test_a_killed_engine_core_fails_its_requests_and_the_replica_reports_unhealthy():
    from deployments.protocol import APIError

    srv = LLMServer(
        {
            "name": "tiny",
            "model": "demo-small",
            "engine": {"num_kv_blocks": 32, "max_model_len": 128},
            "engine_process": True,
        }
    )

    async def main():
        task = asyncio.ensure_future(
            run(srv, req("r", max_tokens=100, ignore_eos=True, temperature=0))
        )
        while srv.engine.stats().num_running == 0:
            await asyncio.sleep(0.01)
        srv.engine.proc.kill()
        with pytest.raises(APIError) as e:
            await asyncio.wait_for(task, 10)
        assert e.value.status == 503 and "Traceback" not in e.value.message

    try:
        srv.check_health()
        asyncio.run(main())
        with pytest.raises(RuntimeError):
            srv.check_health()
    finally:
        srv.engine.shutdown()


def test_real_engine_streamed_text_is_the_decode_of_the_streamed_tokens(real):
    from transformers import AutoTokenizer

    from engine.models.demo import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("demo-small", progress=False))

    async def main():
        handle = FakeHandle(real)
        mux = new_channel_mux(handle)
        sampling = {"max_tokens": 24, "temperature": 1.0, "seed": 3, "ignore_eos": True}
        r = req("txt", prompt=(5, 6, 7, 8, 9), n=3, **sampling)
        call = await open_call(handle, mux, r, "txt", "m")
        ids: dict[int, list[int]] = {}
        text: dict[int, str] = {}
        async for items in call_deltas(call):
            for i, d in items:
                ids.setdefault(i, []).extend(d["token_ids"])
                text[i] = text.get(i, "") + d["text"]
        await mux.close()
        return ids, text

    ids, text = asyncio.run(main())
    assert sorted(ids) == [0, 1, 2]
    for i in ids:
        assert text[i] == tok.decode(ids[i], skip_special_tokens=True)
