"""The engine's per-step counters (EngineStats) and decode_num_threads: decode steps on their
own torch thread count, steps with prompt work on num_threads."""

import torch

from engine.config import EngineConfig
from engine.llm_engine import PREFILL_THREADS_MIN, LLMEngine
from engine.models.demo import resolve_model
from engine.sampling_params import SamplingParams


def test_step_counters_count_decode_rows_and_prompt_tokens():
    eng = LLMEngine(EngineConfig(model=resolve_model("demo-small"), max_num_batched_tokens=64))
    lengths, new = (5, 7, 100), 4
    prompts = [[10 + i] * n for i, n in enumerate(lengths)]
    eng.generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    s = eng.stats()
    # Every prompt token computed once (no shared blocks); each request's first token comes from
    # its last prompt chunk, the other new - 1 from decode rows.
    assert s.prefill_tokens_total == sum(lengths)
    assert s.decode_rows_total == len(lengths) * (new - 1)
    # 112 prompt tokens in chunks of 64: 2 steps, then 3 decode steps (rows of the 100-token
    # request start a step later, in steps that also decode the others).
    assert s.num_steps == 2 + new - 1
    assert s.step_seconds_total > 0
    assert eng.last_step == (1, 0)  # the 100-token request's last decode, alone


def test_decode_steps_run_on_decode_num_threads():
    threads = torch.get_num_threads()
    seen = []
    try:
        eng = LLMEngine(
            EngineConfig(
                model=resolve_model("demo-small"),
                num_threads=2,
                decode_num_threads=1,
                max_num_batched_tokens=PREFILL_THREADS_MIN,
            )
        )
        run = eng.runner.execute_model

        def spy(sched, reqs):
            seen.append((eng.last_step[1], torch.get_num_threads()))
            return run(sched, reqs)

        eng.runner.execute_model = spy
        prompt = [11] * (PREFILL_THREADS_MIN + 10)  # a full chunk, then a 10-token chunk
        eng.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    finally:
        torch.set_num_threads(threads)
    # prompt tokens per step, threads the forward ran on
    assert seen == [(PREFILL_THREADS_MIN, 2), (10, 1), (0, 1), (0, 1)]


def test_without_decode_num_threads_every_step_keeps_num_threads():
    threads = torch.get_num_threads()
    try:
        eng = LLMEngine(EngineConfig(model=resolve_model("demo-small"), num_threads=2))
        eng.generate([[12] * 80], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
