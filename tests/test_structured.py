"""Grammar-constrained decoding (engine/structured.py) without Ray: masks, EOS, cache, the engine
hook with constrained and unconstrained requests in one batch, preemption, speculation."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from bench.structured_schemas import schemas
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.demo import resolve_model
from engine.sampling_params import SamplingParams
from engine.structured import (
    GrammarError,
    StructuredDecoding,
    spec_key,
    unpack_bitmask,
    validate_spec,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green"]},
        "n": {"type": "integer", "minimum": 1, "maximum": 3},
    },
    "required": ["color", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def path():
    return resolve_model("demo-small", progress=False)


@pytest.fixture(scope="module")
def tok(path):
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def engine(path):
    return LLMEngine(EngineConfig(model=path, num_kv_blocks=64, max_num_seqs=8, num_threads=1))


def _allowed(sd: StructuredDecoding, rid: str) -> set[int]:
    row = unpack_bitmask(sd.fill_bitmask([rid]), sd.vocab_size)[0]
    return set(torch.nonzero(row).flatten().tolist())


def test_mask_allows_exactly_the_grammar_and_eos_only_when_complete(tok):
    eos = tok.eos_token_id
    sd = StructuredDecoding(tok, len(tok), (eos,))
    sd.add("r", {"type": "json", "schema": SCHEMA})
    first = _allowed(sd, "r")
    assert first and all(tok.decode([t]).startswith("{") for t in first)
    assert eos not in first
    text = '{"color":"red","n":2}'
    ids = tok.encode(text, add_special_tokens=False)
    for t in ids[:-1]:
        assert t in _allowed(sd, "r")
        assert not sd.accept("r", [t])
    assert eos not in _allowed(sd, "r")  # the closing brace is still missing
    assert sd.accept("r", [ids[-1]])  # complete and nothing else can follow: done
    assert _allowed(sd, "r") == {eos}


def test_apply_masks_only_constrained_rows(tok):
    sd = StructuredDecoding(tok, len(tok), (tok.eos_token_id,))
    sd.add("c", {"type": "json", "schema": SCHEMA})
    logits = torch.zeros(3, len(tok))
    logits = sd.apply(logits, ["c", None, "u"])
    assert torch.isinf(logits[0]).sum() == len(tok) - len(_allowed(sd, "c"))
    assert torch.isfinite(logits[1:]).all()  # unconstrained rows untouched
    assert sd.mask_rows == 1


def test_integer_range_and_enum_enforced(tok):
    sd = StructuredDecoding(tok, len(tok), (tok.eos_token_id,))
    sd.add("r", {"type": "json", "schema": SCHEMA})
    prefix = tok.encode('{"color":"', add_special_tokens=False)
    sd.accept("r", prefix)
    texts = {tok.decode([t]) for t in _allowed(sd, "r")}
    assert texts and all("red".startswith(t) or "green".startswith(t) for t in texts)
    sd.accept("r", tok.encode('red","n":', add_special_tokens=False))
    digits = {tok.decode([t]) for t in _allowed(sd, "r")}
    assert digits == {"1", "2", "3"}


def test_compile_cache_per_schema_and_key_order(tok):
    sd = StructuredDecoding(tok, len(tok), (tok.eos_token_id,))
    sd.add("a", {"type": "json", "schema": SCHEMA})
    sd.add("b", {"type": "json", "schema": dict(reversed(list(SCHEMA.items())))})
    assert sd.compiles == 1
    sd.add("c", {"type": "json", "schema": {"type": "object"}})
    assert sd.compiles == 2
    assert spec_key({"a": 1, "b": 2}) == spec_key({"b": 2, "a": 1})


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "strnig"},
        {"type": "object", "properties": {"a": {"$ref": "#/nope"}}},
        {"type": "string", "pattern": "(?<=a)b"},
    ],
)
def test_bad_schema_is_a_grammar_error_naming_response_format(schema, tok):
    with pytest.raises(GrammarError) as e:
        validate_spec({"type": "json", "schema": schema})
    assert e.value.param == "response_format"
    sd = StructuredDecoding(tok, len(tok), (tok.eos_token_id,))
    with pytest.raises(GrammarError):
        sd.add("r", {"type": "json", "schema": schema})


def test_spec_shape_checked_by_sampling_params():
    with pytest.raises(ValueError, match="structured"):
        SamplingParams(structured={"type": "xml"})
    with pytest.raises(ValueError, match="structured"):
        SamplingParams(structured={"type": "json"})
    SamplingParams(structured={"type": "lark", "grammar": 'start: "a"'})


def _gen(engine, prompts, params):
    return engine.generate(prompts, params)


def test_engine_batch_mixes_constrained_and_unconstrained(engine):
    cases = schemas(6)
    params = []
    for i, s in enumerate(cases):
        params.append(
            SamplingParams(
                temperature=0.8, seed=i, max_tokens=200, structured={"type": "json", "schema": s}
            )
        )
        params.append(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    prompts = [f"Request {i}: give JSON" for i in range(len(params))]
    out = _gen(engine, prompts, params)
    for i, r in enumerate(out):
        if i % 2 == 0:
            assert r.finish_reason == "stop", r.text
            jsonschema.validate(json.loads(r.text), cases[i // 2])
        else:
            assert r.finish_reason == "length" and len(r.token_ids) == 12
    # Unconstrained rows are exactly what they are alone (the mask never touched them).
    alone = _gen(engine, [prompts[1]], [params[1]])[0]
    assert alone.token_ids == out[1].token_ids
    assert not engine.structured.matchers  # finished requests let go of their matchers


def test_preemption_recompute_keeps_grammar_consistent(path):
    # 6 blocks of 16 tokens for 3 requests that each need ~3: preemption by recompute happens.
    eng = LLMEngine(EngineConfig(model=path, num_kv_blocks=8, max_num_seqs=3, num_threads=1))
    text = {"type": "string", "minLength": 20, "maxLength": 24}
    s = {
        "type": "object",
        "properties": {"a": text, "b": text},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    spec = {"type": "json", "schema": s}
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=90, structured=spec) for i in range(3)
    ]
    out = eng.generate([f"{i} " + "x " * 28 for i in range(3)], params)
    assert eng.scheduler.num_preemptions > 0
    for r in out:
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), s)


def test_constrained_requests_do_not_speculate(path):
    eng = LLMEngine(
        EngineConfig(model=path, num_threads=1, speculative={"method": "ngram", "num_tokens": 3})
    )
    p = SamplingParams(temperature=0, max_tokens=80, structured={"type": "json", "schema": SCHEMA})
    r = eng.generate(["a a a a a a a a"], p)[0]
    assert eng.spec.draft_tokens == 0
    jsonschema.validate(json.loads(r.text), SCHEMA)
    assert r.finish_reason == "stop"


def test_bench_structured_small(engine):
    from bench.structured import closed_loop, validity

    cases = schemas(4)
    v = validity(engine, cases)
    assert v["valid"] == 4 and v["valid_pct"] == 100.0
    r = closed_loop(engine, cases, batch=4, num_constrained=2, steps=6, warmup=2, plain_tokens=8)
    assert r["mask_rows_per_step"] == 2.0  # the closed loop keeps 2 constrained rows every step
    assert r["output_tokens"] >= 4 * 6 and not engine.requests


def test_prefetched_masks_equal_synchronous_ones_and_never_go_stale(tok):
    sd = StructuredDecoding(tok, len(tok), (tok.eos_token_id,))
    sd.overlap = True  # as on a host with a spare core
    sd.add("a", {"type": "json", "schema": SCHEMA})
    sd.add("b", {"type": "json", "schema": schemas(3)[2]})
    logits = torch.randn(3, len(tok))
    sync = sd.apply(logits, ["b", None, "a"])
    sd.prefetch(["a", "x", "b"])  # the step's sampling rows, any order
    assert torch.equal(sd.apply(logits, ["b", None, "a"]), sync)
    sd.prefetch(["a", "b"])
    sd.accept("a", tok.encode("{", add_special_tokens=False))
    sd.prefetch([])  # a later step without constrained rows drops the old prefetch
    assert not torch.equal(sd.apply(logits, ["b", None, "a"]), sync)  # "a" moved on: fresh masks
