"""Ray-free tests of the serving layer: protocol validation, response formatting, stream merging,
and LLMServer.generate driving a real AsyncEngine on demo-small (no Serve)."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.openai_format import ChoiceState, ChunkWriter, apply_delta, completion_body
from deployments.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error_to_api,
)
from deployments.stream_merge import StreamError, merge_coalesced


# -- protocol ---------------------------------------------------------------------------------
def test_completion_sampling_dict_and_errors_name_the_field():
    req = CompletionRequest(model="m", prompt="hi", max_tokens=5, temperature=0, stop="x", seed=3)
    s = req.sampling()
    assert s["max_tokens"] == 5 and s["temperature"] == 0 and s["stop"] == ["x"] and s["seed"] == 3
    with pytest.raises(APIError) as e:
        CompletionRequest(model="m", prompt="hi", top_p=1.5).sampling()
    assert e.value.status == 400 and e.value.param == "top_p"
    with pytest.raises(APIError) as e:
        CompletionRequest(model="m", prompt="hi", echo=True).sampling()
    assert e.value.param == "echo"
    with pytest.raises(APIError) as e:
        CompletionRequest(model="m", prompt="hi", logit_bias={"1": 2.0}).sampling()
    assert e.value.param == "logit_bias"


def test_prompt_forms():
    assert CompletionRequest(model="m", prompt="a").prompts() == ["a"]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    with pytest.raises(APIError):
        CompletionRequest(model="m", prompt=[]).prompts()


def test_chat_max_completion_tokens_wins_and_logprobs():
    req = ChatCompletionRequest(
        model="m",
        messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=9,
        max_completion_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    s = req.sampling()
    assert s["max_tokens"] == 4 and s["logprobs"] == 2
    assert req.chat_messages()[0] == {"role": "system", "content": "be brief"}
    with pytest.raises(APIError) as e:
        ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]
        ).sampling()
    assert e.value.param == "tools"


def test_validation_error_names_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        CompletionRequest(model="m", prompt="x", n=0)
    err = validation_error_to_api(e.value.errors())
    assert err.status == 400 and err.param == "n"
    with pytest.raises(ValidationError) as e:
        CompletionRequest(model="m", prompt="x", max_tokenz=3)
    err = validation_error_to_api(e.value.errors())
    assert err.param == "max_tokenz" and "unknown field" in err.message


# -- formatting -------------------------------------------------------------------------------
def test_completion_body_usage_counts_prompt_once_per_prompt():
    states = {0: ChoiceState(), 1: ChoiceState()}
    for i in (0, 1):
        apply_delta(
            states[i],
            {
                "index": i,
                "text": f"t{i}",
                "token_ids": [5, 6],
                "finish_reason": "length",
                "num_prompt_tokens": 7,
                "num_output_tokens": 2,
                "num_cached_tokens": 4,
            },
        )
    body = completion_body("r", 0, "m", states, 2, str)
    assert [c["text"] for c in body["choices"]] == ["t0", "t1"]
    assert body["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 4,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_chat_chunks_carry_role_once():
    w = ChunkWriter(True, "r", 0, "m", str)
    first = json.loads(w.deltas([(0, {"text": "a"})])[6:])
    second = json.loads(w.deltas([(0, {"text": "b", "finish_reason": "stop"})])[6:])
    assert first["choices"][0]["delta"] == {"content": "a", "role": "assistant"}
    assert second["choices"][0]["delta"] == {"content": "b"}
    assert second["choices"][0]["finish_reason"] == "stop"


# -- stream merging ---------------------------------------------------------------------------
async def _gen(items, delay=0.0, fail=False):
    for x in items:
        await asyncio.sleep(delay)
        yield x
    if fail:
        raise ValueError("boom")


def test_merge_coalesces_backlog_and_keeps_order():
    async def main():
        batches = []
        srcs = [_gen(list(range(10)), 0.001), _gen(list("abcdefghij"), 0.001)]
        async for b in merge_coalesced(srcs):
            batches.append(b)
            await asyncio.sleep(0.03)  # a lagging consumer: items pile up meanwhile
        return batches

    batches = asyncio.run(main())
    flat = [x for b in batches for x in b]
    assert [v for i, v in flat if i == 0] == list(range(10))
    assert [v for i, v in flat if i == 1] == list("abcdefghij")
    assert len(batches) <= 4  # 20 items, coalesced into a few batches


def test_merge_raises_source_error_and_cancels_others():
    closed = []

    async def slow():
        try:
            while True:
                await asyncio.sleep(0.01)
                yield 0
        finally:
            closed.append(True)

    async def main():
        with pytest.raises(StreamError) as e:
            async for _ in merge_coalesced([slow(), _gen([1], 0.03, fail=True)]):
                pass
        assert isinstance(e.value.error, ValueError)

    asyncio.run(main())
    assert closed == [True]


# -- LLMServer on a real engine (demo-small, no Serve) ----------------------------------------
@pytest.fixture(scope="module")
def server():
    from deployments.llm_server import LLMServer

    s = LLMServer(
        {
            "name": "tiny",
            "model": "demo-small",
            "engine": {"num_kv_blocks": 64, "max_num_seqs": 4, "max_model_len": 256},
            "max_queued_requests": 2,
        }
    )
    yield s
    s.engine.shutdown()


async def _collect(server, req):
    return [m async for m in server.generate(req)]


def _req(rid, n=1, **sampling):
    sampling.setdefault("max_tokens", 8)
    sampling.setdefault("temperature", 0)
    return {"request_id": rid, "prompt_token_ids": [5, 6, 7, 8, 9], "sampling": sampling, "n": n}


def test_generate_n2_seeded_and_usage(server):
    msgs = asyncio.run(_collect(server, _req("a", n=2, temperature=1.0, seed=7, ignore_eos=True)))
    assert msgs[0]["replica"] == "local"
    toks: dict[int, list[int]] = {0: [], 1: []}
    last: dict[int, dict] = {}
    for m in msgs:
        for d in m["outputs"]:
            toks[d["index"]].extend(d["token_ids"])
            last[d["index"]] = d
    assert len(toks[0]) == len(toks[1]) == 8
    assert last[0]["finish_reason"] == last[1]["finish_reason"] == "length"
    assert last[0]["num_prompt_tokens"] == 5
    # Same seeds again -> same tokens (seed + i per choice).
    again = asyncio.run(_collect(server, _req("b", n=2, temperature=1.0, seed=7, ignore_eos=True)))
    toks2: dict[int, list[int]] = {0: [], 1: []}
    for m in again:
        for d in m["outputs"]:
            toks2[d["index"]].extend(d["token_ids"])
    assert toks2 == toks
    assert server.num_inflight == 0


def test_generate_bad_params_is_an_error_message(server):
    msgs = asyncio.run(_collect(server, _req("c", top_p=0.0)))
    assert len(msgs) == 1 and msgs[0]["error"]["status"] == 400
    assert msgs[0]["error"]["param"] == "top_p"
    too_long = _req("d", max_tokens=1000)
    msgs = asyncio.run(_collect(server, too_long))
    assert msgs[0]["error"]["status"] == 400
    assert msgs[0]["error"]["code"] == "context_length_exceeded"
    assert server.num_inflight == 0


def test_queue_full_is_429_and_close_frees_blocks(server):
    async def main():
        total = server.engine.stats().num_total_blocks
        gens = [server.generate(_req(f"q{i}", max_tokens=200, ignore_eos=True)) for i in range(6)]
        firsts = [await g.__anext__() for g in gens]  # 4 running + 2 queued fill the replica
        assert all("outputs" in f for f in firsts)
        over = await _collect(server, _req("q-over"))
        assert over[0]["error"]["status"] == 429
        assert over[0]["error"]["headers"]["Retry-After"] == "1"
        assert server.num_inflight == 6
        for g in gens:
            await g.aclose()
        assert server.num_inflight == 0
        for _ in range(100):
            s = server.engine.stats()
            if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == total:
                break
            await asyncio.sleep(0.02)
        s = server.engine.stats()
        assert (s.num_running, s.num_waiting, s.num_free_blocks) == (0, 0, total)

    asyncio.run(main())


def test_autoscaling_and_routing_stats(server):
    asyncio.run(_collect(server, _req("s1", max_tokens=4)))
    a = asyncio.run(server.record_autoscaling_stats())
    assert a["queue_depth"] == 0 and a["ttft_samples"] >= 1 and a["ttft_max_s"] > 0
    assert all(isinstance(v, int | float) for v in a.values())
    r = asyncio.run(server.record_routing_stats())
    assert r["num_running"] == 0 and "num_free_blocks" in r


# -- the ingress request path with a fake replica handle (no Serve) ---------------------------
class _FakeGen:
    """Stands in for DeploymentResponseGenerator: yields scripted messages or raises."""

    def __init__(self, messages, error=None):
        self.messages = list(messages)
        self.error = error
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.error is not None:
            raise self.error
        if not self.messages:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        return self.messages.pop(0)

    def cancel(self):
        self.cancelled = True


class _FakeHandle:
    def __init__(self, gen):
        self.gen = gen
        self.reqs = []

    def options(self, **kw):
        return self

    @property
    def generate(self):
        return self

    def remote(self, req):
        self.reqs.append(req)
        return self.gen


def _ingress(gen):
    from deployments.ingress import OpenAIIngress
    from deployments.model_runtime import ModelRuntime

    # The class under serve.ingress's wrapper: routes and state only, no ASGI replica around it.
    ing = object.__new__(OpenAIIngress.__mro__[1])
    ing.key_digests = set()
    rt = ModelRuntime("m", _FakeHandle(gen), None, max_model_len=64, block_size=4, vocab_size=100)
    rt.token_text = str  # type: ignore[method-assign]
    ing.runtimes = {"m": rt}
    return ing, rt


def _request():
    from starlette.requests import Request

    return Request({"type": "http", "headers": [(b"x-request-id", b"rid-1")], "method": "POST"})


def _delta(i, text, fin=None, n_out=1):
    return {
        "index": i,
        "token_ids": [1],
        "text": text,
        "finish_reason": fin,
        "num_prompt_tokens": 9,
        "num_output_tokens": n_out,
        "num_cached_tokens": 8,
        "logprobs": None,
    }


def test_ingress_internal_error_is_500_with_request_id_and_no_trace():
    ing, _ = _ingress(_FakeGen([], error=RuntimeError("secret internals")))
    body = CompletionRequest(model="m", prompt=list(range(9)), max_tokens=2)
    resp = asyncio.run(ing._serve(_request(), body, chat=False))
    err = json.loads(resp.body)["error"]
    assert resp.status_code == 500 and "rid-1" in err["message"]
    assert "secret" not in resp.body.decode() and "Traceback" not in resp.body.decode()


def test_ingress_replica_error_message_keeps_status_and_headers():
    limited = APIError(429, "full", type="rate_limit_error", headers={"Retry-After": "1"})
    gen = _FakeGen([{"error": limited.to_dict()}])
    ing, _ = _ingress(gen)
    body = CompletionRequest(model="m", prompt=list(range(9)), max_tokens=2)
    resp = asyncio.run(ing._serve(_request(), body, chat=False))
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert gen.cancelled


def test_ingress_sends_block_hashes_and_builds_the_body():
    from engine.block_hash import block_hashes

    msgs = [
        {"replica": "r7", "outputs": [_delta(0, "he")]},
        {"outputs": [_delta(0, "llo", "length", 2)]},
    ]
    ing, rt = _ingress(_FakeGen(msgs))
    body = CompletionRequest(model="m", prompt=list(range(9)), max_tokens=2)
    resp = asyncio.run(ing._serve(_request(), body, chat=False))
    out = json.loads(resp.body)
    assert resp.headers["x-fleetlm-replica"] == "r7"
    assert out["choices"][0]["text"] == "hello" and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 8
    req = rt.handle.reqs[0]
    assert req["block_hashes"] == block_hashes(list(range(9)), 4) and len(req["block_hashes"]) == 2


def test_ingress_stream_closed_early_cancels_the_replica_call():
    msgs = [{"replica": "r1", "outputs": [_delta(0, "a")]}] + [
        {"outputs": [_delta(0, "b")]} for _ in range(10)
    ]
    gen = _FakeGen(msgs)
    ing, _ = _ingress(gen)
    body = CompletionRequest(model="m", prompt=list(range(9)), max_tokens=20, stream=True)

    async def main():
        resp = await ing._serve(_request(), body, chat=False)
        it = resp.body_iterator
        first = await it.__anext__()
        assert first.startswith("data: ")
        await it.aclose()  # what Starlette does when the client disconnects

    asyncio.run(main())
    assert gen.cancelled


def test_engine_metrics_are_published_as_deltas(server, monkeypatch):
    import deployments.llm_server as ls

    class Rec:
        def __init__(self):
            self.incs: dict[str, float] = {}
            self.sets: dict[str, float] = {}

        def inc(self, name, value, **labels):
            assert labels == {"model": "tiny", "replica": "local"}
            self.incs[name] = self.incs.get(name, 0) + value

        def set(self, name, value, **labels):
            self.sets[name] = value

    rec = Rec()
    monkeypatch.setattr(ls, "_get_metrics", lambda: rec)
    server._last_stats = None
    server._publish_metrics()
    before = server.engine.stats()
    assert rec.incs["prompt_tokens_total"] == before.prompt_tokens_total
    asyncio.run(_collect(server, _req("m1", max_tokens=3, ignore_eos=True)))
    server._publish_metrics()
    assert rec.incs["generation_tokens_total"] == before.generation_tokens_total + 3
    assert rec.incs["prompt_tokens_total"] == before.prompt_tokens_total + 5
    assert rec.sets["num_requests_running"] == 0 and 0 <= rec.sets["kv_cache_usage_perc"] <= 1
