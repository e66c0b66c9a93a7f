"""Scheduler: one token budget per step, running requests first, then waiting (FCFS).

Each request's ``num_computed_tokens`` catches up with its ``num_tokens``; a step gives each
scheduled request some of that gap. A decode is a gap of 1; a prompt is a large gap, cut into chunks
when chunked prefill is on; prefix hits shrink it before the first chunk. Prefill and decode mix in
one step. When blocks run out, the newest running request is preempted (its blocks freed, recomputed
later from its prompt + output so far): never a crash, never a lost request.
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from engine.outputs import SchedulerOutput
from engine.sequence import Request, RequestStatus


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_since_last: list[str] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, req: Request) -> None:
        self.bm.free(req)
        req.spec_token_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> tuple[SchedulerOutput, list[Request]]:
        """Pick this step's work. Returns the plain output for the runner and the Request
        objects."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[str] = []

        # 1. Running requests, oldest first. Preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            gap = req.num_tokens - req.num_computed_tokens
            # Draft tokens ride along with the decode token when the budget has room for them.
            req.spec_token_ids = req.spec_token_ids[: max(0, budget - gap)]
            num_new = min(gap + len(req.spec_token_ids), budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.bm.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append((req, num_new))
                budget -= num_new
                i += 1

        # 2. Waiting requests, FCFS, only when nothing was preempted this step (no thrash).
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            req = self.waiting[0]
            first_time = req.num_computed_tokens == 0 and not req.block_table
            computed = self.bm.get_computed_blocks(req) if first_time else []
            num_computed = len(computed) * self.bm.block_size
            num_new = req.num_tokens - num_computed
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.bm.allocate(req, num_new, computed):
                break
            self.waiting.popleft()
            if req.num_preemptions == 0:
                self.bm.record_query(req, len(computed))
                req.num_cached_tokens = num_computed
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append((req, num_new))
            budget -= num_new

        finished, self._finished_since_last = self._finished_since_last, []
        return SchedulerOutput(
            req_ids=[r.request_id for r, _ in scheduled],
            num_scheduled_tokens=[n for _, n in scheduled],
            num_computed_tokens=[r.num_computed_tokens for r, _ in scheduled],
            block_tables=[r.block_table for r, _ in scheduled],
            sample=[r.num_computed_tokens + n >= r.num_tokens for r, n in scheduled],
            spec_token_ids=[list(r.spec_token_ids) for r, _ in scheduled],
            preempted_req_ids=preempted,
            finished_req_ids=finished,
        ), [r for r, _ in scheduled]

    def update(
        self,
        scheduled: list[Request],
        num_scheduled: list[int],
        sampled: list[list[int]],
        num_rejected: list[int] | None = None,
    ):
        """Apply a step's results. ``sampled[i]`` holds the tokens accepted for request i (empty for
        a prefill chunk that didn't reach the end of the known tokens): accepted drafts plus one
        sampled token. ``num_rejected[i]`` draft tokens were computed but rejected: their KV is
        rolled back (not counted as computed; blocks only they needed are freed).
        Returns the newly finished requests."""
        finished: list[Request] = []
        rejected = num_rejected or [0] * len(scheduled)
        for req, n, toks, rej in zip(scheduled, num_scheduled, sampled, rejected, strict=True):
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += n - rej
            req.spec_token_ids = []
            for t in toks:
                req.append_token(t)
                if self._check_stop(req, t):
                    break
            if rej:
                self.bm.trim(req, req.num_tokens)
            self.bm.cache_full_blocks(req)
            if req.is_finished:
                finished.append(req)
        for req in finished:
            self._remove_finished(req)
        return finished

    def _check_stop(self, req: Request, token_id: int) -> bool:
        p = req.params
        n_out = req.num_output_tokens
        reason = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token_id in req.eos_token_ids:
                reason = "stop"
            elif token_id in p.stop_token_ids:
                reason = "stop"
        if reason is None and p.max_tokens is not None and n_out >= p.max_tokens:
            reason = "length"
        if reason is None and req.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.finish(req, reason)
            return True
        return False

    def finish(self, req: Request, reason: str) -> None:
        """Mark finished (stop string, abort, stop token...) — blocks are freed by
        _remove_finished."""
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def _remove_finished(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.bm.free(req)
        self._finished_since_last.append(req.request_id)

    def abort(self, req: Request, reason: str = "abort") -> None:
        """Finish ``req`` now (abort, a stop string, a grammar's end, an error) and free its
        blocks; a request that already finished keeps its reason."""
        if not req.is_finished:
            self.finish(req, reason)
        self._remove_finished(req)
