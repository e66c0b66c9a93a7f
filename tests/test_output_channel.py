"""Output channels (deployments/output_channel.py) without Ray: the replica's ChannelHub served
straight into the ingress's ChannelMux, as the Serve handles would carry it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deployments.output_channel import ChannelError, ChannelHub, ChannelMux, ChannelRequest

CID = "ingress-1"


def delta(i: int, toks: list[int], finish: str | None = None) -> dict[str, Any]:
    return {"index": i, "token_ids": toks, "text": "".join(f"<{t}>" for t in toks),
            "finish_reason": finish}  # fmt: skip


class Replicas:
    """Hubs by replica id; ``open`` is what the ingress's handle call would reach."""

    def __init__(self, *ids: str, idle_s: float = 5.0) -> None:
        self.hubs = {r: ChannelHub(idle_s=idle_s) for r in ids}
        self.redirect: dict[str, str] = {}  # replica asked for -> replica that answers

    def open(self, replica: str) -> AsyncIterator[dict[str, Any]]:
        actual = self.redirect.get(replica, replica)
        return self.hubs[actual].serve(CID, {"replica": actual})


async def silent_stream() -> AsyncIterator[dict[str, Any]]:
    """A request stream after its replica message: nothing more, ends when the request ends."""
    await asyncio.sleep(3600)
    yield {}


def request(mux: ChannelMux, rid: str, choices: int = 1, stream=None) -> ChannelRequest:
    sink = mux.sinks[rid]
    cancelled = []
    r = ChannelRequest(
        mux, rid, sink, stream or silent_stream(), lambda: cancelled.append(rid), choices
    )
    r.cancelled = cancelled  # type: ignore[attr-defined]
    return r


async def admitted(reps: Replicas, mux: ChannelMux, rid: str, replica: str = "A"):
    """The request is registered at the ingress, admitted on ``replica`` and bound to its channel:
    returns that replica's outbox for the ingress's channel."""
    mux.register(rid)
    box = reps.hubs[replica].request_started(CID)
    await mux.bind(rid, replica)
    return box


async def collect(r: ChannelRequest) -> list[dict[str, Any]]:
    return [m async for m in r.messages()]


def test_tokens_arrive_in_order_and_the_request_ends_at_its_finish():
    async def go():
        reps = Replicas("A")
        mux = ChannelMux(reps.open, channel_id=CID)
        box = await admitted(reps, mux, "r1", "A")
        r = request(mux, "r1")
        task = asyncio.ensure_future(collect(r))
        for t in range(5):
            box.put("r1", delta(0, [t], "length" if t == 4 else None))
            await asyncio.sleep(0.01)  # a step apart: one message each
        msgs = await asyncio.wait_for(task, 2)
        toks = [t for m in msgs for d in m["outputs"] for t in d["token_ids"]]
        assert toks == [0, 1, 2, 3, 4]
        assert len(msgs) == 5
        assert msgs[-1]["outputs"][0]["finish_reason"] == "length"
        assert r.cancelled == ["r1"]  # closing cancels the request stream (a no-op once done)
        assert "r1" not in mux.sinks
        await mux.close()

    asyncio.run(go())


def test_one_message_per_step_carries_every_request_and_lagging_deltas_merge():
    async def go():
        reps = Replicas("A")
        mux = ChannelMux(reps.open, channel_id=CID)
        got: list[dict] = []
        real_open = reps.open

        async def spy(replica):
            async for msg in real_open(replica):
                got.append(msg)
                yield msg

        mux.open_channel = spy
        for rid in ("a", "b", "c"):
            box = await admitted(reps, mux, rid)  # one outbox: the same channel id on replica A
        reqs = {rid: request(mux, rid) for rid in "abc"}
        # Two steps' outputs land before the channel runs: one message, merged per request.
        for step in range(2):
            for rid in "abc":
                box.put(rid, delta(0, [step], "stop" if step == 1 else None))
        outs = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in reqs.values())), 2)
        data = [m for m in got if "d" in m]
        assert len(data) == 1
        assert sorted(data[0]["d"]) == ["a", "b", "c"]
        for msgs in outs:
            assert len(msgs) == 1
            assert msgs[0]["outputs"][0]["token_ids"] == [0, 1]
            assert msgs[0]["outputs"][0]["text"] == "<0><1>"
        assert mux.num_opened == 1  # one channel for the three requests
        await mux.close()

    asyncio.run(go())


