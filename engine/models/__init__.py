"""Our own model code for the families served most, picked by ``config.architectures``.

``build_model(...)`` returns a model for a registered architecture (see engine/models/llama.py for
the interface) or None, with the reason, when the folder must run on transformers' own modules
(engine/paged_attention.py plugs paged attention into those): an unknown architecture, a rope type
whose table depends on the sequence length (dynamic, longrope), an active sliding window, another
activation than SiLU, pre-quantized weights, or no safetensors files.
"""

from __future__ import annotations

import torch

from engine.models.layers import RotaryTable
from engine.models.llama import LlamaForCausalLM, LlamaShape
from engine.models.loader import has_tensor, load_weights, safetensors_files
from engine.tensor_parallel import HeadSplit

# architecture -> (model class, q/k norm)
MODEL_REGISTRY: dict[str, tuple[type, bool]] = {
    "LlamaForCausalLM": (LlamaForCausalLM, False),
    "MistralForCausalLM": (LlamaForCausalLM, False),
    "Qwen2ForCausalLM": (LlamaForCausalLM, False),
    "Qwen3ForCausalLM": (LlamaForCausalLM, True),
}


def unsupported_reason(hf_config, model_path: str) -> str | None:
    """None when our own code runs this folder, else why it does not."""
    archs = getattr(hf_config, "architectures", None) or []
    if not archs or archs[0] not in MODEL_REGISTRY:
        return f"architecture {archs} has no own implementation"
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        return f"hidden_act {hf_config.hidden_act!r}"
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
    if rope_type in ("dynamic", "longrope"):
        return f"rope type {rope_type!r} depends on the sequence length"
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", True)
    max_pos = getattr(hf_config, "max_position_embeddings", None) or 0
    if window is not None and uses_window and window < max_pos:
        return f"sliding window {window}"
    if getattr(hf_config, "quantization_config", None) is not None:
        return "pre-quantized weights"
    if not safetensors_files(model_path):
        return "no safetensors files"
    return None


def build_model(
    hf_config,
    model_path: str,
    device: torch.device,
    dtype: torch.dtype,
    split: HeadSplit | None = None,
    tp_group=None,
) -> LlamaForCausalLM:
    """Our model for ``model_path`` with this shard's weights, on ``device`` in ``dtype``."""
    cfg = hf_config
    cls, qk_norm = MODEL_REGISTRY[cfg.architectures[0]]
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inter = cfg.intermediate_size
    if split is not None:
        heads, kv_heads, inter = split.local_heads, split.local_kv_heads, inter // split.size
    shape = LlamaShape(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        rms_norm_eps=cfg.rms_norm_eps,
        qkv_bias=has_tensor(model_path, "self_attn.q_proj.bias"),
        o_bias=has_tensor(model_path, "self_attn.o_proj.bias"),
        mlp_bias=has_tensor(model_path, "mlp.down_proj.bias"),
        qk_norm=qk_norm,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
    )
    rotary = RotaryTable(cfg, cfg.max_position_embeddings, device, dtype)
    with torch.device(device):
        model = cls(shape, rotary, tp_group if split is not None else None)
    model.to(dtype=dtype)
    load_weights(model, model_path, split)
    return model.eval().requires_grad_(False)
