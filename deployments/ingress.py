"""OpenAIIngress: the OpenAI-compatible HTTP API (FastAPI on Ray Serve) before LLMServer replicas.

Per request: auth (hashed API keys) -> model lookup -> sampling validation -> response cache ->
tokenize (batched across concurrent requests) -> context-length check -> block hashes (the
router's input) -> one streamed handle call per prompt -> SSE chunks or one JSON body.
Every error is an OpenAI error object; Serve's proxy adds ``x-request-id`` to every response.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.model_runtime import ModelRuntime, load_runtime
from deployments.openai_format import (
    SSE_DONE,
    ChoiceState,
    ChunkWriter,
    apply_delta,
    chat_body,
    completion_body,
    merge_deltas,
    public_finish_reason,
    sse_error,
    usage_of,
)
from deployments.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    validation_error_to_api,
)
from deployments.stream_merge import StreamError, merge_coalesced
from engine.block_hash import block_hashes

logger = logging.getLogger("ray.serve")

app = FastAPI(title="fleetlm", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error_to_api(list(exc.errors())))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(
        error_body(str(exc.detail), kind, None, exc.status_code), status_code=exc.status_code
    )


class Call:
    """One streamed handle call whose first message has arrived (so its status is known)."""

    def __init__(self, gen: Any, first: dict[str, Any]) -> None:
        self.gen = gen
        self.first = first
        self.replica = first.get("replica", "")

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        try:
            yield self.first
            async for msg in self.gen:
                yield msg
        finally:
            # Client gone or request done: cancelling reaches the replica, which aborts the
            # engine request and frees its KV blocks (a no-op once the stream has ended).
            self.gen.cancel()


@serve.ingress(app)
class OpenAIIngress:
    """Deployment body (routes on ``app``); app.py wraps it with serve.deployment."""

    def __init__(self, cluster: dict[str, Any], servers: dict[str, Any]) -> None:
        from cluster.config import ClusterConfig

        cfg = ClusterConfig.model_validate(cluster)
        self.key_digests = set(cfg.api_key_digests())
        self.runtimes: dict[str, ModelRuntime] = {
            mc.name: load_runtime(mc, servers[mc.name]) for mc in cfg.models
        }
        self.created = int(time.time())

    # -- routes -------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        try:
            from deployments.metrics import prometheus_text
        except ModuleNotFoundError:
            return PlainTextResponse("", media_type="text/plain; version=0.0.4")
        return PlainTextResponse(await prometheus_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "fleetlm",
                "max_model_len": rt.max_model_len,
            }
            for name, rt in self.runtimes.items()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(self, request: Request, body: CompletionRequest) -> Any:
        return await self._serve(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request, body: ChatCompletionRequest) -> Any:
        return await self._serve(request, body, chat=True)

    # -- the request path ---------------------------------------------------------------------
    def _auth(self, request: Request) -> str:
        """The tenant namespace (hashed key) for caches; 401 for a missing or unknown key."""
        if not self.key_digests:
            return "anonymous"
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer KEY'",
                type="authentication_error",
                code="invalid_api_key",
            )
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        if digest not in self.key_digests:
            raise APIError(
                401, "invalid API key", type="authentication_error", code="invalid_api_key"
            )
        return digest[:32]

    def _runtime(self, model: str) -> ModelRuntime:
        rt = self.runtimes.get(model)
        if rt is None:
            raise APIError(
                404,
                f"model {model!r} does not exist; served models: {sorted(self.runtimes)}",
                param="model",
                code="model_not_found",
            )
        return rt

    async def _serve(
        self, request: Request, body: CompletionRequest | ChatCompletionRequest, chat: bool
    ) -> Any:
        t0 = time.monotonic()
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        # Metric label: only served model names (a client can't grow the label set).
        model = body.model if body.model in self.runtimes else "unknown"
        try:
            namespace = self._auth(request)
            rt = self._runtime(body.model)
            sampling = body.sampling()
            n = body.n
            cached = await rt.cache_lookup(namespace, body)
            if cached is not None:
                return self._cached_response(rt, body, chat, rid, cached, t0)
            prompts = await self._prompt_ids(rt, body, chat)
            reqs = [
                self._replica_request(rt, f"{rid}-{i}", ids, sampling, n)
                for i, ids in enumerate(prompts)
            ]
            session = request.headers.get("x-session-id")
            if session:
                for r in reqs:
                    r["session_id"] = session
            calls = await self._open_calls(rt, reqs, rid)
        except APIError as e:
            rt_metrics(model).error(e.status)
            return error_response(e)
        except Exception:
            logger.exception("request %s failed before streaming", rid)
            rt_metrics(model).error(500)
            return error_response(_internal(rid))
        headers = {
            "x-fleetlm-replica": ",".join(dict.fromkeys(c.replica for c in calls)),
            "x-fleetlm-cache": "miss",
        }
        tracker = RequestTimer(model, t0)
        writer = ChunkWriter(chat, rid, int(time.time()), model, rt.token_text)
        if body.stream:
            gen = self._sse(rt, body, calls, n, writer, tracker, namespace)
            return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
        states: dict[int, ChoiceState] = defaultdict(ChoiceState)
        try:
            async for items in self._deltas(calls, n):
                tracker.chunk(sum(len(d["token_ids"]) for _, d in items))
                for idx, d in items:
                    apply_delta(states[idx], d)
        except APIError as e:
            rt_metrics(model).error(e.status)
            return error_response(e)
        except Exception:
            logger.exception("request %s failed", rid)
            rt_metrics(model).error(500)
            return error_response(_internal(rid))
        build = chat_body if chat else completion_body
        out = build(rid, writer.created, model, dict(states), n, rt.token_text)
        tracker.done(public_finish_reason(states[0].finish_reason))
        await rt.cache_store(namespace, body, out)
        return JSONResponse(out, headers=headers)

    async def _prompt_ids(
        self, rt: ModelRuntime, body: CompletionRequest | ChatCompletionRequest, chat: bool
    ) -> list[list[int]]:
        if chat:
            assert isinstance(body, ChatCompletionRequest)
            text = rt.render_chat(body.chat_messages(), body.add_generation_prompt)
            return [await self._encode((rt.name, text, False))]
        assert isinstance(body, CompletionRequest)
        prompts = body.prompts()
        if isinstance(prompts[0], str):
            return list(await asyncio.gather(*(self._encode((rt.name, p, True)) for p in prompts)))
        return prompts  # type: ignore[return-value]

    def _replica_request(
        self, rt: ModelRuntime, rid: str, ids: list[int], sampling: dict[str, Any], n: int
    ) -> dict[str, Any]:
        rt.check_prompt(ids, sampling)
        s = dict(sampling)
        if s.get("max_tokens") is None:
            s["max_tokens"] = rt.max_model_len - len(ids)
        return {
            "request_id": rid,
            "prompt_token_ids": ids,
            "sampling": s,
            "n": n,
            "block_hashes": block_hashes(ids, rt.block_size),
        }

    async def _open_calls(
        self, rt: ModelRuntime, reqs: list[dict[str, Any]], rid: str
    ) -> list[Call]:
        results = await asyncio.gather(
            *(self._open_one(rt, r, rid) for r in reqs), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for r in results:
                if isinstance(r, Call):
                    r.gen.cancel()
            raise failed[0]
        return results  # type: ignore[return-value]

    async def _open_one(self, rt: ModelRuntime, req: dict[str, Any], rid: str) -> Call:
        from ray.serve.exceptions import BackPressureError

        gen = rt.handle.options(stream=True).generate.remote(req)
        try:
            first = await gen.__anext__()
        except BackPressureError:
            gen.cancel()
            raise APIError(
                429,
                f"model {rt.name!r} is at capacity (every replica's queue is full); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except StopAsyncIteration:
            raise _internal(rid) from None
        if "error" in first:
            gen.cancel()
            raise APIError.from_dict(first["error"])
        return Call(gen, first)

    async def _deltas(
        self, calls: list[Call], n: int
    ) -> AsyncIterator[list[tuple[int, dict[str, Any]]]]:
        """Merged replica messages as [(choice index, delta)], one list per coalesced step."""
        merged = merge_coalesced([c.messages() for c in calls])
        try:
            async for batch in merged:
                by_idx: dict[int, dict[str, Any]] = {}
                for prompt_idx, msg in batch:
                    if "error" in msg:
                        raise APIError.from_dict(msg["error"])
                    for d in msg["outputs"]:
                        idx = prompt_idx * n + d["index"]
                        by_idx[idx] = merge_deltas(by_idx[idx], d) if idx in by_idx else d
                yield list(by_idx.items())
        except StreamError as e:
            if isinstance(e.error, APIError):
                raise e.error from None
            raise e.error from None
        finally:
            await merged.aclose()

    async def _sse(
        self,
        rt: ModelRuntime,
        body: CompletionRequest | ChatCompletionRequest,
        calls: list[Call],
        n: int,
        writer: ChunkWriter,
        tracker: RequestTimer,
        namespace: str,
    ) -> AsyncIterator[str]:
        states: dict[int, ChoiceState] = defaultdict(ChoiceState)
        deltas = self._deltas(calls, n)
        try:
            async for items in deltas:
                tracker.chunk(sum(len(d["token_ids"]) for _, d in items))
                for idx, d in items:
                    apply_delta(states[idx], d)
                yield writer.deltas(items)
            if body.include_usage():
                yield writer.usage(usage_of(states, n))
            yield SSE_DONE
        except APIError as e:
            rt_metrics(body.model).error(e.status)
            yield sse_error(e.body())
            return
        except Exception:
            logger.exception("stream %s failed", writer.id)
            rt_metrics(body.model).error(500)
            yield sse_error(_internal(writer.id).body())
            return
        finally:
            await deltas.aclose()
        tracker.done(public_finish_reason(states[0].finish_reason))
        build = chat_body if writer.chat else completion_body
        full = build(
            writer.id.split("-", 1)[1], writer.created, body.model, dict(states), n, rt.token_text
        )
        await rt.cache_store(namespace, body, full)

    def _cached_response(
        self,
        rt: ModelRuntime,
        body: CompletionRequest | ChatCompletionRequest,
        chat: bool,
        rid: str,
        cached: tuple[str, dict[str, Any]],
        t0: float,
    ) -> Any:
        kind, stored = cached
        out = dict(stored)
        out["id"] = ("chatcmpl-" if chat else "cmpl-") + rid
        out["created"] = int(time.time())
        headers = {"x-fleetlm-cache": kind, "x-fleetlm-replica": "cache"}
        rt_metrics(rt.name).cache_hit(kind, time.monotonic() - t0)
        if not body.stream:
            return JSONResponse(out, headers=headers)
        writer = ChunkWriter(chat, rid, out["created"], rt.name, rt.token_text)

        async def replay() -> AsyncIterator[str]:
            for chunk in writer.from_body(out):
                yield chunk
            if body.include_usage():
                u = out.get("usage") or {}
                yield writer._wrap([], u)
            yield SSE_DONE

        return StreamingResponse(replay(), media_type="text/event-stream", headers=headers)

    # -- tokenization, batched across concurrent requests -------------------------------------
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.001)
    async def _encode(self, items: list[tuple[str, str, bool]]) -> list[list[int]]:
        """items: (model name, text, add_special_tokens) -> token ids, one tokenizer call per
        (model, add_special_tokens) group, in a worker thread (the event loop keeps streaming)."""
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for i, (name, _, special) in enumerate(items):
            groups[(name, special)].append(i)
        out: list[list[int]] = [[] for _ in items]
        for (name, special), idxs in groups.items():
            texts = [items[i][1] for i in idxs]
            enc = await asyncio.to_thread(self.runtimes[name].encode, texts, special)
            for i, ids in zip(idxs, enc, strict=True):
                out[i] = ids
        return out


def _internal(rid: str) -> APIError:
    return APIError(
        500, f"internal error (request id {rid}); see the server log", type="server_error"
    )


class RequestTimer:
    """Client-visible latency metrics of one request (TTFT, ITL, TPOT, E2E), recorded at the end."""

    def __init__(self, model: str, t0: float) -> None:
        self.model = model
        self.t0 = t0
        self.first: float | None = None
        self.last = t0
        self.num_tokens = 0
        self.gaps: list[float] = []

    def chunk(self, num_tokens: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.num_tokens += num_tokens

    def done(self, finish_reason: str | None) -> None:
        m = rt_metrics(self.model)
        m.latency(self)
        m.success(finish_reason or "stop")


class _IngressMetrics:
    """Thin wrapper: deployments/metrics.py when present, otherwise nothing is recorded."""

    def __init__(self, model: str) -> None:
        self.model = model
        try:
            from deployments.metrics import get_metrics

            self.m: Any = get_metrics()
        except ModuleNotFoundError:
            self.m = None

    def _safe(self, fn: str, name: str, value: float, **labels: Any) -> None:
        if self.m is None:
            return
        try:
            getattr(self.m, fn)(name, value, model=self.model, **labels)
        except Exception:  # metrics must never fail a request
            logger.exception("metric %s failed", name)

    def error(self, status: int) -> None:
        self._safe("inc", "request_errors_total", 1, status=status)

    def success(self, finish_reason: str) -> None:
        self._safe("inc", "request_success_total", 1, finish_reason=finish_reason)

    def cache_hit(self, kind: str, seconds: float) -> None:
        self._safe("inc", "response_cache_hits_total", 1, kind=kind)
        self._safe("observe", "response_cache_hit_latency_seconds", seconds, kind=kind)

    def latency(self, t: RequestTimer) -> None:
        if t.first is None:
            return
        ttft = t.first - t.t0
        self._safe("observe", "time_to_first_token_seconds", ttft)
        self._safe("observe", "e2e_request_latency_seconds", t.last - t.t0)
        for g in t.gaps:
            self._safe("observe", "inter_token_latency_seconds", g)
        if t.num_tokens > 1:
            tpot = (t.last - t.first) / (t.num_tokens - 1)
            self._safe("observe", "request_time_per_output_token_seconds", tpot)


_metrics_by_model: dict[str, _IngressMetrics] = {}


def rt_metrics(model: str) -> _IngressMetrics:
    m = _metrics_by_model.get(model)
    if m is None:
        m = _metrics_by_model[model] = _IngressMetrics(model)
    return m
