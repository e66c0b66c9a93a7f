"""Normalising an OpenAI request body into what determines its answer.

Exact key: sha256 over (namespace, model, messages/prompt, every other body field that can change
the output). Fields that only change delivery (``stream``, ``stream_options``, ``user``...) are
dropped; a field equal to its documented default is dropped, so an explicit ``top_p: 1`` and an
absent one share an entry; with temperature 0 (greedy) the fields greedy decoding ignores (top_p,
top_k, min_p, seed) are dropped too. Unknown fields are kept: a field we don't understand can only
split entries, never merge two requests with different answers. ``response_format``, ``tools`` and
``tool_choice`` are such fields: a cached answer to one schema or tool set is never served to
another (only ``{"type": "text"}`` equals an absent response_format).

Semantic split: the text that is embedded is the last user message (chat) or the prompt string
(completion). Everything else (system prompt, earlier turns, sampling fields) goes into an exact
"context" hash, so a semantic hit only ever crosses requests whose context is identical.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Delivery-only fields: they never change the generated text.
_DELIVERY_FIELDS = frozenset(
    {"stream", "stream_options", "user", "metadata", "store", "service_tier", "parallel_tool_calls"}
)
# Documented defaults (OpenAI / vLLM): an explicit default equals an absent field.
_DEFAULTS: dict[str, Any] = {
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "stop": [],
    "stop_token_ids": [],
    "logit_bias": {},
    "ignore_eos": False,
    "min_tokens": 0,
    "echo": False,
    "logprobs": False,
    "best_of": 1,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "suffix": "",
    "response_format": {"type": "text"},
}
_GREEDY_IGNORED = frozenset({"top_p", "top_k", "min_p", "seed"})
OPENAI_DEFAULT_TEMPERATURE = 1.0  # an absent temperature samples, as in OpenAI's API


def temperature(request: dict[str, Any]) -> float:
    t = request.get("temperature")
    return OPENAI_DEFAULT_TEMPERATURE if t is None else float(t)


def _normalized_fields(request: dict[str, Any]) -> dict[str, Any]:
    greedy = temperature(request) == 0.0
    out: dict[str, Any] = {}
    for k, v in request.items():
        if v is None or k in _DELIVERY_FIELDS or k in ("messages", "prompt"):
            continue
        if k == "stop" and isinstance(v, str):
            v = [v]
        if k == "top_k" and v == -1:
            v = 0
        if k in _DEFAULTS and v == _DEFAULTS[k]:
            continue
        if greedy and k in _GREEDY_IGNORED:
            continue
        if k == "max_completion_tokens":  # the newer OpenAI name of max_tokens
            k = "max_tokens"
        out[k] = v
    out["temperature"] = temperature(request)
    return out


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def exact_key(namespace: str, request: dict[str, Any]) -> str:
    body = {"messages": request.get("messages"), "prompt": request.get("prompt")}
    return _digest([namespace, body, _normalized_fields(request)])


def message_text(content: Any) -> str | None:
    """A chat message's text: a string, or text parts joined; None if it has non-text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                return None
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    return None


def semantic_split(namespace: str, request: dict[str, Any]) -> tuple[str, str] | None:
    """(context hash, text to embed), or None when the request has no single text to embed."""
    messages = request.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            return None
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            return None
        text = message_text(last.get("content"))
        context: Any = [messages[:-1], {k: v for k, v in last.items() if k != "content"}]
    else:
        prompt = request.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        text = prompt if isinstance(prompt, str) else None
        context = "completion"
    if text is None or not text.strip():
        return None
    return _digest([namespace, context, _normalized_fields(request)]), text
