"""Semantic cache: index (search, guard, LRU, TTL), batching, and the layer the ingress calls.

Most tests use a fake embedder whose vectors the test chooses, so similarities are exact numbers;
test_response_cache_minilm.py runs the real all-MiniLM-L6-v2 model.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.response_cache.batcher import EmbedBatcher
from deployments.response_cache.config import CacheConfig
from deployments.response_cache.guard import features, guard_reason
from deployments.response_cache.layer import ResponseCacheLayer
from deployments.response_cache.semantic import SemanticIndex

DIM = 8


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def unit(*xs: float) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[: len(xs)] = xs
    return v / np.linalg.norm(v)


def at_cos(c: float) -> np.ndarray:
    """A unit vector whose cosine with unit(1) is exactly c."""
    return unit(c, float(np.sqrt(1 - c * c)))


class FakeEmbedder:
    """Vectors chosen by the test; any other text gets its own random direction. Counts calls."""

    dim = DIM

    def __init__(self, vecs: dict[str, np.ndarray]):
        self.vecs = vecs
        self.calls: list[list[str]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = []
        for t in texts:
            v = self.vecs.get(t)
            if v is None:
                v = np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(DIM)
                v = (v / np.linalg.norm(v)).astype(np.float32)
            out.append(v)
        return np.stack(out)


def answer(text: str) -> dict:
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
    }


def chat(q: str, temperature: float = 0.0, **kw) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": q}], "temperature": temperature}


# -- index ---------------------------------------------------------------------------------------
def test_index_hit_at_threshold_and_miss_just_below():
    idx = SemanticIndex(DIM, threshold=0.9, max_entries=10, ttl_s=60)
    idx.add("p", unit(1), "how to boil an egg", answer("A"))
    hit = idx.search("p", at_cos(0.9), "how do you boil an egg")
    assert hit is not None and hit.response == answer("A") and hit.similarity == pytest.approx(0.9)
    assert idx.search("p", at_cos(0.89), "how do you boil an egg") is None


def test_index_partitions_never_mix():
    idx = SemanticIndex(DIM, threshold=0.5, max_entries=10, ttl_s=60)
    idx.add("tenant-a", unit(1), "q", answer("A"))
    assert idx.search("tenant-b", unit(1), "q") is None
    assert idx.search("tenant-a", unit(1), "q") is not None


def test_index_returns_best_candidate_passing_the_guard():
    idx = SemanticIndex(DIM, threshold=0.5, max_entries=10, ttl_s=60)
    idx.add("p", unit(1), "What is the capital of Germany?", answer("Berlin"))
    idx.add("p", at_cos(0.8), "Which city is the capital of France?", answer("Paris"))
    # Germany is the closer vector but fails the key-term rule; France's entry is served.
    hit = idx.search("p", unit(1), "What is the capital of France?")
    assert hit is not None and hit.response == answer("Paris")
    assert idx.guard_rejections["key_terms"] == 1


def test_index_without_guard_serves_the_nearest():
    idx = SemanticIndex(DIM, threshold=0.5, max_entries=10, ttl_s=60, use_guard=False)
    idx.add("p", unit(1), "What is the capital of Germany?", answer("Berlin"))
    hit = idx.search("p", unit(1), "What is the capital of France?")
    assert hit is not None and hit.response == answer("Berlin")


def test_index_lru_eviction_and_row_bookkeeping():
    idx = SemanticIndex(DIM, threshold=0.99, max_entries=3, ttl_s=60)
    vecs = {t: unit(*([0.0] * i + [1.0])) for i, t in enumerate("abcde")}
    for t in "abc":
        idx.add("p" if t != "b" else "q", vecs[t], t, answer(t))
    assert idx.search("p", vecs["a"], "a") is not None  # a used: b is least recently used
    idx.add("p", vecs["d"], "d", answer("d"))
    idx.check_invariants()
    assert len(idx) == 3 and idx.evictions == 1
    assert idx.search("q", vecs["b"], "b") is None
    for t in "acd":
        hit = idx.search("p", vecs[t], t)
        assert hit is not None and hit.response == answer(t)
    idx.add("p", vecs["e"], "e", answer("e"))  # a, c, d touched in that order: a goes
    idx.check_invariants()
    assert idx.search("p", vecs["a"], "a") is None


def test_index_ttl_and_same_text_replaces():
    clock = Clock()
    idx = SemanticIndex(DIM, threshold=0.9, max_entries=10, ttl_s=10, clock=clock)
    idx.add("p", unit(1), "q", answer("old"))
    idx.add("p", unit(1), "q", answer("new"))
    assert len(idx) == 1
    assert idx.search("p", unit(1), "q").response == answer("new")
    clock.t = 9.9
    assert idx.search("p", unit(1), "q") is not None
    clock.t = 10.0
    assert idx.search("p", unit(1), "q") is None
    assert len(idx) == 0 and idx.expirations == 1
    idx.check_invariants()


def test_index_many_adds_and_removals_keep_invariants():
    rng = np.random.default_rng(0)
    idx = SemanticIndex(DIM, threshold=0.999, max_entries=20, ttl_s=60)
    stored: dict[str, np.ndarray] = {}
    for i in range(200):
        t = f"t{rng.integers(0, 40)}"
        v = rng.standard_normal(DIM).astype(np.float32)
        v /= np.linalg.norm(v)
        idx.add(f"p{i % 3}", v, t, answer(t))
        stored[t] = v
        idx.check_invariants()
    assert len(idx) == 20


# -- guard ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, b, rule",
    [
        ("What is the capital of France?", "What is the capital of Germany?", "key_terms"),
        ("What is 12 times 12?", "What is 12 times 13?", "key_terms"),
        ("When did World War I end?", "When did World War II end?", "key_terms"),
        ("Sort a list in ascending order", "Sort a list in descending order", "polar"),
        ("Days in a year?", "Days in a year that is not a leap year?", "negation"),
        ("Convert a string to an integer", "Convert an integer to a string", "direction"),
        ("How many legs does a spider have?", "How many legs does an insect have?", "swap"),
        ("What is `os.path` for?", "What is `sys.path` for?", "key_terms"),
        ("How long is a marathon?", "How long is a half marathon?", "key_terms"),
        ("What is twelve times twelve?", "What is twelve times thirteen?", "key_terms"),
        ("How do I double a number?", "How do I triple a number?", "key_terms"),
    ],
)
def test_guard_refuses_near_misses(a, b, rule):
    assert guard_reason(features(a), features(b)) == rule
    assert guard_reason(features(b), features(a)) == rule


@pytest.mark.parametrize(
    "a, b",
    [
        ("What is the capital of France?", "Which city is France's capital?"),
        ("Water boils at how many degrees Celsius?", "Boiling point of water in Celsius?"),
        ("Which planet is the biggest?", "What is the largest planet?"),
        ("Who painted the Mona Lisa?", "Who was the painter of the Mona Lisa?"),
        ("What's gold's chemical symbol?", "What is the chemical symbol for gold?"),
        ("What is twelve times twelve?", "What is 12 times 12?"),
        ("How do I merge two dicts in Python?", "How can I merge a pair of Python dicts?"),
    ],
)
def test_guard_lets_paraphrases_through(a, b):
    assert guard_reason(features(a), features(b)) is None


# -- batcher -------------------------------------------------------------------------------------
def test_concurrent_embeds_share_one_call():
    fake = FakeEmbedder({})
    b = EmbedBatcher(fake.embed, max_wait_ms=20, max_batch_size=64)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*[b.embed(f"text {i}") for i in range(10)])

    vecs = asyncio.run(main())
    assert len(fake.calls) == 1 and fake.calls[0] == [f"text {i}" for i in range(10)]
    for i, v in enumerate(vecs):
        assert np.array_equal(v, fake.embed([f"text {i}"])[0])
    b.close()


def test_batcher_splits_at_max_batch_size_and_survives_errors():
    fake = FakeEmbedder({})
    b = EmbedBatcher(fake.embed, max_wait_ms=20, max_batch_size=4)

    async def main() -> None:
        await asyncio.gather(*[b.embed(f"t{i}") for i in range(10)])

    asyncio.run(main())
    assert [len(c) for c in fake.calls] == [4, 4, 2]

    def boom(texts: list[str]) -> np.ndarray:
        raise RuntimeError("embedder down")

    b2 = EmbedBatcher(boom, max_wait_ms=1)

    async def failing() -> None:
        with pytest.raises(RuntimeError, match="embedder down"):
            await b2.embed("x")

    asyncio.run(failing())
    b.close()
    b2.close()


def test_batcher_without_window_batches_same_turn_and_whatever_queued_while_busy():
    """max_wait_ms=0: texts of one loop turn share a call; texts arriving while a call runs all go
    in the next call, started as soon as the running one returns."""
    import threading

    release = threading.Event()
    calls: list[list[str]] = []

    def slow(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        if len(calls) == 1:
            assert release.wait(10)
        return np.ones((len(texts), DIM), np.float32)

    b = EmbedBatcher(slow, max_wait_ms=0)

    async def main() -> None:
        first = asyncio.gather(b.embed("a"), b.embed("b"))  # one turn -> one call
        while not calls:
            await asyncio.sleep(0.001)
        later = [asyncio.ensure_future(b.embed(f"q{i}")) for i in range(3)]
        await asyncio.sleep(0.02)  # they queue behind the running call
        assert calls == [["a", "b"]]
        release.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 10)

    asyncio.run(main())
    assert calls == [["a", "b"], ["q0", "q1", "q2"]]
    b.close()


def test_batcher_lone_text_does_not_wait_for_a_window():
    b = EmbedBatcher(FakeEmbedder({}).embed)  # the default: no window
    slow = EmbedBatcher(FakeEmbedder({}).embed, max_wait_ms=60_000)

    async def main() -> None:
        await asyncio.wait_for(b.embed("alone"), 5)
        with pytest.raises(asyncio.TimeoutError):  # a window really waits
            await asyncio.wait_for(slow.embed("alone"), 0.2)

    asyncio.run(main())
    b.close()
    slow.close()


# -- layer ---------------------------------------------------------------------------------------
def layer(fake: FakeEmbedder, clock: Clock | None = None, **sem) -> ResponseCacheLayer:
    cfg = CacheConfig.model_validate(
        {"exact": {"ttl_s": 100}, "semantic": {"enabled": True, "threshold": 0.85, **sem}}
    )
    return ResponseCacheLayer(cfg, "m", clock=clock or Clock(), embedder=fake)


Q = "What is the boiling point of water in Celsius?"
PARA = "At what temperature in Celsius does water boil?"
NEAR = "What is the boiling point of water in Fahrenheit?"


def test_layer_exact_then_semantic_then_miss():
    fake = FakeEmbedder({Q: unit(1), PARA: at_cos(0.9), NEAR: at_cos(0.95)})
    lay = layer(fake)

    async def main() -> None:
        assert await lay.lookup("k", chat(Q)) is None
        await lay.store("k", chat(Q), answer("100"))
        assert await lay.lookup("k", chat(Q)) == ("exact", answer("100"))
        assert await lay.lookup("k", chat(PARA)) == ("semantic", answer("100"))
        # Closer than the paraphrase, but a different unit: never served.
        assert await lay.lookup("k", chat(NEAR)) is None

    asyncio.run(main())
    s = lay.stats()
    assert s["hits"] == {"exact": 1, "semantic": 1}
    assert s["misses"] == {"exact": 3, "semantic": 2}
    assert s["entries"] == {"exact": 1, "semantic": 1}
    assert s["semantic"]["guard_rejections"] == {"key_terms": 1}
    # store() after a lookup miss reuses the lookup's embedding: Q was embedded once.
    assert sum(c.count(Q) for c in fake.calls) == 1


def test_layer_tenants_never_share_answers():
    fake = FakeEmbedder({Q: unit(1), PARA: at_cos(0.99)})
    lay = layer(fake)

    async def main() -> None:
        await lay.store("tenant-a", chat(Q), answer("A's answer"))
        assert await lay.lookup("tenant-b", chat(Q)) is None
        assert await lay.lookup("tenant-b", chat(PARA)) is None
        assert await lay.lookup("tenant-a", chat(PARA)) == ("semantic", answer("A's answer"))

    asyncio.run(main())


def test_layer_context_and_params_split_semantic_entries():
    fake = FakeEmbedder({Q: unit(1), PARA: at_cos(0.99)})
    lay = layer(fake)
    with_system = {
        "model": "m",
        "temperature": 0,
        "messages": [{"role": "system", "content": "Answer in French."}, chat(PARA)["messages"][0]],
    }

    async def main() -> None:
        await lay.store("k", chat(Q), answer("100"))
        assert await lay.lookup("k", with_system) is None
        assert await lay.lookup("k", {**chat(PARA), "max_tokens": 3}) is None
        assert await lay.lookup("k", {**chat(PARA), "model": "other"}) is None

    asyncio.run(main())


def test_layer_temperature_above_zero_bypasses_both_caches():
    fake = FakeEmbedder({Q: unit(1)})
    lay = layer(fake)

    async def main() -> None:
        await lay.store("k", chat(Q, temperature=0.7), answer("sampled"))
        assert await lay.lookup("k", chat(Q, temperature=0.7)) is None
        assert await lay.lookup("k", {"model": "m", "messages": chat(Q)["messages"]}) is None

    asyncio.run(main())
    s = lay.stats()
    assert s["entries"] == {"exact": 0, "semantic": 0} and s["bypassed"] == 2
    assert fake.calls == []  # nothing embedded for requests no cache may serve


def test_layer_sampled_requests_cached_when_configured():
    cfg = CacheConfig.model_validate(
        {
            "exact": {"temperature_zero_only": False},
            "semantic": {"enabled": True, "temperature_zero_only": False},
        }
    )
    lay = ResponseCacheLayer(cfg, "m", embedder=FakeEmbedder({}))

    async def main() -> None:
        await lay.store("k", chat(Q, temperature=0.7), answer("sampled"))
        assert await lay.lookup("k", chat(Q, temperature=0.7)) == ("exact", answer("sampled"))

    asyncio.run(main())


def test_layer_semantic_ttl_with_injected_clock():
    clock = Clock()
    fake = FakeEmbedder({Q: unit(1), PARA: at_cos(0.95)})
    lay = layer(fake, clock, ttl_s=5)

    async def main() -> None:
        await lay.store("k", chat(Q), answer("100"))
        clock.t = 4.9
        assert await lay.lookup("k", chat(PARA)) is not None
        clock.t = 5.0
        assert await lay.lookup("k", chat(PARA)) is None

    asyncio.run(main())
    assert lay.stats()["entries"]["semantic"] == 0


def test_layer_concurrent_lookups_embed_in_one_batch():
    fake = FakeEmbedder({})
    lay = layer(fake, batch_wait_ms=20)
    qs = [f"question number {i} about topic {i}?" for i in range(8)]

    async def main() -> list:
        return await asyncio.gather(*[lay.lookup("k", chat(q)) for q in qs])

    assert asyncio.run(main()) == [None] * 8
    assert len(fake.calls) == 1 and sorted(fake.calls[0]) == sorted(qs)
    assert lay.stats()["semantic"]["embed_calls"] == 1


def test_layer_does_not_store_incomplete_or_error_responses():
    lay = layer(FakeEmbedder({}))
    aborted = answer("partial")
    aborted["choices"][0]["finish_reason"] = "abort"

    async def main() -> None:
        await lay.store("k", chat(Q), aborted)
        await lay.store("k", chat(Q), {"error": {"message": "boom"}})
        await lay.store("k", chat(Q), {"choices": []})

    asyncio.run(main())
    assert lay.stats()["entries"] == {"exact": 0, "semantic": 0}


def test_layer_never_raises_for_odd_requests():
    lay = layer(FakeEmbedder({}))

    async def main() -> None:
        odd = [
            {"model": "m", "temperature": 0, "messages": [{"role": "assistant", "content": "x"}]},
            {"model": "m", "temperature": 0, "prompt": [1, 2, 3]},
            {"model": "m", "temperature": 0, "prompt": ["a", "b"]},
            {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": None}]},
            {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "  "}]},
            {"model": "m", "temperature": 0},
        ]
        for r in odd:
            assert await lay.lookup("k", r) is None
            await lay.store("k", r, answer("x"))
            assert await lay.lookup("k", r) == ("exact", answer("x"))

    asyncio.run(main())
    assert lay.stats()["errors"] == 0


def test_layer_embedder_failure_costs_a_hit_not_the_request():
    class Broken(FakeEmbedder):
        def embed(self, texts: list[str]) -> np.ndarray:
            raise RuntimeError("no model")

    lay = layer(Broken({}))

    async def main() -> None:
        assert await lay.lookup("k", chat(Q)) is None
        await lay.store("k", chat(Q), answer("100"))
        assert await lay.lookup("k", chat(Q)) == ("exact", answer("100"))

    asyncio.run(main())
    assert lay.stats()["errors"] == 2


def test_completion_prompt_is_embedded():
    fake = FakeEmbedder({Q: unit(1), PARA: at_cos(0.95)})
    lay = layer(fake)
    comp = {"model": "m", "temperature": 0, "max_tokens": 16}

    async def main() -> None:
        await lay.store("k", {**comp, "prompt": Q}, answer("100"))
        assert await lay.lookup("k", {**comp, "prompt": [PARA]}) == ("semantic", answer("100"))
        assert await lay.lookup("k", chat(PARA)) is None  # chat and completion never mix

    asyncio.run(main())


def test_layer_records_misses_through_deployments_metrics(monkeypatch):
    import sys
    import types

    recorded: list[tuple] = []

    class FakeMetrics:
        def inc(self, name: str, value: float = 1.0, **labels) -> None:
            recorded.append((name, value, labels))

    fake_ray = types.SimpleNamespace(is_initialized=lambda: True)
    fake_mod = types.SimpleNamespace(get_metrics=lambda: FakeMetrics())
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "deployments.metrics", fake_mod)
    lay = layer(FakeEmbedder({Q: unit(1)}))

    async def main() -> None:
        await lay.lookup("k", chat(Q))

    asyncio.run(main())
    assert recorded == [
        ("response_cache_misses_total", 1, {"model": "m", "kind": "exact"}),
        ("response_cache_misses_total", 1, {"model": "m", "kind": "semantic"}),
    ]


def test_long_prompts_are_exact_only():
    fake = FakeEmbedder({})
    lay = layer(fake, max_text_chars=50)
    long_q = "Summarize: " + "lorem ipsum " * 10

    async def main() -> None:
        await lay.store("k", chat(long_q), answer("summary"))
        assert await lay.lookup("k", chat(long_q)) == ("exact", answer("summary"))
        assert await lay.lookup("k", chat(long_q + " dolor")) is None

    asyncio.run(main())
    assert fake.calls == [] and lay.stats()["entries"]["semantic"] == 0
