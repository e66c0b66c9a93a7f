"""Sampling from one step's logits, batched over the step's rows: greedy, temperature, top-k, top-p,
min-p, repetition/presence/frequency penalties, per-request seeds, top-N logprobs. Logprobs are of
the model's raw distribution (before processors, penalties, temperature and truncation).

No host sync per row: every rule is a tensor op over all rows with per-row parameter tensors; a
sampled row draws ``argmax(p / E)`` with ``E ~ Exp(1)`` (distributed as ``p``), its noise from the
request's own generator when it has a seed (one fill per seeded row, no sync) and from the engine's
generator for the rest (one fill); the sampled token ids come to the host in one copy per step
(logprobs, when asked for, add one more).

Hook for constraints (grammars, allowed-token masks): ``Sampler.logits_processors`` is a list of
callables ``fn(logits [N, V] float32, reqs) -> logits`` applied in order to the rows of the
requests that sample, before penalties and sampling. A speculating request's ``1 + k`` rows go
through them too, with the request repeated once per row, but a row after a draft needs the state
after that draft: requests whose processor keeps state (grammars) must not speculate
(SpecController skips them). A processor masks a row by setting disallowed tokens to ``-inf``; it
may work in place and return its argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.outputs import RunnerOutput, SchedulerOutput, TokenLogprob
from engine.sequence import Request
from engine.spec_decode import verify, verify_greedy

LogitsProcessor = Callable[[torch.Tensor, list[Request]], torch.Tensor]


def has_penalty(p) -> bool:
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.default_gen = torch.Generator(device=device)
        self.default_gen.manual_seed(seed)
        self._gens: dict[str, torch.Generator] = {}
        self.logits_processors: list[LogitsProcessor] = []

    def forget(self, request_id: str) -> None:
        self._gens.pop(request_id, None)

    def generator(self, req: Request) -> torch.Generator:
        """The request's own generator (seeded) or the engine's. Raises on a seed torch cannot
        take (the request fails alone, see ``sample_step``)."""
        if req.params.seed is None:
            return self.default_gen
        g = self._gens.get(req.request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(req.params.seed)
            self._gens[req.request_id] = g
        return g

    # -- one step --------------------------------------------------------------------------------
    def sample_step(
        self, logits: torch.Tensor, out: SchedulerOutput, reqs: list[Request]
    ) -> RunnerOutput:
        """logits: [num_sample_rows, V] (ModelRunner.forward's rows). Per scheduled request: the
        accepted tokens (drafts then one sampled; empty for a prefill chunk that does not sample),
        logprobs, rejected draft count; a request whose own data makes sampling fail (e.g. a seed
        torch refuses) gets an error instead and the others sample as usual."""
        res = RunnerOutput.empty([r.request_id for r in reqs])
        plain: list[tuple[int, int]] = []  # (request index, row)
        spec: list[tuple[int, int, list[int]]] = []
        row = 0
        for i, (r, smp, drafts) in enumerate(
            zip(reqs, out.sample, out.spec_token_ids, strict=True)
        ):
            if not smp:
                continue
            try:
                if not r.params.greedy or r.params.seed is not None:
                    self.generator(r)
            except Exception as e:  # noqa: BLE001 - a bad request must not stop the step
                res.errors[i] = f"sampling failed: {e}"
            else:
                (spec.append((i, row, drafts)) if drafts else plain.append((i, row)))
            row += 1 + len(drafts)
        if plain:
            self._sample_rows(logits, plain, reqs, res)
        if spec:
            self._verify_rows(logits, spec, reqs, res)
        return res

    def _sample_rows(self, logits, plain, reqs, res: RunnerOutput) -> None:
        rows = [r for _, r in plain]
        batch = [reqs[i] for i, _ in plain]
        sub = (
            logits
            if len(rows) == logits.shape[0]
            else logits[torch.tensor(rows, device=logits.device)]
        )
        try:
            toks, lps = self.sample(sub, batch)
        except Exception:  # noqa: BLE001 - find the request(s) at fault, sample the rest
            toks, lps = [], []
            for j, (i, _) in enumerate(plain):
                try:
                    t, lp = self.sample(sub[j : j + 1], [reqs[i]])
                    toks.append(t[0])
                    lps.append(lp[0])
                except Exception as e:  # noqa: BLE001
                    res.errors[i] = f"sampling failed: {e}"
                    toks.append(None)
                    lps.append(None)
        for (i, _), t, lp in zip(plain, toks, lps, strict=True):
            if t is not None and i not in res.errors:
                res.sampled_token_ids[i] = [t]
                res.logprobs[i] = [lp] if lp is not None else None

    def _verify_rows(self, logits, spec, reqs, res: RunnerOutput) -> None:
        rows_of = {
            i: self.process(logits[row : row + len(d) + 1], [reqs[i]] * (len(d) + 1))
            for i, row, d in spec
        }
        greedy = [i for i, _, _ in spec if reqs[i].params.greedy]
        targets: dict[int, list[int]] = {}
        if greedy:  # every greedy request's argmax rows in one host copy
            flat = torch.cat([torch.argmax(rows_of[i], dim=-1) for i in greedy]).tolist()
            at = 0
            for i in greedy:
                n = rows_of[i].shape[0]
                targets[i], at = flat[at : at + n], at + n
        for i, _, drafts in spec:
            k = len(drafts)
            rows = rows_of[i]
            res.num_draft_tokens[i] = k
            p = reqs[i].params
            try:
                if p.greedy:
                    accepted = verify_greedy(targets[i], drafts)
                else:
                    accepted = verify(
                        rows,
                        drafts,
                        lambda x, p=p: self.probs(x[None], [p])[0],
                        self.generator(reqs[i]),
                    )
            except Exception as e:  # noqa: BLE001
                res.errors[i] = f"sampling failed: {e}"
                continue
            res.sampled_token_ids[i] = accepted
            res.num_rejected[i] = k - (len(accepted) - 1)

    # -- batched rules ---------------------------------------------------------------------------
    def process(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """The constraint hook: every logits processor over these rows (see module docstring)."""
        for fn in self.logits_processors:
            logits = fn(logits, reqs)
        return logits

    def sample(
        self, logits: torch.Tensor, reqs: list[Request]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [N, V] float32, row i for reqs[i]. Returns one token (and logprob) per row."""
        raw = logits
        logits = self.process(logits, reqs)
        pen = [i for i, r in enumerate(reqs) if has_penalty(r.params)]
        if pen:
            logits = self._apply_penalties(logits, pen, reqs)
        tokens = torch.argmax(logits, dim=-1)
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            probs = self.probs(logits.index_select(0, idx), [reqs[i].params for i in sampled])
            noise = torch.empty_like(probs)
            unseeded = [j for j, i in enumerate(sampled) if reqs[i].params.seed is None]
            if unseeded:
                e = torch.empty((len(unseeded), probs.shape[1]), device=probs.device)
                e.exponential_(generator=self.default_gen)
                noise[torch.tensor(unseeded, device=probs.device)] = e
            for j, i in enumerate(sampled):
                if reqs[i].params.seed is not None:
                    noise[j].exponential_(generator=self.generator(reqs[i]))
            tokens = tokens.index_copy(0, idx, torch.argmax(probs / noise, dim=-1))
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        lps: list[TokenLogprob | None] = [None] * len(reqs)
        if not want:
            return tokens.tolist(), lps
        widx = torch.tensor(want, device=raw.device)
        logp = torch.log_softmax(raw.index_select(0, widx), dim=-1)
        chosen = logp.gather(1, tokens.index_select(0, widx)[:, None])[:, 0]
        n_top = max(reqs[i].params.logprobs or 0 for i in want)
        top_v, top_i = torch.topk(logp, n_top, dim=-1) if n_top else (logp[:, :0], logp[:, :0])
        packed = torch.cat(
            [tokens.double(), chosen.double(), top_v.double().flatten(), top_i.double().flatten()]
        )
        host = packed.tolist()  # one copy for tokens and logprobs
        n = len(reqs)
        toks = [int(t) for t in host[:n]]
        ch = host[n : n + len(want)]
        tv = host[n + len(want) : n + len(want) + len(want) * n_top]
        ti = host[n + len(want) + len(want) * n_top :]
        for j, i in enumerate(want):
            k = reqs[i].params.logprobs or 0
            top = [(int(ti[j * n_top + a]), tv[j * n_top + a]) for a in range(k)]
            lps[i] = TokenLogprob(toks[i], ch[j], top)
        return toks, lps

    def _apply_penalties(self, logits: torch.Tensor, pen: list[int], reqs) -> torch.Tensor:
        """Repetition (over prompt + output), presence and frequency (over the output) penalties
        for rows ``pen``, all rows at once; returns a new tensor."""
        logits = logits.clone()
        dev = logits.device
        rep_rows, rep_toks, rep_val = [], [], []
        out_rows, out_toks = [], []
        for i in pen:
            r = reqs[i]
            p = r.params
            if p.repetition_penalty != 1.0:
                rep_rows += [i] * r.num_tokens
                rep_toks += r.token_ids
            if p.presence_penalty or p.frequency_penalty:
                out = r.output_token_ids
                out_rows += [i] * len(out)
                out_toks += out
        v = logits.shape[1]
        if rep_rows:
            rep_val = torch.tensor(
                [reqs[i].params.repetition_penalty for i in range(len(reqs))], device=dev
            )
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[torch.tensor(rep_rows, device=dev), torch.tensor(rep_toks, device=dev)] = True
            pen_l = torch.where(logits > 0, logits / rep_val[:, None], logits * rep_val[:, None])
            logits = torch.where(seen, pen_l, logits)
        if out_rows:
            counts = torch.zeros((len(reqs), v), dtype=logits.dtype, device=dev)
            counts.index_put_(
                (torch.tensor(out_rows, device=dev), torch.tensor(out_toks, device=dev)),
                torch.ones(len(out_rows), dtype=logits.dtype, device=dev),
                accumulate=True,
            )
            freq = torch.tensor(
                [reqs[i].params.frequency_penalty for i in range(len(reqs))], device=dev
            )
            pres = torch.tensor(
                [reqs[i].params.presence_penalty for i in range(len(reqs))], device=dev
            )
            logits = logits - freq[:, None] * counts - pres[:, None] * (counts > 0)
        return logits

    def probs(self, logits: torch.Tensor, params: list) -> torch.Tensor:
        """[N, V] logits (after penalties) -> sampling distributions: temperature, then top-k
        (logits below the k-th are dropped), then min-p (probabilities below min_p * max), then
        top-p (the smallest prefix, by probability, whose mass reaches top_p), renormalised."""
        dev = logits.device
        v = logits.shape[1]
        temp = torch.tensor(
            [p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev
        )
        x = logits / temp[:, None]
        ks = [p.top_k if p.top_k and 0 < p.top_k < v else v for p in params]
        if any(k < v for k in ks):
            kth = torch.sort(x, dim=-1, descending=True).values.gather(
                1, torch.tensor(ks, device=dev)[:, None] - 1
            )
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=probs.dtype)
            sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            sorted_p = sorted_p.masked_fill(cum - sorted_p > top_p[:, None], 0.0)
            probs = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
        return probs / probs.sum(-1, keepdim=True)
