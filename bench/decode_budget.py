"""Where a decode step's milliseconds go: W1's batch (32 requests, 128-token prompts) decoding on
the demo model, timed per step and per op with torch.profiler; the paged-attention kernels and the
engine's phases are wrapped in named ranges, so they show up beside aten's ops.

    python bench/decode_budget.py [--model demo] [--dtype float32] [--batch 32] [--steps 20]
        [--ab VARIANT --rounds 6]

Prints a budget table (ms per decode step): the whole step's wall time, the model forward and each
op group inside it, and the host work outside the forward (scheduling, input buffers, sampling,
detokenizing).

``--ab VARIANT`` instead times one change against its absence in the same process, steps
interleaved (rounds of ``--steps`` steps each, off/on/on/off order): ``fused-norm`` (the C++
residual add + RMSNorm vs F.rms_norm), ``fused-ops`` (every C++ fused op vs the torch path),
``packed-linear`` (oneDNN-packed weights, engine/models/layers.py PackedLinear, vs F.linear; in
float32 that is FLEETLM_CPU_LINEAR=onednn, not bit-exact).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.attention import PagedAttention
from engine.models.demo import resolve_model
from engine.sampling_params import SamplingParams

# aten op -> budget group (anything else: "other aten ops")
GROUPS = {
    "aten::mm": "matmul",
    "aten::addmm": "matmul",
    "mkldnn::_linear_pointwise": "matmul",  # oneDNN-packed linears (engine/models/layers.py)
    "aten::_fused_rms_norm": "RMSNorm",
    "aten::silu": "SiLU * up",
    "aten::embedding": "embedding",
    "aten::index": "rotary table lookup",
    "aten::argmax": "sampling",
}


def _wrap(cls, name: str, label: str) -> None:
    fn = getattr(cls, name)

    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    setattr(cls, name, wrapped)


def _norms(model):
    return [m for m in model.modules() if hasattr(m, "fused") and hasattr(m, "eps")]


def _toggle(model, variant: str):
    """-> set(on: bool): switches ``variant`` on or off in a loaded own-code model."""
    norms = _norms(model)
    norm_on = [m.fused for m in norms]
    fused_on = model.fused

    def set_norm(on: bool) -> None:
        for m, f in zip(norms, norm_on, strict=True):
            m.fused = f if on else None

    def set_all(on: bool) -> None:
        set_norm(on)
        model.fused = fused_on if on else None

    if variant == "fused-norm":
        if not any(norm_on):
            raise SystemExit("the fused norm is not in use here (no C++ kernels?)")
        return set_norm
    if variant == "fused-ops":
        return set_all
    if variant == "packed-linear":  # the model was loaded unpacked (FLEETLM_CPU_LINEAR=aten)
        from torch import nn

        from engine.models.layers import PackedLinear

        swaps = [
            (parent, name, mod, PackedLinear(mod, 32))
            for parent in model.modules()
            for name, mod in parent.named_children()
            if type(mod) is nn.Linear
        ]

        def set_packed(on: bool) -> None:
            for parent, name, mod, packed in swaps:
                setattr(parent, name, packed if on else mod)

        return set_packed
    raise SystemExit(f"unknown --ab variant {variant!r}")


def _ab(eng, variant: str, rounds: int, steps: int) -> None:
    set_on = _toggle(eng.runner.model, variant)
    times: dict[bool, list[float]] = {False: [], True: []}
    order = [False, True, True, False]
    for r in range(rounds):
        on = order[r % 4]
        set_on(on)
        eng.step()  # first step after a switch: not timed
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            times[on].append(time.perf_counter() - t)
    set_on(True)
    off, on = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
    print(
        f"--ab {variant}: median decode step off {off:.2f} ms, on {on:.2f} ms "
        f"({off - on:+.2f} ms saved, {len(times[True])} steps each, interleaved)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model-impl", default="auto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ab", default=None, help="fused-norm | fused-ops | packed-linear")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    ab_steps = (args.rounds + 1) * (args.steps + 1) if args.ab else 0

    if args.ab == "packed-linear":
        os.environ["FLEETLM_CPU_LINEAR"] = "aten"  # load unpacked; the A/B packs a copy
    eng = LLMEngine(
        EngineConfig(model=resolve_model(args.model), dtype=args.dtype, model_impl=args.model_impl)
    )
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0, max_tokens=2 * args.steps + 8 + ab_steps, ignore_eos=True)
    for _ in range(args.batch):
        eng.add_request(None, torch.randint(10, 4000, (128,), generator=g).tolist(), sp)
    while eng.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running
    ):
        eng.step()
    for _ in range(3):
        eng.step()  # warm
    if args.ab:
        _ab(eng, args.ab, args.rounds, args.steps)
        return
    walls = []
    for _ in range(args.steps):
        t = time.perf_counter()
        eng.step()
        walls.append(time.perf_counter() - t)
    step_ms = statistics.median(walls) * 1000

    # Named ranges for what aten does not see (our kernels) and the engine's phases.
    _wrap(PagedAttention, "paged", "paged attention kernel")
    _wrap(PagedAttention, "store_kv", "store K/V")
    fused = getattr(eng.runner.model, "fused", None)
    if fused is not None:  # engine/csrc/fused_ops.cpp (a module: wrap its function in place)
        _wrap(fused, "rotary_store_kv", "rotary + store K/V")
        if hasattr(fused, "add_rms_norm"):
            _wrap(fused, "add_rms_norm", "add + RMSNorm (C++)")
    runner = eng.runner
    _wrap(type(runner), "forward", "runner.forward")
    _wrap(type(runner.sampler), "sample_step", "sampler")
    _wrap(type(eng.scheduler), "schedule", "scheduler.schedule")
    _wrap(type(eng.scheduler), "update", "scheduler.update")
    if runner.own:
        _wrap(type(runner), "prepare_decode", "input buffers")
        _wrap(type(runner.model), "forward", "model forward")
        _wrap(type(runner.model), "compute_logits", "LM head")
    n = args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            eng.step()
    per: dict[str, float] = defaultdict(float)
    ranges: dict[str, float] = {}
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1000 / n
        if e.key in (
            "paged attention kernel",
            "store K/V",
            "rotary + store K/V",
            "add + RMSNorm (C++)",
            "runner.forward",
            "sampler",
            "scheduler.schedule",
            "scheduler.update",
            "input buffers",
            "model forward",
            "LM head",
        ):
            ranges[e.key] = e.cpu_time_total / 1000 / n
            per[e.key] += ms  # the kernels' own time (pybind calls are not aten ops)
        else:
            per[GROUPS.get(e.key, "other aten ops")] += ms
    print(
        f"decode step, batch {args.batch}, {args.model} {args.dtype} "
        f"({'own model code' if runner.own else 'transformers modules'}), "
        f"threads {torch.get_num_threads()}"
    )
    print(f"  wall time per step (median of {args.steps}, no profiler): {step_ms:7.2f} ms")
    for k in (
        "runner.forward",
        "model forward",
        "LM head",
        "input buffers",
        "sampler",
        "scheduler.schedule",
        "scheduler.update",
    ):
        if k in ranges:
            print(f"  [range] {k:28s} {ranges[k]:7.2f} ms (inclusive, under the profiler)")
    print("  self time by op group (ms per step, under the profiler):")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        if v >= 0.01:
            print(f"    {k:30s} {v:7.2f}")


if __name__ == "__main__":
    main()
