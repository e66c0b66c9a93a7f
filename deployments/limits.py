"""Limits checked at the HTTP edge before any tokenizing, cache lookup or queueing (Ray-free).

Two parts:
- ``BodySizeLimit``: an ASGI middleware. A ``Content-Length`` over the limit is answered with a 413
  at once, without reading the body; a body without one (chunked) is counted as it arrives and
  refused with a 413 as soon as it passes the limit.
- ``check_request(body, limits, max_model_len)``: the parsed body's cheap checks, each a 400 (an
  OpenAI error object) naming the field: text that can't be UTF-8 encoded (lone UTF-16 surrogates,
  which JSON's ``\\ud800`` escapes produce), ``n``, logprobs, stop strings and token ids,
  ``max_tokens``, batch size, and a prompt far over the context window, found by its character
  count before it is tokenized: a token covers at most ``prompt_chars_per_token`` characters, so
  a longer text can't fit ``max_model_len`` tokens.

``Limits``: the plain form of the cluster file's ``limits:`` (cluster.config.LimitsConfig).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException

from deployments.protocol import APIError, bad_request, error_body


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 2**20
    prompt_chars_per_token: int = 32
    max_n: int = 16
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_prompts: int = 64
    max_tokens: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> Limits:
        """From cluster.config.LimitsConfig (or its dict form); missing fields keep defaults."""
        d = cfg if isinstance(cfg, dict) else cfg.model_dump()
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


def too_large_message(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes"


class BodySizeLimit:
    """ASGI middleware: 413 for a body over ``BodySizeLimit.current`` bytes."""

    # One ingress app per process: the deployment sets the cluster file's limit at start.
    current: int = Limits.max_body_bytes

    def __init__(self, app: Any) -> None:
        self.app = app

    @classmethod
    def set_limit(cls, limit: int) -> None:
        cls.current = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = BodySizeLimit.current
        length = _content_length(scope)
        if length is not None and length > limit:
            await _send_413(send, limit)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI re-raises HTTPException from body reading; the app's handler for it
                    # writes the OpenAI error object.
                    raise HTTPException(413, too_large_message(limit))
            return message

        await self.app(scope, counted, send)


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Any, limit: int) -> None:
    body = json.dumps(
        error_body(too_large_message(limit), "invalid_request_error", None, "request_too_large")
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The unread body stays in the connection: it can't carry another request.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# -- the parsed body ----------------------------------------------------------------------------
def first_unencodable(value: Any, path: str) -> str | None:
    """Path of the first string in ``value`` (nested lists/dicts) that isn't valid Unicode text
    (a lone surrogate), e.g. ``messages.0.content``; None when all encode as UTF-8."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        bad = first_unencodable(v, f"{path}.{k}" if path else str(k))
        if bad is not None:
            return bad
        if isinstance(k, str):
            bad = first_unencodable(k, path or "body")
            if bad is not None:
                return bad
    return None


def check_request(body: Any, limits: Limits, max_model_len: int) -> None:
    """Raise APIError (400) for the first limit ``body`` (a Completion/ChatCompletion request)
    breaks. Costs one pass over the body's strings; tokenizes nothing."""
    data = body.__dict__
    bad = first_unencodable(body.model_dump(exclude_none=True), "")
    if bad is not None:
        field = bad.split(".", 1)[0]
        raise bad_request(
            f"{bad}: text is not valid Unicode (a lone UTF-16 surrogate such as \\ud800)",
            bad if field else None,
            "invalid_unicode",
        )
    if body.n > limits.max_n:
        raise bad_request(f"n must be <= {limits.max_n}, got {body.n}", "n")
    _check_logprobs(data, limits)
    _check_stop(data, limits)
    _check_max_tokens(data, limits, max_model_len)
    _check_prompt_size(data, limits, max_model_len)


def _check_logprobs(data: dict[str, Any], limits: Limits) -> None:
    for name in ("top_logprobs", "logprobs"):
        v = data.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > limits.max_logprobs:
            raise bad_request(f"{name} must be <= {limits.max_logprobs}, got {v}", name)


def _check_stop(data: dict[str, Any], limits: Limits) -> None:
    stop = data.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > limits.max_stop_strings:
            raise bad_request(
                f"at most {limits.max_stop_strings} stop strings are allowed, got {len(stops)}",
                "stop",
            )
        for s in stops:
            if len(s) > limits.max_stop_string_chars:
                raise bad_request(
                    f"stop strings must be at most {limits.max_stop_string_chars} characters, "
                    f"got one of {len(s)}",
                    "stop",
                )
    ids = data.get("stop_token_ids") or ()
    if len(ids) > limits.max_stop_token_ids:
        raise bad_request(
            f"at most {limits.max_stop_token_ids} stop_token_ids are allowed, got {len(ids)}",
            "stop_token_ids",
        )


def _check_max_tokens(data: dict[str, Any], limits: Limits, max_model_len: int) -> None:
    for name in ("max_completion_tokens", "max_tokens"):
        v = data.get(name)
        if not isinstance(v, int) or isinstance(v, bool):
            continue
        if v < 1:
            raise bad_request(f"{name} must be >= 1, got {v}", name)
        if limits.max_tokens is not None and v > limits.max_tokens:
            raise bad_request(f"{name} must be <= {limits.max_tokens}, got {v}", name)
        if v >= max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens; {name}={v} "
                "leaves no room for the prompt. Lower it.",
                param=name,
                code="context_length_exceeded",
            )


def _check_prompt_size(data: dict[str, Any], limits: Limits, max_model_len: int) -> None:
    max_chars = max_model_len * limits.prompt_chars_per_token
    if "messages" in data:
        chars = sum(_text_len(m.content) for m in data["messages"])
        field = "messages"
        prompts: list[Any] = []
    else:
        p = data.get("prompt")
        prompts = [p] if isinstance(p, str) or not p or isinstance(p[0], int) else list(p)
        if len(prompts) > limits.max_prompts:
            raise bad_request(
                f"at most {limits.max_prompts} prompts per request, got {len(prompts)}", "prompt"
            )
        chars = max((len(x) for x in prompts if isinstance(x, str)), default=0)
        field = "prompt"
        longest = max((len(x) for x in prompts if isinstance(x, list)), default=0)
        if longest >= max_model_len:
            _too_long(field, f"{longest} prompt tokens", max_model_len)
    if chars > max_chars:
        _too_long(field, f"a prompt of {chars} characters", max_model_len)


def _text_len(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    return sum(len(getattr(p, "text", "") or "") for p in content)


def _too_long(field: str, what: str, max_model_len: int) -> None:
    raise APIError(
        400,
        f"this model's maximum context length is {max_model_len} tokens; the request has "
        f"{what}. Shorten the prompt.",
        param=field,
        code="context_length_exceeded",
    )
