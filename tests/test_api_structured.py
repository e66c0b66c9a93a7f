"""Structured outputs and tool calls end to end on a real local Ray Serve, through the official
``openai`` client: one replica of demo-small (random weights: only the grammar makes its output
valid), the exact response cache on. One app for the module."""

from __future__ import annotations

import json
import threading

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from served_app import openai_client, served_app
from tool_fixtures import TIME, WEATHER

pytestmark = pytest.mark.ray

APP = "fleetlm-structured-test"
PREFIX = "/structured"
MODEL = "tiny"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 5},
            "minItems": 1,
            "maxItems": 3,
        },
        "boss": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}},
                    "required": ["id"],
                    "additionalProperties": False,
                },
            ]
        },
    },
    "required": ["name", "age", "role", "tags", "boss"],
    "additionalProperties": False,
}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "Describe someone."}]


@pytest.fixture(scope="module")
def api(ray_session):
    cluster = {
        "models": [
            {
                "name": MODEL,
                "model": "demo-small",
                "num_replicas": 1,
                "engine": {
                    "num_kv_blocks": 256,
                    "max_num_seqs": 8,
                    "max_model_len": 1024,
                    "num_threads": 1,
                },
                "resources_per_replica": {"num_cpus": 1},
            }
        ]
    }
    with served_app(ray_session, cluster, APP, PREFIX) as base:
        yield base


@pytest.fixture(scope="module")
def client(api):
    return openai_client(api)


def _schema_format(schema: dict, name: str = "person") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_json_schema_chat_and_completion_validate(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format=_schema_format(PERSON),
        temperature=1.0,
        seed=3,
        max_tokens=300,
        n=3,
    )
    for ch in r.choices:
        assert ch.finish_reason == "stop", ch.message.content
        jsonschema.validate(json.loads(ch.message.content), PERSON)
    c = client.completions.create(
        model=MODEL,
        prompt="JSON:",
        max_tokens=300,
        temperature=0,
        extra_body={"response_format": _schema_format(PERSON)},
    )
    assert c.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(c.choices[0].text), PERSON)


class Pet(BaseModel):
    kind: str = Field(pattern="^(cat|dog|owl)$")
    legs: int = Field(ge=0, le=8)
    name: str = Field(max_length=8)


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Pet, temperature=0, max_tokens=200
    )
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog", "owl") and 0 <= pet.legs <= 8


def test_json_object_stops_only_as_a_json_object(client):
    # Any object allows unbounded strings, so a random-weight model may be cut by max_tokens
    # ("length"); every choice that stops is a JSON object.
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=1,
        max_tokens=400,
        n=4,
    )
    stopped = [ch for ch in r.choices if ch.finish_reason == "stop"]
    assert stopped
    for ch in stopped:
        assert isinstance(json.loads(ch.message.content), dict)


def test_json_schema_streamed(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format=_schema_format(PERSON),
        temperature=0,
        max_tokens=300,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize(
    "response_format",
    [
        _schema_format({"type": "object", "properties": {"a": {"type": "strnig"}}}),
        _schema_format({"type": "string", "pattern": "(?<=a)b"}),
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "xml"},
    ],
)
def test_bad_response_format_is_400_naming_it(client, response_format):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=response_format, max_tokens=5
        )
    assert e.value.body["param"] == "response_format"


def _call_args(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS[call.function.name])
    return args


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required(client, stream):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=1.0,
        seed=7,
        max_tokens=200,
    )
    if not stream:
        r = client.chat.completions.create(**kw)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls"
        (call,) = ch.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        _call_args(call)
        return
    chunks = list(client.chat.completions.create(**kw, stream=True))
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            slot = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
            if tc.id:
                slot["id"], slot["name"] = tc.id, tc.function.name
            slot["args"] += tc.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["args"]), PARAMS[calls[0]["name"]])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_named_and_none(client, stream):
    named = {"type": "function", "function": {"name": "get_time"}}
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(**kw, tool_choice=named, stream=True))
        names = [
            tc.function.name
            for c in chunks
            if c.choices
            for tc in c.choices[0].delta.tool_calls or []
            if tc.function.name
        ]
        assert names == ["get_time"]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:
        r = client.chat.completions.create(**kw, tool_choice=named)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_time"
        _call_args(call)
    none = client.chat.completions.create(**kw, tool_choice="none", extra_body={"ignore_eos": True})
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason == "length"


def test_tool_choice_errors_and_follow_up_turn(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert e.value.body["param"] == "tool_choice"
    first = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=100,
        temperature=0,
    )
    msg = first.choices[0].message
    follow = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            msg.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny, 20"},
        ],
        tools=[WEATHER],
        max_tokens=5,
        temperature=0,
    )
    assert follow.usage.prompt_tokens > first.usage.prompt_tokens
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_constrained_and_unconstrained_in_one_batch(client):
    plain_kw = dict(
        model=MODEL,
        prompt="Once upon",
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    alone = client.completions.create(**plain_kw).choices[0].text
    results: dict[str, object] = {}

    def run(key, fn):
        results[key] = fn()

    threads = [
        threading.Thread(
            target=run, args=(f"plain{i}", lambda: client.completions.create(**plain_kw))
        )
        for i in range(3)
    ] + [
        threading.Thread(
            target=run,
            args=(
                f"json{i}",
                lambda i=i: client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"person {i}"}],
                    response_format=_schema_format(PERSON),
                    temperature=1.0,
                    seed=i,
                    max_tokens=300,
                ),
            ),
        )
        for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        assert results[f"plain{i}"].choices[0].text == alone  # the mask never touched them
        ch = results[f"json{i}"].choices[0]
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), PERSON)


def test_cache_keys_on_response_format_and_tools(client):
    other = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "cache me"}], temperature=0)
    raw = client.chat.completions.with_raw_response

    def call(**extra):
        r = raw.create(**kw, max_tokens=300, **extra)
        return r.headers["x-fleetlm-cache"], r.parse()

    kind, a = call(response_format=_schema_format(PERSON))
    assert kind == "miss"
    kind, again = call(response_format=_schema_format(PERSON))
    assert kind == "exact" and again.choices[0].message.content == a.choices[0].message.content
    kind, b = call(response_format=_schema_format(other, "other"))
    assert kind == "miss"  # a different schema is never served the first schema's answer
    jsonschema.validate(json.loads(b.choices[0].message.content), other)
    kind, _ = call(response_format={"type": "json_object"})
    assert kind == "miss"
    kind, t = call(tools=[WEATHER], tool_choice="required")
    assert kind == "miss" and t.choices[0].message.tool_calls
    kind, t2 = call(tools=[TIME], tool_choice="required")
    assert kind == "miss" and t2.choices[0].message.tool_calls[0].function.name == "get_time"
    kind, t3 = call(tools=[TIME], tool_choice="required")
    assert kind == "exact" and t3.choices[0].finish_reason == "tool_calls"
