"""The rules a request must pass before the engine admits it, in one place.

The ingress checks the prompt against the context length itself (no round trip for an oversized
prompt), the replica checks everything before queueing (its engine may run in another process),
and ``LLMEngine.add_request`` checks again. All three call these functions, so they cannot drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import RequestError
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int


def model_max_len(configured: int | None, hf_config: object) -> int:
    """The context length served: the configured one, capped by the model's positions."""
    max_pos = getattr(hf_config, "max_position_embeddings", None) or 2048
    return min(configured or max_pos, max_pos)


def _is_token(t: object, vocab_size: int) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size


def check_prompt(
    ids: list[int], max_tokens: int | None, vocab_size: int, max_model_len: int
) -> None:
    """A non-empty prompt of in-vocabulary ids that leaves room for the output."""
    n = len(ids)
    if n == 0:
        raise RequestError("prompt must not be empty", "prompt")
    bad = [t for t in ids if not _is_token(t, vocab_size)]
    if bad:
        raise RequestError(
            f"prompt contains token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}",
            "prompt",
        )
    if n >= max_model_len or (max_tokens is not None and n + max_tokens > max_model_len):
        wanted = f"{n} prompt tokens" + (f" + {max_tokens} max_tokens" if max_tokens else "")
        raise RequestError(
            f"this model's maximum context length is {max_model_len} tokens; the request asks "
            f"for {wanted}. Shorten the prompt or lower max_tokens.",
            "max_tokens" if n < max_model_len else "prompt",
            "context_length_exceeded",
        )


def check_request(ids: list[int], params: SamplingParams, limits: RequestLimits) -> None:
    """Everything the engine needs of one request; raises RequestError naming the field."""
    if not isinstance(params, SamplingParams):
        raise RequestError("params must be a SamplingParams")
    params.validate()
    check_prompt(ids, params.max_tokens, limits.vocab_size, limits.max_model_len)
    n = len(ids)
    total = n + (params.max_tokens or limits.max_model_len - n)
    if math.ceil(total / limits.block_size) > limits.num_blocks:
        raise RequestError(
            f"prompt + max_tokens = {total} tokens does not fit in the KV cache "
            f"({limits.num_blocks} blocks of {limits.block_size}); lower max_tokens",
            "max_tokens",
        )
