"""Grammar-constrained decoding: one token mask per constrained request per step (llguidance).

A request asks for structure through ``SamplingParams.structured``, a plain dict that crosses
process boundaries as is::

    {"type": "json", "schema": {...}}    JSON text valid against the schema
    {"type": "lark", "grammar": "..."}   llguidance's Lark dialect (``%json {...}`` embeds a
                                         schema); tool-call formats are built this way

Why llguidance (BENCHMARKS.md, "Structured outputs"): of the three libraries measured here it was
the only one whose random walks over 32 schemas were all valid JSON of their schema; its grammars
compile in about a millisecond even over a 151k vocabulary; it installs as one 3 MB wheel.

Per request the engine keeps a matcher that has consumed exactly the request's accepted output
tokens. So prefix-cache hits (prompt only) and preemption-by-recompute (output tokens are kept and
re-fed to the model, not to the matcher) leave it consistent. Constrained requests do not speculate
(SpecController skips them), so the matcher never has to roll drafts back.

EOS: a matcher allows the model's EOS tokens exactly when its grammar is complete; once it can take
nothing else, EOS is the only token left. Unconstrained requests are never looked at.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

# Compact JSON (no free whitespace): a rambling model can't pad forever between tokens.
JSON_OPTIONS = {"whitespace_flexible": False}
_CACHE_SIZE = 256


class GrammarError(ValueError):
    """The grammar or schema can't be compiled; ``param`` names the request field it came from."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message)
        self.param = param


def spec_key(spec: dict[str, Any]) -> str:
    """Canonical text of a spec: the compile cache's key (key order in the schema doesn't split)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def check_spec(spec: Any) -> None:
    """Shape check (no compiling): raise ValueError naming ``structured``."""
    if not isinstance(spec, dict):
        raise ValueError(f"structured must be a dict, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind == "json":
        if set(spec) != {"type", "schema"} or not isinstance(spec["schema"], (dict, bool)):
            raise ValueError("structured of type json needs exactly a 'schema' (a JSON object)")
    elif kind == "lark":
        if set(spec) != {"type", "grammar"} or not isinstance(spec["grammar"], str):
            raise ValueError("structured of type lark needs exactly a 'grammar' (a string)")
    else:
        raise ValueError(f"structured type must be 'json' or 'lark', got {kind!r}")


def to_grammar(spec: dict[str, Any]) -> str:
    """The llguidance grammar (serialized) of a spec."""
    import llguidance

    check_spec(spec)
    if spec["type"] == "json":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(spec["schema"]), defaults=JSON_OPTIONS
            )
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(spec["grammar"])


def validate_spec(spec: dict[str, Any]) -> None:
    """Compile without a tokenizer (what the HTTP edge can afford): GrammarError if it fails."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(to_grammar(spec))
    if is_error:
        raise GrammarError(f"the schema/grammar can't be compiled: {'; '.join(messages)}")


