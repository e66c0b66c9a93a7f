"""All per-request state the engine keeps (nano-vllm's `Sequence`)."""

from __future__ import annotations

import enum
import time

from engine.block_hash import NONE_HASH, hash_block
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One request. Tokens known so far = prompt + output; ``num_computed_tokens`` of them are in
    KV.

    Invariant: ``num_computed_tokens <= num_tokens``; the scheduler's only job is to make
    ``num_computed_tokens`` catch up with ``num_tokens`` (that one rule covers chunked prefill,
    prefix hits and recompute after preemption).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        block_size: int,
        eos_token_ids: tuple[int, ...] = (),
        cache_salt: tuple[int, ...] = (),
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.block_size = block_size
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens that were prefix-cache hits at first schedule
        self.block_table: list[int] = []
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.eos_token_ids = eos_token_ids
        self.extra_keys = cache_salt
        self.num_preemptions = 0
        self.spec_token_ids: list[int] = []  # draft tokens to verify in the next step
        # Chained hashes of every full block of token_ids, extended as tokens are appended.
        self.block_hashes: list[int] = []
        self._update_block_hashes()

    # -- tokens -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if len(self.token_ids) % self.block_size == 0:
            self._update_block_hashes()

    def _update_block_hashes(self) -> None:
        bs = self.block_size
        parent = self.block_hashes[-1] if self.block_hashes else NONE_HASH
        for i in range(len(self.block_hashes), len(self.token_ids) // bs):
            parent = hash_block(parent, self.token_ids[i * bs : (i + 1) * bs], self.extra_keys)
            self.block_hashes.append(parent)

    def block_tokens(self, i: int) -> tuple[int, ...]:
        return tuple(self.token_ids[i * self.block_size : (i + 1) * self.block_size])

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
