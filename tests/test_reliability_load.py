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


def run(kind: str, **kw):
    async def main():
        transport = httpx.ASGITransport(app=server())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await stream_request(http, f"http://t/{kind}", {"stream": True}, {}, **kw)

    return asyncio.run(main())


def test_outcomes():
    assert run("ok", limit_s=5).kind == "completed"
    assert run("ok", limit_s=5).first_token_s is not None
    assert run("error_event", limit_s=5).kind == "clean_error"
    assert run("busy", limit_s=5).kind == "clean_error"
    assert run("busy", limit_s=5).status == 429
    assert run("html", limit_s=5).kind == "lost"
    assert run("cut", limit_s=5).kind == "lost"
    assert run("no_finish", limit_s=5).kind == "lost"
    slow = run("slow", limit_s=0.5)
    assert slow.kind == "lost" and "hung" in slow.detail
    left = run("ok", limit_s=5, hang_up_after_chunks=1)
    assert left.kind == "completed" and left.detail == "hung up on purpose"


def test_tally_and_percentile():
    t = tally([run("ok", limit_s=5), run("busy", limit_s=5), run("cut", limit_s=5)])
    assert (t.completed, t.clean_errors, t.lost) == (1, 1, 1)
    assert t.statuses == {"200": 2, "429": 1}
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([], 0.99) is None
