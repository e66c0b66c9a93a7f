"""OpenAIIngress: the OpenAI-compatible HTTP API (FastAPI on Ray Serve) before LLMServer replicas.

Per request: auth (hashed API keys) -> model lookup -> sampling validation -> response cache ->
tokenize (batched across concurrent requests) -> context-length check -> block hashes (the
router's input) -> one handle call per request (replica_call.py) -> SSE chunks or one JSON body.
Every error is an OpenAI error object; Serve's proxy adds ``x-request-id`` to every response.
"""

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

from deployments.drain import DrainState, DrainWatcher, shutting_down_error
from deployments.ingress_metrics import RequestTimer, rt_metrics
from deployments.limits import BodySizeLimit, Limits, check_request
from deployments.metrics import prometheus_text
from deployments.model_runtime import ModelRuntime, load_runtime
from deployments.openai_format import (
    SSE_DONE,
    ChoiceState,
    ChunkWriter,
    apply_delta,
    public_finish_reason,
    sse_error,
    usage_of,
)
from deployments.openapi import AUTH_ERRORS, CHAT_RESPONSES, COMPLETION_RESPONSES, openapi_schema
from deployments.output_channel import ChannelRequest
from deployments.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    validation_error_to_api,
)
from deployments.rate_limit import admit_or_raise, limiter_for
from deployments.replica_call import call_deltas, internal_error, new_channel_mux, open_call
from deployments.tool_calls import ToolUse, tool_use
from engine.block_hash import block_hashes

logger = logging.getLogger("ray.serve")

