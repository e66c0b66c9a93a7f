"""Tool calls without Ray: parsers (Hermes/Qwen2.5, Llama 3.1 JSON), the streamed deltas, the
grammar that forces a call (run on the engine with the demo model), the template choice."""

from __future__ import annotations

import json

import jsonschema
import pytest
from tool_fixtures import TIME, WEATHER

from deployments.openai_format import ChoiceState, ChunkWriter, chat_body
from deployments.tool_calls import ToolStream, parse_tool_calls, parser_for_template, tool_grammar
from engine.models.demo import CHAT_TEMPLATE


def test_parser_chosen_from_template():
    assert parser_for_template(CHAT_TEMPLATE) == "hermes"
    assert parser_for_template("... <|python_tag|> ... ipython ...") == "llama3_json"
    assert parser_for_template(None) == "hermes"


def test_hermes_parse_calls_and_content():
    text = (
        'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": 1}}\n</tool_call>'
    )
    content, calls = parse_tool_calls(text, "hermes")
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": 1}),
    ]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    assert parse_tool_calls("no calls here", "hermes") == ("no calls here", [])
    broken = "<tool_call>{not json</tool_call>"
    assert parse_tool_calls(broken, "hermes") == (broken, [])


def test_llama3_json_parse():
    content, calls = parse_tool_calls(
        '<|python_tag|>{"name": "get_time", "parameters": {"tz": 3}}', "llama3_json"
    )
    assert content is None and calls[0].name == "get_time"
    assert json.loads(calls[0].arguments) == {"tz": 3}
    assert parse_tool_calls("Hello there", "llama3_json") == ("Hello there", [])


@pytest.mark.parametrize("cut", [1, 2, 3, 7])
def test_stream_deltas_reassemble_to_the_parsed_calls(cut):
    text = (
        'Sure <tool_call>\n{"name": "get_weather", "arguments": {"city": "a\\"}b", '
        '"unit": "c"}}\n</tool_call>'
    )
    ts = ToolStream("hermes")
    content, calls = "", {}
    pieces = [text[i : i + cut] for i in range(0, len(text), cut)]
    for j, piece in enumerate(pieces):
        c, deltas = ts.feed(piece, final=j == len(pieces) - 1)
        content += c
        for d in deltas:
            slot = calls.setdefault(d["index"], {"name": None, "args": "", "id": None})
            if "id" in d:
                assert slot["id"] is None and slot["args"] == ""  # id and name come first
                slot["id"], slot["name"] = d["id"], d["function"]["name"]
            slot["args"] += d["function"]["arguments"]
    assert content.strip() == "Sure"
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["args"]) == {"city": 'a"}b', "unit": "c"}


def test_stream_holds_back_only_a_possible_marker():
    ts = ToolStream("hermes")
    assert ts.feed("hello <tool")[0] == "hello "
    assert ts.feed("box>")[0] == "<toolbox>"
    assert ts.feed("", final=True) == ("", [])


def test_chat_body_and_chunks_finish_with_tool_calls():
    text = '<tool_call>\n{"name": "get_time", "arguments": {"tz": 2}}\n</tool_call>'
    st = ChoiceState(text=[text], finish_reason="stop", num_output_tokens=9)
    body = chat_body("r", 0, "m", {0: st}, 1, str, tool_fmt="hermes")
    ch = body["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None
    assert ch["message"]["tool_calls"][0]["function"] == {
        "name": "get_time",
        "arguments": '{"tz": 2}',
    }
    w = ChunkWriter(True, "r", 0, "m", str, tool_fmt="hermes")
    ev = json.loads(w.deltas([(0, {"text": text, "finish_reason": "stop"})])[6:])
    delta = ev["choices"][0]["delta"]
    assert ev["choices"][0]["finish_reason"] == "tool_calls"
    assert delta["tool_calls"][0]["function"]["name"] == "get_time"
    replay = json.loads(ChunkWriter(True, "r", 0, "m", str).from_body(body)[0][6:])
    assert replay["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] == '{"tz": 2}'


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
def test_forced_call_grammar_on_the_engine(fmt):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.models.demo import resolve_model
    from engine.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=resolve_model("demo-small", progress=False), num_threads=1))
    spec = tool_grammar([WEATHER, TIME], fmt)
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=120, structured=spec) for s in range(4)
    ]
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for r in eng.generate(["call a tool"] * 4, params):
        assert r.finish_reason == "stop", r.text
        content, calls = parse_tool_calls(r.text, fmt)
        assert not content and len(calls) == 1, r.text
        jsonschema.validate(json.loads(calls[0].arguments), tools[calls[0].name])


def test_cluster_file_overrides_the_template_choice():
    from pydantic import ValidationError

    from cluster.config import ModelConfig
    from deployments.model_runtime import load_runtime

    base = {"name": "m", "model": "demo-small", "caches": {"exact": {"enabled": False}}}
    assert load_runtime(ModelConfig.model_validate(base), None).tool_parser == "hermes"
    mc = ModelConfig.model_validate({**base, "tool_parser": "llama3_json"})
    assert load_runtime(mc, None).tool_parser == "llama3_json"
    with pytest.raises(ValidationError, match="tool_parser"):
        ModelConfig.model_validate({**base, "tool_parser": "xml"})


def test_closed_schema_closes_every_object_schema_and_only_schema_positions():
    from deployments.tool_calls import closed_schema

    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "tags": {"type": "array", "items": {"type": "object", "properties": {}}},
            "open": {"type": "object", "additionalProperties": True},
            "kind": {"anyOf": [{"type": "object", "properties": {"x": {}}}, {"type": "null"}]},
            "mode": {"enum": [{"type": "object"}], "default": {"type": "object"}},
        },
        "$defs": {"d": {"type": "object"}},
    }
    got = closed_schema(schema)
    assert got["additionalProperties"] is False
    p = got["properties"]
    assert set(p) == {"properties", "tags", "open", "kind", "mode"}  # names untouched
    assert p["properties"]["additionalProperties"] is False
    assert p["tags"]["items"]["additionalProperties"] is False
    assert p["open"]["additionalProperties"] is True  # an explicit choice is kept
    assert p["kind"]["anyOf"][0]["additionalProperties"] is False
    assert p["kind"]["anyOf"][1] == {"type": "null"}
    assert p["mode"] == {"enum": [{"type": "object"}], "default": {"type": "object"}}
    assert got["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is not modified
