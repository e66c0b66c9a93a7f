"""W1 on an accelerator with a Qwen2.5-0.5B-shaped model (random bf16 weights built from a config,
no hub): our engine beside transformers' static ``generate()`` and ``generate_batch()`` in the same
run, and the decode roofline bound for that batch (bandwidth measured here by a device copy).

    python3 bench/gpu_check.py --json OUT/gpu_check.json          # on the GPU machine
    python bench/gpu_check.py --device cpu --tiny                 # smoke test of the script here

Roofline (WORKLOADS.md): decode tok/s <= batch * bandwidth / (weight bytes + KV bytes read per
step); prefill ~= 2 * parameters FLOPs per token. The W1 bound adds both phases' lower times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--skip-generate-batch", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from bench.engine_throughput import run_fleetlm, run_hf_generate_batch
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    device = torch.device(args.device)
    dtype = torch.bfloat16
    shape = TINY if args.tiny else QWEN25_05B
    n, plen, olen = args.num_prompts, args.prompt_len, args.output_len
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    import transformers

    info["transformers"] = transformers.__version__
    print(info, flush=True)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        path = build_model(Path(d) / "qwen25-05b-random", shape, dtype)
        print(f"model built in {time.perf_counter() - t:.1f} s", flush=True)
        prompts = w1_prompts(n, plen)
        engine = LLMEngine(
            EngineConfig(
                model=path,
                dtype="bfloat16",
                device=args.device,
                max_num_seqs=max(64, n),
                max_num_batched_tokens=8192,
                kv_cache_memory_gb=4.0 if device.type == "cuda" else 0.25,
            )
        )
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        run_fleetlm(engine, prompts[:4], 4)  # warm-up
        run_hf_generate_on(hf, prompts[:4], 4, device)
        rates: dict[str, list[float]] = {"fleetlm": [], "hf_generate": [], "hf_generate_batch": []}
        for _ in range(args.repeats):  # interleaved
            rates["fleetlm"].append(run_fleetlm(engine, prompts, olen))
            rates["hf_generate"].append(run_hf_generate_on(hf, prompts, olen, device))
            if not args.skip_generate_batch:
                sync(device)
                rates["hf_generate_batch"].append(run_hf_generate_batch(hf, prompts, olen))
            print({k: [round(x, 1) for x in v] for k, v in rates.items()}, flush=True)
    bw = bandwidth_gb_s(device)
    tf = matmul_tflops(device, dtype)
    params, decode_bound, w1_bound, step_ms, prefill_ms = roofline(
        shape, n, plen, olen, bw, tf, dtype.itemsize
    )
    w1 = {k: (statistics.median(v) if v else None) for k, v in rates.items()}
    result = {
        **info,
        "model": "Qwen2.5-0.5B-shaped random bf16" if not args.tiny else "tiny random bf16",
        "params": params,
        "workload": f"W1 {n}x{plen} prompt, {olen} out, greedy, ignore_eos",
        "output_tok_s": w1,
        "measured_bandwidth_gb_s": bw,
        "measured_bf16_tflops": tf,
        "decode_step_floor_ms": step_ms,
        "prefill_floor_ms": prefill_ms,
        "decode_bound_tok_s": decode_bound,
        "w1_bound_tok_s": w1_bound,
        "repeats": args.repeats,
    }
    print(json.dumps(result, indent=2))
    for k, v in w1.items():
        if v:
            print(f"  {k:18s} {v:9.1f} tok/s  ({v / w1_bound:.1%} of the W1 roofline bound)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


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
