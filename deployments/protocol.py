"""OpenAI wire format at the HTTP edge: request bodies (pydantic), error objects, sampling dicts.

Requests are validated here once; everything behind the ingress works on plain dicts. Parameters we
cannot honour (echo, suffix, logit_bias, functions, ...) are rejected with a 400 naming the field
rather than silently ignored, so a client never gets output that ignored what it asked for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.sampling_params import SamplingParams

MAX_N = 16


class APIError(Exception):
    """An error that reaches the client as an OpenAI error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def to_dict(self) -> dict[str, Any]:
        """Plain form that crosses process boundaries (replica -> ingress)."""
        return {"status": self.status, **self.body()["error"], "headers": self.headers}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIError:
        return cls(
            int(d.get("status", 500)),
            str(d.get("message", "internal error")),
            type=d.get("type") or "server_error",
            param=d.get("param"),
            code=d.get("code"),
            headers=d.get("headers") or {},
        )


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: Any = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict", "description"}


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None

    def _common_checks(self) -> None:
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options"
            )

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        """Sampling fields as a dict for SamplingParams (validated here, rebuilt in the replica)."""
        d: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": self.ignore_eos}
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        if self.stop is not None:
            d["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.stop_token_ids:
            d["stop_token_ids"] = list(self.stop_token_ids)
        d["min_tokens"] = self.min_tokens
        d["logprobs"] = logprobs
        d["skip_special_tokens"] = self.skip_special_tokens
        d["include_stop_str_in_output"] = self.include_stop_str_in_output
        from deployments.response_format import structured_spec  # imports this module

        spec = structured_spec(self.response_format)
        if spec is not None:
            d["structured"] = spec
        check_sampling(d)
        return d


def check_sampling(d: dict[str, Any]) -> SamplingParams:
    """Build SamplingParams from a dict; its ValueError becomes a 400 naming the field."""
    try:
        return SamplingParams(**d)
    except (ValueError, TypeError) as e:  # RequestError and the like carry the field
        raise bad_request(str(e), getattr(e, "param", None)) from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a non-empty batch: texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if all(isinstance(x, str) for x in p):
            return list(p)  # type: ignore[arg-type]
        if all(isinstance(x, list) for x in p):
            if any(not x for x in p):  # type: ignore[union-attr]
                raise bad_request("prompt token lists must not be empty", "prompt")
            return [list(x) for x in p]  # type: ignore[union-attr]
        raise bad_request("prompt must be a string, a list of strings or token ids", "prompt")

    def sampling(self) -> dict[str, Any]:
        self._common_checks()
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported (only best_of == n)", "best_of")
        return self._sampling(self.max_tokens, self.logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name"
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True

    def chat_messages(self) -> list[dict[str, Any]]:
        # "developer" is OpenAI's new name for "system"; chat templates know "system" only.
        from deployments.tool_calls import template_message

        return [template_message(m) for m in self.messages]

    def sampling(self) -> dict[str, Any]:
        self._common_checks()
        if self.functions:
            raise bad_request("functions is not supported; use tools", "functions")
        from deployments.tool_calls import check_tool_choice

        check_tool_choice(self)
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, logprobs)


def validation_error_to_api(errors: list[dict[str, Any]]) -> APIError:
    """FastAPI/pydantic validation errors -> one 400 naming the first bad field."""
    if not errors:
        return bad_request("invalid request body")
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
    # Union members show up in loc as type names ("str", "list[int]"); keep the user's path only.
    path = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "function")]
    # A field name is client text: escape what UTF-8 can't carry (lone surrogates).
    field = ".".join(path).encode("utf-8", "backslashreplace").decode() or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unknown field"
    if e.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {msg}")
    return bad_request(f"{field}: {msg}" if field else msg, field)
