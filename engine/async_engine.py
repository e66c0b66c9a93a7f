"""AsyncEngine: one background thread runs ``LLMEngine.step()``; each request is an async stream.

The event loop never touches scheduler state: adds and aborts are queued under a lock and applied by
the engine thread between steps; outputs go back through ``loop.call_soon_threadsafe``, one call per
step per event loop. A consumer that lags gets the queued updates merged into one (several tokens in
one chunk), so a slow client costs one wake-up, not one per token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import BlockEvent, EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread hit an unexpected error; requests in flight were failed."""


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    b.new_token_ids = a.new_token_ids + b.new_token_ids
    b.new_text = a.new_text + b.new_text
    if a.logprobs or b.logprobs:
        b.logprobs = (a.logprobs or []) + (b.logprobs or [])
    return b


class AsyncEngine:
    def __init__(self, config: EngineConfig, model_path: str | None = None) -> None:
        self.engine = LLMEngine(config, model_path)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.block_size = self.engine.block_size
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fleetlm-engine", daemon=True)
        self._thread.start()

    # -- public API (event loop side) ---------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise EngineDeadError(f"engine stopped after an error: {self.error}")
        self.engine.validate(prompt_token_ids, params)  # ValueError before anything is queued
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in flight")
            self._streams[request_id] = (loop, queue)
            self._adds.append((request_id, list(prompt_token_ids), params))
        self._wake.set()
        finished = False
        try:
            while True:
                out = await queue.get()
                while not queue.empty() and isinstance(out, RequestOutput) and not out.finished:
                    nxt = queue.get_nowait()
                    out = _merge(out, nxt) if isinstance(nxt, RequestOutput) else nxt
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._streams.pop(request_id, None) is None:
                return
            self._aborts.append(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        s = self.engine.stats()
        with self._lock:
            s.num_waiting += len(self._adds)
        return s

    def pop_block_events(self) -> list[BlockEvent]:
        return self.engine.pop_block_events()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while not self._stopped:
            with self._lock:
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for rid in aborts:
                eng.abort(rid)
            for rid, ids, params in adds:
                try:
                    eng.add_request(rid, ids, params)
                except ValueError as e:  # e.g. a race with the same id; validated before
                    self._deliver([(rid, e)])
            if not eng.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outs = eng.step()
            except Exception as e:  # a bug or device failure: fail everyone, never hang them
                logger.exception("engine step failed")
                self.error = e
                with self._lock:
                    rids = list(self._streams)
                for rid in rids:
                    eng.abort(rid)
                self._deliver([(rid, EngineDeadError(f"engine step failed: {e}")) for rid in rids])
                return
            if outs:
                self._deliver([(o.request_id, o) for o in outs])

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        per_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            for rid, item in items:
                s = self._streams.get(rid)
                if s is None:
                    continue
                finished = isinstance(item, BaseException) or item.finished
                if finished:
                    del self._streams[rid]
                per_loop[s[0]].append((s[1], item))
        for loop, batch in per_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # loop closed
                pass


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)
