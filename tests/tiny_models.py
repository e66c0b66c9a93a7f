"""Tiny random HF model folders (Llama, Qwen2, Mistral, Qwen3) for tests: config + safetensors
weights + a copy of the demo tokenizer (vocab 4096), loadable with AutoModelForCausalLM /
AutoTokenizer.

    from tiny_models import tiny_qwen2      # tests/ is on sys.path under pytest
    path = tiny_qwen2(tmp_path / "qwen2")   # -> str

Every parameter, biases included, is drawn from a seeded normal (norm weights are ones), so bias
handling is exercised and the same call gives the same weights.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path
from typing import Any

# Small but not degenerate: GQA (4 query heads share 2 KV heads), head_dim 16, 2 layers.
BASE_CONFIG: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    "dtype": "float32",
}

# Per-architecture extras. Qwen2's q/k/v projections carry biases by construction in transformers;
# Mistral's sliding window is off unless a test asks for one.
ARCH_EXTRAS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {"use_sliding_window": False},
    "mistral": {"sliding_window": None},
    # q/k RMSNorm per head; head_dim set apart from hidden_size / heads, as Qwen3's configs do.
    "qwen3": {"use_sliding_window": False, "head_dim": 32},
}


def config_class(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "mistral": MistralConfig,
        "qwen3": Qwen3Config,
    }
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    return classes[arch]


def demo_tokenizer_dir() -> Path:
    from engine.models.demo import resolve_model

    return Path(resolve_model("demo-small", progress=False))


def write_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **overrides: Any) -> str:
    """Write a tiny random `arch` model folder at `path`, return it; `overrides` go to config."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config_class(arch)(**{**BASE_CONFIG, **ARCH_EXTRAS[arch], **overrides})
    model = AutoModelForCausalLM.from_config(config).float().eval()
    std = config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(path, safe_serialization=True)
    tok_dir = demo_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, path / name)
    return str(path)


def tiny_llama(path: str | Path, **overrides: Any) -> str:
    return write_tiny_model(path, "llama", **overrides)


def tiny_qwen2(path: str | Path, **overrides: Any) -> str:
    return write_tiny_model(path, "qwen2", **overrides)


def tiny_mistral(path: str | Path, **overrides: Any) -> str:
    return write_tiny_model(path, "mistral", **overrides)


def tiny_qwen3(path: str | Path, **overrides: Any) -> str:
    return write_tiny_model(path, "qwen3", **overrides)
