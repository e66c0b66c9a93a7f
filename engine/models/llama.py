"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a flat ``[T, hidden]`` step.

Per layer: one merged QKV projection ``[T, (H + 2*Hkv) * D]`` (Qwen2's biases included), Qwen3's
per-head q/k RMSNorm, rotary from a cached cos/sin table, paged attention over the whole step, one
merged gate-up projection, and RMSNorm fused with the residual add. Tensor parallelism is
Megatron's split (engine/tensor_parallel.py): QKV and gate-up are column-parallel, o_proj and
down_proj row-parallel, each followed by one all-reduce; a shard's weights are read as slices
(engine/models/loader.py). Module names (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``,
``lm_head``) are plain ``nn.Linear`` so int8 quantization swaps them like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.models.attention import AttentionMetadata, PagedAttention
from engine.models.layers import (
    RMSNorm,
    RotaryTable,
    apply_rotary,
    fused_norm_width,
    silu_and_mul,
)


@dataclass(frozen=True)
class LlamaShape:
    """The local (this shard's) shape of the model."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int  # local query heads
    num_kv_heads: int  # local KV heads
    head_dim: int
    intermediate_size: int  # local
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool


class Attention(nn.Module):
    def __init__(self, s: LlamaShape, layer_idx: int, tp_group) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_size = s.num_heads * s.head_dim
        self.kv_size = s.num_kv_heads * s.head_dim
        self.scale = s.head_dim**-0.5
        self.qkv_proj = nn.Linear(s.hidden_size, self.q_size + 2 * self.kv_size, bias=s.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, s.hidden_size, bias=False)
        # Added after the all-reduce (once, not once per shard).
        self.o_bias = (
            nn.Parameter(torch.zeros(s.hidden_size), requires_grad=False) if s.o_bias else None
        )
        self.q_norm = RMSNorm(s.head_dim, s.rms_norm_eps) if s.qk_norm else None
        self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps) if s.qk_norm else None
        self.tp_group = tp_group

    def forward(self, x, rope, meta: AttentionMetadata, attn: PagedAttention, kv, fused=None):
        """``rope``: (cos, sin) [T, 1, D/2] looked up by position, or with ``fused`` (the C++
        ops) the whole tables and the positions (cos, sin, positions [T])."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if fused is not None:
            # Rotate q and k in place inside qkv and store k, v in their slots: one pass.
            cos, sin, positions = rope
            fused.rotary_store_kv(
                qkv, cos, sin, positions, kv[0], kv[1], meta.slot_mapping,
                self.num_heads, self.num_kv_heads, self.head_dim,
            )  # fmt: skip
            q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
            if not meta.fresh:  # every row reads K/V through the block tables (decode)
                return self._out(attn.paged(q, kv[0], kv[1], meta, self.scale), t)
            k, v = qkv[:, self.q_size :].view(t, 2 * self.num_kv_heads, self.head_dim).chunk(2, 1)
            o = attn.attend(q, k, v, kv[0], kv[1], meta, self.scale)
            return self._out(o, t)
        cos, sin = rope
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:
            # q and k heads side by side [T, H + Hkv, D]: one rotary pass for both.
            qk = qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim)
        else:
            q, k = qkv[:, : self.q_size + self.kv_size].split([self.q_size, self.kv_size], -1)
            q = self.q_norm.norm(q.view(t, self.num_heads, self.head_dim))
            k = self.k_norm.norm(k.view(t, self.num_kv_heads, self.head_dim))
            qk = torch.cat((q, k), dim=1)
        qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        o = attn.forward(q, k, v, kv[0], kv[1], meta, self.scale)
        return self._out(o, t)

    def _out(self, o: torch.Tensor, t: int) -> torch.Tensor:
        y = self.o_proj(o.view(t, self.q_size))
        if self.tp_group is not None:
            self.tp_group.all_reduce(y)
        if self.o_bias is not None:
            y = y + self.o_bias
        return y


class MLP(nn.Module):
    def __init__(self, s: LlamaShape, tp_group) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(s.hidden_size, 2 * s.intermediate_size, bias=s.mlp_bias)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)
        self.down_bias = (
            nn.Parameter(torch.zeros(s.hidden_size), requires_grad=False) if s.mlp_bias else None
        )
        self.tp_group = tp_group

    def forward(self, x):
        y = self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        if self.tp_group is not None:
            self.tp_group.all_reduce(y)
        if self.down_bias is not None:
            y = y + self.down_bias
        return y


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaShape, layer_idx: int, tp_group) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = Attention(s, layer_idx, tp_group)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s, tp_group)

    def forward(self, x, residual, rope, meta, attn, kv, fused):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, meta, attn, kv, fused)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids [T], positions [T], meta) -> hidden [T, hidden]`` (after the final
    norm); ``compute_logits(hidden [n, hidden]) -> [n, vocab]`` for the rows that sample."""

    def __init__(self, s: LlamaShape, rotary: RotaryTable, tp_group=None) -> None:
        super().__init__()
        self.shape = s
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s, i, tp_group) for i in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        if s.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = rotary
        self.attn: PagedAttention | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fused = None  # engine/csrc/fused_ops.cpp where the C++ attention kernels run

    def bind_kv_cache(self, attn: PagedAttention, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.attn = attn
        self.kv_caches = list(zip(k, v, strict=True))
        self.fused = None
        # Qwen3's q/k norms come between the projection and the rotary: the torch path.
        if attn.cpu is not None and not self.shape.qk_norm:
            from engine.cpu_kernels import fused_ops_kernel

            self.fused = fused_ops_kernel()
        # The residual add + RMSNorm of every block and the final norm in one C++ pass where the
        # fused ops run and it reproduces F.rms_norm bit for bit.
        width = fused_norm_width(self.fused) if self.fused is not None else None
        norm = (self.fused, width) if width is not None else None
        for layer in self.layers:
            layer.input_layernorm.fused = layer.post_attention_layernorm.fused = norm
        self.norm.fused = norm

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        fused = self.fused
        if fused is not None:  # the fused op looks cos/sin up by position itself
            rope = (self.rotary.cos, self.rotary.sin, positions)
        else:
            rope = self.rotary.lookup(positions)
        residual = None
        for layer, kv in zip(self.layers, self.kv_caches, strict=True):
            x, residual = layer(x, residual, rope, meta, self.attn, kv, fused)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
