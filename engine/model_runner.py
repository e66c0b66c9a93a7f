"""Model runner: loads an HF causal LM, owns the paged KV cache, turns a SchedulerOutput into
tensors, runs the forward with paged attention, and returns the logits of the rows that sample."""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

from engine.config import EngineConfig
from engine.outputs import SchedulerOutput
from engine.paged_attention import (
    ATTN_NAME,
    AttentionMetadata,
    KVCache,
    PrefillChunk,
    paged_attention,
)
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
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, config=hf_config, dtype=self.dtype, attn_implementation=ATTN_NAME
        ).to(self.device)
        self.model.eval()
        split = None
        if tp_group is not None and tp_group.size > 1:
            split = plan_heads(hf_config, tp_group.size, tp_group.rank)
            shard_model(self.model, split, tp_group)
        if config.quantization in ("int8", "int8-w8a8"):
            from engine.quantization import quantize_int8

            self.model = quantize_int8(
                self.model, dynamic_activations=config.quantization == "int8-w8a8"
            )
        text_cfg = self.model.config.get_text_config()
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
        self.decode_kernel = None
        if self.device.type == "cpu" and self.dtype == torch.float32:
            from engine.cpu_kernels import paged_decode_kernel

            self.decode_kernel = paged_decode_kernel()
        logger.info(
            "loaded %s (%s, %s): %d KV blocks of %d tokens (%.1f MiB)",
            model_path,
            self.dtype,
            self.device,
            self.num_blocks,
            self.block_size,
            self.num_blocks * per_block / 2**20,
        )

    def prepare(self, out: SchedulerOutput, token_ids: list[list[int]]):
        """Flatten a step. ``token_ids[i]``: all known tokens of request i. Returns model inputs,
        attention metadata and the rows whose logits are needed (one per sampling request)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        decode_rows: list[int] = []
        decode_ctx: list[np.ndarray] = []
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
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
            if out.sample[i]:  # the last real token's row, plus one row per draft token
                k = len(out.spec_token_ids[i]) if out.spec_token_ids else 0
                sample_rows.extend(range(row - 1 - k, row))

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
        meta = AttentionMetadata(
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
        return input_ids, position_ids, meta, sample_rows

    @torch.inference_mode()
    def forward(self, out: SchedulerOutput, token_ids: list[list[int]]) -> torch.Tensor:
        """Run one step; returns float32 logits ``[num_sampling_requests, vocab]``."""
        input_ids, position_ids, meta, sample_rows = self.prepare(out, token_ids)
        keep = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        if not sample_rows:
            keep = torch.tensor([input_ids.shape[1] - 1], device=self.device)
        logits = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=keep,
            fleet_meta=meta,
        ).logits[0]
        if not sample_rows:
            return logits[:0].float()
        return logits.float()
