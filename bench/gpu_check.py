"""Kernels, correctness, CUDA graphs, then W1 and a decode-step profile, on an accelerator.

One prepared run for one H100 in under 8 minutes (``--budget-s``: a part that would start past it
is skipped and recorded). Default parts, in order: ``kernels,correctness,graphs,w1,profile``;
``spec`` and ``int8`` run when named. Targets (issue 12), reported under "targets" in the JSON:
W1 fleetlm >= 3x transformers' ``generate()`` on the same GPU in the same run, a batch-32 decode
step <= 5 ms, the GPU busy >= 50% of that step; float32 greedy == ``generate()``.

``kernels`` (bench/gpu_kernels_check.py): engine.kernels' Triton paged attention on the device
against the torch reference (store_kv, decode with a padding row, varlen prefill over cached
context; float32 and bfloat16), with the decode kernel's time beside the reference's.
``graphs``: an attention layer through engine/cuda_graph.py's DecodeGraphRunner, replayed graphs
against eager runs per batch size (bitwise on the same padded bucket; the padding writes nothing),
then the engine's greedy output with CUDA graphs against ``enforce_eager`` on a tiny float32 model.

``correctness``: the greedy equivalence of tests/test_engine_equivalence.py on the device (its
prompts: 20 of lengths 1..700, four sharing a 90-token prefix; its engine cases: default, chunked
prefill, a block pool small enough to force preemption, no cache / no chunking), on its two tiny
random models (demo-small, a tiny Qwen2) in float32, against transformers' own greedy
``generate()`` on the same device; the prompts matching token-for-token are counted per case. A
bfloat16 row of each model's default case is reported for information only (batch-shape numerics
flip near-ties). With ``EngineConfig.model_impl`` present, every float32 case runs on both model
paths: our own model code (``fleetlm``) and transformers' modules (``transformers``).

Speculative decoding on the device (``spec``), same tiny float32 models, the repetitive prompts of
tests/test_spec_decode.py: greedy output with n-gram speculation (default knobs, and a chunked
prefill + preemption case) and with a draft model must equal the engine's greedy output without
speculation (acceptance reported); seeded sampled speculation (temperature, top-p) must run and
repeat token-for-token on a fresh engine, and unseeded sampled speculation must run.

int8 weights on the device (``int8``, information only): greedy agreement of the int8 engine with
the float32 one (and with a float32 engine holding the dequantized weights) on the mixed prompts;
bf16 + int8 and W8A8 (weight-only off the CPU) are run as well.

Then W1 with a Qwen2.5-0.5B-shaped model (random bf16 weights built from a config, no hub): our
engine beside transformers' static ``generate()`` (and ``generate_batch()`` unless skipped) in the
same run, warmed with the full batch shape, runs interleaved, and the decode roofline bound for that
batch (bandwidth measured here by a device copy). ``profile``: one batch-32 decode step of our
engine on that model: wall time per step, the step split by phase (timers with a device sync at
each boundary), and torch.profiler's summed device (kernel + copy) time per step; the rest of the
step's wall time is when the device was idle, waiting on the host.

    python3 bench/gpu_check.py --json OUT/gpu_check.json          # on the GPU machine
    python3 bench/gpu_check.py --parts spec,int8 --json OUT/more.json   # the optional parts
    python bench/gpu_check.py --device cpu --tiny --max-prompts 4 --num-prompts 4   # smoke here

Roofline (WORKLOADS.md): decode tok/s <= batch * bandwidth / (weight bytes + KV bytes read per
step); prefill ~= 2 * parameters FLOPs per token. The W1 bound adds both phases' lower times.
The exit status is 1 when a kernel, float32 correctness, graph or speculative check fails, or a
part raises (the JSON, with every part's figures or error, is written first); a missed
performance target is reported, not an error.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# tests/ as pytest sees it (its modules import each other by bare name); a site-packages "tests"
# package could shadow a namespace import of tests.*.
TESTS_DIR = str(Path(__file__).resolve().parent.parent / "tests")
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

QWEN25_05B = {  # Qwen/Qwen2.5-0.5B config.json, the shape only
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}
TINY = {
    **QWEN25_05B,
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 1024,
}


def build_model(out: Path, shape: dict, dtype: torch.dtype) -> str:
    """A random model folder with the demo tokenizer (ids are what we feed; vocab may differ)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from engine.models.demo import BOS, EOS, PAD, save_tokenizer, special_token_ids

    ids = special_token_ids()
    cfg = Qwen2Config(
        **shape,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out)
    save_tokenizer(out)
    return str(out)


def w1_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 4000, (length,), generator=g).tolist() for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth_gb_s(device: torch.device) -> float:
    """Device copy of 1 GiB (counting bytes read + written), best of 5."""
    n = (2**30 if device.type == "cuda" else 2**26) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t) / 1e12


