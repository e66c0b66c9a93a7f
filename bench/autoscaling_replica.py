"""A stand-in model replica whose capacity is its own, for autoscaling tests and benchmarks: it runs
at most `max_running` requests at once, each producing tokens at `tokens_per_s_per_request`
(asleep, not on the CPU), so N replicas really serve N times one replica's load even on 2 cores.
It reports record_autoscaling_stats() with the same keys as deployments/llm_server.LLMServer."""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

TTFT_WINDOW_S = 10.0


class CapacityReplica:
    def __init__(self, max_running: int = 2, tokens_per_s_per_request: float = 20.0) -> None:
        self.max_running = max_running
        self.tok_s = tokens_per_s_per_request
        self.slots = asyncio.Semaphore(max_running)
        self.num_waiting = 0
        self.num_running = 0
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=4096)

    async def __call__(self, output_tokens: int = 16) -> dict[str, Any]:
        t0 = time.monotonic()
        await self._admit()
        try:
            await asyncio.sleep(1.0 / self.tok_s)
            ttft = time.monotonic() - t0
            self.ttfts.append((time.monotonic(), ttft))
            await asyncio.sleep((output_tokens - 1) / self.tok_s)
        finally:
            self._release()
        return {"ttft_s": ttft, "pid": os.getpid()}

    async def stream(self, output_tokens: int = 16) -> AsyncIterator[dict[str, Any]]:
        """Two chunks: the first token, then the rest at once (the client times the first)."""
        t0 = time.monotonic()
        await self._admit()
        try:
            await asyncio.sleep(1.0 / self.tok_s)
            self.ttfts.append((time.monotonic(), time.monotonic() - t0))
            yield {"tokens": 1}
            await asyncio.sleep((output_tokens - 1) / self.tok_s)
            yield {"tokens": output_tokens - 1, "pid": os.getpid()}
        finally:
            self._release()

    async def _admit(self) -> None:
        self.num_waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.num_waiting -= 1
        self.num_running += 1

    def _release(self) -> None:
        self.num_running -= 1
        self.slots.release()

    def record_autoscaling_stats(self) -> dict[str, float]:
        now = time.monotonic()
        while self.ttfts and self.ttfts[0][0] < now - TTFT_WINDOW_S:
            self.ttfts.popleft()
        vals = sorted(v for _, v in self.ttfts)
        p90 = vals[min(len(vals) - 1, int(0.9 * len(vals)))] if vals else 0.0
        return {
            "queue_depth": self.num_waiting + self.num_running,
            "num_waiting": self.num_waiting,
            "num_running": self.num_running,
            "kv_cache_usage": self.num_running / self.max_running,
            "ttft_samples": len(vals),
            "ttft_p90_s": p90,
        }

    def pid(self) -> int:
        return os.getpid()
