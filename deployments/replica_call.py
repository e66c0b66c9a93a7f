"""How the ingress talks to a model's replicas: one streamed handle call per request for admission,
errors and cancellation; the tokens come through the replica's output channel (output_channel.py).

``open_call`` starts the call and waits for the request's first tokens (their status becomes the
HTTP status); ``call_deltas`` yields the request's deltas.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from typing import Any

from deployments.output_channel import ChannelMux, ChannelRequest
from deployments.protocol import APIError


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
    """This ingress process's output channels to one model's replicas (replicas key their
    outboxes on the channel id)."""
    cid = uuid.uuid4().hex
    return ChannelMux(functools.partial(_channel_stream, handle, cid), channel_id=cid)


async def open_call(
    handle: Any, channels: ChannelMux, req: dict[str, Any], rid: str, model: str
) -> ChannelRequest:
    """Start the request's call and wait until its first tokens (or its error) arrived."""
    from ray.serve.exceptions import BackPressureError

    try:
        sink = channels.register(rid)
    except ValueError as e:
        raise APIError(
            400, f"x-request-id {rid!r} is already in flight", param="x-request-id"
        ) from e
    gen = handle.options(stream=True).generate.remote({**req, "channel": channels.channel_id})
    try:
        first = await gen.__anext__()
    except BackPressureError:
        channels.unregister(rid)
        raise APIError(
            429,
            f"model {model!r} is at capacity (every replica's queue is full); retry shortly",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except StopAsyncIteration:
        channels.unregister(rid)
        raise internal_error(rid) from None
    except BaseException:
        cancel(gen)  # e.g. the client left while we waited for admission
        channels.unregister(rid)
        raise
    if "error" in first:
        cancel(gen)
        channels.unregister(rid)
        raise APIError.from_dict(first["error"])
    replica = first["replica"]
    choices = int(req.get("n", 1)) * len(req.get("prompts") or [None])
    creq = ChannelRequest(channels, rid, sink, gen, lambda: cancel(gen), choices)
    try:
        await channels.bind(rid, replica)
        creq.replica = replica
        msg = await creq.first_message()
    except BaseException:
        creq.close()
        raise
    if msg is not None and "error" in msg:
        creq.close()
        raise APIError.from_dict(msg["error"])
    return creq


async def call_deltas(call: ChannelRequest) -> AsyncIterator[list[tuple[int, dict[str, Any]]]]:
    """The request's deltas as [(choice index, delta)]; what piled up meanwhile comes as one."""
    msgs = call.messages()  # closes the request (cancels its call) when done
    try:
        async for msg in msgs:
            if "error" in msg:
                raise APIError.from_dict(msg["error"])
            yield [(d["index"], d) for d in msg["outputs"]]
    finally:
        await msgs.aclose()
