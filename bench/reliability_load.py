"""Client side of the reliability scenarios (Ray-free): streaming load over HTTP, and each request's
outcome counted as the issue defines it.

- completed: a 200 stream that ends with ``data: [DONE]`` after a chunk with a finish reason, or a
  200 JSON body;
- clean_error: an OpenAI error object, either as the HTTP response (4xx/5xx with
  ``{"error": ...}``) or as an SSE ``data: {"error": ...}`` event that ends the stream;
- failed_fast: a failure the client detects at once but that is no OpenAI error object: the
  connection dropped mid-body (httpx: RemoteProtocolError "incomplete chunked read"; the openai
  client raises APIConnectionError) or an error response whose body is not an OpenAI error
  object (Serve's proxy's plain-text 500; openai raises APIStatusError);
- lost: a stream that ends cleanly without ``[DONE]`` or an error event (a silent truncation),
  ``[DONE]`` without a finish reason, or no end within the time limit (hung).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Outcome:
    kind: str  # completed | clean_error | failed_fast | lost
    status: int = 0
    started: float = 0.0
    first_token_s: float | None = None  # TTFT
    ended: float = 0.0
    detail: str = ""


@dataclass
class Tally:
    completed: int = 0
    clean_errors: int = 0
    failed_fast: int = 0
    lost: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        if o.kind == "completed":
            self.completed += 1
        elif o.kind == "clean_error":
            self.clean_errors += 1
        elif o.kind == "failed_fast":
            self.failed_fast += 1
            if len(self.details) < 5:
                self.details.append(o.detail[:200])
        else:
            self.lost += 1
            if len(self.details) < 5:
                self.details.append(o.detail[:200])
        key = str(o.status)
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "clean_errors": self.clean_errors,
            "failed_fast": self.failed_fast,
            "lost": self.lost,
            "statuses": self.statuses,
            "failure_details": self.details,
        }


def tally(outcomes: list[Outcome]) -> Tally:
    t = Tally()
    for o in outcomes:
        t.add(o)
    return t


def completion_body(model: str, i: int, max_tokens: int, stream: bool = True) -> dict[str, Any]:
    """W3-like: a short distinct prompt, a longer generation, streamed."""
    return {
        "model": model,
        "prompt": f"Request {i}: tell a long story about the number {i * 7919 % 1000}.",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


async def stream_request(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    limit_s: float,
    hang_up_after_chunks: int | None = None,
) -> Outcome:
    """One request; ``hang_up_after_chunks``: close the connection after that many chunks (a
    disconnecting client; its outcome is 'completed' when it left on purpose)."""
    o = Outcome("lost", started=time.monotonic())
    try:
        async with asyncio.timeout(limit_s):
            async with http.stream("POST", url, json=body, headers=headers) as r:
                o.status = r.status_code
                if r.status_code != 200:
                    raw = await r.aread()
                    o.ended = time.monotonic()
                    o.kind = "clean_error" if _is_error_object(raw) else "failed_fast"
                    o.detail = f"{r.status_code} {raw[:200]!r}"
                    return o
                if not body.get("stream"):
                    raw = await r.aread()
                    o.ended = time.monotonic()
                    o.kind = "completed" if b'"choices"' in raw else "lost"
                    return o
                chunks, finished = 0, False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        o.kind = "completed" if finished else "lost"
                        o.detail = "" if finished else "[DONE] without a finish reason"
                        break
                    msg = json.loads(data)
                    if "error" in msg:
                        o.kind, o.detail = "clean_error", str(msg["error"].get("message"))[:200]
                        break
                    if o.first_token_s is None:
                        o.first_token_s = time.monotonic() - o.started
                    chunks += 1
                    finished = finished or any(c.get("finish_reason") for c in msg["choices"])
                    if hang_up_after_chunks is not None and chunks >= hang_up_after_chunks:
                        o.kind, o.detail = "completed", "hung up on purpose"
                        break
                else:
                    o.detail = "stream ended without [DONE] or an error event"
    except (TimeoutError, httpx.TimeoutException):
        o.kind, o.detail = "lost", f"no end within {limit_s:.0f}s (hung)"
    except httpx.TransportError as e:  # the connection dropped or was refused: seen at once
        o.kind, o.detail = "failed_fast", f"{type(e).__name__}: {e}"
    except httpx.HTTPError as e:
        o.kind, o.detail = "lost", f"{type(e).__name__}: {e}"
    o.ended = time.monotonic()
    return o


def _is_error_object(raw: bytes) -> bool:
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


async def streaming_load(
    base: str,
    model: str,
    headers: dict[str, str],
    n: int,
    concurrency: int,
    max_tokens: int,
    limit_s: float = 120.0,
    stream: bool = True,
    spacing_s: float = 0.0,
    hang_up: tuple[int, int] | None = None,
    seed: int = 0,
) -> list[Outcome]:
    """``n`` requests, at most ``concurrency`` at once, started ``spacing_s`` apart.
    ``hang_up=(lo, hi)``: each client hangs up after a random number of chunks in [lo, hi]."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(limit_s), limits=limits) as http:

        async def one(i: int) -> Outcome:
            await asyncio.sleep(i * spacing_s)
            async with sem:
                cut = rng.randint(*hang_up) if hang_up else None
                body = completion_body(model, i, max_tokens, stream)
                return await stream_request(
                    http, base + "/v1/completions", body, headers, limit_s, cut
                )

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]