def roofline(shape: dict, n: int, plen: int, olen: int, bw: float, tflops: float, nbytes: int):
    """(decode tok/s bound, W1 output tok/s bound). bw in GB/s, tflops in TFLOP/s."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        params = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(Qwen2Config(**shape)).parameters()
        )
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    kv_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * nbytes
    # The tied embedding is read in full by the LM head each step.
    weight_bytes = params * nbytes
    mean_ctx = plen + olen / 2
    step_bytes = weight_bytes + n * mean_ctx * kv_per_token
    decode_step_s = step_bytes / (bw * 1e9)
    prefill_s = 2 * params * n * plen / (tflops * 1e12)
    decode_bound = n / decode_step_s
    w1_bound = n * olen / (prefill_s + olen * decode_step_s)
    return params, decode_bound, w1_bound, decode_step_s * 1e3, prefill_s * 1e3


def equivalence_cases() -> list[tuple[str, str, dict, str | None]]:
    """(family, knob id, engine knobs, model_impl) of tests/test_engine_equivalence.py: its CASES
    over its KNOBS, plus transformers' modules on every knob of the demo Llama and Qwen2 (the test
    keeps the fallback path to a few cases for time); an older test (a ``knobs`` parametrize, one
    model path) gives its knobs on those two families."""
    import test_engine_equivalence as t

    knobs = getattr(t, "KNOBS", None)
    cases = getattr(t, "CASES", None)
    if knobs is not None and cases is not None:
        out = [(f, k, knobs[k], impl) for f, k, impl in cases]
        seen = {(f, k, impl) for f, k, impl in cases}
        for f in ("demo-small", "qwen2"):
            for k in knobs:
                if (f, k, "transformers") not in seen:
                    out.append((f, k, knobs[k], "transformers"))
        return out
    for mark in getattr(t.test_greedy_matches_hf_generate, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == "knobs":
            ids = list(mark.kwargs["ids"])
            return [
                (f, i, k, None)
                for f in ("demo-small", "qwen2")
                for i, k in zip(ids, mark.args[1], strict=True)
            ]
    raise RuntimeError("tests/test_engine_equivalence.py: neither KNOBS/CASES nor 'knobs' found")


def hf_greedy_reference(path: str, prompts, dtype: torch.dtype, device: torch.device, new: int):
    """transformers' greedy generate(), one prompt at a time (as the test's reference fixture)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
            out.append(gen[0, len(p) :].tolist())
    del hf
    return out


def graph_stats(engine) -> dict:
    """Decode graph counters of the engine's runner, when it has a graph runner."""
    gr = getattr(engine.runner, "graph_runner", None)
    if gr is None:
        return {"graph_runner": False}
    return {
        "graph_runner": True,
        "graphs_used": gr.use_graphs,
        "graph_replays": gr.num_replays,
        "graph_eager_calls": gr.num_eager,
        "graph_capture_error": gr.capture_error,
    }


def correctness(device: torch.device, tmp: Path, max_prompts: int | None = None) -> list[dict]:
    """One row per (model, model path, dtype, case): prompts matching transformers' greedy
    token-for-token, plus the prefix-cache / preemption / block-release checks the test makes.
    float32 rows are asserted; a bfloat16 row per model path of the two main families' default
    case is information."""
    from test_engine_equivalence import GREEDY, NEW, mixed_prompts

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    # float32 means float32: no TF32 in matmuls (torch's default, stated here).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = equivalence_cases()
    prompts = mixed_prompts()
    if max_prompts:
        prompts = prompts[-max_prompts:]  # the last ones share the cached prefix
    rows = []
    for family in dict.fromkeys(f for f, *_ in cases):
        path = family_path(family, tmp)
        for dtype_name in ("float32", "bfloat16"):
            mine = [c for c in cases if c[0] == family]
            if dtype_name == "bfloat16":
                if family not in ("demo-small", "qwen2"):
                    continue
                first = mine[0][1]
                mine = [c for c in mine if c[1] == first]
            ref = hf_greedy_reference(path, prompts, getattr(torch, dtype_name), device, NEW)
            for _, case, knobs, impl in mine:
                cfg = dict(model=path, device=str(device), dtype=dtype_name, **knobs)
                label = {"model": family, "model_impl": impl, "case": case}
                rows.append(
                    correctness_case(EngineConfig, LLMEngine, GREEDY, prompts, ref, cfg, label)
                )
                empty_cache(device)
    return rows


