"""Text invariants of engine/detokenizer.py on the demo tokenizer (byte-level BPE, as Qwen2's):
whatever the chunking, the streamed pieces concatenate to ``tokenizer.decode(ids,
skip_special_tokens=True)``, cut only at the first matched stop string. Hypothesis draws the token
sequences (byte tokens that split multi-byte characters, special tokens, ordinary tokens), the
chunk boundaries and the stop strings."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.detokenizer import IncrementalDetokenizer

TEXT = "中文 ünï 😀 tab\tend, ascii words. Ωμέγα ﬁ naïve 𝔘 ok"


@functools.cache
def tok():
    from transformers import AutoTokenizer

    from engine.models.demo import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("demo-small", progress=False))


@functools.cache
def pools() -> tuple[list[int], list[int], list[int]]:
    t = tok()
    multibyte = sorted(set(t.encode(TEXT, add_special_tokens=False)))
    return multibyte, list(t.all_special_ids), list(range(6, len(t)))


@st.composite
def token_ids(draw, max_len: int = 40) -> list[int]:
    multibyte, special, anything = pools()
    one = st.one_of(st.sampled_from(multibyte), st.sampled_from(special), st.sampled_from(anything))
    return draw(st.lists(one, min_size=1, max_size=max_len))


def chunked(ids: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def stream(ids, cuts, stop=(), include_stop=False, skip=True) -> tuple[str, bool, list[int]]:
    """Feed the chunks as the engine does (the last one finished); returns the concatenated
    text, whether a stop string matched, and the ids fed until then."""
    d = IncrementalDetokenizer(tok(), list(stop), skip, include_stop)
    text, fed = "", []
    chunks = chunked(ids, cuts)
    for i, c in enumerate(chunks):
        fed += c
        piece, hit = d.add(c, finished=i == len(chunks) - 1)
        text += piece
        if hit:
            return text, True, fed
    return text + d.flush(), False, fed


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(ids=token_ids(), cuts=st.lists(st.integers(0, 40), max_size=8), skip=st.booleans())
def test_streamed_text_equals_decode(ids, cuts, skip):
    text, hit, _ = stream(ids, cuts, skip=skip)
    assert not hit
    assert text == tok().decode(ids, skip_special_tokens=skip)


@SETTINGS
@given(
    ids=token_ids(),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    spans=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 6)), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_stop_strings_cut_at_the_first_match_only(ids, cuts, spans, include):
    full = tok().decode(ids, skip_special_tokens=True)
    stops = []  # substrings of the output (so they match), some across chunk boundaries
    for start, n in spans:
        s = full[start % max(1, len(full)) :][:n] if full else ""
        if s and "\ufffd" not in s:
            stops.append(s)
    if not stops:
        stops = ["zzqq"]
    text, hit, fed = stream(ids, cuts, stops, include)
    decoded = tok().decode(fed, skip_special_tokens=True)
    matches = [(decoded.find(s), s) for s in stops if s in decoded]
    if not matches:
        assert not hit and text == decoded
        return
    assert hit
    j, s = min(matches, key=lambda m: m[0])
    first = [m for m in matches if m[0] == j]
    # At one position the earliest-listed of equally placed stops wins; both cut at j.
    expected = decoded[:j] + (s if include else "")
    if include and len(first) > 1:
        assert text in {decoded[:j] + m[1] for m in first}
    else:
        assert text == expected
    assert all(stop not in text[: len(decoded[:j])] for stop in stops)


def test_a_last_token_ending_mid_character_keeps_its_bytes():
    """A length-limited completion can end inside a multi-byte character: decode() gives U+FFFD
    for the partial bytes, and so must the stream (they used to be dropped)."""
    ids = tok().encode("ok 中", add_special_tokens=False)
    partial = ids[:-1]  # the last byte of 中 never arrives
    assert tok().decode(partial).endswith("\ufffd")
    text, _, _ = stream(partial, [1, 2, 3])
    assert text == tok().decode(partial)


@pytest.mark.parametrize("stop", [["中文"], ["ü"], ["end"]])
def test_multibyte_stop_string_split_over_byte_tokens(stop):
    ids = tok().encode(TEXT, add_special_tokens=False)
    for cuts in ([], list(range(len(ids)))):  # one chunk, one token per chunk
        text, hit, _ = stream(ids, cuts, stop)
        assert hit and text == TEXT[: TEXT.index(stop[0])]
