"""Output channels: one ordered stream per (ingress process, replica) carries its requests' tokens.

Why: each message on a Ray Serve stream costs a few hundred microseconds of CPU at both ends, and on
the replica that CPU is taken from the engine thread (the GIL). With one stream per request, a step
of a batch of 32 sends 32 messages; through a channel it sends one, carrying 32 deltas. That is how
vLLM's engine core hands outputs to its API server (one message per step over ZMQ). Tokens are not
held back to batch them: a channel sends whatever is ready the moment the replica's loop gets to it.

The protocol (LLMServer.generate / LLMServer.channel, ingress.py):

1. The ingress registers a sink for the request, then calls ``generate`` with ``req["channel"] =
   <its channel id>``. That stream carries one ``{"replica": id}`` message once the request is
   admitted, then an ``{"error": ...}`` message if the request fails, then ends. Cancelling it
   aborts the request.
2. The replica puts every engine output of that request into the channel's ``Outbox`` (merged per
   request and choice while nobody drains it: ``coalesce``).
3. The ingress keeps one ``channel`` stream open to each replica it has requests on
   (``ChannelMux.ensure``); it yields ``{"replica": id}`` first, then ``{"d": {request_id:
   [delta, ...]}}`` batches. The mux hands each request's deltas to its sink.
4. A channel ends itself when its ingress has had no request on the replica for ``idle_s``, so a
   draining replica is not held by it; the mux reopens it when a request is bound there again.
5. While the replica has requests of the channel in flight and nothing to send, it sends
   ``{"hb": 1}`` every ``heartbeat_s``. The mux fails a channel that carried no message for
   ``liveness_s`` while requests are bound to it: a replica whose node vanished is otherwise
   noticed only when Ray declares the node dead (its health checks: about 15 s), and its streams
   would wait that long for their error event.

Ray-free: the replica side is ``ChannelHub`` (asyncio only); the ingress side is ``ChannelMux``,
which opens channels through a callable, so both are unit-tested without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from deployments.openai_format import merge_deltas

logger = logging.getLogger("ray.serve")

CHANNEL_IDLE_S = 5.0
CHANNEL_HEARTBEAT_S = 0.5
# Several heartbeats: an event loop of a busy replica or ingress may stall for a while on a loaded
# machine, and a healthy stream cut for that would be worse than a late error.
CHANNEL_LIVENESS_S = 5.0


def coalesce(pending: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """Add ``delta`` to what waits for a slow consumer, one merged delta per choice index.

    The one place outputs that piled up are merged (replica outbox, ingress sink): each hop
    (replica -> ingress -> proxy -> client) costs a few hundred microseconds of CPU per message,
    so a consumer that lags gets one message carrying several engine steps instead of a backlog."""
    i = delta["index"]
    pending[i] = merge_deltas(pending[i], delta) if i in pending else delta


# -- replica side ------------------------------------------------------------------------------
class Outbox:
    """Deltas for one ingress channel, merged per (request, choice) until a channel drains them."""

    def __init__(self) -> None:
        self.pending: dict[str, dict[int, dict[str, Any]]] = {}
        self.event = asyncio.Event()
        self.live = 0  # requests of this channel in flight on this replica
        self.generation = 0  # the channel stream currently draining this box
        self.connected = False

    def put(self, request_id: str, delta: dict[str, Any]) -> None:
        coalesce(self.pending.setdefault(request_id, {}), delta)
        self.event.set()

    def drain(self) -> dict[str, list[dict[str, Any]]]:
        out = {rid: list(per.values()) for rid, per in self.pending.items()}
        self.pending = {}
        self.event.clear()
        return out


class ChannelHub:
    """The replica's outboxes, one per ingress channel id."""

    def __init__(
        self, idle_s: float = CHANNEL_IDLE_S, heartbeat_s: float = CHANNEL_HEARTBEAT_S
    ) -> None:
        self.idle_s = idle_s
        self.heartbeat_s = heartbeat_s
        self.boxes: dict[str, Outbox] = {}

    def box(self, channel_id: str) -> Outbox:
        b = self.boxes.get(channel_id)
        if b is None:
            b = self.boxes[channel_id] = Outbox()
        return b

    def request_started(self, channel_id: str) -> Outbox:
        b = self.box(channel_id)
        b.live += 1
        return b

    def request_ended(self, channel_id: str) -> None:
        b = self.boxes.get(channel_id)
        if b is None:
            return
        b.live -= 1
        self._collect(channel_id, b)

    def _collect(self, channel_id: str, b: Outbox) -> None:
        # Nothing in flight, nothing to send, nobody draining: the box goes (a channel whose
        # ingress went away leaves nothing behind).
        if b.live <= 0 and not b.pending and not b.connected:
            self.boxes.pop(channel_id, None)

    async def serve(self, channel_id: str, hello: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The channel stream: ``hello`` first, then ``{"d": batch}`` whenever deltas are ready,
        ``{"hb": 1}`` after ``heartbeat_s`` without any while requests are in flight."""
        b = self.box(channel_id)
        b.generation += 1
        gen = b.generation
        b.connected = True
        idle = 0.0  # seconds without a request of this channel in flight
        tick = min(self.heartbeat_s, self.idle_s)
        try:
            yield hello
            while b.generation == gen:
                if not b.pending:
                    try:
                        await asyncio.wait_for(b.event.wait(), timeout=tick)
                    except TimeoutError:
                        if b.generation != gen:
                            return
                        if b.live > 0:
                            idle = 0.0
                            yield {"hb": 1}  # alive, nothing to send yet (e.g. a long prefill)
                        elif not b.pending:
                            idle += tick
                            if idle >= self.idle_s:
                                return  # idle: the ingress reopens it on its next request here
                        continue
                    if b.generation != gen:
                        return  # a newer stream of the same channel took over
                idle = 0.0
                batch = b.drain()
                if batch:
                    yield {"d": batch}
        finally:
            if b.generation == gen:
                b.connected = False
                self._collect(channel_id, b)


# -- ingress side ------------------------------------------------------------------------------
class ChannelError(RuntimeError):
    """The channel to a replica failed; its requests cannot get their tokens."""


class Sink:
    """One request's deltas as they arrive through its replica's channel, merged per choice
    until the request's consumer takes them; then its end (an error message or exception)."""

    def __init__(self) -> None:
        self.pending: dict[int, dict[str, Any]] = {}
        self.end: BaseException | dict[str, Any] | None = None
        self.event = asyncio.Event()
        self.replica: str | None = None

    def put(self, deltas: list[dict[str, Any]]) -> None:
        for d in deltas:
            coalesce(self.pending, d)
        self.event.set()

    def put_end(self, end: BaseException | dict[str, Any]) -> None:
        """``{"error": {...}}`` (APIError.to_dict()) or the exception that broke the channel;
        it is taken after the deltas that arrived before it."""
        if self.end is None:
            self.end = end
        self.event.set()

    async def take(self) -> list[dict[str, Any]] | BaseException | dict[str, Any]:
        while True:
            if self.pending:
                out, self.pending = list(self.pending.values()), {}
                return out
            if self.end is not None:
                return self.end
            self.event.clear()
            await self.event.wait()


OpenChannel = Callable[[str], AsyncIterator[dict[str, Any]]]


class ChannelMux:
    """The ingress's channels (one per replica it has requests on) and its requests' sinks.

    ``open_channel(replica_id)`` starts a channel stream aimed at that replica (its first message
    says which replica answered). Items a sink receives: a list of deltas, ``{"error": {...}}``
    (APIError.to_dict()) or an exception (the channel broke).
    """

    def __init__(
        self,
        open_channel: OpenChannel,
        channel_id: str = "",
        liveness_s: float = CHANNEL_LIVENESS_S,
    ) -> None:
        self.open_channel = open_channel
        self.channel_id = channel_id  # what requests name in req["channel"]
        self.liveness_s = liveness_s
        self.sinks: dict[str, Sink] = {}
        self._channels: dict[str, asyncio.Task] = {}
        self._ready: dict[str, asyncio.Future] = {}
        self.num_opened = 0  # channel streams started (for tests and debugging)

    def register(self, request_id: str) -> Sink:
        if request_id in self.sinks:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        s = self.sinks[request_id] = Sink()
        return s

    def unregister(self, request_id: str) -> None:
        self.sinks.pop(request_id, None)

    async def bind(self, request_id: str, replica: str) -> None:
        """The request runs on ``replica``: make sure a channel to it is open (hello received)."""
        s = self.sinks.get(request_id)
        if s is not None:
            s.replica = replica
        fut = self._ready.get(replica)
        if fut is None or replica not in self._channels:
            fut = self._start(replica)
        # shield: one waiter giving up (its client left) must not cancel the shared future.
        await asyncio.shield(fut)

    def _start(self, replica: str) -> asyncio.Future:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._ready[replica] = fut
        self.num_opened += 1
        # A fresh context: the channel is not part of the request that happened to open it (Ray
        # Serve keys its request context, and cancellation, on context variables).
        task = asyncio.get_running_loop().create_task(
            self._run(replica, fut), context=contextvars.Context()
        )
        self._channels[replica] = task
        return fut

    async def _run(self, replica: str, ready: asyncio.Future) -> None:
        error: BaseException | None = None
        stream = None
        try:
            stream = self.open_channel(replica)
            hello = await stream.__anext__()
            if hello.get("replica") != replica:
                raise ChannelError(
                    f"channel to replica {replica} reached {hello.get('replica')!r} instead"
                )
            if not ready.done():
                ready.set_result(None)
            while True:
                msg = await self._next(stream, replica)
                if msg is None:
                    break
                for rid, deltas in msg.get("d", {}).items():
                    s = self.sinks.get(rid)
                    if s is not None:
                        s.put(deltas)
        except asyncio.CancelledError:
            error = ChannelError(f"channel to replica {replica} was cancelled")
        except StopAsyncIteration:
            error = ChannelError(f"channel to replica {replica} ended before its first message")
        except Exception as e:  # noqa: BLE001 - forwarded to the requests that needed it
            error = e
        finally:
            if stream is not None:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(BaseException):
                        await aclose()
            if self._channels.get(replica) is asyncio.current_task():
                del self._channels[replica]
                self._ready.pop(replica, None)
        bound = [s for s in self.sinks.values() if s.replica == replica]
        if error is not None:
            if not isinstance(error, ChannelError):
                logger.warning("output channel to replica %s failed: %r", replica, error)
            if not ready.done():
                ready.set_exception(error)
                ready.exception()  # retrieved: waiters get it through bind()
            for s in bound:
                s.put_end(error)
        elif bound and replica not in self._channels:
            # Ended for idleness while a request was being bound here: reopen.
            self._start(replica)
        elif not ready.done():
            ready.set_exception(ChannelError(f"channel to replica {replica} ended early"))
            ready.exception()

    async def _next(self, stream: AsyncIterator[dict[str, Any]], replica: str) -> dict | None:
        """The channel's next message (None at its end). Raises ChannelError when requests are
        bound to ``replica`` and nothing (not even a heartbeat) came for ``liveness_s``."""
        nxt = asyncio.ensure_future(stream.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=self.liveness_s)
                if not done:
                    await asyncio.sleep(0)  # a message that landed with the timeout counts
                if nxt.done():
                    try:
                        return nxt.result()
                    except StopAsyncIteration:
                        return None
                if any(s.replica == replica for s in self.sinks.values()):
                    msg = f"no word from replica {replica} for {self.liveness_s:.0f}s"
                    logger.warning("output channel: %s; failing its requests", msg)
                    raise ChannelError(msg + " (its process or node is gone)")
        finally:
            if not nxt.done():
                nxt.cancel()

    async def close(self) -> None:
        tasks = list(self._channels.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ChannelRequest:
    """The ingress's view of one request whose tokens come through a channel.

    ``stream`` is the request's own stream after its ``{"replica": id}`` message (it may still
    carry ``{"error": ...}``); ``cancel`` cancels it (which aborts the request on the replica).
    ``messages()`` yields ``{"outputs": [delta, ...]}`` or ``{"error": ...}`` like a request
    stream would, until every one of ``num_choices`` choices has finished.
    """

    def __init__(
        self,
        mux: ChannelMux,
        request_id: str,
        sink: Sink,
        stream: AsyncIterator[dict[str, Any]],
        cancel: Callable[[], None],
        num_choices: int,
    ) -> None:
        self.mux = mux
        self.request_id = request_id
        self.sink = sink
        self.replica = sink.replica or ""
        self._stream = stream
        self._cancel = cancel
        self._left = num_choices
        self._first: dict[str, Any] | None = None
        self._closed = False
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Forward the request stream's error message (or failure) to the sink."""
        try:
            async for msg in self._stream:
                if "error" in msg:
                    self.sink.put_end(msg)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. the replica died
            self.sink.put_end(e)

    async def next_message(self) -> dict[str, Any] | None:
        """The next message, or None once every choice has finished. Deltas that piled up while
        the consumer was busy come merged as one message (per choice, in order)."""
        if self._left <= 0:
            return None
        item = await self.sink.take()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, dict):
            self._left = 0  # an error ends the request
            return item
        self._left -= sum(1 for d in item if d.get("finish_reason") is not None)
        return {"outputs": item}

    async def first_message(self) -> dict[str, Any] | None:
        """Wait for the first message (its status decides the HTTP one); messages() repeats it."""
        self._first = await self.next_message()
        return self._first

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            while (msg := await self.next_message()) is not None:
                yield msg
        finally:
            self.close()

    def close(self) -> None:
        """Idempotent: stop watching, cancel the request (a no-op once it ended), drop the sink."""
        if self._closed:
            return
        self._closed = True
        self._watcher.cancel()
        self._cancel()
        self.mux.unregister(self.request_id)
