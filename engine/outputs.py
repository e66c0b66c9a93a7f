"""Plain dataclasses crossing component boundaries: no tensors, only ids and counts."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SchedulerOutput:
    """Scheduler -> model runner. Per scheduled request: how many new tokens to compute this
    step."""

    req_ids: list[str]
    num_scheduled_tokens: list[int]  # aligned with req_ids
    num_computed_tokens: list[int]  # tokens already in KV before this step, aligned with req_ids
    block_tables: list[list[int]]  # aligned with req_ids
    sample: list[bool]  # whether this step reaches the end of the known tokens (emit a token)
    spec_token_ids: list[list[int]] = field(default_factory=list)  # drafts appended per request
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # freed since the last step


@dataclass
class RunnerOutput:
    """Model runner -> engine, one step. Aligned with the step's scheduled requests."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]  # accepted drafts then one sampled token; [] = no token
    logprobs: list[list[TokenLogprob] | None]
    num_draft_tokens: list[int]  # drafts verified this step
    num_rejected: list[int]  # of those, rejected (their KV is rolled back)
    errors: dict[int, str] = field(default_factory=dict)  # request index -> why it failed

    @classmethod
    def empty(cls, req_ids: list[str]) -> RunnerOutput:
        n = len(req_ids)
        return cls(list(req_ids), [[] for _ in range(n)], [None] * n, [0] * n, [0] * n)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # top-N (token_id, logprob), best first


@dataclass
class RequestOutput:
    """One streamed update for one request: the delta since the previous update."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprob] | None = None
    error: BaseException | str | None = None  # the admission error, or why the step failed it


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    num_steps: int = 0
    step_seconds_total: float = 0.0  # wall time inside steps
    decode_rows_total: int = 0  # decode rows computed, over all steps
    prefill_tokens_total: int = 0  # prompt tokens computed (prefix hits excluded)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)


@dataclass
class BlockEvent:
    """The prefix cache stored or removed a block hash (the router keeps its index from these)."""

    kind: str  # "stored" | "removed" | "cleared"
    block_hashes: list[int]
