"""Per-request sampling parameters, validated once at the edge of the engine.

The rule: a value a client can send must never fail inside a batched engine step, where it would
take every other request of the step down with it. So beyond the meaning checks, every integer must
fit torch's int64 (seeds, token ids), and values that make the float32 arithmetic of a step
overflow are refused (repetition penalties far from 1) or clamped (temperatures between 0 and
MIN_TEMPERATURE, as vLLM does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.errors import RequestError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Seeds as vLLM takes them (torch.long); choice i of n uses seed + i, which torch's
# Generator.manual_seed still accepts (it takes [-2**63, 2**64 - 1]).
SEED_MIN, SEED_MAX = INT64_MIN, INT64_MAX
# Below this a temperature divides logits into float32 overflow (inf -> NaN probabilities).
MIN_TEMPERATURE = 1e-2
REPETITION_PENALTY_RANGE = (1e-2, 100.0)
MAX_LOGPROBS = 20


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (0: only the sampled one)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Grammar-constrained output (engine/structured.py): {"type": "json", "schema": {...}} or
    # {"type": "lark", "grammar": "..."}; None: unconstrained.
    structured: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise RequestError naming the field for anything a client could get wrong."""

        def finite(name: str, v: float) -> None:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise RequestError(f"{name} must be a finite number, got {v!r}", name)

        finite("temperature", self.temperature)
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT64_MAX:
            raise RequestError(
                f"top_k must be an integer in [-1, 2**63 - 1] (0 or -1 disable it), "
                f"got {self.top_k!r}",
                "top_k",
            )
        finite("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.seed is not None and (
            not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise RequestError(
                f"seed must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}", "seed"
            )
        if self.max_tokens is not None and (
            not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT64_MAX
        ):
            raise RequestError(
                f"max_tokens must be an integer in [1, 2**63 - 1], got {self.max_tokens!r}",
                "max_tokens",
            )
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= INT64_MAX:
            raise RequestError(
                f"min_tokens must be an integer in [0, 2**63 - 1], got {self.min_tokens!r}",
                "min_tokens",
            )
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(
                "stop must be a non-empty string or a list of non-empty strings", "stop"
            )
        if not all(_is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise RequestError(
                "stop_token_ids must be a list of integers in [0, 2**63 - 1]", "stop_token_ids"
            )
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise RequestError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
                "logprobs",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            finite(name, v)
            if not -2.0 <= v <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {v}", name)
        finite("repetition_penalty", self.repetition_penalty)
        lo, hi = REPETITION_PENALTY_RANGE
        if not lo <= self.repetition_penalty <= hi:
            raise RequestError(
                f"repetition_penalty must be in [{lo:g}, {hi:g}], got {self.repetition_penalty}",
                "repetition_penalty",
            )
        if self.structured is not None:
            from engine.structured import check_spec

            check_spec(self.structured)
