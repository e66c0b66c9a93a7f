"""LLMEngine: the synchronous front. ``step()`` joins scheduler, runner, sampler and detokenizer."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, GenerationConfig

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.model_runner import ModelRunner
from engine.outputs import BlockEvent, EngineStats, RequestOutput, SchedulerOutput, TokenLogprob
from engine.request_checks import RequestLimits, check_request, model_max_len
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request
from engine.spec_decode import SpecController, SpeculativeConfig, ngram_propose, verify
from engine.structured import StructuredDecoding

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


def _eos_ids(model_path: str, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model_path: str | None = None,
        runner_factory: Callable[[EngineConfig, str], ModelRunner] | None = None,
    ) -> None:
        """``runner_factory`` builds the model runner (default: one-process ``ModelRunner``; the
        tensor-parallel runner drives several shards behind the same interface)."""
        from engine.demo_model import resolve_model

        self.config = config
        self.model_path = model_path or resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.runner = (runner_factory or ModelRunner)(config, self.model_path)
        self.block_size = config.block_size
        self.max_model_len = model_max_len(config.max_model_len, self.runner.hf_config)
        self.vocab_size = self.runner.vocab_size
        self.eos_token_ids = _eos_ids(self.model_path, self.tokenizer)
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            config.prefix_cache_eviction,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            config.enable_chunked_prefill,
        )
        self.sampler = Sampler(self.runner.device, config.seed)
        # Grammar matchers of constrained requests (response_format, tool calls).
        self.structured = StructuredDecoding(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.spec: SpecController | None = None
        self.draft_runner: ModelRunner | None = None
        if config.speculative:
            spec_cfg = SpeculativeConfig.from_dict(config.speculative)
            self.spec = SpecController(spec_cfg)
            if spec_cfg.method == "draft_model":
                # The draft keeps its own KV tensors but shares block ids (and so the block
                # manager) with the target: same slots, same prefix hits, same rollback.
                draft_cfg = EngineConfig.from_dict(
                    {**config.to_dict(), "speculative": None, "quantization": None}
                )
                self.draft_runner = ModelRunner(
                    draft_cfg, resolve_model(spec_cfg.model), num_blocks=self.runner.num_blocks
                )
                if self.draft_runner.vocab_size != self.vocab_size:
                    raise ValueError(
                        "speculative.model must share the target's tokenizer/vocabulary "
                        f"({self.draft_runner.vocab_size} != {self.vocab_size})"
                    )
        self.limits = RequestLimits(
            self.vocab_size, self.max_model_len, self.block_manager.num_blocks, self.block_size
        )
        self.num_steps = 0
        self.requests: dict[str, Request] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._ids = itertools.count()

    # -- requests -----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError (a ValueError) naming the field; nothing is admitted on failure."""
        check_request(prompt_token_ids, params, self.limits)

    def add_request(
        self, request_id: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> str:
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        self.validate(prompt_token_ids, params)
        if params.structured is not None:  # compiles (cached per spec): GrammarError if it can't
            self.structured.add(request_id, params.structured)
        req = Request(request_id, prompt_token_ids, params, self.block_size, self.eos_token_ids)
        self.requests[request_id] = req
        self.detoks[request_id] = IncrementalDetokenizer(
            self.tokenizer,
            params.stop,
            params.skip_special_tokens,
            params.include_stop_str_in_output,
        )
        self.scheduler.add(req)
        self.prompt_tokens_total += len(prompt_token_ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(req)
        self.detoks.pop(request_id, None)
        self.sampler.forget(request_id)
        self.structured.forget(request_id)
        if self.spec is not None:
            self.spec.forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched, reqs = self.scheduler.schedule()
        if not reqs:
            return []
        self.num_steps += 1
        tokens_in = [r.token_ids + d for r, d in zip(reqs, sched.spec_token_ids, strict=True)]
        # The draft model does not run here: its KV catches up in _propose, only for requests
        # that speculate (a backed-off draft costs nothing).
        logits = self.runner.forward(sched, tokens_in)
        # Split logits rows: each sampling request owns 1 + len(drafts) consecutive rows.
        plain: list[tuple[Request, int]] = []
        spec: list[tuple[Request, int, list[int]]] = []
        row = 0
        for r, smp, drafts in zip(reqs, sched.sample, sched.spec_token_ids, strict=True):
            if not smp:
                continue
            (spec.append((r, row, drafts)) if drafts else plain.append((r, row)))
            row += 1 + len(drafts)
        result: dict[str, tuple[list[int], list | None, int]] = {}
        if plain:
            idx = torch.tensor([i for _, i in plain], dtype=torch.long)
            rows = logits[idx]
            if self.structured.active:  # grammar masks on the constrained rows only
                rows = self.structured.apply(rows, [r.request_id for r, _ in plain])
            toks, lps = self.sampler.sample(rows, [r for r, _ in plain])
            for (r, _), t, lp in zip(plain, toks, lps, strict=True):
                result[r.request_id] = ([t], [lp] if lp is not None else None, 0)
        for r, i, drafts in spec:
            accepted = verify(
                logits[i : i + len(drafts) + 1],
                drafts,
                None if r.params.greedy else (lambda row, p=r.params: self.sampler._probs(row, p)),
                self.sampler._generator(r),
            )
            self.spec.record(r.request_id, len(drafts), len(accepted) - 1)
            result[r.request_id] = (accepted, None, len(drafts) - (len(accepted) - 1))
        sampled = [result[r.request_id][0] if r.request_id in result else [] for r in reqs]
        rejected = [result[r.request_id][2] if r.request_id in result else 0 for r in reqs]
        n_before = [r.num_tokens for r in reqs]
        self.scheduler.update(reqs, sched.num_scheduled_tokens, sampled, rejected)
        now = time.monotonic()
        outputs = []
        for req, before in zip(reqs, n_before, strict=True):
            if req.request_id not in result:
                continue
            _, lps, _ = result[req.request_id]
            kept = req.token_ids[before:]  # tokens past a stop condition were not appended
            if kept and self.structured.constrained(req.request_id):
                self._grammar_accept(req, kept)
            if req.first_token_time is None:
                req.first_token_time = now
            self.generation_tokens_total += len(kept)
            outputs.append(self._output(req, kept, lps))
        if self.spec is not None:
            self._propose(self.scheduler.running)
        return outputs

    def _propose(self, running: list[Request]) -> None:
        cfg = self.spec.cfg
        eligible = self.spec.eligible(running, len(self.scheduler.waiting))
        if not eligible:
            return
        k = cfg.num_tokens
        if cfg.method == "ngram":
            for r in eligible:
                r.spec_token_ids = ngram_propose(r.token_ids, k, cfg.ngram_max, cfg.ngram_min)
            return
        # Draft model: k greedy steps over the eligible batch, slots allocated up front. The first
        # catches the draft's KV up from what it last saw to the last known token (one chunk).
        batch = [r for r in eligible if self.block_manager.allocate(r, 1 + k)]
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

    def _grammar_accept(self, req: Request, kept: list[int]) -> None:
        """Feed the request's accepted tokens to its grammar; a grammar that can take nothing more
        (only EOS) ends the request with "stop" (also under ignore_eos / min_tokens)."""
        if self.structured.accept(req.request_id, kept) and not req.is_finished:
            self.scheduler.finish(req, "stop")
            self.scheduler._remove_finished(req)

    def _output(self, req: Request, new: list[int], lps) -> RequestOutput:
        detok = self.detoks[req.request_id]
        text, hit_stop = detok.add(new, req.is_finished)
        if hit_stop and not req.is_finished:
            self.scheduler.finish(req, "stop")
            self.scheduler._remove_finished(req)
        elif req.is_finished and not hit_stop:
            text += detok.flush()
        if req.is_finished:
            self.requests.pop(req.request_id, None)
            self.detoks.pop(req.request_id, None)
            self.sampler.forget(req.request_id)
            self.structured.forget(req.request_id)
            if self.spec is not None:
                self.spec.forget(req.request_id)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new,
            new_text=text,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            logprobs=lps,
        )

    # -- convenience --------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, GenerationResult] = {}
        order = []
        for prompt, p in zip(prompts, plist, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = self.add_request(None, ids, p)
            results[rid] = GenerationResult(rid, ids)
            order.append(rid)
        while self.has_unfinished():
            for o in self.step():
                r = results.get(o.request_id)
                if r is None:
                    continue
                r.token_ids.extend(o.new_token_ids)
                r.text += o.new_text
                r.logprobs.extend(o.logprobs or [])
                r.num_cached_tokens = o.num_cached_tokens
                if o.finished:
                    r.finish_reason = o.finish_reason
        return [results[rid] for rid in order]

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_hit_tokens=bm.hit_tokens,
            prefix_cache_query_tokens=bm.query_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            spec_draft_tokens=self.spec.draft_tokens if self.spec else 0,
            spec_accepted_tokens=self.spec.accepted_tokens if self.spec else 0,
            num_steps=self.num_steps,
        )

    def pop_block_events(self) -> list[BlockEvent]:
        return self.block_manager.pop_events()
