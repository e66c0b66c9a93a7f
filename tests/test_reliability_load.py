"""bench/reliability_load.py counts each request's outcome right (Ray-free, an ASGI app in place
of the server)."""

from __future__ import annotations

import asyncio
import json

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from bench.reliability_load import percentile, stream_request, tally


def chunk(finish=None) -> str:
    return "data: " + json.dumps({"choices": [{"text": "x", "finish_reason": finish}]}) + "\n\n"


def server() -> FastAPI:
    app = FastAPI()

    @app.post("/{kind}")
    async def answer(kind: str):
        if kind == "busy":
            err = {"error": {"message": "full", "type": "rate_limit_error", "param": None}}
            return JSONResponse(err, status_code=429, headers={"retry-after": "1"})
        if kind == "html":
            return JSONResponse("oops", status_code=502)

        async def events():
            yield chunk()
            if kind == "ok":
                yield chunk("length")
                yield "data: [DONE]\n\n"
            elif kind == "error_event":
                yield 'data: {"error": {"message": "replica died", "type": "server_error"}}\n\n'
            elif kind == "no_finish":
                yield "data: [DONE]\n\n"
            elif kind == "slow":
                await asyncio.sleep(5)
            # "cut": the stream just ends

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class Dropped(httpx.AsyncByteStream):
    """A body whose connection drops after one event, as httpx reports a proxy closing mid-body."""

    async def __aiter__(self):
        yield chunk().encode()
        raise httpx.RemoteProtocolError("peer closed connection: incomplete chunked read")


def dropping(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Dropped())


def run(kind: str, **kw):
    async def main():
        transport = (
            httpx.MockTransport(dropping) if kind == "drop" else httpx.ASGITransport(app=server())
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await stream_request(http, f"http://t/{kind}", {"stream": True}, {}, **kw)

    return asyncio.run(main())


def test_outcomes():
    assert run("ok", limit_s=5).kind == "completed"
    assert run("ok", limit_s=5).first_token_s is not None
    assert run("error_event", limit_s=5).kind == "clean_error"
    assert run("busy", limit_s=5).kind == "clean_error"
    assert run("busy", limit_s=5).status == 429
    html = run("html", limit_s=5)  # an error response that is no OpenAI error object
    assert html.kind == "failed_fast" and html.status == 502
    drop = run("drop", limit_s=5)  # the connection dropped mid-body
    assert drop.kind == "failed_fast" and "RemoteProtocolError" in drop.detail
    assert run("cut", limit_s=5).kind == "lost"  # a clean end without [DONE]: silent
    assert run("no_finish", limit_s=5).kind == "lost"
    slow = run("slow", limit_s=0.5)
    assert slow.kind == "lost" and "hung" in slow.detail
    left = run("ok", limit_s=5, hang_up_after_chunks=1)
    assert left.kind == "completed" and left.detail == "hung up on purpose"


def test_tally_and_percentile():
    outcomes = [run(k, limit_s=5) for k in ("ok", "busy", "cut", "drop", "html")]
    t = tally(outcomes)
    assert (t.completed, t.clean_errors, t.failed_fast, t.lost) == (1, 1, 2, 1)
    assert t.statuses == {"200": 3, "429": 1, "502": 1}
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([], 0.99) is None
