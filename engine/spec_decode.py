"""Speculative decoding: proposers (n-gram prompt lookup, draft model), verification, back-off.

Verification (all drafts of a batch are checked in the target's one forward of the step):
- greedy requests accept the longest prefix of drafts equal to the target's argmax, then take the
  target's own token at the first mismatch (or a bonus token after all k): output is token for token
  what decoding without speculation gives.
- sampled requests use rejection sampling. Both proposers here draft deterministically (n-gram
  lookup; the draft model drafts greedily), so the draft distribution q is one-hot at draft x:
  # p: target distribution at that position (after temperature/top-k/top-p/min-p), q = onehot(x)
  accept x with probability min(1, p(x) / q(x)) = p(x); on rejection sample from
  norm(max(p - q, 0)) = p with x removed, renormalised. Then P(out = y) = p(x)·[y=x] + (1 - p(x))·
  p(y)/(1 - p(x))·[y≠x] = p(y): exactly the target distribution.
Rejected draft tokens were written to KV but are not counted as computed; the scheduler rolls
``num_computed_tokens`` back and frees blocks only they needed.

The draft model's KV (same block ids, its own tensors) is only written when it proposes: a request
that is backed off (large batch, low acceptance) or waiting costs the draft nothing. When it becomes
eligible again, the first draft forward catches the draft's KV up over every token it has not seen
(one prefill-style chunk from ``SpecController.draft_valid``) and samples the first draft from its
last row; in steady state that chunk is the one or two tokens the target added in verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.outputs import SchedulerOutput
from engine.sequence import Request


@dataclass
class SpeculativeConfig:
    method: str  # "ngram" | "draft_model"
    num_tokens: int = 4  # k drafts per step
    model: str | None = None  # draft model folder (draft_model)
    ngram_max: int = 4
    ngram_min: int = 1
    max_batch_size: int = 8  # speculate only while this few requests run (back-off)
    min_acceptance: float = 0.3  # per request; below this (over >= 4 proposals) it pauses
    pause_steps: int = 16

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown speculative option(s) {unknown}; allowed: {sorted(known)}")
        cfg = cls(**d)
        if cfg.method not in ("ngram", "draft_model"):
            raise ValueError(f"speculative.method must be ngram|draft_model, got {cfg.method!r}")
        if not isinstance(cfg.num_tokens, int) or not 1 <= cfg.num_tokens <= 16:
            raise ValueError(f"speculative.num_tokens must be in [1, 16], got {cfg.num_tokens!r}")
        if cfg.method == "draft_model" and not cfg.model:
            raise ValueError("speculative.model (a local HF folder) is required for draft_model")
        if not 1 <= cfg.ngram_min <= cfg.ngram_max:
            raise ValueError("speculative.ngram_min must be in [1, ngram_max]")
        if not 0.0 <= cfg.min_acceptance <= 1.0:
            raise ValueError("speculative.min_acceptance must be in [0, 1]")
        return cfg


def ngram_propose(tokens: list[int], k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Prompt lookup: find the most recent earlier occurrence of the last n tokens (longest n
    first) and propose the up-to-k tokens that followed it."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = tokens[length - n :]
        first = pattern[0]
        for start in range(length - n - 1, -1, -1):
            if tokens[start] == first and tokens[start : start + n] == pattern:
                follow = tokens[start + n : start + n + k]
                if follow:
                    return follow
    return []


def verify(
    logits: torch.Tensor,  # [k + 1, V] target logits at the last real token and each draft
    drafts: list[int],
    probs_fn,  # row -> target probabilities (None for greedy)
    generator: torch.Generator | None,
) -> list[int]:
    """Return the accepted drafts followed by one token from the target (1..k+1 tokens)."""
    out: list[int] = []
    if probs_fn is None:
        return verify_greedy(torch.argmax(logits, dim=-1).tolist(), drafts)
    # The uniform draw comes from the generator's own device (a CUDA generator cannot fill a CPU
    # tensor); multinomial draws on the probabilities' device, which is the generator's.
    rand_device = generator.device if generator is not None else None
    for j, x in enumerate(drafts):
        p = probs_fn(logits[j])
        if float(torch.rand((), generator=generator, device=rand_device)) < float(p[x]):
            out.append(x)
            continue
        residual = p.clone()
        residual[x] = 0.0
        total = residual.sum()
        if total <= 0:  # p was one-hot at x: rejection has probability 0
            out.append(x)
            continue
        y = int(torch.multinomial(residual / total, 1, generator=generator))
        return out + [y]
    p = probs_fn(logits[len(drafts)])
    return out + [int(torch.multinomial(p, 1, generator=generator))]


def verify_greedy(target: list[int], drafts: list[int]) -> list[int]:
    """``target``: the target's argmax at the last real token and at each draft (k + 1 ids)."""
    out: list[int] = []
    for j, x in enumerate(drafts):
        if target[j] != x:
            return out + [target[j]]
        out.append(x)
    return out + [target[len(drafts)]]


