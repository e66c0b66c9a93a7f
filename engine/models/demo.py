"""The embedded demo models: built locally and deterministically as ordinary HF folders (no hub).

`resolve_model(name_or_path)` maps "demo" / "demo-small" (and the trained "demo-copy" /
"demo-copy-small", see `write_copy_model`) to a cached folder (built on first use) and passes any
local HF folder through. A build trains a byte-level BPE tokenizer on Python's own
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
# be a string or a list of OpenAI content parts (text parts are joined). Tools follow the Hermes /
# Qwen2.5 convention (deployments/tool_calls.py "hermes"): a system turn lists them as JSON inside
# <tools>, an assistant's calls are <tool_call>{"name", "arguments"}</tool_call> blocks, and a tool
# turn's result goes back as a user turn inside <tool_response>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>You may call these tools. To call one, reply with "
    '<tool_call>\n{"name": <name>, "arguments": <arguments as JSON>}\n</tool_call>\n<tools>\n'
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>{{ eos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('message role must be system, user, assistant or tool, got '"
    " + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}{{ '<|user|><tool_response>\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'tool' %}{{ '\n</tool_response>' }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    '<tool_call>\n{"name": "{{ call[\'function\'][\'name\'] }}", "arguments": '
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}"
    "}\n</tool_call>"
    "{% endfor %}"
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
    if name_or_path in DEMO_SPECS or name_or_path in COPY_SPECS:
        return str(build_demo_model(name_or_path, progress=progress))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model: folder {str(path)!r} has no config.json (not an HF model folder)"
            )
        return str(path)
    raise ValueError(
        f"model: {name_or_path!r} is neither a demo model ({', '.join(DEMO_NAMES)}) nor an "
        "existing local HF model folder (no model hub is reachable; download the model to a "
        "folder and pass its path)"
    )


def build_demo_model(name: str, progress: bool = True) -> Path:
    """Build `name` into the cache once; concurrent callers (several replicas) share a file lock."""
    if name not in DEMO_SPECS and name not in COPY_SPECS:
        raise ValueError(f"model: unknown demo model {name!r}; choose from {list(DEMO_NAMES)}")
    final = demo_path(name)
    if (final / "config.json").is_file():
        refresh_chat_template(final)
        return final
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "config.json").is_file():  # another process finished while we waited
            return final
        # Build next to the final folder (same filesystem) so the rename is atomic.
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            if name in COPY_SPECS:
                write_copy_model(tmp, COPY_SPECS[name], progress=progress)
            else:
                write_demo_model(tmp, DEMO_SPECS[name], progress=progress)
            if final.exists():  # a half-written folder from a crashed non-atomic copy
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def refresh_chat_template(folder: Path) -> None:
    """A folder built before CHAT_TEMPLATE last changed gets the current one (the tokenizer and
    weights are unchanged, so no rebuild); written atomically under the build lock."""
    path = folder / "tokenizer_config.json"
    try:
        if json.loads(path.read_text()).get("chat_template") == CHAT_TEMPLATE:
            return
    except (OSError, ValueError):
        return
    from filelock import FileLock

    with FileLock(str(folder) + ".lock"):
        cfg = json.loads(path.read_text())
        if cfg.get("chat_template") == CHAT_TEMPLATE:
            return
        cfg["chat_template"] = CHAT_TEMPLATE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


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


def llama_config(**shape):
    """A Llama config over the demo tokenizer (its vocabulary and special ids), fp32, untied."""
    from transformers import LlamaConfig

    ids = special_token_ids()
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        dtype="float32",
        **shape,
    )


def make_config(spec: DemoSpec):
    return llama_config(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
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


# -- trained copy models ---------------------------------------------------------------------
# `demo` has random weights and never continues text from its prompt, which is what real models do
# (induction heads) and what prompt-lookup speculation relies on. The "demo-copy" models do: a Llama
# whose first two layers start as the induction circuit trained transformers learn (a previous-token
# head, then a head that attends to the token after an earlier occurrence of the current token and
# copies it), then trained on sequences that repeat earlier segments: random token spans and
# windows of the tokenizer's corpus text. Same tokenizer as `demo`. Layers past the second (and the
# unused heads and MLPs) start as identity (zero output projections) and are trained.
#
# Residual layout: dim 0 a constant; A = the token's own content vector (`content_dim` dims, fixed
# random of equal norm, so the constant stays constant after RMSNorm); B = the previous token's
# content (written by the previous-token head); C = the copied token's content (written by the
# induction head), which the output head (C against the content vectors) reads. RoPE theta 1e8:
# the previous-token head matches on the high-frequency pairs (peak at offset 1), the induction
# head on the low-frequency ones (nearly position-free over the context).


@dataclass(frozen=True)
class CopySpec:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    content_dim: int
    train_steps: int = 40
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-4
    rope_theta: float = 1e8
    max_position_embeddings: int = 2048
    seed: int = 4321
    # Attention-logit margins of the two heads and the output logit of a copied token.
    prev_margin: float = 12.0
    match_margin: float = 20.0
    copy_logit: float = 15.0


COPY_SPECS: dict[str, CopySpec] = {
    "demo-copy": CopySpec(4, 256, 2, 688, 64),
    # Its draft model: same tokenizer, 2 layers, ~4x cheaper per token.
    "demo-copy-small": CopySpec(2, 128, 1, 352, 32),
}
DEMO_NAMES = (*DEMO_SPECS, *COPY_SPECS)


def make_copy_config(spec: CopySpec):
    return llama_config(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
    )


def init_copy_model(spec: CopySpec):
    """The untrained starting point: seeded small weights plus the two-head induction circuit."""
    import math

    import torch
    from transformers import LlamaForCausalLM

    d, a = spec.hidden_size, spec.content_dim
    heads = spec.num_attention_heads
    hd = d // heads
    half = hd // 2
    if spec.num_hidden_layers < 2 or 3 * a + 1 > d or a > hd or a % 2:
        raise ValueError(f"copy model: need >= 2 layers, 3*content_dim+1 <= hidden, got {spec}")
    model = LlamaForCausalLM(make_copy_config(spec)).float().eval()
    seeded_init_(model, 0.02, spec.seed)
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # every residual branch starts as identity
        content = torch.randn(VOCAB_SIZE, a, generator=g, dtype=torch.float32)
        content *= a**0.5 / content.norm(dim=1, keepdim=True)
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = a**0.5
        emb[:, 1 : 1 + a] = content
        omega = [spec.rope_theta ** (-2 * i / hd) for i in range(half)]

        # Layer 0, head 0: previous-token head. q and k read the constant dim only; k is q turned
        # by one position's angle on every high-frequency pair, so q.k peaks at offset 1.
        attn = model.model.layers[0].self_attn
        for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
            w[:hd].zero_()
        high = [i for i in range(half) if omega[i] > 0.02]
        const = (d / 2) ** 0.5  # dim 0 after the layer's RMSNorm
        s = spec.prev_margin * hd**0.5 / (const**2 * sum(1 - math.cos(omega[i]) for i in high))
        s = s**0.5
        for i in high:
            attn.q_proj.weight[i, 0] = s
            attn.k_proj.weight[i, 0] = s * math.cos(omega[i])
            attn.k_proj.weight[i + half, 0] = s * math.sin(omega[i])
        for i in range(a):
            attn.v_proj.weight[i, 1 + i] = 1.0  # value = own content (A)
            attn.o_proj.weight[1 + a + i, i] = (2 * a / d) ** 0.5  # -> B, same scale as A

        # Layer 1, head 0: induction head. q = own content (A), k = previous token's content (B)
        # on the low-frequency pairs; value = the attended token's content, written to C.
        attn = model.model.layers[1].self_attn
        for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
            w[:hd].zero_()
        low = list(range(half - a // 2, half))
        dims = low + [i + half for i in low]
        scale = (d / (3 * a)) ** 0.5  # content after this layer's RMSNorm
        s2 = (spec.match_margin * hd**0.5 / (scale**2 * a)) ** 0.5
        for i, dim in enumerate(dims):
            attn.q_proj.weight[dim, 1 + i] = s2
            attn.k_proj.weight[dim, 1 + a + i] = s2
        for i in range(a):
            attn.v_proj.weight[i, 1 + i] = 1.0
            attn.o_proj.weight[1 + 2 * a + i, i] = 1.0 / scale

        head = model.lm_head.weight
        head.zero_()
        head[:, 1 + 2 * a : 1 + 3 * a] = content * (spec.copy_logit / (a * (d / (4 * a)) ** 0.5))
    return model


def corpus_token_ids(tokenizer) -> list[int]:
    ids: list[int] = []
    for text in iter_corpus():
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return ids


def repeat_batch(spec: CopySpec, g, corpus: list[int] | None):
    """Sequences that repeat an earlier segment: [lead] P [sep] P [sep] P ... (seq_len tokens).
    P is a random span or (half the rows, when given) a window of corpus text; lead and seps are
    random. Returns token ids and a mask of positions whose next token is predictable (inside a
    repeat of P, after its first token)."""
    import torch

    n, t = spec.batch_size, spec.seq_len
    x = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.bool)

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=g))

    def span(length: int) -> list[int]:
        return torch.randint(len(SPECIAL_TOKENS), VOCAB_SIZE, (length,), generator=g).tolist()

    for row in range(n):
        length = rand(4, max(5, min(64, t // 2)))
        if corpus is not None and row % 2 and len(corpus) > length:
            start = rand(0, len(corpus) - length)
            passage = corpus[start : start + length]
        else:
            passage = span(length)
        seq = span(rand(0, 16))
        predictable = [False] * len(seq)
        first = True
        while len(seq) < t:
            seq += passage
            predictable += [False] + [not first] * (length - 1)
            sep = span(rand(0, 4))
            seq += sep
            predictable += [False] * len(sep)
            first = False
        x[row] = torch.tensor(seq[:t])
        # mask[i]: predicting token i + 1 from position i is a copy.
        mask[row, :-1] = torch.tensor(predictable[1:t])
    return x, mask


def train_copy_model(model, spec: CopySpec, corpus: list[int] | None = None, progress=True):
    """Train everything but the embeddings and the output head on `repeat_batch` data (AdamW,
    warmup + cosine). Returns the per-step losses."""
    import math

    import torch
    from tqdm import tqdm

    g = torch.Generator().manual_seed(spec.seed + 1)
    frozen = ("model.embed_tokens.weight", "lm_head.weight")
    params = [p for n, p in model.named_parameters() if n not in frozen]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(spec.train_steps), desc="training copy model", disable=not progress)
    warmup = max(1, spec.train_steps // 10)
    for step in bar:
        lr = spec.lr * min(1.0, (step + 1) / warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / spec.train_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, mask = repeat_batch(spec, g, corpus)
        hidden = model.model(input_ids=x).last_hidden_state
        logits = model.lm_head(hidden[mask])
        loss = torch.nn.functional.cross_entropy(logits, x[:, 1:][mask[:, :-1]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix_str(f"loss {losses[-1]:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def make_copy_model(spec: CopySpec, corpus: list[int] | None = None, progress: bool = True):
    import torch

    torch.manual_seed(spec.seed)
    model = init_copy_model(spec)
    train_copy_model(model, spec, corpus, progress)
    return model


def write_copy_model(out: Path, spec: CopySpec, progress: bool = True) -> None:
    """Tokenizer (the same as `demo`'s), then the trained copy model. Seeded and deterministic on a
    given machine (CPU float sums may differ across thread counts / CPUs)."""
    from transformers import AutoTokenizer

    save_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    model = make_copy_model(spec, corpus_token_ids(tok), progress)
    save_weights(model, out, progress)
    save_generation_config(out)