def test_n_choices_end_when_every_choice_finished():
    async def go():
        reps = Replicas("A")
        mux = ChannelMux(reps.open, channel_id=CID)
        box = await admitted(reps, mux, "r", "A")
        r = request(mux, "r", choices=2)
        task = asyncio.ensure_future(collect(r))
        box.put("r", delta(0, [1], "stop"))
        await asyncio.sleep(0.02)
        assert not task.done()  # choice 1 still running
        box.put("r", delta(1, [2], "length"))
        msgs = await asyncio.wait_for(task, 2)
        assert [d["index"] for m in msgs for d in m["outputs"]] == [0, 1]
        await mux.close()

    asyncio.run(go())


def test_an_error_on_the_request_stream_reaches_the_request():
    async def go():
        reps = Replicas("A")
        mux = ChannelMux(reps.open, channel_id=CID)
        box = await admitted(reps, mux, "r", "A")

        async def failing():
            await asyncio.sleep(0.02)
            yield {"error": {"status": 500, "message": "engine error in request r"}}

        r = request(mux, "r", stream=failing())
        box.put("r", delta(0, [7]))
        msgs = await asyncio.wait_for(collect(r), 2)
        assert msgs[0]["outputs"][0]["token_ids"] == [7]
        assert msgs[-1] == {"error": {"status": 500, "message": "engine error in request r"}}

    asyncio.run(go())


def test_a_broken_channel_fails_its_requests_but_not_other_replicas():
    async def go():
        reps = Replicas("A", "B")
        broken = asyncio.Event()

        async def opener(replica):
            async for msg in reps.open(replica):
                yield msg
                if replica == "A" and "d" in msg:
                    broken.set()
                    raise RuntimeError("replica A died")

        mux = ChannelMux(opener, channel_id=CID)
        box_a = await admitted(reps, mux, "ra", "A")
        box_b = await admitted(reps, mux, "rb", "B")
        ra, rb = request(mux, "ra"), request(mux, "rb")
        box_a.put("ra", delta(0, [1]))
        with pytest.raises(RuntimeError, match="replica A died"):
            await asyncio.wait_for(collect(ra), 2)
        box_b.put("rb", delta(0, [2], "stop"))
        msgs = await asyncio.wait_for(collect(rb), 2)
        assert msgs[0]["outputs"][0]["token_ids"] == [2]
        await mux.close()

    asyncio.run(go())


def test_a_channel_answered_by_another_replica_is_refused():
    async def go():
        reps = Replicas("A", "B")
        reps.redirect["A"] = "B"  # A is gone; the router fell back to B
        mux = ChannelMux(reps.open, channel_id=CID)
        mux.register("r")
        with pytest.raises(ChannelError, match="reached 'B'"):
            await asyncio.wait_for(mux.bind("r", "A"), 2)
        await mux.close()

    asyncio.run(go())


def test_an_idle_channel_ends_and_reopens_for_the_next_request():
    async def go():
        reps = Replicas("A", idle_s=0.05)
        hub = reps.hubs["A"]
        mux = ChannelMux(reps.open, channel_id=CID)
        mux.register("r1")
        box = hub.request_started(CID)
        await mux.bind("r1", "A")
        r1 = request(mux, "r1")
        box.put("r1", delta(0, [1], "stop"))
        assert len(await asyncio.wait_for(collect(r1), 2)) == 1
        hub.request_ended(CID)
        await asyncio.sleep(0.3)  # idle: the replica ends the channel and forgets the outbox
        assert CID not in hub.boxes
        assert "A" not in mux._channels
        mux.register("r2")
        box = hub.request_started(CID)
        box.put("r2", delta(0, [2], "stop"))  # before the channel is back: kept in the outbox
        await mux.bind("r2", "A")
        r2 = request(mux, "r2")
        msgs = await asyncio.wait_for(collect(r2), 2)
        assert msgs[0]["outputs"][0]["token_ids"] == [2]
        assert mux.num_opened == 2
        await mux.close()

    asyncio.run(go())


