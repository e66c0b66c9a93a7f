"""Edge limits without Ray: SamplingParams bounds, deployments/limits.py checks, the body-size
middleware on a bare FastAPI app, and the ingress's OpenAPI document."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from starlette.exceptions import HTTPException

from cluster.config import ClusterConfig
from deployments.limits import BodySizeLimit, Limits, check_request, first_unencodable
from deployments.protocol import APIError, ChatCompletionRequest, CompletionRequest
from engine.sampling_params import MIN_TEMPERATURE, SamplingParams

LIMITS = Limits()
MAX_LEN = 512


# -- SamplingParams: nothing a client sends may fail inside an engine step --------------------
@pytest.mark.parametrize(
    "kw, field",
    [
        ({"seed": 2**80}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"top_k": 2**64}, "top_k"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"min_tokens": 2**70}, "min_tokens"),
        ({"stop_token_ids": [2**64]}, "stop_token_ids"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"repetition_penalty": 1e300}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"temperature": float("inf")}, "temperature"),
    ],
)
def test_sampling_params_refuse_values_an_engine_step_cannot_take(kw, field):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    assert str(e.value).startswith(field)


def test_sampling_params_accept_the_int64_seed_range_and_clamp_tiny_temperatures():
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    assert SamplingParams(temperature=1e-30).temperature == MIN_TEMPERATURE
    assert SamplingParams(temperature=0).greedy


def test_seed_at_the_top_of_the_range_samples_every_choice():
    # Choice i of n samples with seed + i: the engine's generator must take the largest of them.
    import torch

    g = torch.Generator()
    g.manual_seed(SamplingParams(seed=2**63 - 1).seed + 15)


# -- check_request ------------------------------------------------------------------------------
def comp(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **kw})


def chat(content="hi", **kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": content}], **kw}
    )


def refused(body, limits: Limits = LIMITS) -> APIError:
    with pytest.raises(APIError) as e:
        check_request(body, limits, MAX_LEN)
    assert 400 <= e.value.status < 500
    return e.value


def test_lone_surrogates_are_a_400_naming_the_field():
    assert refused(comp(prompt="ok \ud800")).param == "prompt"
    assert refused(comp(prompt=["fine", "\udfff"])).param == "prompt.1"
    assert refused(chat("x\ud83d")).param == "messages.0.content"
    assert refused(comp(stop=["\ud800"])).param == "stop.0"
    assert refused(comp(user="\ud800")).param == "user"
    assert refused(comp(prompt="x\ud800")).code == "invalid_unicode"
    check_request(comp(prompt="emoji \U0001f600 and accents é"), LIMITS, MAX_LEN)  # valid


def test_first_unencodable_walks_keys_and_nesting():
    assert first_unencodable({"a": [{"b": "ok"}, {"c": "\ud800"}]}, "") == "a.1.c"
    assert first_unencodable({"\ud800": 1}, "") == "body"
    assert first_unencodable(["ok", 5, None], "") is None


def test_counts_and_sizes():
    assert refused(comp(n=4), Limits(max_n=3)).param == "n"
    assert refused(comp(logprobs=5), Limits(max_logprobs=2)).param == "logprobs"
    assert refused(chat(logprobs=True, top_logprobs=5), Limits(max_logprobs=2)).param == (
        "top_logprobs"
    )
    assert refused(comp(stop=[f"s{i}" for i in range(1000)])).param == "stop"
    assert refused(comp(stop="x" * 257)).param == "stop"
    assert refused(comp(stop_token_ids=list(range(65)))).param == "stop_token_ids"
    assert refused(comp(prompt=["a"] * 65)).param == "prompt"
    assert refused(comp(max_tokens=100), Limits(max_tokens=50)).param == "max_tokens"
    e = refused(comp(max_tokens=10**30))
    assert e.param == "max_tokens" and e.code == "context_length_exceeded"
    assert refused(chat(max_completion_tokens=MAX_LEN)).param == "max_completion_tokens"
    assert refused(comp(max_tokens=0)).param == "max_tokens"
    check_request(comp(stop=["a"] * 16, n=16, max_tokens=MAX_LEN - 1), LIMITS, MAX_LEN)


def test_a_prompt_far_over_the_window_is_refused_by_its_length_in_characters():
    bound = MAX_LEN * LIMITS.prompt_chars_per_token
    check_request(comp(prompt="x" * bound), LIMITS, MAX_LEN)
    e = refused(comp(prompt="x" * (bound + 1)))
    assert e.param == "prompt" and e.code == "context_length_exceeded"
    assert refused(comp(prompt=["a", "x" * (bound + 1)])).param == "prompt"
    long_chat = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x" * (bound // 2 + 1)}] * 2,
        }
    )
    assert refused(long_chat).param == "messages"
    assert refused(comp(prompt=[1] * MAX_LEN)).param == "prompt"  # token ids: counted exactly


def test_limits_come_from_the_cluster_file():
    cfg = ClusterConfig.model_validate(
        {"models": [{"name": "m"}], "limits": {"max_body_bytes": 4096, "max_stop_strings": 2}}
    )
    lim = Limits.from_config(cfg.limits)
    assert lim.max_body_bytes == 4096 and lim.max_stop_strings == 2 and lim.max_n == 16
    assert Limits.from_config(ClusterConfig.model_validate({"models": [{"name": "m"}]}).limits) == (
        Limits()
    )


# -- the body-size middleware -------------------------------------------------------------------
def _app() -> FastAPI:
    from deployments.ingress import _http_error  # the ingress's handler writes the error object

    app = FastAPI()
    app.add_middleware(BodySizeLimit)
    app.add_exception_handler(HTTPException, _http_error)

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return {"keys": len(body)}

    return app


def test_body_over_the_limit_is_a_413_with_or_without_content_length():
    BodySizeLimit.set_limit(1024)
    try:

        async def main():
            transport = httpx.ASGITransport(app=_app())
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                ok = await c.post("/echo", json={"a": "x" * 100})
                big = await c.post("/echo", json={"a": "x" * 5000})

                async def chunks():
                    for _ in range(10):
                        yield b" " * 500  # no Content-Length: counted as it arrives

                streamed = await c.post(
                    "/echo", content=chunks(), headers={"content-type": "application/json"}
                )
                return ok, big, streamed

        ok, big, streamed = asyncio.run(main())
    finally:
        BodySizeLimit.set_limit(Limits.max_body_bytes)
    assert ok.status_code == 200
    for r in (big, streamed):
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "request_too_large" and "1024 bytes" in err["message"]


# -- the OpenAPI document -----------------------------------------------------------------------
def test_openapi_documents_the_real_models_and_every_error_status():
    from deployments.ingress import app

    doc = app.openapi()
    comp_op = doc["paths"]["/v1/completions"]["post"]
    assert set(comp_op["responses"]) == {"200", "400", "401", "404", "413", "429", "500", "503"}
    assert "422" not in comp_op["responses"]
    ref = comp_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/CompletionRequest")
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "seed", "stop", "n"} <= set(props)
    err = comp_op["responses"]["429"]
    assert err["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "x-ratelimit-remaining-requests" in err["headers"]
    assert set(comp_op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
