"""Merge several async streams into one, coalescing whatever piled up while the consumer was busy.

Used twice on the serving path: the replica merges the n engine streams of one request (n > 1),
and the ingress merges the replica streams of a multi-prompt request. Coalescing is the point: each
hop (replica -> ingress -> proxy -> client) costs a few hundred microseconds of CPU per message, so
a consumer that lags gets one message carrying several engine steps instead of a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()


class StreamError(Exception):
    """Wraps an exception raised by source ``index`` (the consumer decides what it means)."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"stream {index}: {error!r}")
        self.index = index
        self.error = error


async def merge_coalesced(
    sources: list[AsyncIterator[T]],
) -> AsyncIterator[list[tuple[int, T]]]:
    """Yield batches ``[(source_index, item), ...]`` in arrival order until every source ends.

    An exception in a source is raised here as StreamError (the other sources are cancelled).
    Closing this generator (or cancelling its consumer) cancels every source's pump task, which
    closes the source iterators (for engine streams: aborts the requests and frees their blocks).
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, src: AsyncIterator[T]) -> None:
        try:
            async for item in src:
                queue.put_nowait((i, item))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait((i, StreamError(i, e)))
            return
        finally:
            aclose = getattr(src, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()
        queue.put_nowait((i, _DONE))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(sources)]
    live = len(tasks)
    try:
        while live:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            out: list[tuple[int, T]] = []
            for i, item in batch:
                if item is _DONE:
                    live -= 1
                elif isinstance(item, StreamError):
                    raise item
                else:
                    out.append((i, item))
            if out:
                yield out
    finally:
        for t in tasks:
            t.cancel()
        # Let the cancelled pumps run their cleanup (abort) before we return.
        await asyncio.gather(*tasks, return_exceptions=True)
