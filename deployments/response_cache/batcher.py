"""Asyncio micro-batcher: concurrent `embed(text)` calls share one embedding call on a thread.

The first text to arrive opens a window of `max_wait_ms`; texts arriving inside it (up to
`max_batch_size`) join the batch, which then runs `embed_fn(texts)` on a single worker thread, so
the event loop never blocks and batches run one at a time. Texts that arrive while a batch runs
queue for the next one: under load, batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable

import numpy as np


class EmbedBatcher:
    def __init__(
        self,
        embed_fn: Callable[[list[str]], np.ndarray],
        max_wait_ms: float = 2.0,
        max_batch_size: int = 64,
    ):
        self.embed_fn = embed_fn
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_batch_size = max_batch_size
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed")
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps only weak ones
        self.num_calls = 0  # embed_fn calls
        self.num_texts = 0

    async def embed(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A new event loop (e.g. one asyncio.run per test): state of a dead loop is dropped.
            self._loop, self._pending, self._flush_handle = loop, [], None
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((text, fut))
        if len(self._pending) >= self.max_batch_size:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(self.max_wait_s, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch, self._pending = self._pending, []
        if batch:
            assert self._loop is not None
            task = self._loop.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        texts = [t for t, _ in batch]
        self.num_calls += 1
        self.num_texts += len(texts)
        try:
            assert self._loop is not None
            vecs = await self._loop.run_in_executor(self._executor, self.embed_fn, texts)
        except Exception as e:  # every waiter gets the error; the batcher stays usable
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, fut), v in zip(batch, vecs, strict=True):
            if not fut.done():  # a cancelled waiter (client gone) is skipped
                fut.set_result(v)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
