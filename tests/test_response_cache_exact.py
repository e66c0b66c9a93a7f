"""Exact response cache: keys, hit/miss, TTL (injected clock), entry/byte bounds, LRU order."""

from __future__ import annotations

import threading

import pytest

from deployments.response_cache import keys
from deployments.response_cache.exact import ExactCache


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def chat(q: str, **kw) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": q}], "temperature": 0, **kw}


def test_key_ignores_delivery_fields_and_defaults():
    base = keys.exact_key("ns", chat("hi", max_tokens=8))
    assert keys.exact_key("ns", chat("hi", max_tokens=8, stream=True, user="bob")) == base
    assert keys.exact_key("ns", chat("hi", max_tokens=8, top_p=1.0, n=1, stop=[])) == base
    # Greedy decoding ignores top_p/top_k/seed, so they can't split a temperature-0 entry.
    assert keys.exact_key("ns", chat("hi", max_tokens=8, top_p=0.5, seed=3)) == base
    assert keys.exact_key("ns", chat("hi", max_completion_tokens=8)) == base


def test_key_separates_everything_that_changes_the_answer():
    base = keys.exact_key("ns", chat("hi", max_tokens=8))
    others = [
        keys.exact_key("other-tenant", chat("hi", max_tokens=8)),
        keys.exact_key("ns", chat("hi ", max_tokens=8)),
        keys.exact_key("ns", chat("hi", max_tokens=9)),
        keys.exact_key("ns", chat("hi", max_tokens=8, stop=["\n"])),
        keys.exact_key("ns", {**chat("hi", max_tokens=8), "model": "other"}),
        keys.exact_key("ns", chat("hi", max_tokens=8, logprobs=True)),
        keys.exact_key("ns", {"model": "m", "prompt": "hi", "temperature": 0, "max_tokens": 8}),
        keys.exact_key("ns", chat("hi", max_tokens=8, unknown_field=1)),
    ]
    assert len({base, *others}) == len(others) + 1
    # A sampled request keeps its seed/top_p in the key.
    t1 = {**chat("hi"), "temperature": 0.7}
    assert keys.exact_key("ns", {**t1, "seed": 1}) != keys.exact_key("ns", {**t1, "seed": 2})


def test_stop_string_and_list_are_one_key():
    one = keys.exact_key("ns", chat("hi", stop="x"))
    assert one == keys.exact_key("ns", chat("hi", stop=["x"]))


def test_absent_temperature_is_sampling():
    assert keys.temperature({"model": "m"}) == 1.0
    assert keys.temperature({"temperature": 0}) == 0.0


def test_hit_miss_and_fresh_copies():
    c = ExactCache(max_entries=4, ttl_s=60)
    assert c.get("a") is None
    c.put("a", {"choices": [{"text": "x"}]})
    got = c.get("a")
    assert got == {"choices": [{"text": "x"}]}
    got["choices"][0]["text"] = "mutated by a caller"
    assert c.get("a") == {"choices": [{"text": "x"}]}


def test_ttl_expiry_with_injected_clock():
    clock = Clock()
    c = ExactCache(max_entries=4, ttl_s=10, clock=clock)
    c.put("a", {"v": 1})
    clock.t += 9.99
    assert c.get("a") == {"v": 1}
    clock.t += 0.01
    assert c.get("a") is None
    assert len(c) == 0 and c.expirations == 1 and c.nbytes == 0
    # TTL counts from storing, not from the last hit.
    c.put("b", {"v": 2})
    clock.t += 5
    assert c.get("b") is not None
    clock.t += 5
    assert c.get("b") is None


def test_purge_expired():
    clock = Clock()
    c = ExactCache(max_entries=10, ttl_s=10, clock=clock)
    c.put("a", {"v": 1})
    clock.t += 5
    c.put("b", {"v": 2})
    clock.t += 6
    assert c.purge_expired() == 1
    assert c.get("a") is None and c.get("b") == {"v": 2}


def test_entry_bound_evicts_least_recently_used():
    c = ExactCache(max_entries=3, ttl_s=60)
    for k in "abc":
        c.put(k, {"k": k})
    assert c.get("a") is not None  # a is now most recent: b is the LRU
    c.put("d", {"k": "d"})
    assert len(c) == 3 and c.evictions == 1
    assert c.get("b") is None
    assert [k for k in "acd" if c.get(k) is not None] == ["a", "c", "d"]
    c.put("e", {"k": "e"})  # the gets above touched a, c, d in that order: a goes
    assert c.get("a") is None and c.get("e") is not None


def test_byte_bound():
    one = {"t": "x" * 90}
    size = len('{"t":"' + "x" * 90 + '"}')
    c = ExactCache(max_entries=None, ttl_s=60, max_bytes=3 * size)
    for k in "abcd":
        c.put(k, one)
        assert c.nbytes <= 3 * size
    assert len(c) == 3 and c.get("a") is None
    # A response larger than the whole bound is not stored (and evicts nothing).
    assert c.put("huge", {"t": "y" * 10_000}) is False
    assert len(c) == 3 and c.get("huge") is None


def test_overwrite_keeps_byte_count_exact():
    c = ExactCache(max_entries=10, ttl_s=60)
    c.put("a", {"t": "xx"})
    n1 = c.nbytes
    c.put("a", {"t": "xxxx"})
    assert c.nbytes == n1 + 2 and len(c) == 1


def test_thread_safety_under_concurrent_puts_and_gets():
    c = ExactCache(max_entries=50, ttl_s=60)

    def work(i: int) -> None:
        for j in range(300):
            c.put(f"{i}-{j % 80}", {"j": j})
            c.get(f"{(i + 1) % 4}-{j % 80}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(c) == 50
    assert c.nbytes == sum(e.nbytes for e in c._entries.values())


@pytest.mark.parametrize(
    "content, text",
    [("hi", "hi"), ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "a\nb")],
)
def test_message_text(content, text):
    assert keys.message_text(content) == text


def test_message_text_rejects_images():
    assert keys.message_text([{"type": "image_url", "image_url": {"url": "x"}}]) is None
