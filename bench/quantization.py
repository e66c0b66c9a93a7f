"""Weight-only int8 (engine/quantization.py) vs fp32 on the demo model, with transformers' forward.

Figures, same process, same prompts (W1: 32 x 128 random prompt tokens, 64 greedy new tokens):
- weight bytes (parameters + persistent buffers) of both models;
- W1 decode tok/s at batch 32 and at batch 1 (a bare loop of forwards over transformers' own KV
  cache, prefill timed apart), median of --repeats runs;
- greedy agreement: free-running (position-wise equal tokens over the 64 generated), mean position
  of the first divergence, and teacher-forced (next-token argmax of both along fp32's trajectory);
- the same for W8A8 (int8 weights and dynamically quantized activations, `dynamic_activations`);
- W1 output tok/s through fleetlm's own LLMEngine for fp32, int8 and W8A8.
--parts picks among agreement, hf (the bare-forward speed runs) and engine; all by default.
- a control: fp32 with Gaussian weight noise of the same RMS as int8's rounding error on each
  quantized matrix. If int8's agreement matches the control's, the quantizer is doing what its error
  budget allows and the rest is the model's sensitivity (random-weight models are far more sensitive
  than trained ones: their top-1/top-2 logit gaps are small).

    python bench/quantization.py --json out/quantization.json [--model demo] [--repeats 3]

Bound: decode at batch 1 is memory-bound, tok/s <= bandwidth / weight bytes read per step; int8
reads a quarter of the projection bytes, but on CPU the int8 -> fp32 cast runs per call, so the
gain shows mainly as memory, not speed (see the module docstring of engine/quantization.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
from torch import nn

from engine.demo_model import resolve_model
from engine.quantization import Int8Linear, quantize_int8, weight_bytes


def w1_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    # Same recipe as bench/engine_throughput.py's W1 prompts.
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 4000, (length,), generator=g).tolist() for _ in range(n)]


@torch.inference_mode()
def greedy(
    model: nn.Module, prompts: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, float, float]:
    """Bare greedy loop over transformers' DynamicCache. prompts [B, S] -> (tokens [B, new_tokens],
    prefill seconds, decode seconds for the remaining new_tokens - 1 steps)."""
    t0 = time.perf_counter()
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    cache, nxt = out.cache, out.logits[:, -1].argmax(-1)
    t1 = time.perf_counter()
    tokens = [nxt]
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt[:, None], cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
    t2 = time.perf_counter()
    return torch.stack(tokens, dim=1), t1 - t0, t2 - t1


def decode_rates(
    models: dict[str, nn.Module], prompts: torch.Tensor, new_tokens: int, repeats: int
):
    """Median decode tok/s per model; runs interleave so drifting machine load hits all alike."""
    for model in models.values():
        greedy(model, prompts[:, :16], 2)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    for _ in range(repeats):
        for label, model in models.items():
            _, p, d = greedy(model, prompts, new_tokens)
            times[label].append((p, d))
    b = prompts.shape[0]
    return {
        label: {
            "prefill_s_median": statistics.median(p for p, _ in ts),
            "decode_tok_s_median": b * (new_tokens - 1) / statistics.median(d for _, d in ts),
            "decode_tok_s_all": [b * (new_tokens - 1) / d for _, d in ts],
        }
        for label, ts in times.items()
    }


@torch.inference_mode()
def agreement(fp, other, prompts: torch.Tensor, new_tokens: int) -> dict:
    ref, _, _ = greedy(fp, prompts, new_tokens)
    got, _, _ = greedy(other, prompts, new_tokens)
    same = ref == got
    # First divergence per prompt (new_tokens when none).
    first = torch.where(same.all(1), new_tokens, (~same).int().argmax(1))
    # Teacher-forced along fp32's trajectory: logits at the last prompt position and every
    # generated position but the last predict the generated tokens.
    seq = torch.cat([prompts, ref], dim=1)
    s = prompts.shape[1]
    a = fp(seq).logits[:, s - 1 : -1].argmax(-1)
    b = other(seq).logits[:, s - 1 : -1].argmax(-1)
    return {
        "free_running": same.float().mean().item(),
        "first_divergence_mean": first.float().mean().item(),
        "teacher_forced": (a == b).float().mean().item(),
    }


def engine_w1(path: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """W1 through fleetlm's LLMEngine (paged attention, our scheduler): fp32, int8 and W8A8."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    blocks = len(prompts) * -(-(len(prompts[0]) + new_tokens) // 16) + 64
    engines = {}
    for label, quant in (("fp32", None), ("int8", "int8"), ("w8a8", None)):
        cfg = EngineConfig(
            model=path, quantization=quant, num_kv_blocks=blocks, max_num_seqs=len(prompts)
        )
        engines[label] = LLMEngine(cfg)
    # EngineConfig has no W8A8 option yet: swap the fp32 engine's projections in place.
    quantize_int8(engines["w8a8"].runner.model, dynamic_activations=True)
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    rates: dict[str, list[float]] = {k: [] for k in engines}
    tokens: dict[str, list[list[int]]] = {}
    for e in engines.values():
        e.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    for _ in range(repeats):
        for label, e in engines.items():  # interleaved
            e.block_manager.reset_prefix_cache()  # W1 measures compute, not cache hits
            t = time.perf_counter()
            out = e.generate(prompts, sp)
            rates[label].append(len(prompts) * new_tokens / (time.perf_counter() - t))
            tokens[label] = [r.token_ids for r in out]
    ref = torch.tensor(tokens["fp32"])
    res: dict = {}
    for label in engines:
        med = statistics.median(rates[label])
        res[label] = {
            "tok_s_median": med,
            "tok_s_all": rates[label],
            "over_fp32": med / statistics.median(rates["fp32"]),
            "free_running_agreement": (torch.tensor(tokens[label]) == ref).float().mean().item(),
        }
    return res


