"""LLMServer: one Ray Serve replica = one AsyncEngine (one engine thread) for one model.

The ingress calls ``handle.options(stream=True).generate.remote(req)`` with::

    req = {"request_id": str, "prompt_token_ids": [int], "sampling": {SamplingParams fields},
           "n": int, "block_hashes": [int],     # block_hashes: read by the router, not here
           "prompts": [[int], ...]}             # optional: every prompt of a multi-prompt request

and reads messages ``{"replica": id, "outputs": [delta, ...]}`` (delta format: openai_format.py) or
one ``{"error": {...}}`` (APIError.to_dict()). Errors travel as messages, not exceptions, so a bad
parameter reaches the client as a 400 with its message instead of a wrapped Ray traceback.

With ``req["channel"] = <channel id>`` the tokens travel instead through that ingress's output
channel (``channel()``, deployments/output_channel.py: one message per step for all of its
requests); the request's own stream then carries only ``{"replica": id}`` and a possible error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from deployments.openai_format import merge_deltas
from deployments.output_channel import ChannelHub, Outbox
from deployments.protocol import APIError, param_from_message
from deployments.stream_merge import StreamError, merge_coalesced
from engine.config import EngineConfig
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger("ray.serve")

TTFT_WINDOW_S = 30.0  # record_autoscaling_stats reports TTFT over this recent window
METRICS_PERIOD_S = 1.0


def output_delta(index: int, out: RequestOutput) -> dict[str, Any]:
    d: dict[str, Any] = {
        "index": index,
        "token_ids": out.new_token_ids,
        "text": out.new_text,
        "finish_reason": out.finish_reason if out.finished else None,
        "num_prompt_tokens": out.num_prompt_tokens,
        "num_output_tokens": out.num_output_tokens,
        "num_cached_tokens": out.num_cached_tokens,
        "logprobs": None,
    }
    if out.logprobs:
        d["logprobs"] = [
            [lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in out.logprobs
        ]
    return d


def choice_params(sampling: dict[str, Any], n: int) -> list[SamplingParams]:
    """Per-choice SamplingParams; with a seed, choice i uses seed + i (distinct, repeatable)."""
    params = []
    for i in range(n):
        d = dict(sampling)
        if d.get("seed") is not None:
            d["seed"] = d["seed"] + i
        params.append(SamplingParams(**d))
    return params


class TTFTWindow:
    """Recent time-to-first-token samples (seconds) for the autoscaling policy."""

    def __init__(self, window_s: float = TTFT_WINDOW_S, maxlen: int = 4096) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, float]] = deque(maxlen=maxlen)

    def add(self, ttft_s: float, now: float | None = None) -> None:
        self.samples.append((time.monotonic() if now is None else now, ttft_s))

    def summary(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()
        vals = sorted(v for _, v in self.samples)
        if not vals:
            return {"ttft_samples": 0, "ttft_mean_s": 0.0, "ttft_p90_s": 0.0, "ttft_max_s": 0.0}
        return {
            "ttft_samples": len(vals),
            "ttft_mean_s": sum(vals) / len(vals),
            "ttft_p90_s": vals[min(len(vals) - 1, int(0.9 * len(vals)))],
            "ttft_max_s": vals[-1],
        }


class LLMServer:
    """Deployment body; app.py wraps it with serve.deployment and per-model options."""

    def __init__(self, model_config: dict[str, Any]) -> None:
        from cluster.config import ModelConfig
        from engine.async_engine import AsyncEngine

        mc = ModelConfig.model_validate(model_config)
        self.model_name = mc.name
        self.engine_config: EngineConfig = mc.engine_config()
        # A replica admits this many engine sequences (running + queued); beyond it answers 429.
        self.max_sequences = self.engine_config.max_num_seqs + mc.max_queued_requests
        if self.engine_config.tensor_parallel_size > 1:
            from deployments.tp_worker import tp_async_engine  # shards 1..N-1 as Ray actors

            self.engine = tp_async_engine(self.engine_config)
        else:
            self.engine = AsyncEngine(self.engine_config)
        self.replica_id = _replica_id()
        self.num_inflight = 0  # engine sequences admitted and not finished
        self.ttft = TTFTWindow()
        self._tracker = _make_tracker(self.engine.block_size)
        self._metrics_task: asyncio.Task | None = None
        self._last_stats: Any = None
        self.channels = ChannelHub()
        logger.info("LLMServer %s ready (model %s)", self.replica_id, self.model_name)

    # -- requests -----------------------------------------------------------------------------
    async def generate(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self._ensure_metrics_task()
        rid = str(req["request_id"])
        n = int(req.get("n", 1))
        # A multi-prompt request is one call (choice index = prompt index * n + i): Serve gives
        # every handle call of one HTTP request the same internal id, so calls must not overlap.
        prompts = req.get("prompts") or [req["prompt_token_ids"]]
        try:
            params = choice_params(req.get("sampling") or {}, n)
        except (ValueError, TypeError) as e:
            yield {"error": APIError(400, str(e), param=param_from_message(str(e))).to_dict()}
            return
        total = n * len(prompts)
        if self.num_inflight + total > self.max_sequences:
            err = APIError(
                429,
                f"replica queue is full ({self.num_inflight} sequences); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
            yield {"error": err.to_dict()}
            return
        jobs = [
            (rid if total == 1 else f"{rid}-{pi * n + i}", list(ids), p)
            for pi, ids in enumerate(prompts)
            for i, p in enumerate(params)
        ]
        n = total
        self.num_inflight += n
        finished = 0
        start = time.monotonic()
        first = True
        channel = req.get("channel")
        box: Outbox | None = None
        if channel is not None:
            box = self.channels.request_started(str(channel))
        replica_sent = False
        try:
            if box is not None:
                replica_sent = True
                yield {"replica": self.replica_id}  # admitted; tokens follow on the channel
            async for batch in self._batches(jobs):
                merged: dict[int, dict[str, Any]] = {}
                for i, out in batch:
                    d = output_delta(i, out)
                    if out.finished:
                        finished += 1
                        self.num_inflight -= 1
                    if out.finish_reason == "error":
                        msg = out.error or "engine error"
                        yield {"error": APIError(500, msg, type="server_error").to_dict()}
                        return
                    if box is not None:
                        box.put(rid, d)  # the channel sends it with the step's other deltas
                    else:
                        merged[i] = merge_deltas(merged[i], d) if i in merged else d
                if first:
                    first = False
                    self.ttft.add(time.monotonic() - start)
                if box is None:
                    msg: dict[str, Any] = {"outputs": list(merged.values())}
                    if not replica_sent:
                        replica_sent = True
                        msg["replica"] = self.replica_id
                    yield msg
        except StreamError as e:
            err = e.error
            if isinstance(err, ValueError):
                m = str(err)
                code = "context_length_exceeded" if "context length" in m else None
                api = APIError(400, m, param=param_from_message(m), code=code)
            else:
                logger.exception("request %s failed", rid, exc_info=err)
                api = APIError(500, f"engine error in request {rid}", type="server_error")
            yield {"error": api.to_dict()}
        finally:
            # Closing merge_coalesced aborted every unfinished engine stream (blocks freed).
            self.num_inflight -= n - finished
            if box is not None:
                self.channels.request_ended(str(channel))

    async def channel(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The output channel of one ingress (``req["channel"]``): see output_channel.py."""
        async for msg in self.channels.serve(str(req["channel"]), {"replica": self.replica_id}):
            yield msg

    def _batches(
        self, jobs: list[tuple[str, list[int], SamplingParams]]
    ) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """Engine outputs as batches [(choice index, output)]. One choice (the common case) skips
        the merge machinery: AsyncEngine already merges what a lagging consumer left queued."""
        if len(jobs) > 1:
            return merge_coalesced([self._stream(*job) for job in jobs])
        return self._single(*jobs[0])

    async def _single(
        self, rid: str, ids: list[int], params: SamplingParams
    ) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        agen = self._stream(rid, ids, params)
        try:
            async for out in agen:
                yield [(0, out)]
        except Exception as e:  # the same error shape as merge_coalesced's
            raise StreamError(0, e) from e
        finally:
            await agen.aclose()

    async def _stream(
        self, rid: str, ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        # A wrapper so a ValueError raised at call time or at the first step lands in the pump.
        agen = self.engine.generate(rid, ids, params)
        try:
            async for out in agen:
                yield out
        finally:
            # Closing the engine's iterator aborts the request and frees its KV blocks at once.
            await agen.aclose()

    # -- stats for Serve ----------------------------------------------------------------------
    # async so Serve runs them on the replica's event loop, never in a thread beside generate().
    async def record_routing_stats(self) -> dict[str, Any]:
        self._ensure_metrics_task()  # an idle replica still exports its gauges
        stats = self.engine.stats()
        if self._tracker is None:
            return {"num_waiting": stats.num_waiting, "num_running": stats.num_running}
        self._tracker.apply_events(self.engine.pop_block_events())
        return self._tracker.routing_stats(stats)

    async def record_autoscaling_stats(self) -> dict[str, int | float]:
        self._ensure_metrics_task()
        s = self.engine.stats()
        return {
            "queue_depth": s.num_waiting + s.num_running,
            "num_waiting": s.num_waiting,
            "num_running": s.num_running,
            "kv_cache_usage": s.kv_cache_usage,
            "num_inflight": self.num_inflight,
            **self.ttft.summary(),
        }

    async def engine_stats(self) -> dict[str, Any]:
        """For tests and `fleetlm status`: this replica's engine counters."""
        s = self.engine.stats()
        return {
            "replica": self.replica_id,
            "num_inflight": self.num_inflight,
            "kv_cache_usage": s.kv_cache_usage,
            **s.__dict__,
        }

    async def model_info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "max_model_len": self.engine.max_model_len,
            "block_size": self.engine.block_size,
        }

    def check_health(self) -> None:
        error = getattr(self.engine, "error", None)
        if error is not None:
            raise RuntimeError(f"engine thread stopped: {error}")
        check = getattr(self.engine, "check_health", None)  # e.g. tensor-parallel workers alive
        if check is not None:
            check()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # -- metrics ------------------------------------------------------------------------------
    def _ensure_metrics_task(self) -> None:
        if self._metrics_task is None or self._metrics_task.done():
            self._metrics_task = asyncio.ensure_future(self._publish_metrics_loop())

    async def _publish_metrics_loop(self) -> None:
        while True:
            try:
                self._publish_metrics()
            except Exception:  # metrics must never take the replica down
                logger.exception("publishing engine metrics failed")
            await asyncio.sleep(METRICS_PERIOD_S)

    def _publish_metrics(self) -> None:
        m = _get_metrics()
        if m is None:
            return
        s = self.engine.stats()
        prev = self._last_stats
        labels = {"model": self.model_name, "replica": self.replica_id}
        m.set("num_requests_waiting", s.num_waiting, **labels)
        m.set("num_requests_running", s.num_running, **labels)
        m.set("kv_cache_usage_perc", s.kv_cache_usage, **labels)
        for metric, field in (
            ("prompt_tokens_total", "prompt_tokens_total"),
            ("generation_tokens_total", "generation_tokens_total"),
            ("prefix_cache_queries_total", "prefix_cache_query_tokens"),
            ("prefix_cache_hits_total", "prefix_cache_hit_tokens"),
            ("num_preemptions_total", "num_preemptions"),
            ("spec_decode_num_draft_tokens_total", "spec_draft_tokens"),
            ("spec_decode_num_accepted_tokens_total", "spec_accepted_tokens"),
        ):
            delta = getattr(s, field, 0) - (getattr(prev, field, 0) if prev is not None else 0)
            if delta > 0:
                m.inc(metric, delta, **labels)
        self._last_stats = s


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit tests)
        return "local"


def _make_tracker(block_size: int) -> Any:
    try:
        from router.replica_stats import ReplicaCacheTracker
    except ModuleNotFoundError:
        return None
    return ReplicaCacheTracker(block_size)


def _get_metrics() -> Any:
    try:
        from deployments.metrics import get_metrics
    except ModuleNotFoundError:
        return None
    return get_metrics()
