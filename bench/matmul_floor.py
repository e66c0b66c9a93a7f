"""The floor under a decode step's matmuls: for the model's own decode-step linears (every layer's
QKV, o, gate-up and down projections and the LM head, in step order, M = batch rows), time

  step      F.linear over every weight in step order, as the step runs it (the weights do not fit
            in the last-level cache, so each step streams them from DRAM);
  cached    each shape's F.linear repeated on one weight (that weight stays in cache);
  stream    a pure read of the same weights (``weight.sum()``) and a copy (read + write);
  peak      F.linear at a large M (``--peak-m``) on the same weights: the GEMM rate when compute
            dominates, so ``flops(M) / peak`` is the step's compute floor;
  mkl-packed, onednn-packed
            the same step-order pass through MKL's packed sgemm
            (``torch.ops.mkl._mkl_linear`` over ``_mkl_reorder_linear_weight``) and oneDNN's
            (``torch.ops.mkldnn._linear_pointwise`` over ``_reorder_linear_weight``), each
            checked bit for bit against F.linear;
  compiled  (``--compile``) one decoder layer's MLP block (residual add, RMSNorm, gate-up, SiLU *
            up, down) under torch.compile (inductor, CPU) against the same block eager.

    python bench/matmul_floor.py [--model demo] [--dtype float32] [--batch 32] [--repeats 30]
        [--compile] [--json F]

Times are medians over ``--repeats`` passes (ms per step, i.e. per pass over all weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from engine.models.demo import resolve_model


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def step_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The linears one decode step runs, in order: per layer QKV, o, gate-up, down; LM head."""
    out = []
    for i, layer in enumerate(model.layers):
        a, m = layer.self_attn, layer.mlp
        for name, lin in (
            ("qkv", a.qkv_proj),
            ("o", a.o_proj),
            ("gate_up", m.gate_up_proj),
            ("down", m.down_proj),
        ):
            out.append((f"{i}.{name}", lin.weight.detach()))
    out.append(("lm_head", model.lm_head.weight.detach()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--peak-m", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="time torch.compile of an MLP block")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from engine.config import EngineConfig
    from engine.model_runner import ModelRunner

    dtype = getattr(torch, args.dtype)
    os.environ["FLEETLM_CPU_LINEAR"] = "aten"  # plain nn.Linear weights; packing is timed here
    runner = ModelRunner(
        EngineConfig(model=resolve_model(args.model), dtype=args.dtype), resolve_model(args.model)
    )
    if not runner.own:
        raise SystemExit("needs a model on the own model code (engine/models/)")
    model = runner.model
    ws = step_weights(model)
    m = args.batch
    g = torch.Generator().manual_seed(0)
    xs = {w.shape[1]: torch.randn(m, w.shape[1], generator=g).to(dtype) for _, w in ws}
    nbytes = sum(w.numel() * w.element_size() for _, w in ws)
    flops = sum(2 * m * w.shape[0] * w.shape[1] for _, w in ws)
    res: dict[str, object] = {
        "model": args.model,
        "dtype": args.dtype,
        "batch": m,
        "threads": torch.get_num_threads(),
        "weight_mb": nbytes / 1e6,
        "gflop_per_step": flops / 1e9,
    }

    with torch.inference_mode():
        # (a) the step's own order: every weight once, streamed from memory.
        def step():
            for _, w in ws:
                F.linear(xs[w.shape[1]], w)

        res["step_ms"] = _median_ms(step, args.repeats)
        per_shape: dict[str, dict[str, float]] = {}
        peak_reps = max(5, args.repeats // 3)
        for kind in ("qkv", "o", "gate_up", "down", "lm_head"):
            sel = [w for n, w in ws if n.split(".")[-1] == kind]
            w0 = sel[0]

            def one_kind(sel=sel):
                for w in sel:
                    F.linear(xs[w.shape[1]], w)

            def cached(w0=w0, sel=sel):
                for _ in sel:
                    F.linear(xs[w0.shape[1]], w0)

            big = torch.randn(args.peak_m, w0.shape[1], generator=g).to(dtype)
            peak_ms = _median_ms(lambda w0=w0, big=big: F.linear(big, w0), peak_reps)
            f = 2 * w0.shape[0] * w0.shape[1]
            per_shape[kind] = {
                "shape": f"[{m}, {w0.shape[1]}] x [{w0.shape[1]}, {w0.shape[0]}]",
                "count": len(sel),
                "streamed_ms": _median_ms(one_kind, args.repeats),
                "cached_ms": _median_ms(cached, args.repeats),
                "read_ms": _median_ms(lambda sel=sel: [w.sum() for w in sel], args.repeats),
                "peak_gflops": f * args.peak_m / peak_ms / 1e6,
                # The same flops at the large-M rate.
                "compute_floor_ms": len(sel) * peak_ms * m / args.peak_m,
            }
        res["per_shape"] = per_shape
        res["cached_ms"] = sum(v["cached_ms"] for v in per_shape.values())
        res["read_ms"] = _median_ms(lambda: [w.sum() for _, w in ws], args.repeats)
        dst = {n: torch.empty_like(w) for n, w in ws}
        res["copy_ms"] = _median_ms(lambda: [dst[n].copy_(w) for n, w in ws], args.repeats)
        res["read_gbs"] = nbytes / res["read_ms"] / 1e6
        res["compute_floor_ms"] = sum(v["compute_floor_ms"] for v in per_shape.values())

        # Packed weights: MKL's packed sgemm (fp32 only) and oneDNN's blocked layout.
        ref = [F.linear(xs[w.shape[1]], w) for _, w in ws]
        if dtype == torch.float32:
            mkl = [(w, torch.ops.mkl._mkl_reorder_linear_weight(w, m)) for _, w in ws]
            out = [torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, None, m) for w, p in mkl]
            res["mkl_packed_exact"] = all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
            res["mkl_packed_ms"] = _median_ms(
                lambda: [torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, None, m) for w, p in mkl],
                args.repeats,
            )
        dnn = [(w, torch.ops.mkldnn._reorder_linear_weight(w, m)) for _, w in ws]
        out = [
            torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
            for w, p in dnn
        ]
        res["onednn_packed_exact"] = all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
        res["onednn_packed_max_abs_diff"] = max(
            (a - b).abs().max().item() for a, b in zip(out, ref, strict=True)
        )
        res["onednn_packed_ms"] = _median_ms(
            lambda: [
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                for w, p in dnn
            ],
            args.repeats,
        )
        res["step_again_ms"] = _median_ms(step, args.repeats)  # drift check

    if args.compile:
        res["compiled"] = _compiled_mlp(model, m, args.repeats)

    print(
        f"decode-step matmuls, {args.model} {args.dtype}, M = {m}, "
        f"{res['threads']} threads: {res['weight_mb']:.1f} MB of weights, "
        f"{res['gflop_per_step']:.2f} GFLOP per step"
    )
    print(f"  step order, F.linear (streamed)    {res['step_ms']:7.2f} ms "
          f"(again at the end: {res['step_again_ms']:.2f})")  # fmt: skip
    print(f"  same shapes, weight in cache       {res['cached_ms']:7.2f} ms")
    print(f"  compute floor at large-M GEMM rate {res['compute_floor_ms']:7.2f} ms")
    print(f"  read the weights (sum)             {res['read_ms']:7.2f} ms "
          f"({res['read_gbs']:.1f} GB/s)")  # fmt: skip
    print(f"  copy the weights                   {res['copy_ms']:7.2f} ms")
    if "mkl_packed_ms" in res:
        print(f"  MKL packed sgemm                   {res['mkl_packed_ms']:7.2f} ms "
              f"(bit-exact vs F.linear: {res['mkl_packed_exact']})")  # fmt: skip
    print(f"  oneDNN packed linear               {res['onednn_packed_ms']:7.2f} ms "
          f"(bit-exact: {res['onednn_packed_exact']}, max |diff| "
          f"{res['onednn_packed_max_abs_diff']:.2e})")  # fmt: skip
    print("  per shape (ms per step for all layers of that shape):")
    print(f"    {'shape':32s} {'n':>2s} {'streamed':>9s} {'cached':>7s} {'read':>6s} "
          f"{'floor':>6s} {'peak GFLOP/s':>12s}")  # fmt: skip
    for k, v in per_shape.items():
        print(f"    {k + ' ' + v['shape']:32s} {v['count']:2d} {v['streamed_ms']:9.2f} "
              f"{v['cached_ms']:7.2f} {v['read_ms']:6.2f} {v['compute_floor_ms']:6.2f} "
              f"{v['peak_gflops']:12.1f}")  # fmt: skip
    if "compiled" in res:
        c = res["compiled"]
        print(f"  MLP block (add + RMSNorm + gate-up + SiLU*up + down), one layer: eager "
              f"{c['eager_ms']:.3f} ms, torch.compile {c['compiled_ms']:.3f} ms "
              f"(compile {c['compile_s']:.1f} s, bit-exact: {c['exact']}, "
              f"max |diff| {c['max_abs_diff']:.2e})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def _compiled_mlp(model, m: int, repeats: int) -> dict[str, float | bool]:
    """One layer's post-attention half under inductor vs eager (decode shape)."""
    layer = model.layers[0]
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    hidden = norm.weight.shape[0]
    g = torch.Generator().manual_seed(1)
    dt = norm.weight.dtype
    h0 = torch.randn(m, hidden, generator=g).to(dt)
    r0 = torch.randn(m, hidden, generator=g).to(dt)

    def block(h, r):
        r = r + h
        x = F.rms_norm(r, (hidden,), norm.weight, norm.eps)
        gu = F.linear(x, mlp.gate_up_proj.weight)
        gate, up = gu.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, mlp.down_proj.weight), r

    with torch.inference_mode():
        eager_out = block(h0, r0)[0]
        eager_ms = _median_ms(lambda: block(h0, r0), repeats)
        t = time.perf_counter()
        cblock = torch.compile(block, dynamic=False)
        comp_out = cblock(h0, r0)[0]
        compile_s = time.perf_counter() - t
        compiled_ms = _median_ms(lambda: cblock(h0, r0), repeats)
    return {
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "compile_s": compile_s,
        "exact": bool(torch.equal(eager_out, comp_out)),
        "max_abs_diff": (eager_out - comp_out).abs().max().item(),
    }


if __name__ == "__main__":
    main()
