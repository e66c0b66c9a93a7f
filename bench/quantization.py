"""int8 quantization (engine/quantization.py) vs the unquantized model, with transformers' forward.

Figures, same process, same prompts (W1: 32 x 128 random prompt tokens, 64 greedy new tokens):
- weight bytes (parameters + persistent buffers) of every variant;
- agreement with fp32 of: int8 weight-only with per-channel scales, int8 with per-group scales
  (--group-sizes), W8A8 (int8 weights, dynamically quantized activations), and two controls:
  fp32 with Gaussian weight noise of int8's per-matrix error RMS, and the model cast to bf16 (the
  usual serving dtype). Each reports
  - teacher-forced agreement: next-token argmax of both along fp32's own greedy trajectory (each
    position is one greedy decision taken on the same prefix);
  - free-running agreement: position-wise equal tokens when each model generates on its own, and
    the mean position of the first divergence (one early flip makes all later positions differ);
  - perplexity of fp32's generated text under fp32 and under the variant, and their difference;
- W1 decode tok/s at batch 32 and at batch 1 (a bare loop of forwards over transformers' own KV
  cache, prefill timed apart, median of --repeats runs, interleaved) for fp32, int8, int8 per
  group and W8A8, and for bf16 beside bf16 + int8 (aten's packed int8 kernel);
- one linear layer's time per kernel at M = 1 and 32 (--parts kernels), torchao's int8
  weight-only linear included when torchao imports;
- W1 output tok/s through fleetlm's own LLMEngine for fp32, int8 and W8A8 (--parts engine).

    python bench/quantization.py --json out/quantization.json [--model demo] [--repeats 3]
    python bench/quantization.py --json out.json --model path/to/model.gguf --parts agreement

--model is demo, demo-small, a local HF folder, or a .gguf file (read by transformers; needs the
`gguf` and `accelerate` packages). Random-weight models (demo, demo-small) have small top-1/top-2
logit gaps and amplify any weight error through their layers, so their agreement measures the
model's sensitivity as much as the quantizer: the controls tell the two apart.

Bound: decode at batch 1 is memory-bound, tok/s <= bandwidth / weight bytes read per step; int8
reads a quarter of the projection bytes, but on CPU the int8 -> fp32 cast runs per call, so the
gain shows mainly as memory, not speed (see the module docstring of engine/quantization.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time

import torch
from torch import nn

from engine.models.demo import resolve_model
from engine.quantization import Int8Linear, quantize_int8, weight_bytes

PARTS = ("agreement", "hf", "kernels", "engine")


def w1_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    # Same recipe as bench/engine_throughput.py's W1 prompts.
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 4000, (length,), generator=g).tolist() for _ in range(n)]


def load_model(spec: str) -> tuple[nn.Module, str | None]:
    """fp32 model and an HF folder for LLMEngine (None for a .gguf file)."""
    from transformers import AutoModelForCausalLM

    if spec.endswith(".gguf"):
        import os

        folder, name = os.path.split(os.path.abspath(spec))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.eval(), None
    path = resolve_model(spec, progress=False)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), path


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


class Reference:
    """fp32's greedy tokens on the prompts and its teacher-forced logits along them."""

    @torch.inference_mode()
    def __init__(self, fp: nn.Module, prompts: torch.Tensor, new_tokens: int):
        self.prompts, self.new_tokens = prompts, new_tokens
        self.tokens, _, _ = greedy(fp, prompts, new_tokens)
        self.seq = torch.cat([prompts, self.tokens], dim=1)
        self.logits = self.forced_logits(fp)
        self.nll = self.token_nll(self.logits)

    def forced_logits(self, model: nn.Module) -> torch.Tensor:
        # Logits at the last prompt position and every generated position but the last predict
        # the generated tokens.
        s = self.prompts.shape[1]
        return model(self.seq).logits[:, s - 1 : -1].float()

    def token_nll(self, logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        return -logp.gather(-1, self.tokens[..., None]).squeeze(-1)

    @torch.inference_mode()
    def compare(self, model: nn.Module) -> dict:
        got, _, _ = greedy(model, self.prompts, self.new_tokens)
        same = self.tokens == got
        n = self.new_tokens
        first = torch.where(same.all(1), n, (~same).int().argmax(1))  # n when none diverge
        logits = self.forced_logits(model)
        ppl_ref = math.exp(self.nll.mean().item())
        ppl = math.exp(self.token_nll(logits).mean().item())
        return {
            "teacher_forced": (logits.argmax(-1) == self.logits.argmax(-1)).float().mean().item(),
            "free_running": same.float().mean().item(),
            "first_divergence_mean": first.float().mean().item(),
            "logits_rel_err": ((logits - self.logits).norm() / self.logits.norm()).item(),
            "ppl_fp32_text": {"fp32": ppl_ref, "model": ppl},
            "ppl_rel_diff": ppl / ppl_ref - 1,
        }


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


def _median_ms(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


@torch.inference_mode()
def kernel_times(k: int, n: int, group_size: int, calls: int) -> dict:
    """One linear [k -> n] per path, median ms per call at M = 1 and 32."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(k, n, bias=False)
    lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    lin_bf = copy.deepcopy(lin).bfloat16()
    pc, gr = Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, group_size=group_size)
    paths = {
        "fp32": (lin, torch.float32),
        "int8_fp32": (pc, torch.float32),
        f"int8_g{group_size}_fp32": (gr, torch.float32),
        "w8a8_fp32": (Int8Linear.from_linear(lin, dynamic_activations=True), torch.float32),
        "bf16": (lin_bf, torch.bfloat16),
        "int8_bf16_packed": (pc, torch.bfloat16),
        f"int8_g{group_size}_bf16": (gr, torch.bfloat16),
    }
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for label, base, dtype in (
            ("torchao_int8_fp32", lin, torch.float32),
            ("torchao_int8_bf16", lin_bf, torch.bfloat16),
        ):
            m = nn.Sequential(copy.deepcopy(base))
            quantize_(m, Int8WeightOnlyConfig())
            paths[label] = (m, dtype)
    except Exception as e:  # torchao is optional: report why it is absent
        paths_note = f"torchao unavailable: {type(e).__name__}: {e}"[:200]
    else:
        paths_note = "torchao imported"
    res: dict = {"shape": [k, n], "note": paths_note}
    for m_rows in (1, 32):
        x = torch.randn(m_rows, k, generator=g)
        times = res[f"M{m_rows}_ms"] = {}
        for label, (mod, dtype) in paths.items():
            xd = x.to(dtype)
            times[label] = _median_ms(lambda mod=mod, xd=xd: mod(xd), calls)
    return res


def engine_w1(path: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """W1 through fleetlm's LLMEngine (paged attention, our scheduler): fp32, int8 and W8A8."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    blocks = len(prompts) * -(-(len(prompts[0]) + new_tokens) // 16) + 64
    engines = {}
    for label, quant in (("fp32", None), ("int8", "int8"), ("w8a8", "int8-w8a8")):
        cfg = EngineConfig(
            model=path, quantization=quant, num_kv_blocks=blocks, max_num_seqs=len(prompts)
        )
        engines[label] = LLMEngine(cfg)
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


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"group sizes must be positive, got {text!r}")
    return vals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--model", default="demo", help="demo, demo-small, an HF folder or a .gguf")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument(
        "--group-sizes", type=_int_list, default=[32], help="per-group int8 variants, e.g. 128,32"
    )
    ap.add_argument(
        "--parts", default="agreement,hf,kernels,engine", help=f"comma list of {', '.join(PARTS)}"
    )
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if unknown := parts - set(PARTS):
        raise SystemExit(f"--parts: unknown part(s) {sorted(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    fp, path = load_model(args.model)
    variants: dict[str, nn.Module] = {"int8": quantize_int8(copy.deepcopy(fp))}
    for g in args.group_sizes:
        variants[f"int8_g{g}"] = quantize_int8(copy.deepcopy(fp), group_size=g)
    variants["w8a8"] = quantize_int8(copy.deepcopy(fp), dynamic_activations=True)
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
        "weight_bytes": {"fp32": weight_bytes(fp)}
        | {label: weight_bytes(m) for label, m in variants.items()},
    }
    print(
        "weight bytes: "
        + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in res["weight_bytes"].items()),
        flush=True,
    )
    if "agreement" in parts:
        ref = Reference(fp, prompts, args.new_tokens)
        controls = {
            "noise_control": noisy_control(fp, variants["int8"]),
            "bf16_control": copy.deepcopy(fp).bfloat16(),
        }
        res["agreement"] = {}
        for label, model in (variants | controls).items():
            r = res["agreement"][label] = ref.compare(model)
            print(
                f"{label}: teacher-forced {r['teacher_forced']:.3f}, free-running "
                f"{r['free_running']:.3f} (first divergence {r['first_divergence_mean']:.1f}), "
                f"logits rel err {r['logits_rel_err']:.4f}, ppl of fp32's text "
                f"{r['ppl_fp32_text']['fp32']:.3f} -> {r['ppl_fp32_text']['model']:.3f} "
                f"({100 * r['ppl_rel_diff']:+.2f}%)",
                flush=True,
            )
            del model
    if "hf" in parts:
        bf = copy.deepcopy(fp).bfloat16()
        bf_q = quantize_int8(copy.deepcopy(bf))
        res["weight_bytes"] |= {"bf16": weight_bytes(bf), "bf16_int8": weight_bytes(bf_q)}
        speed_models = {"fp32": fp} | variants | {"bf16": bf, "bf16_int8": bf_q}
        for name, batch in (("batch", prompts), ("batch1", prompts[:1])):
            r = res[name] = decode_rates(speed_models, batch, args.new_tokens, args.repeats)
            line = []
            for label in speed_models:
                base = "bf16" if label.startswith("bf16") else "fp32"
                rate = r[label]["decode_tok_s_median"]
                r[label]["over_" + base] = rate / r[base]["decode_tok_s_median"]
                line.append(f"{label} {rate:.0f} tok/s (x{r[label]['over_' + base]:.2f} {base})")
            print(f"{name} ({batch.shape[0]}): " + ", ".join(line), flush=True)
    if "kernels" in parts:
        g = args.group_sizes[0] if args.group_sizes else 32
        res["kernels"] = [kernel_times(k, n, g, calls=200) for k, n in ((512, 1408), (1408, 512))]
        for r in res["kernels"]:
            for m_rows in ("M1_ms", "M32_ms"):
                ms = ", ".join(f"{k} {v:.3f}" for k, v in r[m_rows].items())
                print(f"kernel {r['shape']} {m_rows}: {ms}", flush=True)
            print(r["note"], flush=True)
    if "engine" in parts:
        if path is None:
            raise SystemExit("--parts engine needs an HF folder or demo model, not a .gguf file")
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
