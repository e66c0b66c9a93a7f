"""What the ingress keeps per served model: tokenizer, limits, replica handle, response cache.

The ingress checks the prompt itself (engine/request_checks.py, the engine's own rule) so an
oversized prompt is refused with ``context_length_exceeded`` without a round trip to a replica.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from deployments.protocol import APIError, bad_request
from deployments.tool_calls import parser_for_template
from engine.errors import RequestError
from engine.request_checks import check_prompt, model_max_len

logger = logging.getLogger("ray.serve")


@dataclass
class ModelRuntime:
    name: str
    handle: Any  # DeploymentHandle of LLMServer-<name>
    tokenizer: Any
    max_model_len: int
    block_size: int
    vocab_size: int
    cache: Any = None  # ResponseCacheLayer or None
    channels: Any = None  # output_channel.ChannelMux to this model's replicas
    tool_parser: str = "hermes"  # tool-call format of the model (deployments/tool_calls.py)
    _token_text: dict[int, str] = field(default_factory=dict)

    def encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        enc = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return [list(ids) for ids in enc]

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                f"model {self.name!r} has no chat template; use /v1/completions", "messages"
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools or None,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # a template may raise on role order etc.: the client's input
            raise bad_request(f"chat template rejected the messages: {e}", "messages") from None

    def token_text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return t

    def check_prompt(self, ids: list[int], sampling: dict[str, Any]) -> None:
        try:
            check_prompt(ids, sampling.get("max_tokens"), self.vocab_size, self.max_model_len)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None

    async def cache_lookup(self, namespace: str, body: Any) -> tuple[str, dict[str, Any]] | None:
        if self.cache is None:
            return None
        try:
            return await self.cache.lookup(namespace, body.model_dump(exclude_none=True))
        except Exception:  # a cache failure costs a hit, never the request
            logger.exception("response cache lookup failed")
            return None

    async def cache_store(self, namespace: str, body: Any, response: dict[str, Any]) -> None:
        if self.cache is None:
            return
        try:
            await self.cache.store(namespace, body.model_dump(exclude_none=True), response)
        except Exception:
            logger.exception("response cache store failed")


def load_runtime(mc: Any, handle: Any) -> ModelRuntime:
    """Build a ModelRuntime from a cluster.config.ModelConfig (tokenizer loaded from the folder)."""
    from transformers import AutoConfig, AutoTokenizer

    from engine.models.demo import resolve_model

    path = resolve_model(mc.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoConfig.from_pretrained(path)
    ec = mc.engine_config()
    max_model_len = model_max_len(ec.max_model_len, hf)
    vocab = getattr(hf, "vocab_size", None) or len(tokenizer)
    return ModelRuntime(
        name=mc.name,
        handle=handle,
        tokenizer=tokenizer,
        max_model_len=max_model_len,
        block_size=ec.block_size,
        vocab_size=vocab,
        cache=_cache_layer(mc),
        tool_parser=getattr(mc, "tool_parser", None)
        or parser_for_template(getattr(tokenizer, "chat_template", None)),
    )


def _cache_layer(mc: Any) -> Any:
    caches = getattr(mc, "caches", None)
    if caches is None or isinstance(caches, dict):
        return None
    enabled = any(
        getattr(getattr(caches, k, None), "enabled", False) for k in ("exact", "semantic")
    )
    if not enabled:
        return None
    try:
        from deployments.response_cache import ResponseCacheLayer
    except ImportError:
        logger.warning("response caches configured but deployments.response_cache is missing")
        return None
    return ResponseCacheLayer(caches, mc.name)
