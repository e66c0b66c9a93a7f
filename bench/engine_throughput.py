"""W1 (batch throughput) and W2 (shared-prefix TTFT, cold vs warm) on the demo model, with peers.

In one run, on the same model and prompts: fleetlm's LLMEngine, transformers' static ``generate()``,
transformers' continuous batching ``generate_batch()``, and vLLM's CPU build when ``--vllm-python``
names a Python that has it (run offline in a subprocess, one engine at a time on the same cores).
W1 runs in float32 for all, then again in bfloat16 for fleetlm and vLLM ("W1_bf16").

    python bench/engine_throughput.py --json out/engine.json [--repeats 3] [--vllm-python PY]

Decode bound (WORKLOADS.md): ~1,000 output tok/s for W1 on a 2-core machine of this kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.demo import resolve_model
from engine.sampling_params import SamplingParams

VLLM_SCRIPT = r"""
import json, sys, time
from vllm import LLM, SamplingParams, TokensPrompt
if __name__ == "__main__":
    model, prompts_path, out_path, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    dtype = sys.argv[5]
    prompts = json.load(open(prompts_path))
    llm = LLM(model=model, dtype=dtype, enable_prefix_caching=False, max_model_len=2048)
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:4]], sp, use_tqdm=False)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        rates.append(len(prompts) * 64 / (time.perf_counter() - t))
    json.dump(rates, open(out_path, "w"))
