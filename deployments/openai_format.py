"""Replica deltas -> OpenAI response bodies and SSE chunks (Ray-free; plain dicts, dumped once).

A replica yields messages ``{"replica": id, "outputs": [delta, ...]}`` where a delta is::

    {"index": i, "token_ids": [...], "text": "...", "finish_reason": None | "stop" | "length" | ...,
     "num_prompt_tokens": p, "num_output_tokens": o, "num_cached_tokens": c,
     "logprobs": None | [[token_id, logprob, [[id, logprob], ...]], ...]}

``index`` counts the choices of one replica call (0..n-1); the ingress offsets it per prompt.
Pydantic is kept off this path: building and validating a model per chunk costs more than the chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.tool_calls import ToolStream, parse_tool_calls

TokenText = Callable[[int], str]  # token id -> its text, for logprobs


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[Any]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def public_finish_reason(reason: str | None) -> str | None:
    # "abort" only happens on disconnect (nobody reads it); "error" surfaces as an error object.
    if reason in (None, "stop", "length"):
        return reason
    return "stop"


def usage_of(choices: dict[int, ChoiceState], n: int) -> Usage:
    """Prompt tokens count once per prompt (not once per choice), as OpenAI bills them."""
    u = Usage()
    for idx, c in choices.items():
        u.completion_tokens += c.num_output_tokens
        if idx % n == 0:
            u.prompt_tokens += c.num_prompt_tokens
            u.cached_tokens += c.num_cached_tokens
    return u


def apply_delta(state: ChoiceState, d: dict[str, Any]) -> None:
    if d.get("text"):
        state.text.append(d["text"])
    state.token_ids.extend(d.get("token_ids") or ())
    if d.get("logprobs"):
        state.logprobs.extend(d["logprobs"])
    if d.get("finish_reason"):
        state.finish_reason = d["finish_reason"]
    state.num_prompt_tokens = d.get("num_prompt_tokens", state.num_prompt_tokens)
    state.num_output_tokens = d.get("num_output_tokens", state.num_output_tokens)
    state.num_cached_tokens = d.get("num_cached_tokens", state.num_cached_tokens)


def merge_deltas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` follows ``a`` for the same choice: concatenate, take b's counts and finish reason."""
    out = dict(b)
    out["token_ids"] = (a.get("token_ids") or []) + (b.get("token_ids") or [])
    out["text"] = a.get("text", "") + b.get("text", "")
    if a.get("logprobs") or b.get("logprobs"):
        out["logprobs"] = (a.get("logprobs") or []) + (b.get("logprobs") or [])
    return out


def completion_logprobs(entries: list[list[Any]], token_text: TokenText) -> dict[str, Any]:
    """Legacy completions format: parallel lists, top_logprobs as {token_text: logprob}."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = 0
    for tok, lp, top in entries:
        t = token_text(tok)
        tokens.append(t)
        lps.append(lp)
        tops.append({token_text(i): v for i, v in top})
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[list[Any]], token_text: TokenText) -> dict[str, Any]:
    def one(tok: int, lp: float) -> dict[str, Any]:
        t = token_text(tok)
        return {"token": t, "logprob": lp, "bytes": list(t.encode())}

    content = []
    for tok, lp, top in entries:
        item = one(tok, lp)
        item["top_logprobs"] = [one(i, v) for i, v in top]
        content.append(item)
    return {"content": content}


def completion_body(
    rid: str, created: int, model: str, choices: dict[int, ChoiceState], n: int, tt: TokenText
) -> dict[str, Any]:
    out = []
    for idx in sorted(choices):
        c = choices[idx]
        out.append(
            {
                "index": idx,
                "text": "".join(c.text),
                "logprobs": completion_logprobs(c.logprobs, tt) if c.logprobs else None,
                "finish_reason": public_finish_reason(c.finish_reason),
            }
        )
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage_of(choices, n).to_dict(),
    }


def chat_message(text: str, finish: str | None, tool_fmt: str | None) -> tuple[dict, str | None]:
    """(message, finish_reason) of one choice; with tools in play, calls are parsed out of the
    text (``tool_fmt``: deployments/tool_calls.py's format) and a reply that calls tools finishes
    with "tool_calls"."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_fmt is None:
        return message, finish
    content, calls = parse_tool_calls(text, tool_fmt)
    if not calls:
        return message, finish
    message["content"] = content
    message["tool_calls"] = [c.to_dict() for c in calls]
    return message, "tool_calls" if finish == "stop" else finish


def chat_body(
    rid: str,
    created: int,
    model: str,
    choices: dict[int, ChoiceState],
    n: int,
    tt: TokenText,
    tool_fmt: str | None = None,
) -> dict[str, Any]:
    out = []
    for idx in sorted(choices):
        c = choices[idx]
        message, finish = chat_message(
            "".join(c.text), public_finish_reason(c.finish_reason), tool_fmt
        )
        out.append(
            {
                "index": idx,
                "message": message,
                "logprobs": chat_logprobs(c.logprobs, tt) if c.logprobs else None,
                "finish_reason": finish,
            }
        )
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage_of(choices, n).to_dict(),
    }


