"""LLMEngine: the synchronous front. ``step()`` joins scheduler, runner, sampler and detokenizer."""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field

from transformers import AutoTokenizer, GenerationConfig

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.model_runner import ModelRunner
from engine.outputs import BlockEvent, EngineStats, RequestOutput, TokenLogprob
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request

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
    def __init__(self, config: EngineConfig, model_path: str | None = None) -> None:
        from engine.demo_model import resolve_model

        self.config = config
        self.model_path = model_path or resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.runner = ModelRunner(config, self.model_path)
        self.block_size = config.block_size
        max_pos = getattr(self.runner.hf_config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(config.max_model_len or max_pos, max_pos)
        self.vocab_size = self.runner.vocab_size
        self.eos_token_ids = _eos_ids(self.model_path, self.tokenizer)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            config.enable_chunked_prefill,
        )
        self.sampler = Sampler(self.runner.device, config.seed)
        self.requests: dict[str, Request] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._ids = itertools.count()

    # -- requests -----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the field; nothing is admitted on failure."""
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        params.validate()
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt must not be empty")
        bad = [
            t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size
        ]
        if bad:
            raise ValueError(
                f"prompt contains token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
            )
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt is {n} tokens but this model's maximum context length is "
                f"{self.max_model_len} (the prompt must leave room for at least one output token)"
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens={params.max_tokens} plus the prompt's {n} tokens exceeds this model's "
                f"maximum context length of {self.max_model_len}"
            )
        total = n + (params.max_tokens or self.max_model_len - n)
        if math.ceil(total / self.block_size) > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt + max_tokens = {total} tokens does not fit in the KV cache "
                f"({self.block_manager.num_blocks} blocks of {self.block_size}); lower max_tokens"
            )

    def add_request(
        self, request_id: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> str:
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        self.validate(prompt_token_ids, params)
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
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched, reqs = self.scheduler.schedule()
        if not reqs:
            return []
        logits = self.runner.forward(sched, [r.token_ids for r in reqs])
        sampling = [r for r, s in zip(reqs, sched.sample, strict=True) if s]
        tokens, lps = self.sampler.sample(logits, sampling)
        by_req = {r.request_id: (t, lp) for r, t, lp in zip(sampling, tokens, lps, strict=True)}
        sampled = [[by_req[r.request_id][0]] if r.request_id in by_req else [] for r in reqs]
        self.scheduler.update(reqs, sched.num_scheduled_tokens, sampled)
        now = time.monotonic()
        outputs = []
        for req in sampling:
            tok, lp = by_req[req.request_id]
            if req.first_token_time is None:
                req.first_token_time = now
            self.generation_tokens_total += 1
            outputs.append(self._output(req, [tok], [lp] if lp is not None else None))
        return outputs

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
        )

    def pop_block_events(self) -> list[BlockEvent]:
        return self.block_manager.pop_events()
