"""Async streaming client: sends a workload to an OpenAI-compatible /v1/completions endpoint.

Each request is streamed (SSE) with ``stream_options.include_usage`` (and vLLM's
``continuous_usage_stats``, which gives the exact tokens of every chunk where the server has it).
Per request we keep the send time, each chunk's arrival time and token count, and the final usage;
metrics.py turns these records into vLLM-`bench serve`-style figures. Timing is time.perf_counter.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from cluster.bench.metrics import SLO, BenchResult, compute_result
from cluster.bench.workloads import RequestSpec, WorkloadSpec

MAX_ERROR_CHARS = 300


@dataclass
class RequestRecord:
    index: int
    tag: str
    prompt_len: int  # from the spec; replaced by usage.prompt_tokens when the server reports it
    max_tokens: int
    send_time: float = 0.0  # perf_counter seconds
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with choices
    chunk_tokens: list[float] = field(
        default_factory=list
    )  # tokens in each chunk (may be estimated)
    output_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if reported
    text: str = ""
    success: bool = False
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.send_time


def _build_body(
    model: str, spec: RequestSpec, wl: WorkloadSpec, continuous_usage: bool
) -> dict[str, Any]:
    stream_options: dict[str, bool] = {"include_usage": True}
    if continuous_usage:
        stream_options["continuous_usage_stats"] = True
    body: dict[str, Any] = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": wl.temperature,
        "stream": True,
        "stream_options": stream_options,
    }
    if wl.ignore_eos:
        body["ignore_eos"] = True  # vLLM / fleetlm extension: exactly max_tokens come back
    return body


def _error_text(prefix: str, detail: str) -> str:
    return f"{prefix}: {detail}"[:MAX_ERROR_CHARS]


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    spec: RequestSpec,
    wl: WorkloadSpec,
    rec: RequestRecord,
    headers: dict[str, str],
    continuous_usage: bool = True,
) -> RequestRecord:
    """Stream one completion into `rec`; never raises for server or network faults."""
    body = _build_body(model, spec, wl, continuous_usage)
    usage_total: int | None = None  # final usage.completion_tokens
    done = False
    cum_usage: list[int | None] = []  # cumulative completion_tokens per chunk (continuous usage)
    rec.send_time = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode(errors="replace")
                rec.error = _error_text(f"HTTP {resp.status_code}", _extract_message(raw))
                return rec
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = _error_text("stream error", _extract_message(data))
                    return rec
                usage = chunk.get("usage") or {}
                if chunk.get("choices"):
                    rec.chunk_times.append(now)
                    rec.text += chunk["choices"][0].get("text") or ""
                    cum_usage.append(usage.get("completion_tokens") if usage else None)
                elif usage:
                    usage_total = usage.get("completion_tokens")
                if usage:
                    rec.prompt_len = usage.get("prompt_tokens") or rec.prompt_len
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        rec.cached_tokens = int(details["cached_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        rec.error = _error_text(type(e).__name__, str(e) or repr(e))
        return rec
    if not rec.chunk_times:
        rec.error = "stream ended without any completion chunk"
        return rec
    if not done:  # a replica that dies mid-stream closes the connection early: not a success
        rec.error = f"stream ended before [DONE] after {len(rec.chunk_times)} chunks"
        return rec
    rec.chunk_tokens = _tokens_per_chunk(cum_usage, usage_total)
    rec.output_tokens = round(sum(rec.chunk_tokens))
    rec.success = True
    return rec


def _tokens_per_chunk(cum_usage: list[int | None], usage_total: int | None) -> list[float]:
    """Tokens carried by each chunk.

    Exact when every chunk had cumulative usage (vLLM continuous_usage_stats). Otherwise the final
    usage total is spread evenly over the chunks (right in total for a server that sends several
    tokens per chunk); with no usage at all, one token per chunk (the OpenAI streaming convention).
    """
    n = len(cum_usage)
    if all(c is not None for c in cum_usage):
        prev = 0
        out: list[float] = []
        for c in cum_usage:
            assert c is not None
            out.append(float(c - prev))
            prev = c
        if usage_total is None or usage_total == prev:
            return out
    if usage_total is not None:
        return [usage_total / n] * n
    return [1.0] * n


def _extract_message(raw: str) -> str:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return raw.strip()
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)
    return str(err)


async def run_workload(
    url: str,
    model: str,
    workload: WorkloadSpec,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    api_key: str | None = None,
    slo: SLO | None = None,
    timeout_s: float = 600.0,
    seed: int = 0,
    progress: bool = True,
    continuous_usage: bool = True,
) -> BenchResult:
    """Run `workload` against `url` (server base URL, with or without /v1) and compute its metrics.

    `concurrency`/`rate` override the workload's defaults. With a rate, arrivals are Poisson
    (exponential gaps, seeded); concurrency then caps in-flight requests. `continuous_usage` asks
    for usage in every chunk (vLLM's extension); turn it off for servers that reject unknown fields.
    """
    concurrency = concurrency if concurrency is not None else workload.concurrency
    rate = rate if rate is not None else workload.rate
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate!r}")
    endpoint = completions_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    n = len(workload.requests)
    limit = concurrency or n
    sem = asyncio.Semaphore(limit)
    records = [
        RequestRecord(i, s.tag, s.prompt_len, s.max_tokens) for i, s in enumerate(workload.requests)
    ]
    bar = _progress_bar(n, workload.name, progress)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(i: int) -> None:
            async with sem:
                await send_request(
                    client,
                    endpoint,
                    model,
                    workload.requests[i],
                    workload,
                    records[i],
                    headers,
                    continuous_usage,
                )
            if bar is not None:
                bar.update(1)

        rng = random.Random(seed)
        start = time.perf_counter()
        due = start  # absolute arrival schedule: a late wake-up does not delay later arrivals
        tasks = []
        for i in range(n):
            if rate is not None and i > 0:
                due += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    config = dict(
        url=url,
        model=model,
        workload=workload.name,
        workload_params=workload.params,
        concurrency=concurrency,
        rate=rate,
        num_requests=n,
    )
    return compute_result(records, duration, start, slo or SLO(), config)


def completions_url(url: str) -> str:
    base = url.rstrip("/")
    if base.endswith("/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/completions"


def _progress_bar(n: int, name: str, enabled: bool):  # -> tqdm | None
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=n, desc=f"bench {name}", unit="req")


async def first_model(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model id that GET /v1/models lists (for `--model` left out)."""
    base = completions_url(url).rsplit("/completions", 1)[0]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        resp = await client.get(base + "/models", headers=headers)
        resp.raise_for_status()
        data = resp.json().get("data") or []
    if not data:
        raise ValueError(f"{base}/models lists no model; pass --model")
    return str(data[0]["id"])
