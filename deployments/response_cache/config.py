"""CacheConfig: the per-model response-cache section of the cluster YAML (pydantic, validated once).

Embedded by cluster/config.py per model as ``cache: {exact: {...}, semantic: {...}}``.
Every cache must be bounded: an unbounded one is a config error naming the field.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ExactCacheConfig(BaseModel):
    """Identical normalized requests: model, messages/prompt, output-affecting params, tenant."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve identical requests from the exact cache.")
    max_entries: int | None = Field(
        4096, description="Most responses kept (LRU beyond it); null only with max_bytes set."
    )
    max_bytes: int | None = Field(
        None, description="Most bytes of stored response JSON kept (LRU beyond it); optional."
    )
    ttl_s: float = Field(3600.0, description="Seconds an entry stays valid after it is stored.")
    temperature_zero_only: bool = Field(
        True, description="Cache only temperature-0 requests (sampled answers are meant to vary)."
    )

    @model_validator(mode="after")
    def _check(self) -> ExactCacheConfig:
        _check_bounds("exact", self.max_entries, self.max_bytes, self.ttl_s)
        return self


class SemanticCacheConfig(BaseModel):
    """Prompts whose sentence embeddings are close (cosine >= threshold), per model and tenant."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Off by default: a hit is an approximate answer.")
    threshold: float = Field(
        0.8,
        description="Cosine similarity in (0, 1] a stored prompt must reach to be served "
        "(all-MiniLM-L6-v2 embeddings; with the guard on, see bench/cache.py).",
    )
    guard: bool = Field(
        True,
        description="Also require the lexical near-miss checks of response_cache/guard.py "
        "(same entities and numbers, negation, polar words, no one-word swap).",
    )
    ttl_s: float = Field(3600.0, description="Seconds an entry stays valid after it is stored.")
    max_entries: int | None = Field(
        2048, description="Most prompts kept per model (LRU eviction beyond it)."
    )
    temperature_zero_only: bool = Field(
        True, description="Cache only temperature-0 requests (sampled answers are meant to vary)."
    )
    batch_wait_ms: float = Field(
        0.0,
        description="Extra wait for more lookups before an idle embedder starts a batch. 0: a "
        "lone lookup is embedded at once; lookups arriving while a batch runs are embedded "
        "together right after it either way.",
    )
    max_batch_size: int = Field(64, description="Most prompts embedded in one call.")
    max_text_chars: int = Field(
        1000,
        description="Longer prompts are not semantically cached: the embedding sees only the "
        "first 256 tokens, so two long documents with one opening would look identical.",
    )
    embed_dtype: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        "auto",
        description="Matmul precision of the embedding model. auto: bfloat16 where the CPU runs "
        "it natively (similarities move by ~0.002, ~1.5x faster), else float32; int8: "
        "similarities move by up to ~0.03.",
    )
    embed_threads: int = Field(
        1, description="torch threads for the embedding forward (one short prompt gains little)."
    )

    @model_validator(mode="after")
    def _check(self) -> SemanticCacheConfig:
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise ValueError(f"semantic.threshold must be in (0, 1], got {self.threshold!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"semantic.threshold must be in (0, 1], got {self.threshold}")
        _check_bounds("semantic", self.max_entries, None, self.ttl_s)
        if self.batch_wait_ms < 0:
            raise ValueError(f"semantic.batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.max_batch_size < 1:
            raise ValueError(f"semantic.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_text_chars < 1:
            raise ValueError(f"semantic.max_text_chars must be >= 1, got {self.max_text_chars}")
        if self.embed_threads < 1:
            raise ValueError(f"semantic.embed_threads must be >= 1, got {self.embed_threads}")
        return self


class CacheConfig(BaseModel):
    """Both response caches of one model. Default: exact on, semantic off."""

    model_config = ConfigDict(extra="forbid")

    exact: ExactCacheConfig = Field(default_factory=ExactCacheConfig)
    semantic: SemanticCacheConfig = Field(default_factory=SemanticCacheConfig)


def _check_bounds(kind: str, max_entries: int | None, max_bytes: int | None, ttl_s: float) -> None:
    # A cache with neither an entry nor a byte bound grows without limit: reject it.
    if max_entries is None and max_bytes is None:
        raise ValueError(f"{kind}.max_entries must be set (a cache needs a bound)")
    if max_entries is not None and max_entries < 1:
        raise ValueError(f"{kind}.max_entries must be >= 1, got {max_entries}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"{kind}.max_bytes must be >= 1, got {max_bytes}")
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"{kind}.ttl_s must be a finite number > 0, got {ttl_s}")
