"""Asyncio micro-batcher: concurrent `embed(text)` calls share one embedding call on a thread.

No fixed window by default: when the worker is idle, a text starts a batch on the next turn of the
event loop (so texts arriving in the same turn, e.g. from one `gather`, share it) and a lone
lookup never waits for a timer. Texts that arrive while a batch runs queue and all go together in
the next batch, which starts the moment the running one returns: under load, batches grow by
themselves. `max_wait_ms > 0` adds a window: an idle worker waits that long after the first text
before starting, to collect more. `embed_fn(texts)` runs on a single worker thread, so the event
loop never blocks and batches run one at a time; at most `max_batch_size` texts per call.
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
        max_wait_ms: float = 0.0,
        max_batch_size: int = 64,
    ):
        self.embed_fn = embed_fn
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_batch_size = max_batch_size
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed")
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._running = False  # a batch is on the worker thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps only weak ones
        self.num_calls = 0  # embed_fn calls
        self.num_texts = 0

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future[object]:
        """Run `fn` on the worker thread (queued behind any batch), e.g. loading the model."""
        return self._executor.submit(fn)

    async def embed(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A new event loop (e.g. one asyncio.run per test): state of a dead loop is dropped.
            self._loop, self._pending, self._flush_handle, self._running = loop, [], None, False
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((text, fut))
        if self._running:
            pass  # the running batch starts the next one when it returns
        elif len(self._pending) >= self.max_batch_size:
            self._flush()
        elif self._flush_handle is None:
            if self.max_wait_s > 0:
                self._flush_handle = loop.call_later(self.max_wait_s, self._flush)
            else:
                self._flush_handle = loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._running or not self._pending:
            return
        batch = self._pending[: self.max_batch_size]
        self._pending = self._pending[self.max_batch_size :]
        assert self._loop is not None
        self._running = True
        task = self._loop.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        texts = [t for t, _ in batch]
        self.num_calls += 1
        self.num_texts += len(texts)
        assert self._loop is not None
        vecs: np.ndarray | None = None
        error: Exception | None = None
        try:
            vecs = await self._loop.run_in_executor(self._executor, self.embed_fn, texts)
        except asyncio.CancelledError:  # the loop is shutting down
            self._running = False
            for _, fut in batch:
                fut.cancel()
            raise
        except Exception as e:  # every waiter gets the error; the batcher stays usable
            error = e
        self._running = False
        if self._pending:  # what queued meanwhile goes now, without a window
            self._flush()
        for i, (_, fut) in enumerate(batch):
            if fut.done():  # a cancelled waiter (client gone) is skipped
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                assert vecs is not None
                fut.set_result(vecs[i])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
