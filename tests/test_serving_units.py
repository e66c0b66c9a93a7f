"""Ray-free tests of the serving layer: protocol validation and response formatting. The replica
and the ingress's request path: tests/test_serving_replica.py."""

from __future__ import annotations

import json

import pytest

from deployments.openai_format import ChoiceState, ChunkWriter, apply_delta, completion_body
from deployments.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error_to_api,
)


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
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as v:  # a tool without its function
        ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]
        )
    assert validation_error_to_api(v.value.errors()).param.startswith("tools")
    with pytest.raises(APIError) as e:
        ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": "x"}], functions=[{"name": "f"}]
        ).sampling()
    assert e.value.param == "functions"


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