def test_a_channel_ending_while_a_request_binds_is_reopened():
    async def go():
        reps = Replicas("A")
        hub = reps.hubs["A"]
        calls: list[str] = []

        async def opener(replica):
            calls.append(replica)
            if len(calls) == 1:  # ends right after its hello, as an idling-out channel would
                yield {"replica": "A"}
                return
            async for msg in reps.open(replica):
                yield msg

        mux = ChannelMux(opener, channel_id=CID)
        mux.register("r")
        box = hub.request_started(CID)  # admitted on the replica before the ingress binds it
        box.put("r", delta(0, [5], "stop"))
        await mux.bind("r", "A")
        msgs = await asyncio.wait_for(collect(request(mux, "r")), 2)
        assert msgs[0]["outputs"][0]["token_ids"] == [5]
        assert calls == ["A", "A"]  # reopened because a request was bound there
        await mux.close()

    asyncio.run(go())


def test_a_duplicate_request_id_is_refused():
    mux = ChannelMux(Replicas("A").open, channel_id=CID)
    mux.register("r")
    with pytest.raises(ValueError, match="already in flight"):
        mux.register("r")


def test_a_newer_stream_of_the_same_channel_takes_over():
    async def go():
        hub = ChannelHub()
        box = hub.request_started(CID)
        old = hub.serve(CID, {"replica": "A"})
        assert await old.__anext__() == {"replica": "A"}
        pending = asyncio.ensure_future(old.__anext__())
        await asyncio.sleep(0.01)
        new = hub.serve(CID, {"replica": "A"})
        assert await new.__anext__() == {"replica": "A"}
        box.put("r", delta(0, [1]))
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 1)  # the old one ends without taking the deltas
        assert await asyncio.wait_for(new.__anext__(), 1) == {"d": {"r": [delta(0, [1])]}}
        await new.aclose()

    asyncio.run(go())


def test_deltas_that_piled_up_come_merged_and_an_error_after_them_still_arrives():
    async def go():
        mux = ChannelMux(Replicas("A").open, channel_id=CID)
        sink = mux.register("r")
        r = request(mux, "r", choices=2)
        # Three channel messages reached the sink while the consumer was busy, then an error.
        sink.put([delta(0, [1]), delta(1, [10])])
        sink.put([delta(0, [2])])
        sink.put([delta(1, [11])])
        sink.put_end({"error": {"status": 500, "message": "boom"}})
        sink.put([delta(0, [3])])  # after the end: still before it (the replica sent it first)
        msgs = await asyncio.wait_for(collect(r), 2)
        assert len(msgs) == 2
        by_idx = {d["index"]: d["token_ids"] for d in msgs[0]["outputs"]}
        assert by_idx == {0: [1, 2, 3], 1: [10, 11]}
        assert msgs[1] == {"error": {"status": 500, "message": "boom"}}

    asyncio.run(go())


def test_a_replica_with_requests_in_flight_heartbeats_and_an_idle_one_does_not():
    async def go():
        hub = ChannelHub(idle_s=0.2, heartbeat_s=0.02)
        stream = hub.serve(CID, {"replica": "A"})
        assert await stream.__anext__() == {"replica": "A"}
        hub.request_started(CID)
        assert await asyncio.wait_for(stream.__anext__(), 1) == {"hb": 1}
        hub.request_ended(CID)
        with pytest.raises(StopAsyncIteration):  # no heartbeat when idle: the channel ends
            while True:
                msg = await asyncio.wait_for(stream.__anext__(), 1)
                assert msg == {"hb": 1}  # at most the ones already due

    asyncio.run(go())


def test_a_silent_channel_fails_its_bound_requests_after_liveness_s():
    async def go():
        async def vanished(replica):  # hello, then nothing: the replica's node is gone
            yield {"replica": replica}
            await asyncio.sleep(3600)

        mux = ChannelMux(vanished, channel_id=CID, liveness_s=0.2)
        mux.register("r")
        await mux.bind("r", "A")
        r = request(mux, "r")
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(ChannelError, match="no word from replica A"):
            await asyncio.wait_for(collect(r), 2)
        assert 0.2 <= asyncio.get_running_loop().time() - t0 < 1.0
        await mux.close()

    asyncio.run(go())


def test_heartbeats_keep_a_slow_request_alive():
    async def go():
        reps = Replicas("A")
        reps.hubs["A"].heartbeat_s = 0.02
        mux = ChannelMux(reps.open, channel_id=CID, liveness_s=0.1)
        box = await admitted(reps, mux, "r")
        r = request(mux, "r")
        await asyncio.sleep(0.5)  # 5x liveness_s without a token: a long prefill
        box.put("r", delta(0, [7], "stop"))
        msgs = await asyncio.wait_for(collect(r), 2)
        assert msgs[0]["outputs"][0]["token_ids"] == [7]
        await mux.close()

    asyncio.run(go())
