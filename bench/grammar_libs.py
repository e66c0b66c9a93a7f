"""Grammar libraries side by side: JSON Schema coverage, compile time, token-mask time at batch 32.

    python -m bench.grammar_libs [--tokenizer DIR ...] [--batch 32] [--json out.json]

For each installed library (llguidance, xgrammar, outlines-core) and each tokenizer (default: the
demo tokenizer, 4,096 tokens; pass a larger HF tokenizer folder for a realistic vocabulary):
compile the benchmark schemas (bench/structured_schemas.py) plus a few harder constructs, then run
``--batch`` matchers over different schemas in lock step. Each step fills every live matcher's
bitmask (timed, one thread, as the engine does it) and feeds it a random allowed token (untimed), so
the matchers walk through realistic states (inside strings, between keys, in numbers) until their
JSON is complete. Libraries not installed are reported as such.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import numpy as np
import torch

from bench.structured_schemas import schemas

EXTRA = {
    "pattern": {"type": "string", "pattern": "^[a-z]{2,5}-[0-9]{1,3}$"},
    "format_date": {"type": "string", "format": "date"},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    "ref": {
        "$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/p"}},
    },
    "number_range": {"type": "number", "minimum": -1.5, "maximum": 2.5},
    "const": {"const": "fixed"},
}


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet -> byte (the ByteLevel pre-tokenizer's mapping)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class Lib:
    name = ""

    def __init__(self, tok) -> None: ...
    def compile(self, schema: dict[str, Any]) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, m: Any, mask: torch.Tensor, i: int) -> None: ...
    def accept(self, m: Any, t: int) -> bool: ...
    def done(self, m: Any) -> bool: ...


class LLGuidance(Lib):
    name = "llguidance"

    def __init__(self, tok) -> None:
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tok)

    def compile(self, schema):
        g = self.ll.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        err = self.ll.LLMatcher.validate_grammar(g, self.tok)
        if err and not err.startswith("WARNING"):
            raise ValueError(err)
        self.matcher(g)  # grammar construction happens here: count it as compile time
        return g

    def matcher(self, compiled):
        return self.ll.LLMatcher(self.tok, compiled, log_level=0)

    def fill(self, m, mask, i):
        row = mask[i]
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, m, t):
        return m.consume_token(t)

    def done(self, m):
        return m.is_stopped() or m.is_accepting()


class XGrammar(Lib):
    name = "xgrammar"

    def __init__(self, tok) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, mask, i):
        m.fill_next_token_bitmask(mask, i)

    def accept(self, m, t):
        return m.accept_token(t)

    def done(self, m):
        return m.is_terminated() or m.is_completed()


class OutlinesCore(Lib):
    name = "outlines-core"

    def __init__(self, tok) -> None:
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema

        self.oc = oc
        self.regex = build_regex_from_schema
        dec = _byte_decoder()
        special = set(tok.all_special_ids)
        words: dict[bytes, list[int]] = {}
        for s, i in tok.get_vocab().items():
            if i in special:
                continue
            try:
                b = bytes(dec[c] for c in s)
            except KeyError:
                continue
            words.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(tok.eos_token_id, words)

    def compile(self, schema):
        return self.oc.Index(self.regex(json.dumps(schema)), self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, m, mask, i):
        row = mask[i]
        m.write_mask_into(row.data_ptr(), row.numel(), 4)

    def accept(self, m, t):
        m.advance(t)
        return True

    def done(self, m):
        return m.is_finished()


LIBS = [LLGuidance, XGrammar, OutlinesCore]


def allowed(mask_row: torch.Tensor, vocab: int) -> np.ndarray:
    bits = np.unpackbits(mask_row.numpy().view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def run_lib(cls, tok, batch: int, seed: int) -> dict[str, Any]:
    try:
        lib = cls(tok)
    except ImportError as e:
        return {"installed": False, "error": str(e)}
    vocab = len(tok)
    out: dict[str, Any] = {"installed": True}
    compiled, times, failures = [], [], {}
    for i, s in enumerate(schemas(60)):
        t0 = time.perf_counter()
        try:
            compiled.append(lib.compile(s))
            times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a library's own error type: coverage gap
            failures[f"schema{i}"] = str(e)[:200]
    for name, s in EXTRA.items():
        try:
            lib.compile(s)
        except Exception as e:  # noqa: BLE001
            failures[name] = str(e)[:200]
    out["compiled"] = f"{len(compiled)}/60"
    out["extra_ok"] = sorted(set(EXTRA) - set(failures))
    out["failures"] = failures
    out["compile_ms_median"] = statistics.median(times) * 1000 if times else None
    out["compile_ms_max"] = max(times) * 1000 if times else None
    rng = random.Random(seed)
    ms = [lib.matcher(compiled[i % len(compiled)]) for i in range(batch)]
    walked: list[list[int]] = [[] for _ in range(batch)]
    mask = torch.zeros((batch, (vocab + 31) // 32), dtype=torch.int32)
    fill_ms, accept_ms, live = [], [], list(range(batch))
    rows = 0
    steps = 0
    while live and steps < 400:
        t0 = time.perf_counter()
        for i in live:
            lib.fill(ms[i], mask, i)
        fill_ms.append((time.perf_counter() - t0) * 1000)
        rows += len(live)
        toks = {}
        for i in live:
            ids = allowed(mask[i], vocab)
            toks[i] = int(rng.choice(ids)) if len(ids) else tok.eos_token_id
        t0 = time.perf_counter()
        for i in live:
            lib.accept(ms[i], toks[i])
        accept_ms.append((time.perf_counter() - t0) * 1000)
        for i in live:
            walked[i].append(toks[i])
        live = [i for i in live if not lib.done(ms[i]) and toks[i] != tok.eos_token_id]
        steps += 1
    # Coverage that counts: does each finished walk's text validate against its schema?
    import jsonschema

    ok = 0
    all_schemas = [s for i, s in enumerate(schemas(60)) if f"schema{i}" not in failures]
    for i in range(batch):
        text = tok.decode([t for t in walked[i] if t != tok.eos_token_id])
        try:
            jsonschema.validate(json.loads(text), all_schemas[i % len(compiled)])
            ok += 1
        except (ValueError, jsonschema.ValidationError) as e:
            out.setdefault("invalid_examples", []).append(f"{text[:80]!r}: {str(e)[:80]}")
    out["walks_valid"] = f"{ok}/{batch}"
    us_per_row = sum(fill_ms) * 1000 / max(1, rows)
    out.update(
        steps=steps,
        live_rows=rows,
        mask_us_per_row=round(us_per_row, 1),
        # One step with every row of the batch constrained, at the mean per-row cost of the walk.
        mask_ms_per_step_at_batch=round(us_per_row * batch / 1000, 3),
        first_step_ms=round(fill_ms[0], 3),
        accept_us_per_row=round(sum(accept_ms) * 1000 / max(1, rows), 1),
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", action="append", help="HF tokenizer folder (default: demo)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines-core")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from engine.models.demo import resolve_model

    torch.set_num_threads(1)
    folders = args.tokenizer or [resolve_model("demo-small", progress=False)]
    want = set(args.libs.split(","))
    results: dict[str, Any] = {}
    for folder in folders:
        tok = AutoTokenizer.from_pretrained(folder)
        key = f"vocab{len(tok)}"
        results[key] = {}
        for cls in LIBS:
            if cls.name not in want:
                continue
            t0 = time.perf_counter()
            r = run_lib(cls, tok, args.batch, args.seed)
            r["total_s"] = round(time.perf_counter() - t0, 1)
            results[key][cls.name] = r
            skip = ("failures", "invalid_examples")
            print(key, cls.name, json.dumps({k: v for k, v in r.items() if k not in skip}))
            for ex in r.get("invalid_examples", [])[:3]:
                print("   invalid:", ex)
            if r.get("failures"):
                print("   failures:", json.dumps(r["failures"])[:600])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
