"""The embedded demo models: built locally and deterministically as ordinary HF folders (no hub).

`resolve_model(name_or_path)` maps "demo" / "demo-small" to a cached folder (built on first use) and
passes any local HF folder through. A build trains a byte-level BPE tokenizer on Python's own
stdlib sources (a fixed, sorted, size-capped file list, so the same Python gives the same tokenizer)
and fills a Llama model with seeded normal weights; the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Bump when the recipe changes: a new version builds into a new cache folder, never over an old one.
DEMO_VERSION = "v1"
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
BOS, EOS, PAD = SPECIAL_TOKENS[:3]
# Tokenizer training text cap: enough for 4096 merges, small enough to train in a few seconds.
CORPUS_MAX_BYTES = 1_500_000

# One turn = role token + content + eos; the generation prompt opens an assistant turn. Content may
# be a string or a list of OpenAI content parts (text parts are joined).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('message role must be system, user or assistant, got '"
    " + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class DemoSpec:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    # Wide enough that greedy top-1/top-2 logit gaps are rarely below 1e-3, so two fp32
    # implementations of the same model do not flip on near-ties.
    initializer_range: float = 0.08
    seed: int = 1234


DEMO_SPECS: dict[str, DemoSpec] = {
    "demo": DemoSpec(8, 512, 8, 4, 1408),
    "demo-small": DemoSpec(2, 128, 4, 2, 352),
}


def cache_root() -> Path:
    env = os.environ.get("FLEETLM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/fleetlm/models").expanduser()


def demo_path(name: str) -> Path:
    return cache_root() / f"{name}-{DEMO_VERSION}"


def resolve_model(name_or_path: str, progress: bool = True) -> str:
    """Return a local HF folder for `name_or_path`, building the demo models on first use."""
    if name_or_path in DEMO_SPECS:
        return str(build_demo_model(name_or_path, progress=progress))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model: folder {str(path)!r} has no config.json (not an HF model folder)"
            )
        return str(path)
    raise ValueError(
        f"model: {name_or_path!r} is neither 'demo', 'demo-small' nor an existing local HF model "
        "folder (no model hub is reachable; download the model to a folder and pass its path)"
    )


def build_demo_model(name: str, progress: bool = True) -> Path:
    """Build `name` into the cache once; concurrent callers (several replicas) share a file lock."""
    if name not in DEMO_SPECS:
        raise ValueError(f"model: unknown demo model {name!r}; choose from {sorted(DEMO_SPECS)}")
    final = demo_path(name)
    if (final / "config.json").is_file():
        return final
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "config.json").is_file():  # another process finished while we waited
            return final
        # Build next to the final folder (same filesystem) so the rename is atomic.
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            write_demo_model(tmp, DEMO_SPECS[name], progress=progress)
            if final.exists():  # a half-written folder from a crashed non-atomic copy
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_demo_model(out: Path, spec: DemoSpec, progress: bool = True) -> None:
    from tqdm import tqdm

    stages = ["tokenizer", "weights", "save"]
    bar = tqdm(stages, desc=f"building {out.name}", disable=not progress, leave=False)
    for stage in bar:
        bar.set_postfix_str(stage)
        if stage == "tokenizer":
            save_tokenizer(out)
        elif stage == "weights":
            model = make_model(spec)
        else:
            save_weights(model, out, progress)
            save_generation_config(out)


def save_weights(model, out: Path, progress: bool) -> None:
    from transformers.utils import logging as hf_logging

    # save_pretrained draws its own shard bar; keep a quiet build quiet (restored after).
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if was_enabled and not progress:
            hf_logging.enable_progress_bar()


def corpus_files() -> list[Path]:
    """Deterministic training files: stdlib LICENSE and top-level modules, sorted, size-capped."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = [stdlib / "LICENSE.txt", *sorted(stdlib.glob("*.py"))]
    files, total = [], 0
    for f in candidates:
        if not f.is_file():
            continue
        size = f.stat().st_size
        if total + size > CORPUS_MAX_BYTES:
            continue
        files.append(f)
        total += size
    if not files:
        raise RuntimeError(f"no tokenizer training text found under {stdlib}")
    return files


def iter_corpus() -> Iterator[str]:
    for f in corpus_files():
        yield f.read_text(encoding="utf-8", errors="replace")


def train_tokenizer():
    """Byte-level BPE with the special tokens at ids 0..5; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(iter_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(out: Path) -> None:
    tok = train_tokenizer()
    assert len(tok) == VOCAB_SIZE, len(tok)
    tok.save_pretrained(out)
    # Rewrite the config in the long-standing PreTrainedTokenizerFast form, chat template inline, so
    # older transformers (e.g. a peer engine's venv) load the folder as well as 5.x does.
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def special_token_ids() -> dict[str, int]:
    # Specials are added first by the trainer, so their ids are their list positions.
    return {t: i for i, t in enumerate(SPECIAL_TOKENS)}


def make_config(spec: DemoSpec):
    from transformers import LlamaConfig

    ids = special_token_ids()
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        dtype="float32",
    )


def seeded_init_(model, std: float, seed: int) -> None:
    """Overwrite every parameter from its own generator (seed + crc32(name)): independent of
    transformers' init code and of parameter order. Norm weights are ones, biases zeros."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def make_model(spec: DemoSpec):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(make_config(spec)).float().eval()
    seeded_init_(model, spec.initializer_range, spec.seed)
    return model


def save_generation_config(out: Path) -> None:
    ids = special_token_ids()
    gen = {
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