@dataclass
class _Track:
    proposed: int = 0
    accepted: int = 0
    paused_until: int = 0
    history: list[tuple[int, int]] = field(default_factory=list)
    # Draft model only: positions [0, draft_written) of the draft's KV hold what the draft computed
    # (known tokens, then its own drafts), as of preemption count ``draft_preemptions``.
    draft_written: int = 0
    draft_preemptions: int = 0


class SpecController:
    """Decides who speculates this step (back-off) and keeps acceptance counters."""

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg
        self.tracks: dict[str, _Track] = {}
        self.step = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0

    def eligible(self, running: list[Request], num_waiting: int = 0) -> list[Request]:
        """Requests that get drafts this step. ``num_waiting``: requests queued behind the running
        ones; they count toward the batch, so the first requests of a burst admitted over several
        steps don't speculate (and, with a draft model, prefill the draft) only to back off as the
        rest arrive."""
        self.step += 1
        if len(running) + num_waiting > self.cfg.max_batch_size:
            return []  # large batch: the spare compute speculation needs isn't there
        out = []
        for r in running:
            p = r.params
            if r.is_finished or r.num_tokens - r.num_computed_tokens != 1:
                continue  # still prefilling
            if p.logprobs is not None or p.presence_penalty or p.frequency_penalty:
                continue
            if p.repetition_penalty != 1.0:
                continue
            if p.structured is not None:  # grammar-constrained: drafts would bypass the mask
                continue
            if self.tracks.get(r.request_id, _Track()).paused_until > self.step:
                continue
            out.append(r)
        return out

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        t = self.tracks.setdefault(request_id, _Track())
        t.history = (t.history + [(proposed, accepted)])[-8:]
        prop = sum(h[0] for h in t.history)
        acc = sum(h[1] for h in t.history)
        if len(t.history) >= 4 and acc < self.cfg.min_acceptance * prop:
            t.paused_until = self.step + self.cfg.pause_steps
            t.history = []

    def draft_valid(self, r: Request) -> int:
        """How many leading tokens of ``r`` the draft model's KV holds correctly. The draft skips
        steps while ``r`` is backed off (or being verified), so this can lag
        ``num_computed_tokens``; its drafts past the accepted ones were rejected, and a preemption
        freed the blocks (recompute starts the draft over as well)."""
        t = self.tracks.get(r.request_id)
        if t is None or t.draft_preemptions != r.num_preemptions:
            return 0
        return min(t.draft_written, r.num_computed_tokens)

    def draft_wrote(self, r: Request, num_tokens: int) -> None:
        t = self.tracks.setdefault(r.request_id, _Track())
        t.draft_written = num_tokens
        t.draft_preemptions = r.num_preemptions

    def forget(self, request_id: str) -> None:
        self.tracks.pop(request_id, None)


class DraftProposer:
    """Sets ``spec_token_ids`` of the running requests that speculate next step: n-gram lookup, or
    k greedy steps of a draft model over the eligible batch. The draft model shares block ids (and
    so the block manager) with the target; its KV tensors are its own."""

    def __init__(self, controller: SpecController, block_manager, draft_runner=None) -> None:
        self.spec = controller
        self.cfg = controller.cfg
        self.bm = block_manager
        self.draft_runner = draft_runner

    def propose(self, running: list[Request], num_waiting: int) -> None:
        cfg = self.cfg
        eligible = self.spec.eligible(running, num_waiting)
        if not eligible:
            return
        k = cfg.num_tokens
        if cfg.method == "ngram":
            for r in eligible:
                r.spec_token_ids = ngram_propose(r.token_ids, k, cfg.ngram_max, cfg.ngram_min)
            return
        # Slots for the drafts are allocated up front. The first draft step catches the draft's
        # KV up from what it last saw to the last known token (one chunk).
        batch = [r for r in eligible if self.bm.allocate(r, 1 + k)]
        if not batch:  # no free blocks for drafts this step
            return
        drafts: list[list[int]] = [[] for _ in batch]
        computed = [self.spec.draft_valid(r) for r in batch]  # <= num_tokens - 1
        for j in range(k):
            if j:
                computed = [r.num_tokens - 1 + j for r in batch]
            out = SchedulerOutput(
                req_ids=[r.request_id for r in batch],
                num_scheduled_tokens=[
                    r.num_tokens + j - c for r, c in zip(batch, computed, strict=True)
                ],
                num_computed_tokens=computed,
                block_tables=[r.block_table for r in batch],
                sample=[True] * len(batch),
                spec_token_ids=[[] for _ in batch],
            )
            logits = self.draft_runner.forward(
                out, [r.token_ids + d for r, d in zip(batch, drafts, strict=True)]
            )
            for d, t in zip(drafts, torch.argmax(logits, dim=-1).tolist(), strict=True):
                d.append(t)
        for r, d in zip(batch, drafts, strict=True):
            r.spec_token_ids = d
            # KV now holds the known tokens and drafts d[0..k-2] (d[k-1] was never fed back).
            self.spec.draft_wrote(r, r.num_tokens + k - 1)
