"""EngineConfig: built once, validated, passed down; each component copies the fields it needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class EngineConfig:
    model: str = "demo"  # "demo", "demo-small", or a local HF causal-LM folder
    dtype: DType = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when present, else cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derived from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    max_num_seqs: int = 64  # max running requests
    max_num_batched_tokens: int = 2048  # token budget per step
    enable_prefix_caching: bool = True
    # lru: free cached blocks are evicted least recently freed first; slru: blocks that never
    # served a prefix-cache hit go first (a finished request's own tail before shared prefixes).
    # slru by default: higher hit rates on W2 (simulated and served) and W6 (simulated); after a
    # shift to new tenants it falls below lru only briefly (BENCHMARKS.md, routing).
    prefix_cache_eviction: Literal["lru", "slru"] = "slru"
    enable_chunked_prefill: bool = True
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default
    # CPU, one shard: torch threads for steps with little prefill work (decode steps: under
    # llm_engine.PREFILL_THREADS_MIN prompt tokens); None: num_threads. Served on cores shared
    # with the HTTP processes, a decode step's threads wait on each other whenever one is
    # preempted; a thread fewer than the cores leaves those processes a core. On 2 cores it
    # helped W1 (32 short rows) a little and hurt W2 (16 long rows): not a default
    # (BENCHMARKS.md, serving path).
    decode_num_threads: int | None = None
    quantization: Literal["int8", "int8-w8a8"] | None = (
        None  # weight-only int8 / + int8 activations
    )
    speculative: dict[str, Any] | None = (
        None  # {"method": "ngram"|"draft_model", "num_tokens": k, ...}
    )
    tensor_parallel_size: int = 1
    # auto: our own model code (engine/models/) for the families it has, transformers' modules for
    # the rest; fleetlm: own code or an error; transformers: always transformers' modules.
    model_impl: Literal["auto", "fleetlm", "transformers"] = "auto"
    # CUDA only: decode-only steps replay a CUDA graph per batch-size bucket unless this is set.
    # Accepted everywhere; on CPU it changes nothing (decode runs eagerly there).
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        def pos_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        pos_int("block_size")
        pos_int("max_num_seqs")
        pos_int("max_num_batched_tokens")
        pos_int("tensor_parallel_size")
        pos_int("max_model_len", allow_none=True)
        pos_int("num_kv_blocks", allow_none=True)
        pos_int("num_threads", allow_none=True)
        pos_int("decode_num_threads", allow_none=True)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.quantization not in (None, "int8", "int8-w8a8"):
            raise ValueError(
                f"quantization must be null, 'int8' or 'int8-w8a8', got {self.quantization!r}"
            )
        if self.model_impl not in ("auto", "fleetlm", "transformers"):
            raise ValueError(
                f"model_impl must be 'auto', 'fleetlm' or 'transformers', got {self.model_impl!r}"
            )
        if self.prefix_cache_eviction not in ("lru", "slru"):
            raise ValueError(
                f"prefix_cache_eviction must be 'lru' or 'slru', got {self.prefix_cache_eviction!r}"
            )
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be true or false, got {self.enforce_eager!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError("num_kv_blocks must be >= 2")