"""


def w1_prompts(n: int = 32, length: int = 128, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 4000, (length,), generator=g).tolist() for _ in range(n)]


def run_fleetlm(engine: LLMEngine, prompts, out_len: int, tokens: list | None = None) -> float:
    """W1 output tok/s; the output token ids per prompt go into ``tokens`` when given."""
    engine.block_manager.reset_prefix_cache()  # W1 measures compute, not cache hits
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    t = time.perf_counter()
    res = engine.generate(prompts, sp)
    dt = time.perf_counter() - t
    assert all(len(r.token_ids) == out_len for r in res)
    if tokens is not None:
        tokens[:] = [list(r.token_ids) for r in res]
    return len(prompts) * out_len / dt


def run_hf_generate(model, prompts, out_len: int, tokens: list | None = None) -> float:
    ids = torch.tensor(prompts)
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
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + out_len
    if tokens is not None:
        tokens[:] = out[:, ids.shape[1] :].tolist()
    return len(prompts) * out_len / dt


def run_hf_generate_batch(model, prompts, out_len: int) -> float:
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


def run_vllm(
    python: str, model: str, prompts, repeats: int, dtype: str = "float32"
) -> float | None:
    with tempfile.TemporaryDirectory() as d:
        script, pp, op = (os.path.join(d, f) for f in ("v.py", "p.json", "o.json"))
        open(script, "w").write(VLLM_SCRIPT)
        json.dump(prompts, open(pp, "w"))
        env = dict(os.environ)
        # vLLM's CPU build claims most of RAM for KV by default, which fails beside this process's
        # models; 4 GiB is far more than W1 needs. Its AOT compile cache does not load with torch
        # 2.13 (see bench/vllm_server.py), so use the plain torch.compile cache.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        r = subprocess.run(
            [python, script, model, pp, op, str(repeats), dtype],
            capture_output=True,
            text=True,
            env=env,
        )
        if r.returncode != 0:
            print("vLLM run failed:\n" + r.stderr[-2000:], file=sys.stderr)
            return None
        return statistics.median(json.load(open(op)))


def w2_ttft(engine: LLMEngine, groups: int, per_group: int, prefix: int, question: int):
    """Sequential requests (one at a time, so TTFT is pure prefill): the first of each group finds
    its system prompt cold, the rest find it warm in the prefix cache."""
    engine.block_manager.reset_prefix_cache()
    g = torch.Generator().manual_seed(1)
    cold, warm = [], []
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for _ in range(groups):
        sys_prompt = torch.randint(10, 4000, (prefix,), generator=g).tolist()
        for j in range(per_group):
            q = torch.randint(10, 4000, (question,), generator=g).tolist()
            engine.add_request(None, sys_prompt + q, sp)
            t = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            (cold if j == 0 else warm).append((time.perf_counter() - t) * 1000)
    return statistics.mean(cold), statistics.mean(warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--vllm-python", default=None, help="a Python with vLLM's CPU build")
    ap.add_argument("--skip-generate-batch", action="store_true")
    ap.add_argument("--w2-groups", type=int, default=4)
    ap.add_argument("--w2-per-group", type=int, default=4)
    ap.add_argument("--json", default=None, help="write figures here too")
    ap.add_argument("--skip-bf16", action="store_true", help="no W1_bf16 runs")
    ap.add_argument(
        "--model-impl",
        default="auto",
        choices=["auto", "fleetlm", "transformers"],
        help="fleetlm's model code (EngineConfig.model_impl)",
    )
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model)
    prompts = w1_prompts(args.num_prompts)
    engine = LLMEngine(
        EngineConfig(
            model=path,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=max(64, args.num_prompts),
            model_impl=args.model_impl,
        )
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    run_fleetlm(engine, prompts[:4], 4)  # warm-up both
    run_hf_generate(hf, prompts[:4], 4)

    rates: dict[str, list[float]] = {"fleetlm": [], "hf_generate": [], "hf_generate_batch": []}
    steps = args.repeats * (2 if args.skip_generate_batch else 3)
    with tqdm(total=steps, desc="W1", unit="run") as bar:
        differ = 0  # sequences whose greedy tokens are not generate()'s, over all repeats
        for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
            ours, theirs = [], []
            rates["fleetlm"].append(run_fleetlm(engine, prompts, args.output_len, ours))
            bar.update()
            rates["hf_generate"].append(run_hf_generate(hf, prompts, args.output_len, theirs))
            bar.update()
            differ += sum(a != b for a, b in zip(ours, theirs, strict=True))
            if not args.skip_generate_batch:
                rates["hf_generate_batch"].append(
                    run_hf_generate_batch(hf, prompts, args.output_len)
                )
                bar.update()
    w1 = {k: (statistics.median(v) if v else None) for k, v in rates.items()}
    w1["sequences_differing_from_generate"] = differ
    w1["vllm"] = (
        run_vllm(args.vllm_python, path, prompts, args.repeats) if args.vllm_python else None
    )
    cold, warm = w2_ttft(engine, args.w2_groups, args.w2_per_group, 512, 64)
    result = {"W1": w1, "W2": {"cold_ttft_ms": cold, "warm_ttft_ms": warm}}
    if not args.skip_bf16:
        del engine, hf
        bf16 = LLMEngine(
            EngineConfig(
                model=path,
                dtype="bfloat16",
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=max(64, args.num_prompts),
                model_impl=args.model_impl,
            )
        )
        run_fleetlm(bf16, prompts[:4], 4)
        bf = [run_fleetlm(bf16, prompts, args.output_len) for _ in range(args.repeats)]
        del bf16
        result["W1_bf16"] = {
            "fleetlm": statistics.median(bf),
            "vllm": (
                run_vllm(args.vllm_python, path, prompts, args.repeats, "bfloat16")
                if args.vllm_python
                else None
            ),
        }

    print(
        f"\nW1 ({args.num_prompts}x128 prompt, {args.output_len} out, greedy), "
        f"median of {args.repeats}, output tok/s:"
    )
    for k, v in w1.items():
        if k == "sequences_differing_from_generate":
            continue
        ratio = f"  ({v / w1['hf_generate']:.2f}x generate)" if v and w1["hf_generate"] else ""
        print(f"  {k:18s} {v:8.1f}{ratio}" if v else f"  {k:18s}      n/a")
    print(
        f"  greedy tokens: {w1['sequences_differing_from_generate']} of "
        f"{args.repeats * len(prompts)} fleetlm sequences differ from generate()'s"
    )
    if "W1_bf16" in result:
        b = result["W1_bf16"]
        vs = f"  ({b['fleetlm'] / b['vllm']:.2f}x vLLM bf16)" if b["vllm"] else ""
        print(f"W1 bfloat16: fleetlm {b['fleetlm']:.1f}{vs}, vLLM {b['vllm'] or 'n/a'}")
    if w1["vllm"]:
        print(f"W1 float32: fleetlm / vLLM = {w1['fleetlm'] / w1['vllm']:.2f}x")
    print(
        f"W2 TTFT (prefix 512 + question 64): cold {cold:.1f} ms, warm {warm:.1f} ms "
        f"(warm/cold {warm / cold:.2f})"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        json.dump(result, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
