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
from engine.outputs import BlockEvent, EngineStats, RequestOutput, TokenLogprob
from engine.request_checks import RequestLimits, check_request, model_max_len
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request
from engine.spec_decode import DraftProposer, SpecController, SpeculativeConfig
from engine.structured import StructuredDecoding

logger = logging.getLogger(__name__)

# A step computing at least this many prompt tokens runs on num_threads, fewer on
# decode_num_threads. Demo fp32, 2 cores: a second thread makes a 32-row decode step 1.35x and
# prefill 1.7x faster offline (43 vs 32 ms; 0.55 vs 0.32 ms per prompt token), but served the
# 2-thread decode step takes ~53 ms; by those costs 2 threads win from ~60 prompt tokens.
PREFILL_THREADS_MIN = 64


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
        from engine.models.demo import resolve_model

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
        self.sampler: Sampler = self.runner.sampler
        # Grammar matchers of constrained requests (response_format, tool calls); their masks
        # reach the logits through the sampler's processor hook.
        self.structured = StructuredDecoding(
            self.tokenizer, self.vocab_size, self.eos_token_ids, self.runner.device
        )
        self.sampler.logits_processors.append(self._grammar_masks)
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
        self.proposer = (
            DraftProposer(self.spec, self.block_manager, self.draft_runner) if self.spec else None
        )
        self.limits = RequestLimits(
            self.vocab_size, self.max_model_len, self.block_manager.num_blocks, self.block_size
        )
        self.num_steps = 0
        # Per-step counters (EngineStats): wall time inside step(), decode rows, prompt tokens
        # computed; last_step is the last step's (decode rows, prompt tokens).
        self.step_seconds_total = 0.0
        self.decode_rows_total = 0
        self.prefill_tokens_total = 0
        self.last_step = (0, 0)
        single_cpu = self.runner.device.type == "cpu" and config.tensor_parallel_size == 1
        self._threads: tuple[int, int] | None = None  # (decode steps, prefill steps)
        if single_cpu and config.decode_num_threads:
            self._threads = (config.decode_num_threads, torch.get_num_threads())
        self._threads_now = torch.get_num_threads()
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
        self._forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model and sample, apply the results, stream. A request whose own data
        fails (sampling, detokenizing) ends alone with finish_reason "error"; the step goes on."""
        t0 = time.perf_counter()
        sched, reqs = self.scheduler.schedule()
        if not reqs:
            return []
        self.num_steps += 1
        rows = prefill = 0
        for r, n in zip(reqs, sched.num_scheduled_tokens, strict=True):
            if r.num_computed_tokens >= r.num_prompt_tokens:
                rows += 1
            else:
                prefill += n
        self.last_step = (rows, prefill)
        self.decode_rows_total += rows
        self.prefill_tokens_total += prefill
        if self._threads is not None:
            n = self._threads[prefill >= PREFILL_THREADS_MIN]
            if n != self._threads_now:
                torch.set_num_threads(n)
                self._threads_now = n
        if self.structured.active:  # grammar masks fill on a thread while the model runs
            sampling = zip(reqs, sched.sample, strict=True)
            self.structured.prefetch([r.request_id for r, smp in sampling if smp])
        res = self.runner.execute_model(sched, reqs)
        outputs = [self._fail(reqs[i], msg) for i, msg in res.errors.items()]
        if self.spec is not None:
            for r, n, rej in zip(reqs, res.num_draft_tokens, res.num_rejected, strict=True):
                self.spec.record(r.request_id, n, n - rej)
        n_before = [r.num_tokens for r in reqs]
        self.scheduler.update(
            reqs, sched.num_scheduled_tokens, res.sampled_token_ids, res.num_rejected
        )
        now = time.monotonic()
        for i, (req, before) in enumerate(zip(reqs, n_before, strict=True)):
            if not res.sampled_token_ids[i] or i in res.errors:
                continue
            kept = req.token_ids[before:]  # tokens past a stop condition were not appended
            if req.first_token_time is None:
                req.first_token_time = now
            self.generation_tokens_total += len(kept)
            try:
                if kept and self.structured.constrained(req.request_id):
                    self._grammar_accept(req, kept)
                outputs.append(self._output(req, kept, res.logprobs[i]))
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the step
                outputs.append(self._fail(req, f"output failed: {e}"))
        if self.proposer is not None:
            # The draft model runs here, not in the target's step: its KV catches up only for
            # requests that speculate (a backed-off draft costs nothing).
            self.proposer.propose(self.scheduler.running, len(self.scheduler.waiting))
        self.step_seconds_total += time.perf_counter() - t0
        return outputs

    def _fail(self, req: Request, message: str) -> RequestOutput:
        """End ``req`` with finish_reason "error" (its blocks freed) and say why."""
        logger.warning("request %s failed: %s", req.request_id, message)
        self.scheduler.abort(req, "error")
        self._forget(req.request_id)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=[],
            new_text="",
            finished=True,
            finish_reason="error",
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            error=message,
        )

    def _forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.detoks.pop(request_id, None)
        self.sampler.forget(request_id)
        self.structured.forget(request_id)
        if self.spec is not None:
            self.spec.forget(request_id)

    def _grammar_masks(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Sampler logits processor: grammar masks on the constrained rows (in place)."""
        if self.structured.active:
            return self.structured.apply(logits, [r.request_id for r in reqs])
        return logits

    def _grammar_accept(self, req: Request, kept: list[int]) -> None:
        """Feed the request's accepted tokens to its grammar; a grammar that can take nothing more
        (only EOS) ends the request with "stop" (also under ignore_eos / min_tokens)."""
        if self.structured.accept(req.request_id, kept) and not req.is_finished:
            self.scheduler.abort(req, "stop")

    def _output(self, req: Request, new: list[int], lps) -> RequestOutput:
        detok = self.detoks[req.request_id]
        text, hit_stop = detok.add(new, req.is_finished)
        if hit_stop and not req.is_finished:
            self.scheduler.abort(req, "stop")
        elif req.is_finished and not hit_stop:
            text += detok.flush()
        if req.is_finished:
            self._forget(req.request_id)
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
            step_seconds_total=self.step_seconds_total,
            decode_rows_total=self.decode_rows_total,
            prefill_tokens_total=self.prefill_tokens_total,
        )

    def pop_block_events(self) -> list[BlockEvent]:
        return self.block_manager.pop_events()
