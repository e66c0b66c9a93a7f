"""Tool calls (Ray-free): the grammar that forces a call, and parsers of what models emit.

Formats (``tool_parser``), chosen from the model's chat template unless the cluster file names one:

- ``hermes`` (Hermes, Qwen2.5, the demo models): each call is
  ``<tool_call>\\n{"name": "...", "arguments": {...}}\\n</tool_call>``; text outside is content.
- ``llama3_json`` (Llama 3.1/3.2): the whole reply is one JSON object
  ``{"name": "...", "parameters": {...}}``, optionally after ``<|python_tag|>``.

``tool_choice`` "required" or a named function is enforced by grammar: exactly one call to one of
the allowed functions whose arguments validate against its ``parameters`` schema (one call keeps a
rambling model from chaining calls until max_tokens). "auto" generates freely and parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

PARSERS = ("hermes", "llama3_json")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def parser_for_template(template: str | None) -> str:
    """The tool-call format a chat template teaches its model."""
    t = template or ""
    if HERMES_OPEN in t:
        return "hermes"
    if PYTHON_TAG in t or "ipython" in t:
        return "llama3_json"
    return "hermes"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _args_key(fmt: str) -> str:
    return "parameters" if fmt == "llama3_json" else "arguments"


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "not", "if", "then", "else", "contains", "additionalItems")


def closed_schema(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema that doesn't say otherwise takes no
    properties beyond those it names (``additionalProperties: false``), as OpenAI's strict
    function calling and xgrammar's strict mode read a schema: a forced call's arguments then
    hold only the declared parameters, so they end instead of growing extra keys. Walks schema
    positions only (never ``enum``/``const``/``default`` values, never a property's name)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_schema(v) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(v) for v in out[key]]
    for key in _SCHEMA_ONE:
        if key in out:
            v = out[key]
            out[key] = [closed_schema(x) for x in v] if isinstance(v, list) else closed_schema(v)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed_schema(out["additionalProperties"])
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_schema(tools: list[dict[str, Any]], fmt: str) -> dict[str, Any]:
    """JSON schema of one call to any of ``tools`` (OpenAI tool dicts); the arguments follow
    the function's parameters schema, read strictly (``closed_schema``)."""
    options = []
    for t in tools:
        fn = t["function"]
        params = closed_schema(fn.get("parameters") or {"type": "object", "properties": {}})
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, _args_key(fmt): params},
                "required": ["name", _args_key(fmt)],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def tool_grammar(tools: list[dict[str, Any]], fmt: str) -> dict[str, Any]:
    """The ``SamplingParams.structured`` spec that forces one call to one of ``tools``."""
    schema = call_schema(tools, fmt)
    if fmt == "llama3_json":
        return {"type": "json", "schema": schema}
    body = json.dumps(schema, separators=(",", ":"))
    grammar = f'start: "{HERMES_OPEN}\\n" call "\\n{HERMES_CLOSE}"\ncall: %json {body}\n'
    return {"type": "lark", "grammar": grammar}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _as_call(obj: Any, fmt: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(_args_key(fmt), obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models emit the arguments pre-serialized
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


_HERMES_RE = re.compile(
    re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|$)", re.S
)


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a complete reply; a reply without a parseable call is all content."""
    if fmt == "llama3_json":
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG) :].strip()
        calls = []
        for part in body.split(";") if body.startswith("{") else []:
            try:
                call = _as_call(json.loads(part), fmt)
            except ValueError:
                return text, []
            if call is None:
                return text, []
            calls.append(call)
        return (None, calls) if calls else (text, [])
    calls = []
    for m in _HERMES_RE.finditer(text):
        try:
            call = _as_call(json.loads(m.group(1).strip()), fmt)
        except ValueError:
            call = None
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    content = _HERMES_RE.sub("", text).strip()
    return content or None, calls


_CALL_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)


class ToolStream:
    """One choice's streamed text -> OpenAI deltas: content, then per call
    ``{index, id, type, function: {name, arguments: ""}}`` once its name is known, then argument
    fragments as they arrive. Text that may still turn into a call marker is held back until it
    can't. llama3_json replies are one JSON object that is either a call or content, so they are
    held to the end and sent whole."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.buf = ""  # text not yet sent or classified
        self.in_call = False
        self.num_calls = 0
        self.head_done = False  # the current call's id and name were sent
        self.args_done = False
        self.depth, self.in_str, self.esc = 0, False, False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """New text (``final``: the choice's last) -> (content to send, tool-call deltas)."""
        self.buf += text
        if self.fmt != "hermes":
            if not final:
                return "", []
            content, calls = parse_tool_calls(self.buf, self.fmt)
            self.buf = ""
            self.num_calls = len(calls)
            return content or "", [{"index": i, **c.to_dict()} for i, c in enumerate(calls)]
        content, deltas = "", []
        while True:
            if not self.in_call:
                i = self.buf.find(HERMES_OPEN)
                if i < 0:
                    keep = 0 if final else _partial_suffix(self.buf, HERMES_OPEN)
                    content += self.buf[: len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep :]
                    break
                content += self.buf[:i]
                self.buf = self.buf[i + len(HERMES_OPEN) :]
                self.in_call, self.head_done, self.args_done = True, False, False
                self.depth, self.in_str, self.esc = 0, False, False
                continue
            if not self.head_done:
                m = _CALL_HEAD.match(self.buf)
                if m is None:
                    break
                deltas.append(
                    {
                        "index": self.num_calls,
                        "id": new_call_id(),
                        "type": "function",
                        "function": {"name": json.loads(f'"{m.group(1)}"'), "arguments": ""},
                    }
                )
                self.num_calls += 1
                self.head_done = True
                self.buf = self.buf[m.end() :]
                continue
            if not self.args_done:
                frag, used = self._scan_args(self.buf)
                self.buf = self.buf[used:]
                if frag:
                    deltas.append({"index": self.num_calls - 1, "function": {"arguments": frag}})
                if not self.args_done:
                    break
                continue
            j = self.buf.find(HERMES_CLOSE)  # arguments complete: skip to the end of the call
            if j < 0:
                break
            self.buf = self.buf[j + len(HERMES_CLOSE) :]
            self.in_call = False
        if self.num_calls and not self.in_call:
            content = content.strip()  # whitespace between calls is not content
        return content, deltas

    def _scan_args(self, s: str) -> tuple[str, int]:
        """Take argument JSON from ``s`` up to the end of the value: (fragment, chars used)."""
        out: list[str] = []
        for i, c in enumerate(s):
            if self.depth == 0 and not out and c.isspace():
                continue
            out.append(c)
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 0:
                        self.args_done = True
                        return "".join(out), i + 1
                continue
            if c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.args_done = True
                    return "".join(out), i + 1
        return "".join(out), len(s)


def _partial_suffix(s: str, marker: str) -> int:
    """Length of the longest suffix of ``s`` that is a proper prefix of ``marker``."""
    for n in range(min(len(s), len(marker) - 1), 0, -1):
        if marker.startswith(s[-n:]):
            return n
    return 0


# -- the request side ------------------------------------------------------------------------------
@dataclass
class ToolUse:
    """What one chat request asks of tools: the format, the tools for the chat template, and the
    grammar spec when a call is forced (tool_choice "required" or a named function)."""

    fmt: str
    tools: list[dict[str, Any]]
    spec: dict[str, Any] | None = None


def check_tool_choice(body: Any) -> None:
    """400 naming ``tools``/``tool_choice`` for choices that can't be honoured."""
    from deployments.protocol import bad_request

    names = [t.function.name for t in body.tools or []]
    if len(set(names)) != len(names):
        raise bad_request("tools: function names must be unique", "tools")
    choice = body.tool_choice
    if choice is None or choice == "none":
        return
    if not names:
        raise bad_request("tool_choice requires tools", "tool_choice")
    if not isinstance(choice, str) and choice.function.name not in names:
        raise bad_request(
            f"tool_choice names function {choice.function.name!r}, which is not in tools",
            "tool_choice",
        )


def tool_use(body: Any, fmt: str) -> ToolUse | None:
    """None when the request has no tools in play (none given, or tool_choice "none")."""
    if not body.tools or body.tool_choice == "none":
        return None
    from deployments.response_format import check_grammar

    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    choice = body.tool_choice or "auto"
    if choice == "auto":
        return ToolUse(fmt, tools)
    forced = (
        tools
        if choice == "required"
        else [t for t in tools if t["function"]["name"] == choice.function.name]
    )
    spec = tool_grammar(forced, fmt)
    check_grammar(spec, "tools")
    return ToolUse(fmt, tools, spec)


def template_message(m: Any) -> dict[str, Any]:
    """A ChatMessage as chat templates take it (transformers' tool-use conventions): tool-call
    arguments as a mapping, tool turns with their ``tool_call_id``."""
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": m.text()}
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args: Any = json.loads(c.function.arguments)
            except ValueError:
                args = c.function.arguments
            calls.append(
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": args},
                }
            )
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    name = getattr(m, "name", None)
    if isinstance(name, str):
        out["name"] = name
    return out