def noisy_control(fp: nn.Module, quantized: nn.Module, seed: int = 0) -> nn.Module:
    """fp32 copy whose quantized matrices get Gaussian noise with int8's per-matrix error RMS."""
    noisy = copy.deepcopy(fp)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in quantized.named_modules():
            if isinstance(mod, Int8Linear):
                w = noisy.get_submodule(name).weight
                rms = (mod.dequantized_weight() - w).pow(2).mean().sqrt()
                w.add_(torch.randn(w.shape, generator=g) * rms)
    return noisy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--model", default="demo", help="demo, demo-small or a local HF folder")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument(
        "--parts", default="agreement,hf,engine", help="comma list of agreement, hf, engine"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model, progress=False)
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    q = quantize_int8(copy.deepcopy(fp))
    w8a8 = quantize_int8(copy.deepcopy(fp), dynamic_activations=True)
    prompts = torch.tensor(w1_prompts(args.prompts, args.prompt_len))
    res: dict = {
        "model": args.model,
        "workload": {
            "prompts": args.prompts,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "weight_bytes": {"fp32": weight_bytes(fp), "int8": weight_bytes(q)},
    }
    print(
        f"weight bytes: fp32 {res['weight_bytes']['fp32'] / 2**20:.1f} MiB, "
        f"int8 {res['weight_bytes']['int8'] / 2**20:.1f} MiB",
        flush=True,
    )
    parts = set(args.parts.split(","))
    if unknown := parts - {"agreement", "hf", "engine"}:
        raise SystemExit(f"--parts: unknown part(s) {sorted(unknown)}")
    if "agreement" in parts:
        controls = (("int8", q), ("noise_control", noisy_control(fp, q)), ("w8a8", w8a8))
        for label, model in controls:
            res[f"agreement_{label}"] = agreement(fp, model, prompts, args.new_tokens)
            print(f"{label} agreement", res[f"agreement_{label}"], flush=True)
    for name, batch in (("batch", prompts), ("batch1", prompts[:1])) if "hf" in parts else ():
        models = {"fp32": fp, "int8": q, "w8a8": w8a8}
        r = res[name] = decode_rates(models, batch, args.new_tokens, args.repeats)
        base = r["fp32"]["decode_tok_s_median"]
        line = [f"{name}: fp32 {base:.0f} tok/s (prefill {r['fp32']['prefill_s_median']:.2f} s)"]
        for label in ("int8", "w8a8"):
            rate = r[label]["decode_tok_s_median"]
            r[f"{label}_over_fp32"] = rate / base
            prefill = r[label]["prefill_s_median"]
            line.append(f"{label} {rate:.0f} tok/s (x{rate / base:.2f}, prefill {prefill:.2f} s)")
        print(", ".join(line), flush=True)
    if "engine" in parts:
        res["engine_w1"] = engine_w1(path, prompts.tolist(), args.new_tokens, args.repeats)
        for label, r in res["engine_w1"].items():
            print(
                f"engine W1 {label}: {r['tok_s_median']:.0f} output tok/s (x{r['over_fp32']:.2f}),"
                f" free-running agreement {r['free_running_agreement']:.3f}",
                flush=True,
            )
    res["command"] = " ".join([sys.executable, *sys.argv])
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
