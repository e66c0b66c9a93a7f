"""The CPU paged-attention kernel alone (engine/csrc/paged_attention.cpp, ``paged_attention``)
against gather + SDPA, and optionally against another version of the kernel, in one command.

Shapes (demo model attention: 8 query heads, 4 KV heads, head_dim 64, block size 16):
- ``decode``: W1's decode step, 32 sequences, one query row each, 130-190 tokens of context;
- ``prefix``: prefill over cached context as after a prefix-cache hit (W2: 4 requests of 64 new
  tokens after 512 cached ones);
- ``chunk``: one 512-token prefill chunk after 1,536 cached tokens (chunked prefill).

Each shape gets ``--layers`` separate KV caches (blocks scattered at random), and one timed round
calls every layer once, so K/V come from memory as in a model step (one layer's decode K/V is
10.5 MB in float32; the L3 would hold a single layer). Variants run in turn inside each round;
figures are microseconds per call (one layer), median and minimum over ``--repeats`` rounds.

    python bench/attention_kernel.py [--json F] [--repeats 30] [--baseline-rev REV]

``--baseline-rev REV`` builds ``engine/csrc/paged_attention.cpp`` as of git revision REV as a
second module (``rev:REV``), ``--baseline-src FILE`` another source file (``src:FILE``), for
before/after figures from one command. The reference
(``sdpa``) gathers each request's K/V through precomputed slot indices (built outside the timed
region) and runs SDPA: the decode batch as one padded, masked call, prefill per request with a
causal mask shifted by the cached length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cpu_kernels import paged_decode_kernel

ROOT = Path(__file__).resolve().parent.parent
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 4, 64, 16


@dataclass
class Case:
    name: str
    q_lens: list[int]
    ctx_before: list[int]


def cases(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    decode_ctx = torch.randint(130, 191, (32,), generator=g).tolist()
    return [
        Case("decode", [1] * 32, [c - 1 for c in decode_ctx]),
        Case("prefix", [64] * 4, [512] * 4),
        Case("chunk", [512], [1536]),
    ]


@dataclass
class Layer:
    k: torch.Tensor
    v: torch.Tensor
    block_tables: torch.Tensor
    q: torch.Tensor


def build(case: Case, dtype: torch.dtype, layers: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [a + b for a, b in zip(case.q_lens, case.ctx_before, strict=True)]
    need = [-(-s // BLOCK) for s in seq_lens]
    max_blocks = max(need)
    num_blocks = sum(need) + 16
    qsl = torch.tensor([0, *torch.tensor(case.q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = []
    for _ in range(layers):
        shape = (num_blocks * BLOCK, KV_HEADS, HEAD_DIM)
        k = torch.randn(shape, generator=g).to(dtype)
        v = torch.randn(shape, generator=g).to(dtype)
        perm = torch.randperm(num_blocks, generator=g)
        bt = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
        used = 0
        for i, nb in enumerate(need):
            bt[i, :nb] = perm[used : used + nb].to(torch.int32)
            used += nb
        q = torch.randn(int(qsl[-1]), HEADS, HEAD_DIM, generator=g).to(dtype)
        out.append(Layer(k, v, bt, q))
    return out, qsl, torch.tensor(seq_lens, dtype=torch.int32)


def sdpa_fn(case: Case, layers: list[Layer], qsl, seq_lens, scale):
    """Gather + SDPA over precomputed slot indices, per layer."""
    lens = seq_lens.tolist()
    starts = qsl.tolist()
    if all(n == 1 for n in case.q_lens):  # decode: one padded batch
        lmax = max(lens)
        pos = torch.arange(lmax)
        mask = (pos.unsqueeze(0) < seq_lens.unsqueeze(1)).view(len(lens), 1, 1, lmax)
        slots = [
            (L.block_tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK).clamp(min=0)
            for L in layers
        ]

        def run(i: int):
            L = layers[i]
            q = L.q.view(len(lens), KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
            k = L.k[slots[i]].transpose(1, 2)  # [B, Hkv, Lmax, D]
            v = L.v[slots[i]].transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

        return run
    per_layer = []
    for L in layers:
        reqs = []
        for n, s in enumerate(lens):
            a, b = starts[n], starts[n + 1]
            pos = torch.arange(s)
            slots = L.block_tables[n, pos // BLOCK].long() * BLOCK + pos % BLOCK
            q_pos = torch.arange(s - (b - a), s)
            reqs.append((a, b, slots, pos.unsqueeze(0) <= q_pos.unsqueeze(1)))
        per_layer.append(reqs)

    def run(i: int):
        L = layers[i]
        out = torch.empty_like(L.q)
        for a, b, slots, mask in per_layer[i]:
            k = L.k[slots].transpose(0, 1)
            v = L.v[slots].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                L.q[a:b].transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
            out[a:b] = o.transpose(0, 1)
        return out

    return run


def kernel_fn(mod, layers: list[Layer], qsl, seq_lens, scale):
    def run(i: int):
        L = layers[i]
        return mod.paged_attention(L.q, L.k, L.v, L.block_tables, qsl, seq_lens, BLOCK, scale)

    return run


def build_variant(src_text: str):
    """Compile a kernel source as its own module (flags as engine/cpu_kernels.py)."""
    import hashlib

    from torch.utils.cpp_extension import load

    digest = hashlib.sha1(src_text.encode()).hexdigest()[:10]
    d = Path(tempfile.gettempdir()) / f"fleetlm_attention_{digest}"
    d.mkdir(exist_ok=True)
    path = d / "paged_attention.cpp"
    if not path.exists() or path.read_text() != src_text:
        path.write_text(src_text)
    return load(
        name=f"fleetlm_attention_{digest}",
        sources=[str(path)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def git_source(rev: str) -> str:
    return subprocess.run(
        ["git", "show", f"{rev}:engine/csrc/paged_attention.cpp"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cases", default="decode,prefix,chunk")
    ap.add_argument(
        "--baseline-rev",
        action="append",
        default=[],
        help="also time the kernel as of this git revision (repeatable)",
    )
    ap.add_argument(
        "--baseline-src", action="append", default=[], help="also time this kernel source file"
    )
    ap.add_argument("--no-sdpa", action="store_true", help="skip the gather + SDPA reference")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    mod = paged_decode_kernel()
    if mod is None:
        raise SystemExit("the C++ kernel did not build (see the warning above)")
    variants = {"kernel": mod}
    for rev in args.baseline_rev:
        variants[f"rev:{rev}"] = build_variant(git_source(rev))
    for src in args.baseline_src:
        variants[f"src:{Path(src).name}"] = build_variant(Path(src).read_text())
    scale = HEAD_DIM**-0.5
    wanted = set(args.cases.split(","))
    print(
        f"threads {torch.get_num_threads()}, layers {args.layers}, repeats {args.repeats}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    results: dict[str, dict] = {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for case in cases(args.seed):
            if case.name not in wanted:
                continue
            layers, qsl, seq_lens = build(case, dtype, args.layers, args.seed + 1)
            fns = {name: kernel_fn(m, layers, qsl, seq_lens, scale) for name, m in variants.items()}
            if not args.no_sdpa:
                fns["sdpa"] = sdpa_fn(case, layers, qsl, seq_lens, scale)
            # Agreement with the float32 reference on layer 0 (bf16 rounding for bf16 inputs).
            want = sdpa_fn(
                case,
                [Layer(L.k.float(), L.v.float(), L.block_tables, L.q.float()) for L in layers[:1]],
                qsl,
                seq_lens,
                scale,
            )(0).reshape(len(layers[0].q), HEADS, HEAD_DIM)
            err = {
                n: float((f(0).reshape(want.shape).float() - want).abs().max())
                for n, f in fns.items()
            }
            for f in fns.values():  # warm-up
                for i in range(len(layers)):
                    f(i)
            times: dict[str, list[float]] = {n: [] for n in fns}
            for _ in range(args.repeats):
                for n, f in fns.items():
                    t0 = time.perf_counter()
                    for i in range(len(layers)):
                        f(i)
                    times[n].append((time.perf_counter() - t0) / len(layers) * 1e6)
            key = f"{case.name}_{dtype_name}"
            rows = int(qsl[-1])
            ctx = seq_lens.tolist()
            res = {
                "rows": rows,
                "sequences": len(ctx),
                "context": [min(ctx), max(ctx)],
                "us_per_call": {n: statistics.median(t) for n, t in times.items()},
                "us_per_call_min": {n: min(t) for n, t in times.items()},
                "max_abs_err_vs_fp32_sdpa": err,
            }
            med = res["us_per_call"]
            res["speedup_vs"] = {
                n: med[n] / med["kernel"] for n in med if n != "kernel" and med["kernel"] > 0
            }
            results[key] = res
            line = ", ".join(f"{n} {med[n]:.0f} (min {res['us_per_call_min'][n]:.0f})" for n in med)
            ratios = ", ".join(f"{r:.2f}x vs {n}" for n, r in res["speedup_vs"].items())
            print(
                f"{key:16s} rows {rows:4d} ctx {min(ctx)}-{max(ctx)}: us/call {line}; "
                f"kernel {ratios}; max err {max(err.values()):.1e}"
            )
    out = {
        "threads": torch.get_num_threads(),
        "layers": args.layers,
        "repeats": args.repeats,
        "baseline_rev": args.baseline_rev,
        "baseline_src": args.baseline_src,
        "load_average_end": os.getloadavg()[0],
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
