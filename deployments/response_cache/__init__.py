"""Exact + semantic response caches.

Ray-free algorithms: config (CacheConfig, pydantic), keys (request normalisation), exact (LRU/TTL
store), embedder (all-MiniLM-L6-v2), guard (near-miss rules), semantic (vector index), batcher
(asyncio micro-batcher). One adapter: layer.ResponseCacheLayer, what the ingress calls.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CacheConfig", "ResponseCacheLayer"]


def __getattr__(name: str) -> Any:
    # Lazy: cluster/config.py imports only CacheConfig and should not pull numpy and friends in.
    if name == "ResponseCacheLayer":
        from deployments.response_cache.layer import ResponseCacheLayer

        return ResponseCacheLayer
    if name == "CacheConfig":
        from deployments.response_cache.config import CacheConfig

        return CacheConfig
    raise AttributeError(name)