def correctness_case(EngineConfig, LLMEngine, greedy, prompts, ref, cfg: dict, label: dict) -> dict:
    t = time.perf_counter()
    knobs = {k: v for k, v in cfg.items() if k not in ("model", "device", "dtype")}
    if label["model_impl"] is not None:
        cfg = {**cfg, "model_impl": label["model_impl"]}
    eng = LLMEngine(EngineConfig(**cfg))
    eng.generate([prompts[-1]], greedy)  # warm the shared prefix (cache hits)
    res = eng.generate(prompts, greedy)
    st = eng.stats()
    match = [r.token_ids == want for r, want in zip(res, ref, strict=True)]
    checks = {"all_blocks_freed": st.num_free_blocks == st.num_total_blocks}
    if knobs.get("enable_prefix_caching", True):
        checks["prefix_cache_hit"] = st.prefix_cache_hit_tokens > 0
    if "num_kv_blocks" in knobs and len(prompts) >= 20:  # a smoke subset may fit the pool
        checks["preempted"] = st.num_preemptions > 0
    row = {
        **label,
        "dtype": cfg["dtype"],
        "knobs": knobs,
        "prompts": len(prompts),
        "matching": sum(match),
        "mismatched_prompt_lengths": [len(p) for p, m in zip(prompts, match, strict=True) if not m],
        "prefix_cache_hit_tokens": st.prefix_cache_hit_tokens,
        "num_preemptions": st.num_preemptions,
        "num_steps": st.num_steps,
        "own_model_code": getattr(eng.runner, "own", None),
        **graph_stats(eng),
        **checks,
        "seconds": round(time.perf_counter() - t, 2),
    }
    row["ok"] = row["matching"] == row["prompts"] and all(checks.values())
    row["asserted"] = cfg["dtype"] == "float32"  # bfloat16: for information
    print(
        f"  {label['model']:10s} {str(label['model_impl']):12s} {cfg['dtype']:8s} "
        f"{label['case']:18s} {row['matching']:2d}/{row['prompts']} match, hits "
        f"{st.prefix_cache_hit_tokens}, preemptions {st.num_preemptions}, graph replays "
        f"{row.get('graph_replays', '-')}"
        + ("" if row["ok"] or not row["asserted"] else "  <-- MISMATCH"),
        flush=True,
    )
    del eng
    return row


def graphs_check(device: torch.device, tmp: Path, max_prompts: int | None = None) -> dict:
    """The graph runner on an attention layer (bench/gpu_kernels_check.py), then the engine's
    greedy output with decode graphs against the same engine with ``enforce_eager``."""
    from test_engine_equivalence import GREEDY, mixed_prompts

    from bench.gpu_kernels_check import graph_toy_check
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    out = {"layer": graph_toy_check(device)}
    prompts = mixed_prompts()[-max_prompts:] if max_prompts else mixed_prompts()
    rows = []
    for model_name, path in tiny_model_paths(tmp).items():
        got = {}
        for eager in (True, False):
            eng = LLMEngine(
                EngineConfig(model=path, device=str(device), dtype="float32", enforce_eager=eager)
            )
            got[eager] = ([r.token_ids for r in eng.generate(prompts, GREEDY)], graph_stats(eng))
            del eng
            empty_cache(device)
        same = sum(a == b for a, b in zip(got[True][0], got[False][0], strict=True))
        row = {
            "model": model_name,
            "prompts": len(prompts),
            "graphs_equal_eager": same,
            "with_graphs": got[False][1],
            "enforce_eager": got[True][1],
        }
        row["ok"] = same == len(prompts)
        rows.append(row)
        print(
            f"  graphs {model_name:10s} greedy with graphs == enforce_eager: {same}/{len(prompts)}"
            f", {got[False][1]}" + ("" if row["ok"] else "  <-- FAIL"),
            flush=True,
        )
    out["engine"] = rows
    replays = [r["with_graphs"].get("graph_replays", 0) for r in rows]
    out["engine_replays_graphs"] = bool(replays) and all(n > 0 for n in replays)
    # On CUDA the engine must actually replay graphs (a capture that fell back to eager fails).
    out["all_ok"] = (
        out["layer"]["all_ok"]
        and all(r["ok"] for r in rows)
        and (device.type != "cuda" or out["engine_replays_graphs"])
    )
    return out


PARTS = ("kernels", "correctness", "graphs", "w1", "profile", "spec", "int8")
DEFAULT_PARTS = ("kernels", "correctness", "graphs", "w1", "profile")


def family_path(family: str, tmp: Path) -> str:
    """A tiny float32 random model of tests/tiny_models.py (demo-small: the embedded demo)."""
    from engine.models.demo import resolve_model

    if family == "demo-small":
        return resolve_model("demo-small", progress=False)
    import tiny_models

    path = tmp / f"{family}-tiny"
    if path.exists():
        return str(path)
    return getattr(tiny_models, f"tiny_{family}")(path, max_position_embeddings=1024)


def tiny_model_paths(tmp: Path) -> dict[str, str]:
    """The demo Llama and the tiny Qwen2 of tests/test_engine_equivalence.py."""
    return {"demo-small": family_path("demo-small", tmp), "qwen2-tiny": family_path("qwen2", tmp)}


