"""The cluster file's ``engine:`` section (and its ``speculative:``) as a typed schema, so a typo or
a bad value fails at ``fleetlm up`` / ``fleetlm render`` as ``FILE:LINE: field: reason`` instead
of on the replicas.

Pydantic at the edge, dataclasses inside: ``EngineOptions`` mirrors engine.config.EngineConfig (less
``model`` and ``tensor_parallel_size``, which the model entry sets) with a description per field,
and its validator builds the EngineConfig (and SpeculativeConfig) once, so their cross-field rules
apply here too. tests/test_config.py keeps the two field lists equal.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.config import EngineConfig
from engine.spec_decode import SpeculativeConfig

MODEL_LEVEL = ("model", "tensor_parallel_size")  # set on the model entry, not inside engine
# The defaults are EngineConfig's own (one place); the schema adds types, bounds and descriptions.
DEFAULT = {f.name: f.default for f in fields(EngineConfig)}


class SpeculativeOptions(BaseModel):
    """Speculative decoding: drafts proposed per step and verified in one forward pass."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ngram", "draft_model"] = Field(
        description="ngram: prompt lookup (drafts copied from earlier text); draft_model: a "
        "smaller model sharing the tokenizer proposes them."
    )
    num_tokens: int = Field(4, ge=1, le=16, description="Drafts per request per step (k).")
    model: str | None = Field(
        None, description="draft_model: a local HF folder (or demo name) of the draft model."
    )
    ngram_max: int = Field(4, ge=1, description="ngram: longest suffix looked up.")
    ngram_min: int = Field(1, ge=1, description="ngram: shortest suffix looked up.")
    max_batch_size: int = Field(
        8, ge=1, description="Speculate only while at most this many requests run."
    )
    min_acceptance: float = Field(
        0.3,
        ge=0,
        le=1,
        description="A request whose drafts are accepted less often than this pauses speculating.",
    )
    pause_steps: int = Field(16, ge=0, description="Steps a low-acceptance request pauses.")

    @model_validator(mode="after")
    def _rules(self) -> SpeculativeOptions:
        SpeculativeConfig.from_dict(self.model_dump())  # cross-field rules, one place
        return self


class EngineOptions(BaseModel):
    """Engine options of one model's replicas (engine.config.EngineConfig)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        DEFAULT["dtype"],
        description="Weights and activations; auto: float32 on CPU, bfloat16 on CUDA.",
    )
    device: str = Field(
        DEFAULT["device"], description="auto (cuda when present, else cpu), cpu or cuda[:N]."
    )
    max_model_len: int | None = Field(
        DEFAULT["max_model_len"],
        ge=1,
        description="Context length; null: the model's max_position_embeddings.",
    )
    block_size: int = Field(DEFAULT["block_size"], ge=1, description="Tokens per KV-cache block.")
    num_kv_blocks: int | None = Field(
        DEFAULT["num_kv_blocks"],
        ge=2,
        description="KV-cache blocks per replica; null: from kv_cache_memory_gb.",
    )
    kv_cache_memory_gb: float = Field(
        DEFAULT["kv_cache_memory_gb"],
        gt=0,
        description="KV-cache size when num_kv_blocks is null (GiB).",
    )
    max_num_seqs: int = Field(
        DEFAULT["max_num_seqs"], ge=1, description="Most requests running at once per replica."
    )
    max_num_batched_tokens: int = Field(
        DEFAULT["max_num_batched_tokens"],
        ge=1,
        description="Token budget of one engine step (prefill chunks + decodes).",
    )
    enable_prefix_caching: bool = Field(
        DEFAULT["enable_prefix_caching"],
        description="Reuse cached KV blocks of identical prompt prefixes.",
    )
    prefix_cache_eviction: Literal["lru", "slru"] = Field(
        DEFAULT["prefix_cache_eviction"],
        description="lru: least recently freed block first; slru: blocks that never served a hit "
        "go before shared prefixes.",
    )
    enable_chunked_prefill: bool = Field(
        DEFAULT["enable_chunked_prefill"],
        description="Split long prompts over steps so decodes keep running.",
    )
    seed: int = Field(DEFAULT["seed"], description="Seed of unseeded sampling.")
    num_threads: int | None = Field(
        DEFAULT["num_threads"],
        ge=1,
        description="torch intra-op threads on CPU; null: torch's default.",
    )
    decode_num_threads: int | None = Field(
        DEFAULT["decode_num_threads"],
        ge=1,
        description="CPU: torch threads for decode steps (steps with under 64 prompt tokens); "
        "null: num_threads. Fewer than the cores leaves the HTTP processes a core.",
    )
    quantization: Literal["int8", "int8-w8a8"] | None = Field(
        DEFAULT["quantization"],
        description="int8: weight-only int8 linears; int8-w8a8: int8 activations too.",
    )
    speculative: SpeculativeOptions | None = Field(
        DEFAULT["speculative"], description="Speculative decoding; null: off."
    )
    model_impl: Literal["auto", "fleetlm", "transformers"] = Field(
        DEFAULT["model_impl"],
        description="auto: fleetlm's own model code for the families it has, transformers' "
        "modules for the rest; fleetlm: own code or an error; transformers: always transformers'.",
    )
    enforce_eager: bool = Field(
        DEFAULT["enforce_eager"],
        description="CUDA: run decode steps eagerly instead of replaying CUDA graphs (no effect "
        "on CPU).",
    )

    @model_validator(mode="before")
    @classmethod
    def _not_here(cls, v: Any) -> Any:
        # "OPTION: reason" so the error points at that option's own line (cluster/config.py).
        if isinstance(v, dict):
            for owned in MODEL_LEVEL:
                if owned in v:
                    raise ValueError(f"{owned}: set it on the model entry, not inside engine")
        return v

    @model_validator(mode="after")
    def _rules(self) -> EngineOptions:
        self.engine_config("demo", 1)  # EngineConfig's own cross-field rules
        return self

    def engine_config(self, model: str, tensor_parallel_size: int) -> EngineConfig:
        d = self.model_dump()
        return EngineConfig.from_dict(
            {**d, "model": model, "tensor_parallel_size": tensor_parallel_size}
        )
