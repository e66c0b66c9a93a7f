"""Paged attention plugged into transformers' attention interface (no copy of model code).

The runner flattens a step's tokens into one row ``[1, T]`` (every request's new tokens back to
back) and passes an ``AttentionMetadata`` through the model's forward kwargs; transformers hands it
to :func:`paged_attention` for every layer with ``module.layer_idx``.

KV cache per layer: ``k_cache[layer]``, ``v_cache[layer]`` of shape
``[num_blocks * block_size, Hkv, D]`` (a slot = block_id * block_size + offset). Each layer first
writes the step's new K/V into their slots, then attends:
- decode rows (1 new token): batched, K/V gathered from the cache into ``[B, Hkv, Lmax, D]``; GQA by
  viewing the query as ``[B, Hkv, G, D]`` (query head h reads kv head h // G, as transformers'
  repeat_kv);
- prefill chunks: one SDPA each; a chunk with nothing cached before it reads K/V straight from the
  current forward (no gather), otherwise it gathers its context and uses a causal mask shifted by
  the number of tokens already computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_NAME = "fleetlm_paged"


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the flattened step
    num_tokens: int
    num_computed: int  # tokens already in KV before this chunk
    slots: torch.Tensor | None  # [num_computed + num_tokens] context slots (None: nothing cached)
    mask: torch.Tensor | None  # [num_tokens, context] bool, True = attend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    decode_rows: torch.Tensor | None  # [B] rows of decode tokens in the flattened step
    decode_slots: torch.Tensor | None  # [B, Lmax] context slots per decode row (padded with slot 0)
    decode_mask: torch.Tensor | None  # [B, 1, 1, Lmax] bool, True = attend
    decode_lens: torch.Tensor | None  # [B] context length per decode row
    prefills: list[PrefillChunk]
    kv_cache: KVCache
    decode_kernel: object | None = None  # compiled CPU kernel (engine/cpu_kernels.py) or None


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    fleet_meta: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    assert fleet_meta is not None, "paged attention needs the runner's metadata"
    meta = fleet_meta
    cache = meta.kv_cache
    layer = module.layer_idx
    k_cache, v_cache = cache.k[layer], cache.v[layer]
    k_new = key[0].transpose(0, 1)  # [T, Hkv, D]
    v_new = value[0].transpose(0, 1)
    k_cache.index_copy_(0, meta.slot_mapping, k_new)
    v_cache.index_copy_(0, meta.slot_mapping, v_new)

    num_heads, head_dim = query.shape[1], query.shape[3]
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    q_all = query[0].transpose(0, 1)  # [T, H, D]
    out = torch.empty_like(q_all)

    if meta.decode_rows is not None:
        b = meta.decode_rows.numel()
        q = q_all.index_select(0, meta.decode_rows).view(b, num_kv_heads, group, head_dim)
        if meta.decode_kernel is not None:  # reads K/V in place: no gathered copy
            scale = scaling if scaling is not None else head_dim**-0.5
            o = meta.decode_kernel.paged_decode(
                q, k_cache, v_cache, meta.decode_slots, meta.decode_lens, scale
            )
        else:
            k = k_cache[meta.decode_slots].transpose(1, 2)  # [B, Hkv, Lmax, D]
            v = v_cache[meta.decode_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask, scale=scaling)
        out.index_copy_(0, meta.decode_rows, o.reshape(b, num_heads, head_dim))

    for c in meta.prefills:
        rows = slice(c.start, c.start + c.num_tokens)
        q = query[:, :, rows]  # [1, H, n, D]
        if c.slots is None:
            k, v = key[:, :, rows], value[:, :, rows]
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=group > 1
            )
        else:
            k = k_cache[c.slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            v = v_cache[c.slots].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=c.mask, scale=scaling, enable_gqa=group > 1
            )
        out[rows] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None
