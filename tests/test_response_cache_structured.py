"""Response-cache keys separate requests by response_format, tools and tool_choice (exact keys and
the semantic cache's context hash alike)."""

from __future__ import annotations

from deployments.response_cache.keys import exact_key, semantic_split

SCHEMA_A = {"type": "object", "properties": {"a": {"type": "integer"}}}
SCHEMA_B = {"type": "object", "properties": {"b": {"type": "integer"}}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _req(**extra):
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "Give me a record"}],
        "temperature": 0,
        **extra,
    }


def _fmt(schema):
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def test_exact_and_semantic_keys_split_on_response_format_and_tools():
    variants = [
        _req(),
        _req(response_format=_fmt(SCHEMA_A)),
        _req(response_format=_fmt(SCHEMA_B)),
        _req(response_format={"type": "json_object"}),
        _req(tools=[TOOL]),
        _req(tools=[TOOL], tool_choice="required"),
        _req(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}}),
    ]
    exact = [exact_key("t", v) for v in variants]
    assert len(set(exact)) == len(variants)
    contexts = [semantic_split("t", v)[0] for v in variants]
    assert len(set(contexts)) == len(variants)
    # The embedded text is the same: only the context keeps the answers apart.
    assert len({semantic_split("t", v)[1] for v in variants}) == 1


def test_text_format_equals_absent_and_key_order_does_not_split():
    assert exact_key("t", _req(response_format={"type": "text"})) == exact_key("t", _req())
    # With tools, an absent tool_choice is "auto": "none" answers differently.
    none = _req(tools=[TOOL], tool_choice="none")
    assert exact_key("t", none) != exact_key("t", _req(tools=[TOOL]))
    reordered = {"json_schema": {"schema": SCHEMA_A, "name": "x"}, "type": "json_schema"}
    assert exact_key("t", _req(response_format=reordered)) == exact_key(
        "t", _req(response_format=_fmt(SCHEMA_A))
    )