def spec_check(device: torch.device, tmp: Path) -> dict:
    """Speculative decoding on ``device``: greedy equality with the non-speculative engine, and
    seeded sampled speculation repeating on a fresh engine."""
    from test_spec_decode import repetitive_prompts
    from tiny_models import tiny_llama

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    prompts = repetitive_prompts()
    new = 32
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    draft = tiny_llama(tmp / "draft-llama")  # a different, smaller model: real rejections
    cases = [
        ("ngram", {"method": "ngram"}, {}),
        (
            "ngram chunked+preempt",
            {"method": "ngram"},
            {"num_kv_blocks": 48, "max_num_batched_tokens": 48},
        ),
        ("draft_model", {"method": "draft_model", "model": draft}, {}),
        ("draft_model (self)", {"method": "draft_model"}, {}),  # draft = target: acceptance
    ]
    rows = []
    for model_name, path in tiny_model_paths(tmp).items():
        base = dict(model=path, device=str(device), dtype="float32")
        cases[-1][1]["model"] = path
        ref = [r.token_ids for r in LLMEngine(EngineConfig(**base)).generate(prompts, greedy)]
        for case, spec, knobs in cases:
            t = time.perf_counter()
            spec = {**spec, "num_tokens": 4, "max_batch_size": 64}
            eng = LLMEngine(EngineConfig(**base, speculative=spec, **knobs))
            eng.generate(prompts[-2:], greedy)  # warm the prefix cache (as the test does)
            got = [r.token_ids for r in eng.generate(prompts, greedy)]
            st = eng.stats()
            match = sum(a == b for a, b in zip(got, ref, strict=True))
            row = {
                "model": model_name,
                "case": case,
                "sampling": "greedy",
                "prompts": len(prompts),
                "matching_non_speculative": match,
                "draft_tokens": st.spec_draft_tokens,
                "accepted_tokens": st.spec_accepted_tokens,
                "acceptance": round(st.spec_accepted_tokens / max(1, st.spec_draft_tokens), 3),
                "num_steps": st.num_steps,
                "num_preemptions": st.num_preemptions,
                "all_blocks_freed": st.num_free_blocks == st.num_total_blocks,
                "seconds": round(time.perf_counter() - t, 2),
            }
            row["ok"] = (
                match == len(prompts)
                and st.spec_draft_tokens > 0
                and row["all_blocks_freed"]
                and (not knobs or st.num_preemptions > 0)
            )
            rows.append(row)
            print(
                f"  spec {model_name:10s} {case:22s} greedy {match}/{len(prompts)} equal, "
                f"acceptance {row['acceptance']:.2f} ({st.spec_accepted_tokens}/"
                f"{st.spec_draft_tokens}), preemptions {st.num_preemptions}"
                + ("" if row["ok"] else "  <-- FAIL"),
                flush=True,
            )
            del eng
            empty_cache(device)
        # Sampled: seeded requests repeat on a fresh engine; unseeded ones (the engine's default
        # generator) run. Rejection sampling draws on the device's generator.
        for case, spec in (cases[0][:2], cases[3][:2]):
            spec = {**spec, "num_tokens": 4, "max_batch_size": 64}
            # Half at temperature 0.8 / top-p 0.95 (rejections: random models are flat), half at
            # 0.05 (acceptances): both branches of the rejection sampler run.
            seeded = [
                SamplingParams(
                    temperature=0.05 if i % 2 else 0.8,
                    top_p=1.0 if i % 2 else 0.95,
                    seed=100 + i,
                    max_tokens=new,
                    ignore_eos=True,
                )
                for i in range(len(prompts))
            ]
            runs, stats = [], []
            for _ in range(2):
                eng = LLMEngine(EngineConfig(**base, speculative=spec))
                runs.append([r.token_ids for r in eng.generate(prompts, seeded)])
                stats.append(eng.stats())
                del eng
            eng = LLMEngine(EngineConfig(**base, speculative=spec))
            unseeded = SamplingParams(temperature=1.0, max_tokens=new, ignore_eos=True)
            free = eng.generate(prompts, unseeded)
            st = stats[0]
            row = {
                "model": model_name,
                "case": case,
                "sampling": "seeded; temperature 0.8 top_p 0.95 / 0.05 alternating",
                "prompts": len(prompts),
                "repeat_identical": sum(a == b for a, b in zip(*runs, strict=True)),
                "draft_tokens": st.spec_draft_tokens,
                "accepted_tokens": st.spec_accepted_tokens,
                "acceptance": round(st.spec_accepted_tokens / max(1, st.spec_draft_tokens), 3),
                "unseeded_run_tokens": sum(len(r.token_ids) for r in free),
                "unseeded_draft_tokens": eng.stats().spec_draft_tokens,
            }
            row["ok"] = (
                row["repeat_identical"] == len(prompts)
                and all(len(t) == new for t in runs[0])
                and st.spec_draft_tokens > 0
                and row["unseeded_run_tokens"] == new * len(prompts)
            )
            rows.append(row)
            print(
                f"  spec {model_name:10s} {case:22s} sampled: repeat {row['repeat_identical']}/"
                f"{len(prompts)}, acceptance {row['acceptance']:.2f} ({st.spec_accepted_tokens}/"
                f"{st.spec_draft_tokens}), unseeded run {row['unseeded_run_tokens']} tokens"
                + ("" if row["ok"] else "  <-- FAIL"),
                flush=True,
            )
            del eng
        empty_cache(device)
    return {"all_ok": all(r["ok"] for r in rows), "new_tokens": new, "rows": rows}


def agreement(got: list[list[int]], ref: list[list[int]]) -> dict:
    """Prompts identical, and the mean share of each output before its first divergence."""
    prefix = []
    for a, b in zip(got, ref, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(b))
        prefix.append(n / len(b))
    return {
        "identical": sum(a == b for a, b in zip(got, ref, strict=True)),
        "prompts": len(ref),
        "mean_prefix_agreement": round(statistics.mean(prefix), 3),
    }


