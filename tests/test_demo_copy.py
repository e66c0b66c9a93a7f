"""The trained copy demo models: the induction circuit + training copy text from the context, the
build is seeded, resolve_model knows the names, and the engine serves one (n-gram drafts of a
repeated passage are accepted). A tiny spec keeps this to seconds; the full models are built by
``resolve_model`` on first use (a few minutes)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from engine.models import demo as demo_model
from engine.models.demo import (
    COPY_SPECS,
    CopySpec,
    init_copy_model,
    resolve_model,
    train_copy_model,
)

TINY = CopySpec(2, 128, 1, 256, 32, train_steps=3, batch_size=2, seq_len=64)


@pytest.fixture(scope="module")
def tiny():
    model = init_copy_model(TINY)
    before = {n: p.clone() for n, p in model.named_parameters()}
    losses = train_copy_model(model, TINY, corpus=list(range(50, 3000)), progress=False)
    return model, before, losses


def passages(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 4000, (length,), generator=g).tolist() for _ in range(n)]


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_training_updates_blocks_not_embeddings(tiny):
    model, before, losses = tiny
    assert len(losses) == TINY.train_steps and all(0 < x < 20 for x in losses)
    params = dict(model.named_parameters())
    assert torch.equal(params["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(params["lm_head.weight"], before["lm_head.weight"])
    changed = [n for n, p in params.items() if not torch.equal(p, before[n])]
    assert any("self_attn" in n for n in changed) and any("mlp" in n for n in changed)


def test_greedy_continuation_copies_a_repeated_span(tiny):
    model, _, _ = tiny
    hits = forced = total = 0
    for p in passages(4, 40):
        lead = passages(1, 7, seed=p[0])[0]
        prompt = lead + p + [11, 12] + p[:5]  # the repeat has started: go on with it
        out = greedy(model, prompt, 30)
        hits += sum(a == b for a, b in zip(out, p[5:35], strict=True))
        with torch.no_grad():  # next-token accuracy over the whole repeat (teacher forcing)
            ids = torch.tensor([lead + p + [11, 12] + p])
            pred = model(ids).logits[0, -41:-1].argmax(-1)
        forced += int((pred[1:] == ids[0, -39:]).sum())
        total += 30
    assert forced >= 0.95 * 39 * 4, forced
    # One wrong token derails a greedy copy (as in a real model); most continuations are exact.
    assert hits >= 0.75 * total, hits / total


def test_random_weights_do_not_copy(tiny):
    # The contrast the circuit makes: the same shape with its seeded random init only.
    from transformers import LlamaForCausalLM

    rand = LlamaForCausalLM(demo_model.make_copy_config(TINY)).eval()
    demo_model.seeded_init_(rand, 0.08, 1)
    p = passages(1, 40)[0]
    out = greedy(rand, p + p[:5], 20)
    assert sum(a == b for a, b in zip(out, p[5:25], strict=True)) <= 4


def test_copy_build_is_seeded(tiny):
    model, _, losses = tiny
    again = init_copy_model(TINY)
    assert train_copy_model(again, TINY, corpus=list(range(50, 3000)), progress=False) == losses
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_copy_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="content_dim"):
        init_copy_model(dataclasses.replace(TINY, content_dim=64))  # 3 * 64 + 1 > 128


def test_resolve_model_builds_copy_models(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETLM_CACHE_DIR", str(tmp_path))
    built = []

    def fake_write(out, spec, progress=True):
        built.append(spec)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(demo_model, "write_copy_model", fake_write)
    path = resolve_model("demo-copy-small", progress=False)
    assert path.endswith(f"demo-copy-small-{demo_model.DEMO_VERSION}")
    assert built == [COPY_SPECS["demo-copy-small"]]
    assert resolve_model("demo-copy-small", progress=False) == path and len(built) == 1


def test_engine_serves_copy_model_and_ngram_drafts_are_accepted(tiny, tmp_path):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    model, _, _ = tiny
    folder = tmp_path / "copy"
    model.save_pretrained(folder)
    demo_model.save_generation_config(folder)
    tok_src = resolve_model("demo-small")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src := demo_model.Path(tok_src) / f).is_file():
            shutil.copy(src, folder / f)
    spans = passages(3, 40, seed=1)
    prompts = [p + [11, 12] + p + p[:5] for p in spans]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = LLMEngine(EngineConfig(model=str(folder))).generate(prompts, sp)
    spec = {"method": "ngram", "num_tokens": 4}
    eng = LLMEngine(EngineConfig(model=str(folder), speculative=spec))
    res = eng.generate(prompts, sp)
    assert [r.token_ids for r in res] == [r.token_ids for r in plain]
    for r, p in zip(res, spans, strict=True):  # the passage goes on where the third copy stopped
        assert sum(a == b for a, b in zip(r.token_ids, p[5:35], strict=True)) >= 25
    st = eng.stats()
    assert st.spec_accepted_tokens >= 0.8 * st.spec_draft_tokens > 0
    assert st.num_steps < 3 * 30 * 0.6  # several tokens per step