class ChunkWriter:
    """Turns merged replica deltas into SSE ``data:`` lines for one streamed request."""

    def __init__(
        self,
        chat: bool,
        rid: str,
        created: int,
        model: str,
        tt: TokenText,
        tool_fmt: str | None = None,
    ) -> None:
        self.chat = chat
        self.tool_fmt = tool_fmt  # tools in play: text is parsed into tool-call deltas
        self.tool_streams: dict[int, ToolStream] = {}
        self.rid = rid
        self.id = f"chatcmpl-{rid}" if chat else f"cmpl-{rid}"
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.created = created
        self.model = model
        self.tt = tt
        self.started: set[int] = set()

    def event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        """One SSE ``data:`` event of this response's chunk object."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def deltas(self, items: list[tuple[int, dict[str, Any]]], usage: Usage | None = None) -> str:
        """One SSE event per call: every choice's delta of this engine step (or of several).

        ``usage``: running totals for vLLM's ``stream_options.continuous_usage_stats``."""
        choices = []
        for idx, d in items:
            fr = public_finish_reason(d.get("finish_reason"))
            lp = d.get("logprobs")
            if self.chat:
                delta: dict[str, Any] = {"content": d.get("text", "")}
                if self.tool_fmt is not None:
                    delta, fr = self._tool_delta(idx, d, fr)
                if idx not in self.started:
                    self.started.add(idx)
                    delta["role"] = "assistant"
                ch = {
                    "index": idx,
                    "delta": delta,
                    "logprobs": chat_logprobs(lp, self.tt) if lp else None,
                    "finish_reason": fr,
                }
            else:
                ch = {
                    "index": idx,
                    "text": d.get("text", ""),
                    "logprobs": completion_logprobs(lp, self.tt) if lp else None,
                    "finish_reason": fr,
                }
            choices.append(ch)
        return self.event(choices, usage.to_dict() if usage is not None else None)

    def _tool_delta(
        self, idx: int, d: dict[str, Any], fr: str | None
    ) -> tuple[dict[str, Any], str | None]:
        ts = self.tool_streams.setdefault(idx, ToolStream(self.tool_fmt or "hermes"))
        content, calls = ts.feed(d.get("text", ""), final=fr is not None)
        delta: dict[str, Any] = {"content": content or None} if calls else {"content": content}
        if calls:
            delta["tool_calls"] = calls
        if fr == "stop" and ts.num_calls:
            fr = "tool_calls"
        return delta, fr

    def body(self, choices: dict[int, ChoiceState], n: int) -> dict[str, Any]:
        """The whole response (non-streamed, or a stream's copy for the cache)."""
        if self.chat:
            return chat_body(self.rid, self.created, self.model, choices, n, self.tt, self.tool_fmt)
        return completion_body(self.rid, self.created, self.model, choices, n, self.tt)

    def usage(self, usage: Usage) -> str:
        return self.event([], usage.to_dict())

    def from_body(self, body: dict[str, Any]) -> list[str]:
        """A stored full response (cache hit) replayed as a stream: one chunk per choice."""
        items = []
        for ch in body.get("choices", []):
            text = (ch["message"]["content"] or "") if self.chat else ch.get("text", "")
            items.append((ch["index"], {"text": text, "finish_reason": ch.get("finish_reason")}))
        if not self.chat or not any(ch["message"].get("tool_calls") for ch in body["choices"]):
            return [self.deltas(items)] if items else []
        choices = []
        for ch in body["choices"]:
            calls = [{"index": i, **c} for i, c in enumerate(ch["message"].get("tool_calls") or [])]
            delta: dict[str, Any] = {"role": "assistant", "content": ch["message"]["content"]}
            if calls:
                delta["tool_calls"] = calls
            choices.append(
                {
                    "index": ch["index"],
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": ch.get("finish_reason"),
                }
            )
        return [self.event(choices)]


def sse_error(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