def int8_check(device: torch.device, tmp: Path) -> dict:
    """int8 weights on ``device``: greedy agreement with the unquantized engine (information)."""
    from test_engine_equivalence import mixed_prompts

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.quantization import Int8Linear
    from engine.sampling_params import SamplingParams

    prompts = mixed_prompts()
    new = 32
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    rows = []
    for model_name, path in tiny_model_paths(tmp).items():
        for dtype, quant in (("float32", "int8"), ("float32", "int8-w8a8"), ("bfloat16", "int8")):
            t = time.perf_counter()
            base = dict(model=path, device=str(device), dtype=dtype)
            ef = LLMEngine(EngineConfig(**base))
            ref = [r.token_ids for r in ef.generate(prompts, greedy)]
            eq = LLMEngine(EngineConfig(**base, quantization=quant))
            layers = {n: m for n, m in eq.runner.model.named_modules() if isinstance(m, Int8Linear)}
            got = [r.token_ids for r in eq.generate(prompts, greedy)]
            row = {
                "model": model_name,
                "dtype": dtype,
                "quantization": quant,
                "int8_layers": len(layers),
                "vs_unquantized": agreement(got, ref),
            }
            if quant == "int8" and dtype == "float32":
                # The same engine holding the dequantized weights: equal up to summation order.
                with torch.no_grad():
                    for name, mod in layers.items():
                        ef.runner.model.get_submodule(name).weight.copy_(mod.dequantized_weight())
                ef.block_manager.reset_prefix_cache()
                deq = [r.token_ids for r in ef.generate(prompts, greedy)]
                row["vs_dequantized_fp32"] = agreement(got, deq)
            row["seconds"] = round(time.perf_counter() - t, 2)
            rows.append(row)
            v = row["vs_unquantized"]
            print(
                f"  int8 {model_name:10s} {dtype:8s} {quant:9s} vs unquantized: "
                f"{v['identical']}/{v['prompts']} identical, mean prefix agreement "
                f"{v['mean_prefix_agreement']:.2f}"
                + (
                    f"; vs dequantized fp32 {row['vs_dequantized_fp32']['identical']}/"
                    f"{row['vs_dequantized_fp32']['prompts']}"
                    if "vs_dequantized_fp32" in row
                    else ""
                ),
                flush=True,
            )
            del ef, eq
            empty_cache(device)
    return {"new_tokens": new, "rows": rows}


def empty_cache(device: torch.device) -> None:
    """Free a dropped engine's device memory now: its runner and decode graph runner refer to
    each other (bound methods), so only the cycle collector frees its KV cache and graphs."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def targets(result: dict) -> dict:
    """Issue 12's GPU targets against what this run measured (None: not measured)."""
    w1r, prof = result.get("w1", {}), result.get("profile", {})
    corr = result.get("correctness", {})

    def row(value, target, higher_is_better: bool) -> dict:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        return {"value": value, "target": target, "met": met}

    wall = prof.get("step_wall_ms_median")
    return {
        "float32_greedy_equals_generate": {
            "value": corr.get("float32_matching"),
            "met": corr.get("float32_all_match"),
        },
        "w1_fleetlm_vs_generate": row(w1r.get("fleetlm_vs_generate"), 3.0, True),
        "decode_step_ms_batch32": row(wall, 5.0, False),
        "gpu_busy_share_of_decode_step": row(prof.get("device_busy_share"), 0.5, True),
    }