class StructuredDecoding:
    """Matchers of one engine's constrained requests, by request id.

    ``tokenizer``: the HF tokenizer; ``vocab_size``: rows of the model's logits (may exceed the
    tokenizer's size: the extra ids are never allowed); ``eos_token_ids``: every id that ends a
    request (generation config and tokenizer)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        device: torch.device | None = None,
    ) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._ll_tokenizer: Any = None  # built on the first constrained request (~1 s at 150k)
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # spec key -> fresh matcher
        self.matchers: dict[str, Any] = {}
        # Masks of the step being computed, filled while the model runs (see prefetch()), but only
        # where a core is spare: on a CPU whose cores all run the model's OpenMP threads, a fill
        # thread beside them slowed every step (measured: 0.87x -> 0.78x at batch 32, 2 cores).
        cpus = os.cpu_count() or 1
        on_cpu = device is None or torch.device(device).type == "cpu"
        self.overlap = not on_cpu or cpus > torch.get_num_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[dict[str, int], Future] | None = None
        self.mask_time_s = 0.0  # cumulative, for benchmarks
        self.mask_rows = 0
        self.compiles = 0

    @property
    def active(self) -> bool:
        return bool(self.matchers)

    def _tokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance.hf

            eos = list(self.eos_token_ids) or None
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos
            )
        return self._ll_tokenizer

    def compile(self, spec: dict[str, Any]) -> Any:
        """A fresh matcher for ``spec`` (compiled once per distinct spec, LRU-bounded)."""
        import llguidance

        key = spec_key(spec)
        base = self._compiled.get(key)
        if base is None:
            grammar = to_grammar(spec)
            tok = self._tokenizer()
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
            if is_error:
                raise GrammarError(f"the schema/grammar can't be compiled: {'; '.join(messages)}")
            base = llguidance.LLMatcher(tok, grammar, log_level=0)
            if base.is_error():
                raise GrammarError(f"the schema/grammar can't be compiled: {base.get_error()}")
            self.compiles += 1
            self._compiled[key] = base
            if len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return base.deep_copy()

    def add(self, request_id: str, spec: dict[str, Any]) -> None:
        self.matchers[request_id] = self.compile(spec)

    def forget(self, request_id: str) -> None:
        self._drain()
        self.matchers.pop(request_id, None)

    def _drain(self) -> None:
        """Drop an unused prefetch, first letting its fill finish: a matcher may be borrowed by
        one thread at a time, so nothing touches the matchers while a fill is running."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending[1].result()
            except Exception:  # the fill's own error surfaces where its masks are used
                pass

    def constrained(self, request_id: str) -> bool:
        return request_id in self.matchers

    def fill_bitmask(self, request_ids: list[str]) -> torch.Tensor:
        """[len(request_ids), ceil(V / 32)] int32 bitmask (bit t of the row: token t allowed).
        Row by row on the calling thread (each call releases the GIL): llguidance's own
        executor adds a worker thread beside the model's OpenMP threads, which a CPU host
        whose cores all run the model can't spare."""
        words = (self.vocab_size + 31) // 32
        mask = torch.empty((len(request_ids), words), dtype=torch.int32)
        for i, rid in enumerate(request_ids):
            m = self.matchers[rid]
            row = mask[i]
            m.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)
            if m.is_error():  # nothing valid is left: let only EOS end the request
                row.zero_()
                for t in self.eos_token_ids:
                    row[t // 32] |= _bit(t % 32)
        return mask

    def prefetch(self, request_ids: list[str]) -> None:
        """Start filling this step's masks for the constrained ones of ``request_ids`` (the rows
        that will sample) on a worker thread; apply() picks them up. llguidance releases the GIL,
        so the fill overlaps the model's forward. The matchers are not touched again before
        apply(): tokens are accepted only after sampling."""
        self._drain()  # never let a step use another step's masks
        ids = [rid for rid in request_ids if rid in self.matchers]
        if not ids or not self.overlap:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._pending = (
            {rid: i for i, rid in enumerate(ids)},
            self._pool.submit(self.fill_bitmask, ids),
        )

    def _masks(self, ids: list[str]) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is not None:
            rows, fut = pending
            bitmask = fut.result()
            if all(rid in rows for rid in ids):
                return bitmask[[rows[rid] for rid in ids]]
        return self.fill_bitmask(ids)

    def apply(self, logits: torch.Tensor, request_ids: list[str | None]) -> torch.Tensor:
        """``logits`` [N, V] with the constrained rows masked (a new tensor: the runner's logits
        may be inference tensors); with no constrained row, ``logits`` itself, untouched."""
        rows = [i for i, rid in enumerate(request_ids) if rid is not None and rid in self.matchers]
        if not rows:
            return logits
        t0 = time.perf_counter()
        bitmask = self._masks([request_ids[i] for i in rows])  # type: ignore[misc]
        # The whole [N, V] mask built on the host in numpy (one copy to the device), then one
        # select: a few times cheaper than index_put + masked_fill over torch tensors on a CPU.
        allowed = np.ones(logits.shape, dtype=bool)
        allowed[rows] = _unpack(bitmask, logits.shape[-1])
        keep = torch.from_numpy(allowed).to(logits.device, non_blocking=True)
        out = torch.where(keep, logits, float("-inf"))
        self.mask_time_s += time.perf_counter() - t0
        self.mask_rows += len(rows)
        return out

    def accept(self, request_id: str, token_ids: list[int]) -> bool:
        """Feed a request's newly accepted tokens. Returns True when its grammar is done (it can
        take nothing but EOS), so the engine finishes the request."""
        m = self.matchers.get(request_id)
        if m is None:
            return False
        self._drain()
        for t in token_ids:
            if t in self.eos_token_ids and m.is_accepting():
                return True
            m.consume_token(t)
        return m.is_stopped()


def _bit(i: int) -> int:
    # Bit 31 of an int32 word is its sign bit.
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


def _unpack(bitmask: torch.Tensor, vocab: int) -> np.ndarray:
    packed = bitmask.numpy().view(np.uint8)
    return np.unpackbits(packed, axis=1, bitorder="little")[:, :vocab].view(bool)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, W] int32 -> [N, vocab] bool (little-endian bits, as llguidance/xgrammar pack them)."""
    return torch.from_numpy(np.ascontiguousarray(_unpack(bitmask, vocab)))