app = FastAPI(title="fleetlm", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
app.add_middleware(BodySizeLimit)  # 413 before the body is read (deployments/limits.py)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    rt_metrics("unknown").error(400)  # the body never parsed, so its model is unknown too
    return error_response(validation_error_to_api(list(exc.errors())))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    code: Any = "request_too_large" if exc.status_code == 413 else exc.status_code
    return JSONResponse(error_body(str(exc.detail), kind, None, code), status_code=exc.status_code)


@serve.ingress(app)
class OpenAIIngress:
    """Deployment body (routes on ``app``); app.py wraps it with serve.deployment."""

    def __init__(self, cluster: dict[str, Any], servers: dict[str, Any]) -> None:
        from cluster.config import ClusterConfig

        cfg = ClusterConfig.model_validate(cluster)
        digests = cfg.api_key_digests()
        self.key_digests = set(digests)
        self.rate = limiter_for(cfg.api_keys, digests)  # per-key requests/tokens per minute
        self.limits = Limits.from_config(cfg.limits)
        BodySizeLimit.set_limit(self.limits.max_body_bytes)
        self.runtimes: dict[str, ModelRuntime] = {
            mc.name: load_runtime(mc, servers[mc.name]) for mc in cfg.models
        }
        for rt in self.runtimes.values():
            rt.channels = new_channel_mux(rt.handle)
        self.created = int(time.time())
        # `fleetlm down` drains through Ray's KV (deployments/drain.py): 503 for new requests.
        self.drain = DrainState()
        self._loop: asyncio.AbstractEventLoop | None = None  # the requests' loop (first request)
        try:
            ctx = serve.get_replica_context()
            DrainWatcher(ctx.app_name, ctx.replica_id.unique_id, self.drain, self._on_drain)
        except Exception:  # noqa: BLE001 - outside Serve (tests build the class bare): no drain
            logger.warning("no replica context: drain requests are not watched")

    # -- routes -------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(await prometheus_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=AUTH_ERRORS)
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

    @app.post("/v1/completions", responses=COMPLETION_RESPONSES)
    async def completions(self, request: Request, body: CompletionRequest) -> Any:
        return await self._serve(request, body, chat=False)

    @app.post("/v1/chat/completions", responses=CHAT_RESPONSES)
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
        self._loop = self._loop or asyncio.get_running_loop()
        try:
            self.drain.admit()
        except APIError as e:
            rt_metrics(model).error(e.status)
            return error_response(e)
        streaming = False
        try:
            resp = await self._respond(request, body, chat, rid, t0)
            if isinstance(resp, StreamingResponse):
                resp.body_iterator = self._counted(resp.body_iterator)
                streaming = True  # the stream counts itself out when it ends
            return resp
        except APIError as e:
            rt_metrics(model).error(e.status)
            return error_response(e)
        except Exception:
            logger.exception("request %s failed", rid)
            rt_metrics(model).error(500)
            return error_response(internal_error(rid))
        finally:
            if not streaming:
                self.drain.done()

    def _on_drain(self, deadline: float) -> None:
        """From the drain watcher's thread: at the deadline, end what is still in flight."""
        loop = self._loop
        if loop is None:
            return  # no request ever came: nothing to end
        delay = max(0.0, deadline - time.time())
        loop.call_soon_threadsafe(loop.call_later, delay, self._end_in_flight)

    def _end_in_flight(self) -> None:
        """The grace period is over: every request still waiting on a replica ends with the
        503 'server is shutting down' (an SSE error event for a stream that has begun), and its
        replica call is cancelled as for a client that left."""
        err = {"error": shutting_down_error().to_dict()}
        for rt in self.runtimes.values():
            for sink in list(rt.channels.sinks.values()):
                sink.put_end(err)

    async def _counted(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.drain.done()

    async def _respond(
        self,
        request: Request,
        body: CompletionRequest | ChatCompletionRequest,
        chat: bool,
        rid: str,
        t0: float,
    ) -> Any:
        namespace = self._auth(request)
        admit_or_raise(self.rate, namespace, time.monotonic())
        rt = self._runtime(body.model)
        check_request(body, self.limits, rt.max_model_len)  # before any tokenizing or queueing
        sampling = body.sampling()
        tools = tool_use(body, rt.tool_parser) if chat else None
        if tools is not None and tools.spec is not None:
            sampling["structured"] = tools.spec  # a forced call: its grammar wins
        n = body.n
        cached = await rt.cache_lookup(namespace, body)
        if cached is not None:
            return self._cached_response(rt, body, chat, rid, cached, t0)
        prompts = await self._prompt_ids(rt, body, chat, tools)
        req = self._replica_request(rt, rid, prompts, sampling, n)
        session = request.headers.get("x-session-id")
        if session:
            req["session_id"] = session
        call = await open_call(rt.handle, rt.channels, req, rid, rt.name)
        headers = {"x-fleetlm-replica": call.replica, "x-fleetlm-cache": "miss"}
        tracker = RequestTimer(rt.name, t0)
        writer = ChunkWriter(
            chat, rid, int(time.time()), rt.name, rt.token_text, tools.fmt if tools else None
        )
        if body.stream:
            gen = self._sse(rt, body, call, n, writer, tracker, namespace)
            return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
        states: dict[int, ChoiceState] = defaultdict(ChoiceState)
        async for items in call_deltas(call):
            tracker.chunk(sum(len(d["token_ids"]) for _, d in items))
            for idx, d in items:
                apply_delta(states[idx], d)
        out = writer.body(dict(states), n)
        tracker.done(public_finish_reason(states[0].finish_reason))
        self.rate.charge(namespace, out["usage"]["total_tokens"], time.monotonic())
        await rt.cache_store(namespace, body, out)
        return JSONResponse(out, headers=headers)

    async def _prompt_ids(
        self,
        rt: ModelRuntime,
        body: CompletionRequest | ChatCompletionRequest,
        chat: bool,
        tools: ToolUse | None = None,
    ) -> list[list[int]]:
        if chat:
            assert isinstance(body, ChatCompletionRequest)
            text = rt.render_chat(
                body.chat_messages(), body.add_generation_prompt, tools.tools if tools else None
            )
            return [await self._encode((rt.name, text, False))]
        assert isinstance(body, CompletionRequest)
        prompts = body.prompts()
        if isinstance(prompts[0], str):
            return list(await asyncio.gather(*(self._encode((rt.name, p, True)) for p in prompts)))
        return prompts  # type: ignore[return-value]

    def _replica_request(
        self,
        rt: ModelRuntime,
        rid: str,
        prompts: list[list[int]],
        sampling: dict[str, Any],
        n: int,
    ) -> dict[str, Any]:
        """One replica call for the whole request (see LLMServer.generate for the format)."""
        for ids in prompts:
            rt.check_prompt(ids, sampling)
        s = dict(sampling)
        if s.get("max_tokens") is None:
            s["max_tokens"] = rt.max_model_len - max(len(ids) for ids in prompts)
        req: dict[str, Any] = {
            "request_id": rid,
            "prompt_token_ids": prompts[0],
            "sampling": s,
            "n": n,
            # The router's input: the first prompt's blocks, hashed as the engine hashes them.
            "block_hashes": block_hashes(prompts[0], rt.block_size),
        }
        if len(prompts) > 1:
            req["prompts"] = prompts
        return req

    async def _sse(
        self,
        rt: ModelRuntime,
        body: CompletionRequest | ChatCompletionRequest,
        call: ChannelRequest,
        n: int,
        writer: ChunkWriter,
        tracker: RequestTimer,
        namespace: str,
    ) -> AsyncIterator[str]:
        states: dict[int, ChoiceState] = defaultdict(ChoiceState)
        deltas = call_deltas(call)
        continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
        try:
            async for items in deltas:
                tracker.chunk(sum(len(d["token_ids"]) for _, d in items))
                for idx, d in items:
                    apply_delta(states[idx], d)
                yield writer.deltas(items, usage_of(states, n) if continuous else None)
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
            yield sse_error(internal_error(writer.id).body())
            return
        finally:
            await deltas.aclose()
        tracker.done(public_finish_reason(states[0].finish_reason))
        self.rate.charge(namespace, usage_of(states, n).to_dict()["total_tokens"], time.monotonic())
        full = writer.body(dict(states), n)
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
        took = time.monotonic() - t0
        headers = {
            "x-fleetlm-cache": kind,
            "x-fleetlm-replica": "cache",
            "server-timing": f"cache;dur={took * 1000.0:.3f}",  # in the ingress, ms
        }
        rt_metrics(rt.name).cache_hit(kind, took)
        if not body.stream:
            return JSONResponse(out, headers=headers)
        writer = ChunkWriter(chat, rid, out["created"], rt.name, rt.token_text)

        async def replay() -> AsyncIterator[str]:
            for chunk in writer.from_body(out):
                yield chunk
            if body.include_usage():
                u = out.get("usage") or {}
                yield writer.event([], u)
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