def main() -> None:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--parts",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated, run in the order given, from: {','.join(PARTS)}",
    )
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model for W1 (smoke test)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument(
        "--max-prompts",
        type=int,
        default=None,
        help="correctness/graphs: only the last N of the 20 mixed prompts (smoke tests)",
    )
    ap.add_argument(
        "--generate-batch",
        action="store_true",
        help="W1: also transformers' generate_batch() (0.23x generate() on the H100; slow)",
    )
    ap.add_argument(
        "--no-w1-eager",
        action="store_true",
        help="W1: skip the fleetlm run with enforce_eager (the figure without CUDA graphs)",
    )
    ap.add_argument(
        "--batch-time-cap-s",
        type=float,
        default=45.0,
        help="a generate_batch() run slower than this is not repeated",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="a part is not started after this many seconds (W1 stops repeating past it)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for name in ("repeats", "num_prompts", "prompt_len", "output_len", "profile_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(parts) - set(PARTS))
    if bad or not parts:
        ap.error(f"--parts: unknown or empty {bad}; choose from {','.join(PARTS)}")
    args.deadline = t_start + args.budget_s

    import transformers

    device = torch.device(args.device)
    # float32 means float32: no TF32 in matmuls (torch's default, stated here).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version(),
        "parts": parts,
        "errors": {},
        "skipped_for_time": [],
    }
    print(result, flush=True)

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        result["targets"] = targets(result)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)

    def run_part(name: str, fn) -> None:
        """One part's figures or its error; a part failing must not lose the others."""
        if time.perf_counter() > args.deadline:
            result["skipped_for_time"].append(name)
            print(f"== {name}: skipped (past --budget-s {args.budget_s:.0f})", flush=True)
            save()
            return
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            fn()
        except Exception as e:
            result["errors"][name] = traceback.format_exc()[-3000:]
            print(f"{name} FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        result.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t, 1)
        save()

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)

        def do_kernels() -> None:
            from bench.gpu_kernels_check import kernel_checks

            try:
                result["kernels"] = kernel_checks(device)
            finally:
                if not result.get("kernels", {}).get("all_ok"):
                    # The other parts still run, on the torch attention path (recorded).
                    from engine import kernels

                    kernels.disable_triton()
                    result["triton_disabled_after_kernels_failure"] = True
            print("kernels:", "all ok" if result["kernels"]["all_ok"] else "FAIL", flush=True)

        def do_correctness() -> None:
            rows = correctness(device, tmp, args.max_prompts)
            fp32 = [r for r in rows if r["dtype"] == "float32"]
            result["correctness"] = {
                "float32_all_match": all(r["ok"] for r in fp32),
                "float32_matching": f"{sum(r['matching'] for r in fp32)}/"
                f"{sum(r['prompts'] for r in fp32)}",
                "rows": rows,
            }
            print(
                "correctness float32:",
                "all match" if result["correctness"]["float32_all_match"] else "MISMATCH",
                result["correctness"]["float32_matching"],
                flush=True,
            )

        def do_graphs() -> None:
            result["graphs"] = graphs_check(device, tmp, args.max_prompts)
            print("graphs:", "all ok" if result["graphs"]["all_ok"] else "FAIL", flush=True)

        def do_spec() -> None:
            result["spec"] = spec_check(device, tmp)
            print("spec:", "all ok" if result["spec"]["all_ok"] else "FAIL", flush=True)

        def do_int8() -> None:
            result["int8"] = int8_check(device, tmp)

        w1_state: dict = {}

        def do_w1() -> None:
            result["w1"] = w1(args, device, tmp, w1_state)

        def do_profile() -> None:
            result["profile"] = profile_decode_step(args, device, tmp, w1_state)

        fns = {
            "kernels": do_kernels,
            "correctness": do_correctness,
            "graphs": do_graphs,
            "spec": do_spec,
            "int8": do_int8,
            "w1": do_w1,
            "profile": do_profile,
        }
        for name in dict.fromkeys(parts):  # in the order given
            run_part(name, fns[name])
    save()
    detail = ("kernels", "correctness", "graphs", "spec", "int8")
    summary = {k: v for k, v in result.items() if k not in detail}
    print(json.dumps(summary, indent=2))
    w1r = result.get("w1", {})
    for k, v in w1r.get("output_tok_s", {}).items():
        if v:
            print(f"  {k:18s} {v:9.1f} tok/s  ({v / w1r['w1_bound_tok_s']:.1%} of the W1 bound)")
    for k, v in result["targets"].items():
        print(f"  target {k}: {v}")
    failed = list(result["errors"])
    if "correctness" in result and not result["correctness"]["float32_all_match"]:
        failed.append("correctness")
    for name in ("kernels", "graphs", "spec"):
        if name in result and not result[name]["all_ok"]:
            failed.append(name)
    if failed:
        print("FAILED:", failed, flush=True)
        sys.exit(1)


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def w1_engine_and_model(args, device: torch.device, tmp: Path, state: dict):
    """The W1 model folder, our engine and transformers' model on it (built once, shared by the w1
    and profile parts)."""
    if "engine" in state:
        return state["engine"], state["hf"], state["prompts"]
    from transformers import AutoModelForCausalLM

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    dtype = torch.bfloat16
    shape = TINY if args.tiny else QWEN25_05B
    t = time.perf_counter()
    path = build_model(tmp / "qwen25-05b-random", shape, dtype)
    print(f"W1: model built in {time.perf_counter() - t:.1f} s", flush=True)
    state["prompts"] = w1_prompts(args.num_prompts, args.prompt_len)

    def engine(enforce_eager: bool) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=path,
                dtype="bfloat16",
                device=str(device),
                max_num_seqs=max(64, args.num_prompts),
                max_num_batched_tokens=8192,
                kv_cache_memory_gb=4.0 if device.type == "cuda" else 0.25,
                enforce_eager=enforce_eager,
            )
        )

    t = time.perf_counter()
    state["engine"] = engine(False)
    print(f"W1: engine ready in {time.perf_counter() - t:.1f} s", flush=True)
    state["engine_eager"] = None if args.no_w1_eager else engine(True)
    state["hf"] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return state["engine"], state["hf"], state["prompts"]


