"""Model runner: loads the model, owns the paged KV cache and the step's input buffers, runs the
forward with paged attention, and returns the logits of the rows that sample (``forward``) or, with
the runner's sampler, a RunnerOutput (``execute_model``).

Two model paths (``EngineConfig.model_impl``):
- our own code (engine/models/) for the registered families (Llama, Mistral, Qwen2, Qwen3), the
  default where it applies: flat step, persistent input buffers filled in place, metadata built
  vectorized, paged attention that reads K/V in place through block tables;
- transformers' own modules for anything else, with paged attention plugged in through its
  attention interface (engine/paged_attention.py).

Decode-only steps (own path) run through static buffers, so a CUDA graph can be captured over
them: ``prepare_decode(out, token_ids) -> n`` fills rows ``[0, n)`` of the buffers,
``pad_decode(n, num_padded)`` fills rows ``[n, num_padded)`` with dummy requests (token 0 at
position 0, slot -1 which writes nowhere, sequence length 0 which attends to nothing), and
``run_decode_static(num_padded) -> hidden [num_padded, hidden_size]`` runs the decoder over rows
``[0, num_padded)`` reading only those buffers (no host sync inside; the metadata object for each
``num_padded`` is built once and cached, its tensors are views of the buffers). A graph runner
captures ``run_decode_static(bucket)`` per batch-size bucket and replays it; without one (CPU,
``enforce_eager``) it is an eager call. ``decode_hook``, when set, replaces that call:
``decode_hook(num_real) -> hidden [>= num_real, hidden_size]`` (it pads and replays).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

from engine.config import EngineConfig
from engine.cuda_graph import DecodeGraphRunner
from engine.models import build_model, unsupported_reason
from engine.models.attention import AttentionMetadata, FreshChunk, PagedAttention
from engine.models.layers import pack_linears
from engine.outputs import RunnerOutput, SchedulerOutput
from engine.paged_attention import ATTN_NAME, KVCache, PrefillChunk, paged_attention
from engine.paged_attention import AttentionMetadata as HFAttentionMetadata
from engine.sampler import Sampler
from engine.tensor_parallel import TPGroup, plan_heads, shard_model

logger = logging.getLogger(__name__)

AttentionInterface.register(ATTN_NAME, paged_attention)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


class _Buffer:
    """A persistent input buffer: host numpy array filled in place, and the device tensor the
    model reads (the same memory on CPU; a pinned host copy plus a device tensor on CUDA)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.np = self.host.numpy()
        self.dev = (
            self.host if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)
        )

    def sync(self, n: int) -> torch.Tensor:
        """Copy the first ``n`` rows to the device (no-op on CPU); returns those rows."""
        if self.dev is not self.host:
            self.dev[:n].copy_(self.host[:n], non_blocking=True)
        return self.dev[:n]


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_path: str,
        num_blocks: int | None = None,
        tp_group: TPGroup | None = None,
    ) -> None:
        """``tp_group``: this process is one tensor-parallel shard; it keeps its slice of the
        weights (engine/tensor_parallel.py) and a KV cache of its own KV heads only."""
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        hf_config = AutoConfig.from_pretrained(model_path)
        text_cfg = hf_config.get_text_config()
        split = None
        if tp_group is not None and tp_group.size > 1:
            split = plan_heads(hf_config, tp_group.size, tp_group.rank)
        reason = unsupported_reason(text_cfg, model_path)
        if config.model_impl == "fleetlm" and reason is not None:
            raise ValueError(f"model_impl 'fleetlm' cannot run {model_path}: {reason}")
        self.own = config.model_impl != "transformers" and reason is None
        if self.own:
            self.model = build_model(text_cfg, model_path, self.device, self.dtype, split, tp_group)
        else:
            if config.model_impl == "auto":
                logger.info("%s runs on transformers' modules: %s", model_path, reason)
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, config=hf_config, dtype=self.dtype, attn_implementation=ATTN_NAME
            ).to(self.device)
            self.model.eval()
            if split is not None:
                shard_model(self.model, split, tp_group)
        if config.quantization in ("int8", "int8-w8a8"):
            from engine.quantization import quantize_int8

            self.model = quantize_int8(
                self.model, dynamic_activations=config.quantization == "int8-w8a8"
            )
        # Own code on CPU: weights packed once for oneDNN (engine/models/layers.py PackedLinear)
        # where that is F.linear's own kernel, bit for bit (bfloat16; 1.3-1.6x F.linear at decode
        # sizes). FLEETLM_CPU_LINEAR=onednn packs float32 too (~2x MKL's sgemm at decode sizes
        # on this machine, but not MKL's bits: greedy output then equals generate()'s only as
        # far as no logit margin is that small); =aten packs nothing.
        self.packed_linears = 0
        cpu_linear = os.environ.get("FLEETLM_CPU_LINEAR", "auto")
        if self.own and self.device.type == "cpu" and cpu_linear != "aten":
            self.packed_linears = pack_linears(
                self.model, config.max_num_seqs, exact_only=cpu_linear != "onednn"
            )
        self.hf_config = text_cfg
        self.vocab_size = text_cfg.vocab_size
        self.num_layers = text_cfg.num_hidden_layers
        self.num_kv_heads = getattr(text_cfg, "num_key_value_heads", None) or (
            text_cfg.num_attention_heads
        )
        if split is not None:
            self.num_kv_heads = split.local_kv_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or (
            text_cfg.hidden_size // text_cfg.num_attention_heads
        )
        self.block_size = config.block_size
        per_block = KVCache.bytes_per_block(
            self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype
        )
        self.num_blocks = (
            num_blocks
            or config.num_kv_blocks
            or max(2, int(config.kv_cache_memory_gb * 2**30 // per_block))
        )
        self.kv_cache = KVCache(
            self.num_layers,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.device,
        )
        self.sampler = Sampler(self.device, config.seed)
        self.decode_hook: Callable[[int], torch.Tensor] | None = None
        self.decode_kernel = None
        if self.own:
            self.attn = PagedAttention(self.device, self.dtype, self.block_size)
            self.model.bind_kv_cache(self.attn, self.kv_cache.k, self.kv_cache.v)
            max_pos = getattr(text_cfg, "max_position_embeddings", None) or 2048
            self._alloc_buffers(
                max(config.max_num_batched_tokens, config.max_num_seqs),
                config.max_num_seqs,
                -(-max_pos // self.block_size) + 1,
            )
        elif self.device.type == "cpu" and self.dtype == torch.float32:
            from engine.cpu_kernels import paged_decode_kernel

            self.decode_kernel = paged_decode_kernel()
        self.graph_runner: DecodeGraphRunner | None = None
        single = tp_group is None or tp_group.size == 1  # graphs around NCCL calls: not here
        if self.own and self.device.type == "cuda" and single and not config.enforce_eager:
            gr = self.use_decode_graphs(True)
            try:
                seconds = gr.capture()
                logger.info("decode CUDA graphs for batch sizes %s: %.1f s", gr.buckets, seconds)
            except Exception as e:  # a capture fault costs speed, not service: decode eagerly
                logger.warning("decode CUDA graph capture failed, decoding eagerly: %r", e)
                gr.capture_error = repr(e)
                gr.use_graphs = False
                gr.graphs.clear()
                self.decode_hook = None
        logger.info(
            "loaded %s (%s, %s, %s): %d KV blocks of %d tokens (%.1f MiB)",
            model_path,
            "own model code" if self.own else "transformers modules",
            self.dtype,
            self.device,
            self.num_blocks,
            self.block_size,
            self.num_blocks * per_block / 2**20,
        )

    # -- persistent buffers (own path) ----------------------------------------------------------
    def _alloc_buffers(self, max_tokens: int, max_seqs: int, max_blocks: int) -> None:
        dev = self.device
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        self.input_ids = _Buffer((max_tokens,), torch.long, dev)
        self.positions = _Buffer((max_tokens,), torch.long, dev)
        self.slot_mapping = _Buffer((max_tokens,), torch.long, dev)
        self.block_tables = _Buffer((max_seqs, max_blocks), torch.int32, dev)
        self.seq_lens = _Buffer((max_seqs,), torch.int32, dev)
        self.query_start_loc = _Buffer((max_seqs + 1,), torch.int32, dev)
        # Decode: request i owns row i, so query_start_loc is arange (fixed).
        self.decode_qsl = torch.arange(max_seqs + 1, dtype=torch.int32, device=dev)
        self._decode_meta: dict[int, AttentionMetadata] = {}

    def _ensure_capacity(self, num_tokens: int, num_seqs: int, num_blocks: int) -> None:
        """Grow the buffers (rare: a draft model's catch-up chunk, a long block table)."""
        if num_tokens > self.max_tokens or num_seqs > self.max_seqs or num_blocks > self.max_blocks:
            self._alloc_buffers(
                max(num_tokens, self.max_tokens),
                max(num_seqs, self.max_seqs),
                max(num_blocks, self.max_blocks),
            )

    def _fill_common(self, out: SchedulerOutput, token_ids) -> tuple[int, int, np.ndarray]:
        """Fill ids, positions, slots, block tables and sequence lengths of a step in place.
        Returns (num_tokens, num_requests, cumulative token counts [N + 1])."""
        n = np.asarray(out.num_scheduled_tokens, dtype=np.int64)
        start = np.asarray(out.num_computed_tokens, dtype=np.int64)
        num_req = len(n)
        cu = np.zeros(num_req + 1, dtype=np.int64)
        np.cumsum(n, out=cu[1:])
        total = int(cu[-1])
        self._ensure_capacity(total, num_req, max(len(t) for t in out.block_tables))
        bs = self.block_size
        self.input_ids.np[:total] = list(
            itertools.chain.from_iterable(
                token_ids[i][s : s + k]
                for i, (s, k) in enumerate(zip(start.tolist(), n.tolist(), strict=True))
            )
        )
        bt = self.block_tables.np
        for i, table in enumerate(out.block_tables):
            bt[i, : len(table)] = table
        owner = np.repeat(np.arange(num_req), n)  # request of each flat row
        pos = np.arange(total) - np.repeat(cu[:-1] - start, n)
        self.positions.np[:total] = pos
        self.slot_mapping.np[:total] = bt[owner, pos // bs].astype(np.int64) * bs + pos % bs
        self.seq_lens.np[:num_req] = start + n
        self.model.rotary.ensure(int((start + n).max()))
        return total, num_req, cu

    def prepare_decode(self, out: SchedulerOutput, token_ids) -> int:
        """Fill rows [0, n) of the static buffers for a decode-only step; returns n."""
        _, num_req, _ = self._fill_common(out, token_ids)
        return num_req

    def pad_decode(self, num_real: int, num_padded: int) -> None:
        """Rows [num_real, num_padded) become dummy requests that write nowhere."""
        assert num_padded <= min(self.max_seqs, self.max_tokens), num_padded
        if num_padded > num_real:
            self.input_ids.np[num_real:num_padded] = 0
            self.positions.np[num_real:num_padded] = 0
            self.slot_mapping.np[num_real:num_padded] = -1
            self.seq_lens.np[num_real:num_padded] = 0

    def sync_decode(self, num_padded: int) -> None:
        """Host buffers -> device buffers for rows [0, num_padded) (no-op on CPU)."""
        for b in (self.input_ids, self.positions, self.slot_mapping, self.seq_lens):
            b.sync(num_padded)
        self.block_tables.sync(num_padded)

    def use_decode_graphs(self, use_graphs: bool) -> DecodeGraphRunner:
        """Decode-only steps go through engine/cuda_graph.py from now on: padded to their
        batch-size bucket, then a replayed CUDA graph (``use_graphs`` on CUDA) or an eager
        ``run_decode_static`` of the bucket. Call ``capture()`` on the result before serving."""
        gr = DecodeGraphRunner(
            self.run_decode_static,
            self._pad_and_sync_decode,
            self.max_seqs,
            self.device,
            use_graphs,
            # A graph reads the addresses it was captured with: buffers or a rotary table
            # reallocated since then mean recapturing.
            buffers_key=lambda: (self.input_ids.dev.data_ptr(), self.model.rotary.cos.data_ptr()),
        )
        self.graph_runner = self.decode_hook = gr
        return gr

    def _pad_and_sync_decode(self, num_real: int, num_padded: int) -> None:
        self.pad_decode(num_real, num_padded)
        self.sync_decode(num_padded)

    def decode_metadata(self, num_padded: int) -> AttentionMetadata:
        meta = self._decode_meta.get(num_padded)
        if meta is None:
            meta = AttentionMetadata(
                slot_mapping=self.slot_mapping.dev[:num_padded],
                block_size=self.block_size,
                block_tables=self.block_tables.dev[:num_padded],
                query_start_loc=self.decode_qsl[: num_padded + 1],
                seq_lens=self.seq_lens.dev[:num_padded],
                max_query_len=1,
            )
            self._decode_meta[num_padded] = meta
        return meta

    def run_decode_static(self, num_padded: int) -> torch.Tensor:
        """The decoder over static rows [0, num_padded) -> hidden [num_padded, hidden_size]."""
        return self.model(
            self.input_ids.dev[:num_padded],
            self.positions.dev[:num_padded],
            self.decode_metadata(num_padded),
        )

    def _prepare_own(self, out: SchedulerOutput, token_ids):
        total, num_req, cu = self._fill_common(out, token_ids)
        start = out.num_computed_tokens
        for b in (self.input_ids, self.positions, self.slot_mapping):
            b.sync(total)
        self.block_tables.sync(num_req)
        seq_lens = self.seq_lens.sync(num_req)
        fresh = [i for i in range(num_req) if start[i] == 0]
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping.dev[:total], block_size=self.block_size
        )
        meta.fresh = [FreshChunk(int(cu[i]), int(cu[i + 1] - cu[i])) for i in fresh]
        paged = [i for i in range(num_req) if start[i] > 0]
        if paged:
            meta.max_query_len = max(out.num_scheduled_tokens[i] for i in paged)
            qsl = self.query_start_loc
            if not fresh:
                qsl.np[: num_req + 1] = cu
                meta.block_tables = self.block_tables.dev[:num_req]
                meta.seq_lens = seq_lens
                meta.query_start_loc = qsl.sync(num_req + 1)
            else:
                lens = cu[1:] - cu[:-1]
                sub = np.asarray(paged)
                qsl.np[0] = 0
                np.cumsum(lens[sub], out=qsl.np[1 : len(paged) + 1])
                idx = torch.from_numpy(sub).to(self.device)
                meta.block_tables = self.block_tables.dev[:num_req].index_select(0, idx)
                meta.seq_lens = seq_lens.index_select(0, idx)
                meta.query_start_loc = qsl.sync(len(paged) + 1)
                rows = np.concatenate([np.arange(cu[i], cu[i + 1]) for i in paged])
                if rows[-1] == len(rows) - 1:  # the paged requests lead the step
                    meta.paged_rows = slice(0, len(rows))
                else:
                    meta.paged_rows = torch.from_numpy(rows).to(self.device)
        return self.input_ids.dev[:total], self.positions.dev[:total], meta

    # -- transformers-module path ---------------------------------------------------------------
    def prepare(self, out: SchedulerOutput, token_ids: list[list[int]]):
        """transformers-module path: flatten a step. ``token_ids[i]``: all known tokens of
        request i. Returns model inputs, attention metadata and the rows whose logits are
        needed."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        decode_rows: list[int] = []
        decode_ctx: list[np.ndarray] = []
        prefills: list[PrefillChunk] = []
        row = 0
        for i, (n, start, table) in enumerate(
            zip(out.num_scheduled_tokens, out.num_computed_tokens, out.block_tables, strict=True)
        ):
            ids.extend(token_ids[i][start : start + n])
            pos = np.arange(start, start + n)
            tbl = np.asarray(table, dtype=np.int64)
            ctx = start + n
            all_slots = tbl[np.arange(ctx) // bs] * bs + np.arange(ctx) % bs
            positions.append(pos)
            slots.append(all_slots[start:ctx])
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_ctx.append(all_slots)
            elif start == 0:
                prefills.append(PrefillChunk(row, n, 0, None, None))
            else:
                q_pos = torch.arange(start, ctx).unsqueeze(1)
                mask = (torch.arange(ctx).unsqueeze(0) <= q_pos).to(self.device)  # [n, ctx]
                prefills.append(
                    PrefillChunk(row, n, start, torch.from_numpy(all_slots).to(self.device), mask)
                )
            row += n

        dev = self.device
        d_rows = d_slots = d_mask = d_lens = None
        if decode_rows:
            lmax = max(len(c) for c in decode_ctx)
            pad = np.zeros((len(decode_ctx), lmax), dtype=np.int64)
            lens = np.array([len(c) for c in decode_ctx], dtype=np.int64)
            for j, c in enumerate(decode_ctx):
                pad[j, : len(c)] = c
            d_slots = torch.from_numpy(pad).to(dev)
            d_mask = (
                (torch.arange(lmax).unsqueeze(0) < torch.from_numpy(lens).unsqueeze(1))
                .view(len(decode_ctx), 1, 1, lmax)
                .to(dev)
            )
            d_rows = torch.tensor(decode_rows, dtype=torch.long, device=dev)
            d_lens = torch.from_numpy(lens).to(dev)
        meta = HFAttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            decode_rows=d_rows,
            decode_slots=d_slots,
            decode_mask=d_mask,
            decode_lens=d_lens,
            prefills=prefills,
            kv_cache=self.kv_cache,
            decode_kernel=self.decode_kernel,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev).unsqueeze(0)
        position_ids = torch.from_numpy(np.concatenate(positions)).to(dev).unsqueeze(0)
        return input_ids, position_ids, meta, sample_rows(out)

    # -- the step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self, out: SchedulerOutput, token_ids: list[list[int]], compute_logits: bool = True
    ) -> torch.Tensor | None:
        """Run one step; returns float32 logits ``[num_sample_rows, vocab]`` (rows: per sampling
        request, its last real token then one per draft token), or None without
        ``compute_logits`` (a tensor-parallel worker: the LM head runs on shard 0)."""
        if not self.own:
            return self._forward_hf(out, token_ids, compute_logits)
        is_decode = all(
            n == 1 and c > 0 and s
            for n, c, s in zip(
                out.num_scheduled_tokens, out.num_computed_tokens, out.sample, strict=True
            )
        )
        if is_decode:
            num = self.prepare_decode(out, token_ids)
            if self.decode_hook is not None:
                hidden = self.decode_hook(num)[:num]
            else:
                self.sync_decode(num)
                hidden = self.run_decode_static(num)
            rows = None
        else:
            input_ids, positions, meta = self._prepare_own(out, token_ids)
            hidden = self.model(input_ids, positions, meta)
            rows = sample_rows(out)
        if not compute_logits:
            return None
        if rows is not None:
            if not rows:
                return hidden.new_zeros((0, self.vocab_size), dtype=torch.float32)
            if len(rows) != hidden.shape[0]:
                hidden = hidden[torch.tensor(rows, dtype=torch.long, device=self.device)]
        return self.model.compute_logits(hidden).float()

    def _forward_hf(self, out, token_ids, compute_logits: bool):
        input_ids, position_ids, meta, rows = self.prepare(out, token_ids)
        if not compute_logits:
            self.model.get_decoder()(
                input_ids=input_ids, position_ids=position_ids, use_cache=False, fleet_meta=meta
            )
            return None
        keep = torch.tensor(rows or [input_ids.shape[1] - 1], dtype=torch.long, device=self.device)
        logits = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=keep,
            fleet_meta=meta,
        ).logits[0]
        return logits[: len(rows)].float()

    def execute_model(self, out: SchedulerOutput, reqs) -> RunnerOutput:
        """One step with sampling: the forward, then the sampler (and speculative verification)
        over the sampling rows."""
        token_ids = [r.token_ids + d for r, d in zip(reqs, out.spec_token_ids, strict=True)]
        logits = self.forward(out, token_ids)
        return self.sampler.sample_step(logits, out, reqs)


def sample_rows(out: SchedulerOutput) -> list[int]:
    """Flat rows whose logits are needed: per sampling request its last real token's row, then one
    row per draft token."""
    rows: list[int] = []
    end = 0
    for i, n in enumerate(out.num_scheduled_tokens):
        end += n
        if out.sample[i]:
            k = len(out.spec_token_ids[i]) if out.spec_token_ids else 0
            rows.extend(range(end - 1 - k, end))
    return rows
