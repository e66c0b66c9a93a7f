"""A deterministic set of varied, bounded JSON schemas for the structured-output benchmarks.

Every schema mixes some of: enums, nested objects, arrays with minItems/maxItems, integer ranges,
bounded strings (maxLength), anyOf. Every string and array is bounded, so a random-weight model
under the grammar reaches the end of the object within a few hundred tokens (an unbounded string
lets a rambling model run into max_tokens and be cut, which measures the model, not the grammar).
"""

from __future__ import annotations

import random
from typing import Any

WORDS = [
    "alpha", "beta", "gamma", "delta", "red", "green", "blue", "north", "south", "east", "west",
    "low", "mid", "high", "cat", "dog", "owl", "open", "closed", "draft", "done",
]  # fmt: skip
NAMES = [
    "name", "id", "kind", "color", "size", "count", "owner", "tags", "status", "level", "city",
    "score", "items", "meta", "title", "rank", "code", "mode", "note", "flag",
]  # fmt: skip


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["enum", "int", "str", "bool", "anyof", "enum_int"])
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(WORDS, rng.randint(2, 5))}
    if kind == "enum_int":
        return {"enum": rng.sample(range(0, 100), rng.randint(2, 4))}
    if kind == "int":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 500)}
    if kind == "str":
        lo = rng.randint(0, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(1, 12)}
    if kind == "bool":
        return {"type": "boolean"}
    return {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": rng.randint(1, 99)},
            {"type": "string", "maxLength": rng.randint(1, 8)},
            {"type": "null"},
        ][: rng.randint(2, 3)]
    }


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    r = rng.random()
    if depth < 2 and r < 0.25:
        return _object(rng, depth + 1)
    if depth < 3 and r < 0.45:
        lo = rng.randint(0, 2)
        item = _object(rng, depth + 1) if depth < 1 and rng.random() < 0.3 else _leaf(rng)
        return {"type": "array", "items": item, "minItems": lo, "maxItems": lo + rng.randint(1, 3)}
    return _leaf(rng)


def _object(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    keys = rng.sample(NAMES, rng.randint(1, 4 if depth else 5))
    props = {k: _value(rng, depth) for k in keys}
    required = [k for k in keys if rng.random() < 0.8] or keys[:1]
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def schemas(n: int = 60, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct schemas; the first five cover each construct plainly."""
    fixed: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
            "required": ["color"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "name": {"type": "string", "minLength": 1, "maxLength": 10},
            },
            "required": ["age", "name"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 6},
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["tags"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "owner": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                        "admin": {"type": "boolean"},
                    },
                    "required": ["id", "admin"],
                    "additionalProperties": False,
                }
            },
            "required": ["owner"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "value": {
                    "anyOf": [
                        {"type": "integer", "minimum": 0, "maximum": 10},
                        {"type": "string", "enum": ["none", "many"]},
                    ]
                }
            },
            "required": ["value"],
            "additionalProperties": False,
        },
    ]
    rng = random.Random(seed)
    out = list(fixed)
    seen = {repr(s) for s in out}
    while len(out) < n:
        s = _object(rng)
        if repr(s) not in seen:
            seen.add(repr(s))
            out.append(s)
    return out[:n]
