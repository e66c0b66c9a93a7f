"""Weights straight from an HF folder's safetensors into our model code.

q/k/v are merged into ``qkv_proj`` and gate/up into ``gate_up_proj`` as they load. A
tensor-parallel shard reads only its own slice of each split tensor (``safe_open().get_slice``),
never the whole model: rows of q/k/v/gate/up (column-parallel), columns of o_proj/down_proj
(row-parallel), with the head split of engine/tensor_parallel.py's ``plan_heads``.
"""

from __future__ import annotations

import glob
import os
import re

import torch
from safetensors import safe_open

from engine.tensor_parallel import HeadSplit

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


def safetensors_files(model_path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(model_path, "*.safetensors")))


def load_weights(model, model_path: str, split: HeadSplit | None) -> None:
    """Fill ``model`` (engine/models/llama.py) from ``model_path``; raises on a missing tensor."""
    s = model.shape
    d = s.head_dim
    r = split.rank if split else 0
    q0 = r * s.num_heads * d
    kv0 = (split.kv_head_start if split else 0) * d
    inter0 = r * s.intermediate_size
    nq, nkv, ni = s.num_heads * d, s.num_kv_heads * d, s.intermediate_size
    # name in the layer -> (param, rows [a, b) of the file tensor, destination offset, split dim)
    loaded: set[str] = set()
    expected = {n for n, _ in model.named_parameters()}
    if s.tie_word_embeddings:
        expected.discard("lm_head.weight")

    def put(dst: torch.Tensor, src, dim: int | None, start: int, size: int, offset: int = 0):
        if dim is None:
            t = src[:]
        elif dim == 0:
            t = src[start : start + size]
        else:
            t = src[:, start : start + size]
        t = t.to(dtype=dst.dtype)
        with torch.no_grad():
            if offset or (dim == 0 and dst.shape[0] != t.shape[0]):
                dst[offset : offset + t.shape[0]].copy_(t)
            else:
                dst.copy_(t)

    for path in safetensors_files(model_path):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                src = f.get_slice(name)
                m = _LAYER.match(name)
                if m is None:
                    short = name.removeprefix("model.")
                    if short == "lm_head.weight" and s.tie_word_embeddings:
                        continue
                    if short in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
                        put(model.get_parameter(short), src, None, 0, 0)
                        loaded.add(short)
                    continue
                i, rest = int(m.group(1)), m.group(2)
                if i >= s.num_layers:
                    continue
                layer = model.layers[i]
                attn, mlp = layer.self_attn, layer.mlp
                kind = rest.rsplit(".", 1)[-1]  # weight | bias
                target = None
                if rest.startswith("self_attn.") and rest.split(".")[1] in (
                    "q_proj",
                    "k_proj",
                    "v_proj",
                ):
                    proj = rest.split(".")[1]
                    start, size, off = {
                        "q_proj": (q0, nq, 0),
                        "k_proj": (kv0, nkv, nq),
                        "v_proj": (kv0, nkv, nq + nkv),
                    }[proj]
                    target = f"layers.{i}.self_attn.qkv_proj.{kind}"
                    put(getattr(attn.qkv_proj, kind), src, 0, start, size, off)
                    loaded.add(target + f"#{proj}")
                    continue
                if rest.startswith("mlp.") and rest.split(".")[1] in ("gate_proj", "up_proj"):
                    proj = rest.split(".")[1]
                    off = 0 if proj == "gate_proj" else ni
                    target = f"layers.{i}.mlp.gate_up_proj.{kind}"
                    put(getattr(mlp.gate_up_proj, kind), src, 0, inter0, ni, off)
                    loaded.add(target + f"#{proj}")
                    continue
                if rest == "self_attn.o_proj.weight":
                    put(attn.o_proj.weight, src, 1, q0, nq)
                    loaded.add(f"layers.{i}.self_attn.o_proj.weight")
                elif rest == "self_attn.o_proj.bias" and attn.o_bias is not None:
                    put(attn.o_bias, src, None, 0, 0)
                    loaded.add(f"layers.{i}.self_attn.o_bias")
                elif rest == "mlp.down_proj.weight":
                    put(mlp.down_proj.weight, src, 1, inter0, ni)
                    loaded.add(f"layers.{i}.mlp.down_proj.weight")
                elif rest == "mlp.down_proj.bias" and mlp.down_bias is not None:
                    put(mlp.down_bias, src, None, 0, 0)
                    loaded.add(f"layers.{i}.mlp.down_bias")
                elif rest in (
                    "input_layernorm.weight",
                    "post_attention_layernorm.weight",
                    "self_attn.q_norm.weight",
                    "self_attn.k_norm.weight",
                ):
                    full = f"layers.{i}.{rest}"
                    if full in expected:
                        put(model.get_parameter(full), src, None, 0, 0)
                        loaded.add(full)
    merged = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }
    missing = []
    for name in sorted(expected):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in merged:
            missing += [f"{name}#{p}" for p in merged[parts[-2]] if f"{name}#{p}" not in loaded]
        elif name not in loaded:
            missing.append(name)
    if missing:
        raise ValueError(f"{model_path}: weights missing from the safetensors files: {missing[:6]}")


def has_tensor(model_path: str, suffix: str) -> bool:
    """Whether any tensor name in the folder ends with ``suffix`` (e.g. a bias)."""
    for path in safetensors_files(model_path):
        with safe_open(path, framework="pt", device="cpu") as f:
            if any(k.endswith(suffix) for k in f.keys()):
                return True
    return False
