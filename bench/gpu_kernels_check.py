"""Device checks of the paged-attention kernels and the decode graph runner (bench/gpu_check.py's
``kernels`` and ``graphs`` parts).

kernels: engine.kernels on the device (Triton on CUDA) against the torch reference
(engine/kernels/reference.py, itself checked against SDPA in CI) on a Qwen2.5-0.5B-like head
layout (14 query heads, 2 KV heads, head dim 64, 16-token blocks): store_kv with padding slots,
decode over ragged contexts with a padding row, varlen prefill over cached context; float32 and
bfloat16; plus the decode kernel's time beside the reference's (information).

graphs: one attention layer over the paged cache, run through engine/cuda_graph.py's
DecodeGraphRunner with graphs (captured per bucket, replayed) and eagerly, for several batch
sizes: the replayed real rows must equal the eager padded run's (bit for bit reported; 1e-5
asserted) and the unpadded run's within float32 rounding, and the padding rows must write nothing
to the cache.
"""

from __future__ import annotations

import time

import torch

from engine import kernels
from engine.cuda_graph import DecodeGraphRunner
from engine.kernels import reference

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 14, 2, 64, 16
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tables(lens: list[int], max_blocks: int, num_blocks: int, g: torch.Generator):
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    table = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        need = -(-n // BLOCK)
        table[i, :need] = perm[used : used + need]
        used += need
    return table


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def kernel_checks(device: torch.device) -> dict:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        num_blocks = 1200
        shape = (num_blocks * BLOCK, KV_HEADS, HEAD_DIM)
        k_cache = torch.randn(shape, generator=g).to(device, dtype)
        v_cache = torch.randn(shape, generator=g).to(device, dtype)
        name = str(dtype).removeprefix("torch.")

        # store_kv: 40 rows, every fourth a padding slot.
        slots = torch.randperm(num_blocks * BLOCK, generator=g)[:40]
        slots[::4] = -1
        k_new = torch.randn(40, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
        v_new = torch.randn(40, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
        kc, vc = k_cache.clone(), v_cache.clone()
        kr, vr = k_cache.clone(), v_cache.clone()
        kernels.store_kv(k_new, v_new, kc, vc, slots.to(device))
        reference.store_kv(k_new, v_new, kr, vr, slots.to(device))
        rows.append(
            {
                "kernel": "store_kv",
                "dtype": name,
                "ok": bool(torch.equal(kc, kr) and torch.equal(vc, vr)),
            }
        )

        # decode: batch 32, contexts 1..1000, one padding row (0).
        lens = torch.randint(1, 1000, (32,), generator=g)
        lens[5] = 0
        max_blocks = 1000 // BLOCK + 2
        table = _tables(lens.tolist(), max_blocks, num_blocks, g).to(device)
        ctx = lens.to(torch.int32).to(device)
        q = torch.randn(32, HEADS, HEAD_DIM, generator=g).to(device, dtype)
        scale = HEAD_DIM**-0.5
        got = kernels.paged_decode(q, k_cache, v_cache, table, ctx, BLOCK, scale)
        want = reference.paged_decode(q, k_cache, v_cache, table, ctx, BLOCK, scale)
        err = _max_err(got, want)
        decode_args = (q, k_cache, v_cache, table, ctx, BLOCK, scale)
        timing = _time_pair(device, kernels.paged_decode, reference.paged_decode, decode_args)
        rows.append(
            {
                "kernel": "paged_decode",
                "dtype": name,
                "batch": 32,
                "max_err": err,
                "padding_row_zero": bool((got[5] == 0).all()),
                "ok": err <= TOL[dtype] * 10 and bool((got[5] == 0).all()),
                "backend": kernels.backend_name(device),
                **timing,
            }
        )

        # prefill over cached context: (new tokens, sequence length) per sequence.
        q_lens = [128, 1, 37, 300, 64]
        seq_lens = [128, 500, 37, 700, 97]
        table = _tables(seq_lens, 700 // BLOCK + 2, num_blocks, g).to(device)
        qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, generator=g).to(device, dtype)
        sl = torch.tensor(seq_lens, dtype=torch.int32).to(device)
        args = (q, k_cache, v_cache, table, qsl.to(device), sl, BLOCK, scale)
        got = kernels.paged_prefill(*args, max_query_len=max(q_lens))
        want = reference.paged_prefill(*args)
        err = _max_err(got, want)
        rows.append(
            {
                "kernel": "paged_prefill",
                "dtype": name,
                "tokens": sum(q_lens),
                "max_err": err,
                "ok": err <= TOL[dtype] * 10,
                "backend": kernels.backend_name(device),
            }
        )
        # The varlen entry's general path must agree with its decode route on decode rows.
        dq = torch.randn(8, HEADS, HEAD_DIM, generator=g).to(device, dtype)
        dl = torch.tensor([1, 15, 16, 17, 0, 300, 2, 650], dtype=torch.int32).to(device)
        dt = _tables(dl.tolist(), 700 // BLOCK + 2, num_blocks, g).to(device)
        dqsl = torch.arange(9, dtype=torch.int32, device=device)
        a = kernels.paged_attention(dq, k_cache, v_cache, dt, dqsl, dl, BLOCK, scale, 1)
        b = kernels.paged_attention(dq, k_cache, v_cache, dt, dqsl, dl, BLOCK, scale, 2)
        err = _max_err(a, b)
        rows.append(
            {
                "kernel": "paged_attention decode route vs prefill kernel",
                "dtype": name,
                "max_err": err,
                "ok": err <= TOL[dtype] * 10,
            }
        )
    for r in rows:
        print(
            f"  kernel {r['kernel']:48s} {r['dtype']:8s} "
            + (f"max err {r['max_err']:.2e} " if "max_err" in r else "")
            + (
                f"{r['kernel_us']:.0f} us vs reference {r['reference_us']:.0f} us "
                if "kernel_us" in r
                else ""
            )
            + ("ok" if r["ok"] else "<-- FAIL"),
            flush=True,
        )
    return {"all_ok": all(r["ok"] for r in rows), "rows": rows}


def _time_pair(device: torch.device, fn, ref, args: tuple, iters: int = 20) -> dict:
    """Mean microseconds per call of fn(*args) and ref(*args) (after a warm-up call each)."""
    out = {}
    for key, f in (("kernel_us", fn), ("reference_us", ref)):
        f(*args)
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            f(*args)
        _sync(device)
        out[key] = (time.perf_counter() - t) / iters * 1e6
    return out


class AttentionLayer:
    """Embed, store K/V through the slots, paged decode attention, project: the decode step's
    attention work over static buffers (token ids, positions, slots, block tables, lengths)."""

    def __init__(self, max_rows: int, max_blocks: int, num_slots: int, device, dtype):
        g = torch.Generator().manual_seed(1)
        width = HEADS * HEAD_DIM
        kvw = KV_HEADS * HEAD_DIM

        def rnd(*shape, s=1.0):
            return (torch.randn(shape, generator=g) * s).to(device, dtype)

        self.emb, self.pos = rnd(1000, width), rnd(4096, width)
        self.wk, self.wv = rnd(width, kvw, s=width**-0.5), rnd(width, kvw, s=width**-0.5)
        self.out = rnd(width, 1000, s=width**-0.5)
        self.k_cache = rnd(num_slots, KV_HEADS, HEAD_DIM)
        self.v_cache = rnd(num_slots, KV_HEADS, HEAD_DIM)
        z = dict(device=device)
        self.input_ids = torch.zeros(max_rows, dtype=torch.long, **z)
        self.positions = torch.zeros(max_rows, dtype=torch.long, **z)
        self.slot_mapping = torch.zeros(max_rows, dtype=torch.long, **z)
        self.seq_lens = torch.zeros(max_rows, dtype=torch.int32, **z)
        self.block_tables = torch.zeros(max_rows, max_blocks, dtype=torch.int32, **z)
        self.qsl = torch.arange(max_rows + 1, dtype=torch.int32, **z)

    def load(self, lens: list[int], g: torch.Generator) -> int:
        n, w = len(lens), self.block_tables.shape[1]
        perm = torch.randperm(n * w, generator=g).to(torch.int32) + 1  # block 0 unused
        table = torch.zeros(n, w, dtype=torch.int32)
        slots = torch.zeros(n, dtype=torch.long)
        for i, c in enumerate(lens):
            used = -(-c // BLOCK)
            table[i, :used] = perm[i * w : i * w + used]
            slots[i] = int(table[i, (c - 1) // BLOCK]) * BLOCK + (c - 1) % BLOCK
        dev = self.input_ids.device
        self.block_tables[:n] = table.to(dev)
        self.slot_mapping[:n] = slots.to(dev)
        self.input_ids[:n] = torch.randint(0, 1000, (n,), generator=g).to(dev)
        self.positions[:n] = torch.tensor(lens, device=dev) - 1
        self.seq_lens[:n] = torch.tensor(lens, dtype=torch.int32, device=dev)
        return n

    def fill(self, num_real: int, num_padded: int) -> None:
        rows = slice(num_real, num_padded)
        self.input_ids[rows] = 0
        self.positions[rows] = 0
        self.slot_mapping[rows] = -1
        self.seq_lens[rows] = 0

    def forward(self, b: int) -> torch.Tensor:
        x = self.emb[self.input_ids[:b]] + self.pos[self.positions[:b]]
        k = (x @ self.wk).view(b, KV_HEADS, HEAD_DIM)
        v = (x @ self.wv).view(b, KV_HEADS, HEAD_DIM)
        kernels.store_kv(k, v, self.k_cache, self.v_cache, self.slot_mapping[:b])
        o = kernels.paged_attention(
            x.view(b, HEADS, HEAD_DIM),
            self.k_cache,
            self.v_cache,
            self.block_tables[:b],
            self.qsl[: b + 1],
            self.seq_lens[:b],
            BLOCK,
            HEAD_DIM**-0.5,
            max_query_len=1,
        )
        return o.reshape(b, -1) @ self.out


def graph_toy_check(device: torch.device, max_num_seqs: int = 64) -> dict:
    """Replay == eager (same padded bucket, bitwise) and ~= unpadded, per batch size, float32."""
    dtype = torch.float32
    max_blocks, num_slots = 40, (max_num_seqs * 40 + 1) * BLOCK
    layer = AttentionLayer(max_num_seqs, max_blocks, num_slots, device, dtype)
    graphed = DecodeGraphRunner(layer.forward, layer.fill, max_num_seqs, device, use_graphs=True)
    eager = DecodeGraphRunner(layer.forward, layer.fill, max_num_seqs, device, use_graphs=False)
    capture_s = graphed.capture()
    rows = []
    for n in sorted({b for b in (1, 3, 8, 13, 32, 50) if b < max_num_seqs} | {max_num_seqs}):
        g = torch.Generator().manual_seed(n)
        lens = torch.randint(1, max_blocks * BLOCK - 1, (n,), generator=g).tolist()
        k0, v0 = layer.k_cache.clone(), layer.v_cache.clone()
        layer.load(lens, torch.Generator().manual_seed(1000 + n))
        want = eager(n)[:n].clone()
        k_eager = layer.k_cache.clone()
        unpadded = layer.forward(n).clone()
        layer.k_cache.copy_(k0)
        layer.v_cache.copy_(v0)
        layer.load(lens, torch.Generator().manual_seed(1000 + n))  # the same step again
        got = graphed(n)[:n].clone()
        _sync(device)
        changed = (layer.k_cache != k0).flatten(1).any(1).nonzero().flatten()
        real_slots = torch.sort(layer.slot_mapping[:n]).values
        row = {
            "batch": n,
            "replay_equals_eager_padded": bool(torch.equal(got, want)),  # information
            "max_err_vs_eager_padded": _max_err(got, want),
            "max_err_vs_unpadded": _max_err(got, unpadded),
            "cache_equals_eager": bool(torch.equal(layer.k_cache, k_eager)),
            "padding_wrote_nothing": bool(torch.equal(changed, real_slots)),
        }
        row["ok"] = (
            row["max_err_vs_eager_padded"] <= 1e-5  # bitwise expected; cuBLAS may differ
            and row["max_err_vs_unpadded"] <= 1e-4
            and row["cache_equals_eager"]
            and row["padding_wrote_nothing"]
        )
        rows.append(row)
        print(
            f"  graph toy batch {n:3d}: replay == eager {row['replay_equals_eager_padded']}, "
            f"vs unpadded {row['max_err_vs_unpadded']:.1e}, padding wrote nothing "
            f"{row['padding_wrote_nothing']}" + ("" if row["ok"] else "  <-- FAIL"),
            flush=True,
        )
    return {
        "all_ok": all(r["ok"] for r in rows),
        "graphs_used": graphed.use_graphs,
        "captured": graphed.num_captures,
        "replays": graphed.num_replays,
        "capture_s": capture_s,
        "rows": rows,
    }
