"""Sampling from one step's logits: greedy, temperature, top-k, top-p, min-p, penalties, seeds,
top-N logprobs. Logprobs are of the model's raw distribution (before temperature and truncation)."""

from __future__ import annotations

import torch

from engine.outputs import TokenLogprob
from engine.sequence import Request


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.default_gen = torch.Generator(device=device)
        self.default_gen.manual_seed(seed)
        self._gens: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._gens.pop(request_id, None)

    def _generator(self, req: Request) -> torch.Generator:
        if req.params.seed is None:
            return self.default_gen
        g = self._gens.get(req.request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(req.params.seed)
            self._gens[req.request_id] = g
        return g

    def sample(
        self, logits: torch.Tensor, reqs: list[Request]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [N, V] float32, row i for reqs[i]. Returns one token (and logprob) per row."""
        greedy = torch.argmax(logits, dim=-1).tolist()
        tokens: list[int] = []
        for i, req in enumerate(reqs):
            p = req.params
            if p.greedy and not self._has_penalty(p):
                tokens.append(greedy[i])
                continue
            row = self._apply_penalties(logits[i], req)
            if p.greedy:
                tokens.append(int(torch.argmax(row)))
                continue
            probs = self._probs(row, p)
            tokens.append(int(torch.multinomial(probs, 1, generator=self._generator(req))))
        lps: list[TokenLogprob | None] = [None] * len(reqs)
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if want:
            logp = torch.log_softmax(logits[want], dim=-1)
            for j, i in enumerate(want):
                n = reqs[i].params.logprobs or 0
                top = []
                if n:
                    v, idx = torch.topk(logp[j], n)
                    top = list(zip(idx.tolist(), v.tolist(), strict=True))
                lps[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), top)
        return tokens, lps

    @staticmethod
    def _has_penalty(p) -> bool:
        return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1

    def _apply_penalties(self, row: torch.Tensor, req: Request) -> torch.Tensor:
        p = req.params
        if not self._has_penalty(p):
            return row
        row = row.clone()
        out = req.output_token_ids
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.token_ids)), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if out and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.unique(
                torch.tensor(out, dtype=torch.long, device=row.device), return_counts=True
            )
            row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
        return row

    @staticmethod
    def _probs(row: torch.Tensor, p) -> torch.Tensor:
        row = row / p.temperature
        if p.top_k and p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = cum - sorted_p > p.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        return probs / probs.sum()
