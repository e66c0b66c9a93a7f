"""Exact + semantic response caches: Ray-free algorithms (exact, semantic, embedder) and one adapter
(ResponseCacheLayer) that the ingress calls."""
