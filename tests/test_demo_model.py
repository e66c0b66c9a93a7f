"""Demo model builder, resolve_model and the tiny test model folders."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama, tiny_mistral, tiny_qwen2

from engine.models import demo as demo_model
from engine.models.demo import DEMO_SPECS, SPECIAL_TOKENS, resolve_model, write_demo_model


def folder_digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """demo-small built once for this module into a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLEETLM_CACHE_DIR", str(cache))
    try:
        yield Path(resolve_model("demo-small", progress=False))
    finally:
        mp.undo()


def test_build_is_deterministic(small_dir, tmp_path):
    other = tmp_path / "again"
    other.mkdir()
    write_demo_model(other, DEMO_SPECS["demo-small"], progress=False)
    assert folder_digest(other) == folder_digest(small_dir)
    assert set(folder_digest(small_dir)) >= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_resolve_uses_cache_and_env(small_dir, monkeypatch):
    monkeypatch.setenv("FLEETLM_CACHE_DIR", str(small_dir.parent))
    before = (small_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("demo-small", progress=False) == str(small_dir)
    assert small_dir.name == f"demo-small-{demo_model.DEMO_VERSION}"
    assert (small_dir / "model.safetensors").stat().st_mtime_ns == before  # not rebuilt


def test_concurrent_builds_share_one_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETLM_CACHE_DIR", str(tmp_path))
    calls = []
    real = demo_model.write_demo_model

    def counting(out, spec, progress=True):
        calls.append(out)
        real(out, spec, progress=progress)

    monkeypatch.setattr(demo_model, "write_demo_model", counting)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model("demo-small", False)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert len(calls) == 1  # the lock made the others wait for the first build
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temp build folder was renamed into place


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ValueError, match="local HF model folder"):
        resolve_model("meta-llama/Llama-3-8B")
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        resolve_model(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*config\.json"):
        resolve_model(str(empty))
    (empty / "config.json").write_text("{}")
    assert resolve_model(str(empty)) == str(empty)  # a local folder passes through as is
    with pytest.raises(ValueError, match="unknown demo model"):
        demo_model.build_demo_model("demo-huge")


def test_config_matches_spec(small_dir):
    cfg = json.loads((small_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (2, 128, 352)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"]) == (4096, 2048)
    gen = json.loads((small_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == SPECIAL_TOKENS.index("<|eos|>")


def test_demo_spec_parameter_count():
    # The full demo model is ~28M parameters; checked on the meta device, no weights allocated.
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(demo_model.make_config(DEMO_SPECS["demo"]))
    n = sum(p.numel() for p in model.parameters())
    assert 26e6 < n < 30e6, n


def test_tokenizer_roundtrip_and_specials(small_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_dir)
    assert len(tok) == 4096
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    text = "naïve café — 日本語のテキスト 🙂🚀 Ελληνικά\n\tdef f(x):\n        return x ** 2\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert all(0 <= i < 4096 for i in ids)
    # Trained on Python sources: common code is compressed well below one token per byte.
    code = "def __init__(self, name, value=None):\n        return self.value\n"
    assert len(tok(code)["input_ids"]) < len(code.encode()) / 2.5
    # Special token text in the input is one token.
    assert tok("<|user|>hi", add_special_tokens=False)["input_ids"][0] == 3


def test_chat_template(small_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|bos|><|system|>Be brief.<|eos|><|user|>Hi<|eos|><|assistant|>Hello<|eos|>"
        "<|user|>Again<|eos|><|assistant|>"
    )
    no_gen = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=False)
    assert no_gen.endswith("<|user|>Hi<|eos|>")
    with pytest.raises(Exception, match="role"):
        tok.apply_chat_template([{"role": "function", "content": "x"}], tokenize=False)


def test_chat_template_renders_tools_calls_and_results(small_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_dir)
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object"}},
    }
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather"}}
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    call["function"]["arguments"] = {"city": "Paris"}
    text = tok.apply_chat_template(msgs, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|bos|><|system|>You may call these tools.")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert text.endswith(
        "<|user|>Weather?<|eos|><|assistant|><tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|eos|>'
        "<|user|><tool_response>\nsunny\n</tool_response><|eos|><|assistant|>"
    )
    # Without tools the prompt is exactly the plain chat (no tool preamble).
    plain = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert plain == "<|bos|><|user|>Weather?<|eos|><|assistant|>"


def test_demo_logits_are_well_separated(small_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(small_dir).eval()
    x = torch.randint(6, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top2 = model(x).logits.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).flatten()
    assert torch.isfinite(gap).all()
    assert (gap < 1e-3).float().mean() < 0.02  # greedy ties are rare


@pytest.mark.parametrize(
    "make,cls_name", [(tiny_llama, "Llama"), (tiny_qwen2, "Qwen2"), (tiny_mistral, "Mistral")]
)
def test_tiny_models_load(make, cls_name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make(tmp_path / cls_name)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == f"{cls_name}ForCausalLM"
    attn = model.model.layers[0].self_attn
    if cls_name == "Qwen2":
        assert attn.q_proj.bias is not None and attn.q_proj.bias.abs().sum() > 0
        assert attn.k_proj.bias is not None and attn.v_proj.bias is not None
        assert attn.o_proj.bias is None
    else:
        assert attn.q_proj.bias is None
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 4096) and torch.isfinite(logits).all()
    # Same call, same weights.
    again = AutoModelForCausalLM.from_pretrained(make(tmp_path / "again"))
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_cli_model_build(small_dir, monkeypatch, capsys):
    from cluster.cli import main

    monkeypatch.setenv("FLEETLM_CACHE_DIR", str(small_dir.parent))
    assert main(["model", "build", "demo-small", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(small_dir)