def w1(args, device: torch.device, tmp: Path, state: dict) -> dict:
    from bench.engine_throughput import run_fleetlm, run_hf_generate_batch

    dtype = torch.bfloat16
    shape = TINY if args.tiny else QWEN25_05B
    n, plen, olen = args.num_prompts, args.prompt_len, args.output_len
    engine, hf, prompts = w1_engine_and_model(args, device, tmp, state)
    # Warm-up with the full batch shape (all prompts: the batch-n prefill and decode shapes,
    # allocator pools, kernel choices), twice each, a few tokens.
    eager = state["engine_eager"]
    t = time.perf_counter()
    for _ in range(2):
        run_fleetlm(engine, prompts, 8)
        if eager is not None:
            run_fleetlm(eager, prompts, 8)
        run_hf_generate_on(hf, prompts, 8, device)
    print(f"W1: warm-up (full batch, 8 tokens, x2) {time.perf_counter() - t:.1f} s", flush=True)
    rates: dict[str, list[float]] = {
        "fleetlm": [],
        "fleetlm_enforce_eager": [],
        "hf_generate": [],
        "hf_generate_batch": [],
    }
    errors: dict[str, str] = {}
    batch_on = args.generate_batch
    if batch_on:
        try:
            run_hf_generate_batch(hf, prompts, 8)  # warm-up
        except Exception as e:  # a peer failing must not lose the other figures
            errors["hf_generate_batch"] = f"{type(e).__name__}: {e}"[:500]
            print("generate_batch failed:", errors["hf_generate_batch"], flush=True)
            batch_on = False
    for i in range(args.repeats):  # interleaved
        if i and time.perf_counter() > args.deadline:
            print(f"W1: past --budget-s after {i} repeats", flush=True)
            break
        rates["fleetlm"].append(run_fleetlm(engine, prompts, olen))
        if eager is not None:
            rates["fleetlm_enforce_eager"].append(run_fleetlm(eager, prompts, olen))
        rates["hf_generate"].append(run_hf_generate_on(hf, prompts, olen, device))
        if batch_on:
            sync(device)
            try:
                rates["hf_generate_batch"].append(run_hf_generate_batch(hf, prompts, olen))
            except Exception as e:
                errors["hf_generate_batch"] = f"{type(e).__name__}: {e}"[:500]
                print("generate_batch failed:", errors["hf_generate_batch"], flush=True)
                batch_on = False
            if batch_on and n * olen / rates["hf_generate_batch"][-1] > args.batch_time_cap_s:
                batch_on = False  # one slow run is the figure; the time is better spent elsewhere
                print("generate_batch: over the time cap, not repeated", flush=True)
        print({k: [round(x, 1) for x in v] for k, v in rates.items()}, flush=True)
    bw = bandwidth_gb_s(device)
    tf = matmul_tflops(device, dtype)
    params, decode_bound, w1_bound, step_ms, prefill_ms = roofline(
        shape, n, plen, olen, bw, tf, dtype.itemsize
    )
    med = {k: (statistics.median(v) if v else None) for k, v in rates.items()}
    return {
        "model": "Qwen2.5-0.5B-shaped random bf16" if not args.tiny else "tiny random bf16",
        "params": params,
        "workload": f"W1 {n}x{plen} prompt, {olen} out, greedy, ignore_eos",
        "warm_up": "full batch, 8 tokens, twice, each engine",
        "repeats_run": len(rates["fleetlm"]),
        "output_tok_s": med,
        "output_tok_s_runs": rates,
        "fleetlm_vs_generate": med["fleetlm"] / med["hf_generate"],
        "fleetlm_enforce_eager_vs_generate": (
            med["fleetlm_enforce_eager"] / med["hf_generate"]
            if med["fleetlm_enforce_eager"]
            else None
        ),
        "graph_stats": graph_stats(engine),
        "errors": errors,
        "measured_bandwidth_gb_s": bw,
        "measured_bf16_tflops": tf,
        "decode_step_floor_ms": step_ms,
        "prefill_floor_ms": prefill_ms,
        "decode_bound_tok_s": decode_bound,
        "w1_bound_tok_s": w1_bound,
        "repeats": args.repeats,
    }


