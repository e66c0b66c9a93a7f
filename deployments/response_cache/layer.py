"""ResponseCacheLayer: the adapter the ingress calls (one per served model).

lookup(namespace, body) tries the exact cache, then (if enabled) the semantic one, and returns
("exact"|"semantic", stored response body) or None; store(namespace, body, response) fills both.
`namespace` is the tenant (the ingress passes the hashed API key): it is part of every exact key
and every semantic partition, so one tenant never receives another's answer. Neither method raises
for a normal request: a cache failure is logged and costs a hit, never the request.

Stored responses are complete, non-streamed OpenAI bodies; the ingress replays them as SSE when
the request asks for a stream, and sets a fresh id/created. Metrics: the ingress records hits and
hit latency (it sees the whole request); this layer records misses by kind through
deployments/metrics.py when Ray is up, and keeps every counter in stats() either way.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from deployments.response_cache import keys
from deployments.response_cache.batcher import EmbedBatcher
from deployments.response_cache.config import CacheConfig
from deployments.response_cache.exact import ExactCache
from deployments.response_cache.semantic import SemanticIndex

logger = logging.getLogger(__name__)

_UNCACHEABLE_FINISH = frozenset({None, "abort", "error", "cancelled"})
_RECENT_VECS = 512  # embeddings from lookups kept for the store() that follows a miss


class Embedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


class ResponseCacheLayer:
    def __init__(
        self,
        cfg: CacheConfig,
        model: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        embedder: Embedder | None = None,
    ):
        self.cfg = cfg
        self.model = model
        ex, sem = cfg.exact, cfg.semantic
        self.exact = (
            ExactCache(ex.max_entries, ex.ttl_s, ex.max_bytes, clock) if ex.enabled else None
        )
        self._embedder = embedder
        self.semantic: SemanticIndex | None = None
        self.batcher: EmbedBatcher | None = None
        if sem.enabled:
            assert sem.max_entries is not None, "validated by CacheConfig"
            self.semantic = SemanticIndex(
                embedder.dim if embedder is not None else 384,
                sem.threshold,
                sem.max_entries,
                sem.ttl_s,
                clock,
                use_guard=sem.guard,
            )
            self.batcher = EmbedBatcher(self._embed_sync, sem.batch_wait_ms, sem.max_batch_size)
            if embedder is None:
                # Load the model (and run its first forward) on the worker thread now, in the
                # background, so the first lookup doesn't pay for it.
                self.batcher.submit(self._warm).add_done_callback(_log_failure)
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = {"exact": 0, "semantic": 0}
        self.misses = {"exact": 0, "semantic": 0}
        self.bypassed = 0  # requests no enabled cache may serve (temperature > 0, no text...)
        self.errors = 0
        self._hit_ms: dict[str, deque[float]] = {k: deque(maxlen=2048) for k in self.hits}

    # -- the ingress API ------------------------------------------------------------------------
    async def lookup(self, namespace: str, request: dict[str, Any]) -> tuple[str, dict] | None:
        t0 = time.perf_counter()
        try:
            found = await self._lookup(namespace, request)
        except Exception:
            self.errors += 1
            logger.exception("response cache lookup failed (model %s)", self.model)
            return None
        if found is not None:
            self.hits[found[0]] += 1
            self._hit_ms[found[0]].append((time.perf_counter() - t0) * 1000.0)
        return found

    async def store(self, namespace: str, request: dict[str, Any], response: dict) -> None:
        try:
            await self._store(namespace, request, response)
        except Exception:
            self.errors += 1
            logger.exception("response cache store failed (model %s)", self.model)

    def stats(self) -> dict[str, Any]:
        def p50(xs: deque[float]) -> float | None:
            return float(np.median(np.fromiter(xs, float))) if xs else None

        out: dict[str, Any] = {
            "hits": dict(self.hits),
            "misses": dict(self.misses),
            "bypassed": self.bypassed,
            "errors": self.errors,
            "hit_latency_p50_ms": {k: p50(v) for k, v in self._hit_ms.items()},
            "entries": {
                "exact": len(self.exact) if self.exact is not None else 0,
                "semantic": len(self.semantic) if self.semantic is not None else 0,
            },
        }
        if self.exact is not None:
            out["exact"] = {
                "bytes": self.exact.nbytes,
                "evictions": self.exact.evictions,
                "expirations": self.exact.expirations,
            }
        if self.semantic is not None and self.batcher is not None:
            out["semantic"] = {
                "evictions": self.semantic.evictions,
                "expirations": self.semantic.expirations,
                "guard_rejections": dict(self.semantic.guard_rejections),
                "embed_calls": self.batcher.num_calls,
                "embedded_texts": self.batcher.num_texts,
            }
        return out

    def warmup(self) -> None:
        """Wait until the embedding model is loaded and warm (the constructor started that)."""
        if self.batcher is not None:
            self.batcher.submit(self._warm).result()

    def _warm(self) -> None:
        self._embed_sync(["warm up the embedder"])

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    # -- internals ------------------------------------------------------------------------------
    def _eligible(self, temperature_zero_only: bool, request: dict[str, Any]) -> bool:
        return not temperature_zero_only or keys.temperature(request) == 0.0

    async def _lookup(self, namespace: str, request: dict[str, Any]) -> tuple[str, dict] | None:
        looked = False
        if self.exact is not None and self._eligible(self.cfg.exact.temperature_zero_only, request):
            looked = True
            got = self.exact.get(keys.exact_key(namespace, request))
            if got is not None:
                return "exact", got
            self._miss("exact")
        split = self._semantic_split(namespace, request)
        if split is not None:
            looked = True
            assert self.semantic is not None and self.batcher is not None
            context, text = split
            vec = self._recent.get(text)  # the same text seen lately (another context, tenant)
            if vec is None:
                vec = await self.batcher.embed(text)
            self._remember(text, vec)
            hit = self.semantic.search(context, vec, text)
            if hit is not None:
                return "semantic", hit.response
            self._miss("semantic")
        if not looked:
            self.bypassed += 1
        return None

    async def _store(self, namespace: str, request: dict[str, Any], response: dict) -> None:
        if not _cacheable(response):
            return
        if self.exact is not None and self._eligible(self.cfg.exact.temperature_zero_only, request):
            self.exact.put(keys.exact_key(namespace, request), response)
        split = self._semantic_split(namespace, request)
        if split is not None:
            assert self.semantic is not None and self.batcher is not None
            context, text = split
            vec = self._recent.get(text)
            if vec is None:
                vec = await self.batcher.embed(text)
            self.semantic.add(context, vec, text, response)

    def _semantic_split(self, namespace: str, request: dict[str, Any]) -> tuple[str, str] | None:
        sem = self.cfg.semantic
        if self.semantic is None or not self._eligible(sem.temperature_zero_only, request):
            return None
        split = keys.semantic_split(namespace, request)
        if split is None or len(split[1]) > sem.max_text_chars:
            return None
        return split

    def _remember(self, text: str, vec: np.ndarray) -> None:
        self._recent[text] = vec
        self._recent.move_to_end(text)
        while len(self._recent) > _RECENT_VECS:
            self._recent.popitem(last=False)

    def _embed_sync(self, texts: list[str]) -> np.ndarray:
        # Runs on the batcher's single worker thread, so the lazy load happens once.
        if self._embedder is None:
            from deployments.response_cache.embedder import MiniLMEmbedder

            sem = self.cfg.semantic
            self._embedder = MiniLMEmbedder(num_threads=sem.embed_threads, dtype=sem.embed_dtype)
        return self._embedder.embed(texts)

    def _miss(self, kind: str) -> None:
        self.misses[kind] += 1
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        try:
            from deployments.metrics import get_metrics

            get_metrics().inc("response_cache_misses_total", 1, model=self.model, kind=kind)
        except Exception:  # metrics must never fail a request
            logger.debug("response_cache_misses_total not recorded", exc_info=True)


def _log_failure(fut: Any) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        logger.error("semantic cache embedder failed to load", exc_info=fut.exception())


def _cacheable(response: Any) -> bool:
    """Only complete answers: a body with choices that all finished normally, and no error."""
    if not isinstance(response, dict) or "error" in response:
        return False
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(
        isinstance(c, dict) and c.get("finish_reason") not in _UNCACHEABLE_FINISH for c in choices
    )
