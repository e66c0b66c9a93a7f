"""The engine as a serving replica sees it (``EngineClient``), and ``AsyncEngine``: the engine loop
on a thread of the caller's process.

The interface is LLMEngine's public face made asynchronous: ``add`` and ``abort`` return at once,
``outputs()`` waits for the next engine step(s) and returns every request's new tokens in one list
(one step's outputs, or several steps' when the consumer lagged, in step order). The consumer
(deployments/llm_server.py) routes them to the requests' output channels, where deltas that piled
up are merged (deployments/output_channel.py): that is the only place outputs are coalesced.

Implementations: ``AsyncEngine`` (here), ``engine.engine_core.EngineCoreClient`` (the same loop in
a process of its own), and the fake engine of the serving tests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from engine.outputs import BlockEvent, EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # the serving layer imports this module without the model code
    from engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an unexpected error; every request in flight failed."""


class EngineClient(Protocol):
    block_size: int
    max_model_len: int

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request. Raises ValueError (engine.request_checks.RequestError) for bad input
        and EngineDeadError once the engine stopped; nothing is queued then."""

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks before the next step; unknown ids are ignored."""

    async def outputs(self) -> list[RequestOutput]:
        """The outputs of the steps run since the last call (waits for at least one). A request
        whose add failed in the engine gets one finished output with finish_reason "error".
        Raises EngineDeadError when the engine stopped."""

    def stats(self) -> EngineStats: ...

    def pop_block_events(self) -> list[BlockEvent]: ...

    def check_health(self) -> None:
        """Raise when the engine can serve no more requests (Serve then replaces the replica)."""

    def shutdown(self) -> None: ...


def error_output(request_id: str, error: BaseException) -> RequestOutput:
    return RequestOutput(
        request_id=request_id,
        new_token_ids=[],
        new_text="",
        finished=True,
        finish_reason="error",
        error=error,
    )


class EngineLoop:
    """What both the thread and the engine-core process run: adds and aborts queued from another
    thread are applied between steps; ``run_once`` returns one step's outputs."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.adds: list[tuple[str, list[int], SamplingParams]] = []
        self.aborts: list[str] = []

    def queue_add(self, request_id: str, ids: list[int], params: SamplingParams) -> None:
        with self.lock:
            self.adds.append((request_id, ids, params))
        self.wake.set()

    def queue_abort(self, request_id: str) -> None:
        with self.lock:
            self.aborts.append(request_id)
        self.wake.set()

    def run_once(self, idle_wait_s: float) -> list[RequestOutput]:
        """Apply queued adds/aborts, then one step; waits up to ``idle_wait_s`` when idle.
        Exceptions from step() propagate (the caller fails every request)."""
        eng = self.engine
        with self.lock:
            adds, self.adds = self.adds, []
            aborts, self.aborts = self.aborts, []
        failed = []
        for rid in aborts:
            eng.abort(rid)
        for rid, ids, params in adds:
            try:
                eng.add_request(rid, ids, params)
            except ValueError as e:  # checked before queueing; e.g. a duplicate id
                failed.append(error_output(rid, e))
        if not eng.has_unfinished():
            if not failed:
                self.wake.wait(timeout=idle_wait_s)
                self.wake.clear()
            return failed
        return failed + eng.step()


class OutputBuffer:
    """Step outputs handed from an engine thread (or a pipe reader) to the event loop: one
    wake-up per step, however many requests it carries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: list[RequestOutput] = []
        self.error: BaseException | None = None

    def push(self, outs: list[RequestOutput]) -> None:
        with self._lock:
            self._out.extend(outs)
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()

    async def take(self) -> list[RequestOutput]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # one consumer loop at a time (a replica has one)
            self._ready = asyncio.Event()
            self._loop = loop
        while True:
            with self._lock:
                out, self._out = self._out, []
            if out:
                return out
            if self.error is not None:
                raise EngineDeadError(f"engine stopped after an error: {self.error}")
            self._ready.clear()
            await self._ready.wait()

    def _notify(self) -> None:
        loop = self._loop
        if loop is None:
            return  # nobody waits yet: take() finds them on its first call
        try:
            loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # loop closed
            pass


class AsyncEngine:
    """EngineClient with the engine loop on a thread of this process."""

    def __init__(self, make_engine: Callable[[], LLMEngine]) -> None:
        self.engine = make_engine()
        self.max_model_len = self.engine.max_model_len
        self.block_size = self.engine.block_size
        self._loop = EngineLoop(self.engine)
        self._buffer = OutputBuffer()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fleetlm-engine", daemon=True)
        self._thread.start()

    @property
    def error(self) -> BaseException | None:
        return self._buffer.error

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine stopped after an error: {self.error}")
        self.engine.validate(prompt_token_ids, params)
        self._loop.queue_add(request_id, list(prompt_token_ids), params)

    def abort(self, request_id: str) -> None:
        self._loop.queue_abort(request_id)

    async def outputs(self) -> list[RequestOutput]:
        return await self._buffer.take()

    def stats(self) -> EngineStats:
        s = self.engine.stats()
        with self._loop.lock:
            s.num_waiting += len(self._loop.adds)
        return s

    def pop_block_events(self) -> list[BlockEvent]:
        return self.engine.pop_block_events()

    def check_health(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine stopped after an error: {self.error}")
        check = getattr(self.engine.runner, "check_health", None)  # tensor-parallel workers
        if check is not None:
            check()

    def shutdown(self) -> None:
        self._stopped = True
        self._loop.wake.set()
        self._thread.join(timeout=10)
        close = getattr(self.engine.runner, "shutdown", None)
        if close is not None:
            close()

    def _run(self) -> None:
        while not self._stopped:
            try:
                outs = self._loop.run_once(idle_wait_s=0.5)
            except Exception as e:  # a bug or device failure: fail everyone, never hang them
                logger.exception("engine step failed")
                self._buffer.fail(e)
                return
            if outs:
                self._buffer.push(outs)
