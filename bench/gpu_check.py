"""Correctness, then W1, on an accelerator.

Correctness first: the greedy equivalence of tests/test_engine_equivalence.py on the device (its
prompts: 20 of lengths 1..700, four sharing a 90-token prefix; its engine cases: default, chunked
prefill, a block pool small enough to force preemption, no cache / no chunking), on its two tiny
random models (demo-small, a tiny Qwen2) in float32, against transformers' own greedy
``generate()`` on the same device; the prompts matching token-for-token are counted per case. A
bfloat16 row of each case is reported for information only (batch-shape numerics flip near-ties).

Then W1 with a Qwen2.5-0.5B-shaped model (random bf16 weights built from a config, no hub): our
engine beside transformers' static ``generate()`` and ``generate_batch()`` in the same run, and the
decode roofline bound for that batch (bandwidth measured here by a device copy).

    python3 bench/gpu_check.py --json OUT/gpu_check.json          # on the GPU machine
    python bench/gpu_check.py --device cpu --tiny                 # smoke test of the script here

Roofline (WORKLOADS.md): decode tok/s <= batch * bandwidth / (weight bytes + KV bytes read per
step); prefill ~= 2 * parameters FLOPs per token. The W1 bound adds both phases' lower times.
The exit status is 1 when a float32 correctness case mismatches (the JSON is written first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
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

    from engine.demo_model import BOS, EOS, PAD, save_tokenizer, special_token_ids

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


def equivalence_cases() -> tuple[list[dict], list[str]]:
    """The engine knob cases of tests/test_engine_equivalence.py (its parametrize), with ids."""
    from test_engine_equivalence import test_greedy_matches_hf_generate as t

    for mark in getattr(t, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == "knobs":
            return list(mark.args[1]), list(mark.kwargs["ids"])
    raise RuntimeError("tests/test_engine_equivalence.py: no 'knobs' parametrize found")


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


def correctness(device: torch.device, tmp: Path) -> list[dict]:
    """One row per (model, dtype, case): prompts matching transformers' greedy token-for-token,
    plus the prefix-cache / preemption / block-release checks the test makes."""
    from test_engine_equivalence import GREEDY, NEW, mixed_prompts
    from tiny_models import tiny_qwen2

    from engine.config import EngineConfig
    from engine.demo_model import resolve_model
    from engine.llm_engine import LLMEngine

    # float32 means float32: no TF32 in matmuls (torch's default, stated here).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    models = {
        "demo-small": resolve_model("demo-small", progress=False),
        "qwen2-tiny": tiny_qwen2(tmp / "qwen2-tiny", max_position_embeddings=1024),
    }
    knob_cases, ids = equivalence_cases()
    prompts = mixed_prompts()
    rows = []
    for model_name, path in models.items():
        for dtype_name in ("float32", "bfloat16"):
            dtype = getattr(torch, dtype_name)
            ref = hf_greedy_reference(path, prompts, dtype, device, NEW)
            for case, knobs in zip(ids, knob_cases, strict=True):
                t = time.perf_counter()
                eng = LLMEngine(
                    EngineConfig(model=path, device=str(device), dtype=dtype_name, **knobs)
                )
                eng.generate([prompts[-1]], GREEDY)  # warm the shared prefix (cache hits)
                res = eng.generate(prompts, GREEDY)
                st = eng.stats()
                match = [r.token_ids == want for r, want in zip(res, ref, strict=True)]
                checks = {"all_blocks_freed": st.num_free_blocks == st.num_total_blocks}
                if knobs.get("enable_prefix_caching", True):
                    checks["prefix_cache_hit"] = st.prefix_cache_hit_tokens > 0
                if "num_kv_blocks" in knobs:
                    checks["preempted"] = st.num_preemptions > 0
                row = {
                    "model": model_name,
                    "dtype": dtype_name,
                    "case": case,
                    "knobs": knobs,
                    "prompts": len(prompts),
                    "matching": sum(match),
                    "mismatched_prompt_lengths": [
                        len(p) for p, m in zip(prompts, match, strict=True) if not m
                    ],
                    "prefix_cache_hit_tokens": st.prefix_cache_hit_tokens,
                    "num_preemptions": st.num_preemptions,
                    "num_steps": st.num_steps,
                    "cpu_kernel_loaded": eng.runner.decode_kernel is not None,
                    **checks,
                    "seconds": round(time.perf_counter() - t, 2),
                }
                row["ok"] = row["matching"] == row["prompts"] and all(checks.values())
                row["asserted"] = dtype_name == "float32"  # bfloat16: for information
                rows.append(row)
                print(
                    f"  {model_name:10s} {dtype_name:8s} {case:18s} "
                    f"{row['matching']:2d}/{row['prompts']} match, hits "
                    f"{st.prefix_cache_hit_tokens}, preemptions {st.num_preemptions}"
                    + ("" if row["ok"] or not row["asserted"] else "  <-- MISMATCH"),
                    flush=True,
                )
                del eng
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model for W1 (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--skip-generate-batch", action="store_true")
    ap.add_argument(
        "--batch-time-cap-s",
        type=float,
        default=45.0,
        help="a generate_batch() run slower than this is not repeated",
    )
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--correctness-only", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for name in ("repeats", "num_prompts", "prompt_len", "output_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.skip_correctness and args.correctness_only:
        ap.error("--skip-correctness and --correctness-only exclude each other")

    import transformers

    device = torch.device(args.device)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(result, flush=True)

    def save() -> None:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)

    correct_ok = True
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_correctness:
            print("correctness: fleetlm greedy vs transformers generate() greedy", flush=True)
            t = time.perf_counter()
            rows = correctness(device, Path(d))
            fp32 = [r for r in rows if r["dtype"] == "float32"]
            correct_ok = all(r["ok"] for r in fp32)
            result["correctness"] = {
                "float32_all_match": correct_ok,
                "float32_matching": f"{sum(r['matching'] for r in fp32)}/"
                f"{sum(r['prompts'] for r in fp32)}",
                "seconds": round(time.perf_counter() - t, 1),
                "rows": rows,
            }
            print(
                "correctness float32:",
                "all match" if correct_ok else "MISMATCH",
                result["correctness"]["float32_matching"],
                flush=True,
            )
            save()
        if not args.correctness_only:
            result.update(w1(args, device, Path(d)))
            save()
    print(json.dumps({k: v for k, v in result.items() if k != "correctness"}, indent=2))
    w1_bound = result.get("w1_bound_tok_s")
    for k, v in result.get("output_tok_s", {}).items():
        if v:
            print(f"  {k:18s} {v:9.1f} tok/s  ({v / w1_bound:.1%} of the W1 roofline bound)")
    if not correct_ok:
        sys.exit(1)


def w1(args, device: torch.device, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from bench.engine_throughput import run_fleetlm
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    dtype = torch.bfloat16
    shape = TINY if args.tiny else QWEN25_05B
    n, plen, olen = args.num_prompts, args.prompt_len, args.output_len
    t = time.perf_counter()
    path = build_model(tmp / "qwen25-05b-random", shape, dtype)
    print(f"W1: model built in {time.perf_counter() - t:.1f} s", flush=True)
    prompts = w1_prompts(n, plen)
    engine = LLMEngine(
        EngineConfig(
            model=path,
            dtype="bfloat16",
            device=str(device),
            max_num_seqs=max(64, n),
            max_num_batched_tokens=8192,
            kv_cache_memory_gb=4.0 if device.type == "cuda" else 0.25,
        )
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    run_fleetlm(engine, prompts[:4], 4)  # warm-up
    run_hf_generate_on(hf, prompts[:4], 4, device)
    rates: dict[str, list[float]] = {"fleetlm": [], "hf_generate": [], "hf_generate_batch": []}
    errors: dict[str, str] = {}
    batch_on = not args.skip_generate_batch
    if batch_on:
        try:
            run_hf_generate_batch_on(hf, prompts[:4], 4)  # warm-up
        except Exception as e:  # a peer failing must not lose the other figures
            errors["hf_generate_batch"] = f"{type(e).__name__}: {e}"[:500]
            print("generate_batch failed:", errors["hf_generate_batch"], flush=True)
            batch_on = False
    for _ in range(args.repeats):  # interleaved
        rates["fleetlm"].append(run_fleetlm(engine, prompts, olen))
        rates["hf_generate"].append(run_hf_generate_on(hf, prompts, olen, device))
        if batch_on:
            sync(device)
            try:
                rates["hf_generate_batch"].append(run_hf_generate_batch_on(hf, prompts, olen))
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
    return {
        "model": "Qwen2.5-0.5B-shaped random bf16" if not args.tiny else "tiny random bf16",
        "params": params,
        "workload": f"W1 {n}x{plen} prompt, {olen} out, greedy, ignore_eos",
        "output_tok_s": {k: (statistics.median(v) if v else None) for k, v in rates.items()},
        "output_tok_s_runs": rates,
        "errors": errors,
        "measured_bandwidth_gb_s": bw,
        "measured_bf16_tflops": tf,
        "decode_step_floor_ms": step_ms,
        "prefill_floor_ms": prefill_ms,
        "decode_bound_tok_s": decode_bound,
        "w1_bound_tok_s": w1_bound,
        "repeats": args.repeats,
    }


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


def run_hf_generate_batch_on(model, prompts, out_len: int) -> float:
    """transformers' continuous batching ``generate_batch()``. Not under inference_mode: its loop
    runs in a thread of its own, and tensors made as inference tensors in this thread then refuse
    that thread's in-place updates (transformers 5.17 fails every request so)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        max_new_tokens=out_len,
        min_new_tokens=out_len,
        do_sample=False,
        eos_token_id=-1,
        pad_token_id=0,
    )
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    dt = time.perf_counter() - t
    n = sum(len(o.generated_tokens) for o in out.values())
    if n != len(prompts) * out_len:
        raise RuntimeError(f"generate_batch returned {n} of {len(prompts) * out_len} tokens")
    return n / dt


if __name__ == "__main__":
    main()