def profile_decode_step(args, device: torch.device, tmp: Path, state: dict) -> dict:
    """One batch-n decode step of our engine on the W1 model: wall time, a split by phase, and the
    device's summed kernel/copy time (torch.profiler); wall minus device time is device idle."""
    from torch.profiler import ProfilerActivity, profile

    from engine.sampling_params import SamplingParams

    engine, _, prompts = w1_engine_and_model(args, device, tmp, state)
    steps = args.profile_steps
    engine.block_manager.reset_prefix_cache()
    sp = SamplingParams(temperature=0, max_tokens=4 * steps + 8, ignore_eos=True)
    rids = [engine.add_request(f"profile-{i}", p, sp) for i, p in enumerate(prompts)]
    first: set[str] = set()
    while len(first) < len(rids):  # prefill (every request has its first token)
        first.update(o.request_id for o in engine.step())
    running = len(engine.scheduler.running)
    for _ in range(3):  # decode warm-up
        engine.step()

    # 1. Plain wall time of a decode step (its last .tolist() syncs already; sync for certainty).
    walls = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        engine.step()
        sync(device)
        walls.append((time.perf_counter() - t) * 1e3)

    # 2. Phases, with a device sync at each boundary (device work lands in its own phase).
    phases: dict[str, list[float]] = {}
    restore = []
    depth = [0]

    def timed(obj, attr: str, label: str) -> None:
        fn = getattr(obj, attr, None)
        if obj is None or fn is None or not callable(fn):
            return  # this engine has no such phase (e.g. the other model path's)

        def wrapper(*a, **k):
            if depth[0]:  # inside another timed phase: counted there
                return fn(*a, **k)
            depth[0] += 1
            sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(device)
                depth[0] -= 1
                phases.setdefault(label, []).append((time.perf_counter() - t0) * 1e3)

        restore.append((obj, attr, obj.__dict__.get(attr)))
        setattr(obj, attr, wrapper)

    runner = engine.runner
    timed(engine.scheduler, "schedule", "schedule")
    timed(runner, "prepare", "prepare inputs (transformers path: host flatten + copies)")
    timed(runner, "prepare_decode", "fill decode buffers (host)")
    timed(runner, "_prepare_own", "prepare inputs (own path, non-decode step)")
    timed(runner, "decode_hook", "decode forward (pad, copy, graph replay or eager; synced)")
    timed(runner, "run_decode_static", "decode forward, eager (synced)")
    timed(runner.model, "forward", "model forward (synced)")
    timed(runner.model, "compute_logits", "LM head")
    timed(engine.sampler, "sample_step", "sample (+ device-to-host copy)")
    timed(engine.sampler, "sample", "sample (+ device-to-host copy)")
    timed(engine.scheduler, "update", "scheduler update")
    split_walls = []
    try:
        for _ in range(steps):
            sync(device)
            t = time.perf_counter()
            engine.step()
            sync(device)
            split_walls.append((time.perf_counter() - t) * 1e3)
    finally:
        for obj, attr, own in reversed(restore):
            if own is None:
                delattr(obj, attr)  # the instance attribute goes; the class method shows again
            else:
                setattr(obj, attr, own)
    phase_ms = {k: statistics.median(v) for k, v in phases.items()}
    phase_ms["rest of step (outputs, detokenize, bookkeeping)"] = statistics.median(
        split_walls
    ) - sum(phase_ms.values())

    wall = statistics.median(walls)
    out: dict = {
        "batch": running,
        "steps_each": steps,
        "step_wall_ms_median": wall,
        "step_wall_ms_runs": walls,
        "phase_ms_median_synced": phase_ms,
        "synced_step_wall_ms_median": statistics.median(split_walls),
        "note": "device busy = summed kernel/copy durations under torch.profiler (one stream: "
        "no overlap); idle share = 1 - busy / unprofiled step wall time (an estimate)",
    }
    print(
        f"profile: batch {running} decode step {wall:.2f} ms wall; phases (synced): "
        + ", ".join(f"{k} {v:.2f}" for k, v in phase_ms.items()),
        flush=True,
    )

    # 3. Device time under the profiler.
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        sync(device)
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            sync(device)
            out["profiled_step_wall_ms"] = (time.perf_counter() - t) * 1e3 / steps
        events = prof.events()
        dev_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        by_name: dict[str, list[float]] = {}
        for e in dev_events:
            by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
        device_ms = sum(sum(v) for v in by_name.values()) / 1e3 / steps
        copy_us = sum(
            sum(v) for k, v in by_name.items() if k.lower().startswith(("memcpy", "memset"))
        )
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
        # Cross-check: the self device time of every (CPU) op, summed.
        self_dev = sum(
            getattr(e, "self_device_time_total", 0) or 0
            for e in events
            if e.device_type == torch.autograd.DeviceType.CPU
        )
        out.update(
            {
                "device_busy_ms_per_step": device_ms,
                "device_busy_ms_per_step_from_cpu_ops": self_dev / 1e3 / steps,
                "device_copy_ms_per_step": copy_us / 1e3 / steps,
                "device_ops_per_step": len(dev_events) / steps,
                "cpu_ops_per_step": (len(events) - len(dev_events)) / steps,
                "device_busy_share": device_ms / wall if device_ms else None,
                "device_idle_share_estimate": (1 - device_ms / wall) if device_ms else None,
                "top_device_ops": [
                    {
                        "name": k[:120],
                        "count_per_step": len(v) / steps,
                        "ms_per_step": sum(v) / 1e3 / steps,
                    }
                    for k, v in top
                ],
            }
        )
        print(
            f"profile: device busy {device_ms:.2f} ms/step (cross-check "
            f"{self_dev / 1e3 / steps:.2f}), {len(dev_events) / steps:.0f} device ops/step, "
            f"profiled step {out['profiled_step_wall_ms']:.2f} ms",
            flush=True,
        )
    finally:
        while engine.has_unfinished():  # the rest of the profile requests
            engine.step()
    return out


def run_hf_generate_on(model, prompts, out_len: int, device: torch.device) -> float:
    """transformers' static generate() on ``device`` (one padded-free batch: equal lengths)."""
    ids = torch.tensor(prompts, device=device)
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=out_len,
            min_new_tokens=out_len,
            do_sample=False,
            pad_token_id=0,
        )
    sync(device)
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + out_len
    return len(prompts) * out_len / dt


if __name__ == "__main__":
    main()
