"""How the ingress talks to a model's replicas: one streamed handle call per request.

``open_call`` starts the call and waits for its first message (its status becomes the HTTP
status); ``call_deltas`` yields the request's deltas. With output channels (the default) the call
carries admission, errors and cancellation while the tokens come through the replica's channel
(output_channel.py); without, the call carries the tokens too.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from typing import Any

from deployments.model_runtime import ModelRuntime
from deployments.openai_format import merge_deltas
from deployments.output_channel import ChannelMux, ChannelRequest
from deployments.protocol import APIError
from deployments.stream_merge import StreamError, merge_coalesced


def internal_error(rid: str) -> APIError:
    return APIError(
        500, f"internal error (request id {rid}); see the server log", type="server_error"
    )


def cancel(gen: Any) -> None:
    """Best-effort cancel of a handle call; a call that already failed re-raises its error here."""
    try:
        gen.cancel()
    except Exception:
        pass


class Call:
    """One streamed handle call whose first message has arrived (so its status is known)."""

    def __init__(self, gen: Any, first: dict[str, Any] | None, replica: str = "") -> None:
        self.gen = gen  # a handle's response stream, or an output_channel.ChannelRequest
        self.first = first
        self.replica = replica or (first or {}).get("replica", "")

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        if isinstance(self.gen, ChannelRequest):
            async for msg in self.gen.messages():  # closes (cancels the request) when done
                yield msg
            return
        try:
            yield self.first
            async for msg in self.gen:
                yield msg
        finally:
            # Client gone or request done: cancelling reaches the replica, which aborts the
            # engine request and frees its KV blocks (a no-op once the stream has ended).
            cancel(self.gen)


def _channel_id() -> str:
    """This ingress process's channel id for one model (replicas key their outboxes on it)."""
    return uuid.uuid4().hex


async def _channel_stream(handle: Any, channel_id: str, replica: str) -> AsyncIterator[dict]:
    """The output channel stream to ``replica`` (the router honours ``target_replica``)."""
    gen = handle.options(stream=True).channel.remote(
        {"channel": channel_id, "target_replica": replica}
    )
    try:
        async for msg in gen:
            yield msg
    finally:
        cancel(gen)


def new_channel_mux(handle: Any) -> ChannelMux:
    """This ingress process's output channels to one model's replicas."""
    cid = _channel_id()
    return ChannelMux(functools.partial(_channel_stream, handle, cid), channel_id=cid)


async def open_call(rt: ModelRuntime, req: dict[str, Any], rid: str) -> Call:
    """Start the streamed call and wait for its first message: its status decides ours."""
    from ray.serve.exceptions import BackPressureError

    sink = None
    if rt.channels is not None:
        try:
            sink = rt.channels.register(rid)
        except ValueError as e:
            msg = f"x-request-id {rid!r} is already in flight"
            raise APIError(400, msg, param="x-request-id") from e
        req = {**req, "channel": rt.channels.channel_id}
    gen = rt.handle.options(stream=True).generate.remote(req)
    try:
        first = await gen.__anext__()
    except BackPressureError:
        raise APIError(
            429,
            f"model {rt.name!r} is at capacity (every replica's queue is full); retry shortly",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except StopAsyncIteration:
        raise internal_error(rid) from None
    except BaseException:
        cancel(gen)  # e.g. the client left while we waited for the first token
        if sink is not None:
            rt.channels.unregister(rid)
        raise
    if "error" in first:
        cancel(gen)
        if sink is not None:
            rt.channels.unregister(rid)
        raise APIError.from_dict(first["error"])
    if sink is None:
        return Call(gen, first)
    return await _open_channel_call(rt, req, rid, gen, sink, first["replica"])


async def _open_channel_call(
    rt: ModelRuntime, req: dict[str, Any], rid: str, gen: Any, sink: Any, replica: str
) -> Call:
    """The request was admitted on ``replica``; its tokens come through that channel."""
    choices = int(req.get("n", 1)) * len(req.get("prompts") or [None])
    creq = ChannelRequest(rt.channels, rid, sink, gen, lambda: cancel(gen), choices)
    try:
        await rt.channels.bind(rid, replica)
        creq.replica = replica
        first = await creq.first_message()
    except BaseException:
        creq.close()
        raise
    if first is not None and "error" in first:
        creq.close()
        raise APIError.from_dict(first["error"])
    return Call(creq, None, replica)


async def call_deltas(call: Call) -> AsyncIterator[list[tuple[int, dict[str, Any]]]]:
    """Replica messages as [(choice index, delta)]; what piled up meanwhile comes as one."""
    if isinstance(call.gen, ChannelRequest):  # merges what piled up by itself
        msgs = call.messages()
        try:
            async for msg in msgs:
                if "error" in msg:
                    raise APIError.from_dict(msg["error"])
                yield [(d["index"], d) for d in msg["outputs"]]
        finally:
            await msgs.aclose()
        return
    merged = merge_coalesced([call.messages()])
    try:
        async for batch in merged:
            by_idx: dict[int, dict[str, Any]] = {}
            for _, msg in batch:
                if "error" in msg:
                    raise APIError.from_dict(msg["error"])
                for d in msg["outputs"]:
                    idx = d["index"]
                    by_idx[idx] = merge_deltas(by_idx[idx], d) if idx in by_idx else d
            yield list(by_idx.items())
    except StreamError as e:
        raise e.error from None
    finally:
        await merged.aclose()
