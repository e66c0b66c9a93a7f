"""LLMServer: one Ray Serve replica of one model. It admits requests, streams their tokens through
output channels and reports stats; the engine behind it is an ``EngineClient`` it is given
(engine/async_engine.py): by default the engine loop on a thread of the replica, with
``engine_process`` the engine core in a process of its own (engine/engine_core.py).

The ingress calls ``handle.options(stream=True).generate.remote(req)`` with::

    req = {"request_id": str, "prompt_token_ids": [int], "sampling": {SamplingParams fields},
           "n": int, "block_hashes": [int],     # block_hashes: read by the router, not here
           "prompts": [[int], ...],             # optional: every prompt of a multi-prompt request
           "channel": str}                      # the ingress's output channel id

That stream yields ``{"replica": id}`` once the request is admitted, then ``{"error": {...}}``
(APIError.to_dict()) if it fails, and ends when every choice has finished; cancelling it aborts the
request (its KV blocks are freed before the engine's next step). Its tokens travel through the
ingress's output channel (``channel()``, deployments/output_channel.py) as deltas (format:
openai_format.py); one task here takes each engine step's outputs and puts them in the channels.
Errors travel as messages, not exceptions, so a bad parameter reaches the client as a 400 with its
message instead of a wrapped Ray traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.metrics import get_metrics
from deployments.output_channel import ChannelHub, Outbox
from deployments.protocol import APIError
from engine.async_engine import EngineClient, EngineDeadError
from engine.config import EngineConfig
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from router.replica_stats import ReplicaCacheTracker

logger = logging.getLogger("ray.serve")

TTFT_WINDOW_S = 30.0  # record_autoscaling_stats reports TTFT over this recent window
METRICS_PERIOD_S = 1.0

EngineFactory = Callable[[Any], EngineClient]  # cluster.config.ModelConfig -> engine


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


def api_error(e: BaseException, rid: str) -> APIError:
    """The client's view of an engine error: bad input is a 400 naming the field, a stopped engine
    a 503 (Serve replaces the replica), anything else a 500 without internals."""
    if isinstance(e, ValueError | TypeError):  # RequestError, GrammarError: typed field and code
        return APIError(400, str(e), param=getattr(e, "param", None), code=getattr(e, "code", None))
    if isinstance(e, EngineDeadError):
        msg = f"engine error: the replica's engine stopped (request {rid}); retry"
        return APIError(503, msg, type="server_error")
    return APIError(500, f"engine error in request {rid}", type="server_error")


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


@dataclass(eq=False)
class Live:
    """One admitted request: its engine sequences (one per choice) and where their tokens go."""

    rid: str
    box: Outbox
    start: float
    jobs: dict[str, int] = field(default_factory=dict)  # engine request id -> choice index
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    first: bool = True

    def end(self, error: APIError | None = None) -> None:
        if not self.done.done():
            self.done.set_result(error)


class LLMServer:
    """Deployment body; app.py wraps it with serve.deployment and per-model options."""

    def __init__(self, model_config: dict[str, Any], engine_factory: EngineFactory | None = None):
        from cluster.config import ModelConfig

        mc = ModelConfig.model_validate(model_config)
        self.model_name = mc.name
        self.engine_config: EngineConfig = mc.engine_config()
        # A replica admits this many engine sequences (running + queued); beyond it answers 429.
        self.max_sequences = self.engine_config.max_num_seqs + mc.max_queued_requests
        self.engine: EngineClient = (engine_factory or default_engine)(mc)
        self.replica_id = _replica_id()
        self.num_inflight = 0  # engine sequences admitted and not finished
        self.ttft = TTFTWindow()
        self._tracker = ReplicaCacheTracker(self.engine.block_size)
        self._jobs: dict[str, Live] = {}  # engine request id -> its request
        self._rids: set[str] = set()
        self._pump_task: asyncio.Task | None = None
        self.engine_error: BaseException | None = None  # set when the engine stopped
        self._metrics_task: asyncio.Task | None = None
        self._last_stats: Any = None
        self.channels = ChannelHub()
        logger.info("LLMServer %s ready (model %s)", self.replica_id, self.model_name)

    # -- requests -----------------------------------------------------------------------------
    async def generate(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self._ensure_tasks()
        rid = str(req["request_id"])
        channel = req.get("channel")
        if not isinstance(channel, str):
            msg = "req['channel'] (an output channel id) is required: tokens travel through it"
            yield {"error": APIError(400, msg, param="channel").to_dict()}
            return
        n = int(req.get("n", 1))
        # A multi-prompt request is one call (choice index = prompt index * n + i): Serve gives
        # every handle call of one HTTP request the same internal id, so calls must not overlap.
        prompts = req.get("prompts") or [req["prompt_token_ids"]]
        try:
            params = choice_params(req.get("sampling") or {}, n)
        except (ValueError, TypeError) as e:
            yield {"error": api_error(e, rid).to_dict()}
            return
        total = n * len(prompts)
        if rid in self._rids:
            msg = f"x-request-id {rid!r} is already in flight"
            yield {"error": APIError(400, msg, param="x-request-id").to_dict()}
            return
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
        live = Live(rid, self.channels.request_started(channel), time.monotonic())
        self._rids.add(rid)
        try:
            try:
                for pi, ids in enumerate(prompts):
                    for i, p in enumerate(params):
                        index = pi * n + i
                        job = rid if total == 1 else f"{rid}-{index}"
                        self.engine.add(job, list(ids), p)
                        live.jobs[job] = index
                        self._jobs[job] = live
                        self.num_inflight += 1
            except Exception as e:  # noqa: BLE001 - bad input or a dead engine, as a message
                yield {"error": api_error(e, rid).to_dict()}
                return
            yield {"replica": self.replica_id}  # admitted; tokens follow on the channel
            error = await live.done
            if error is not None:
                yield {"error": error.to_dict()}
        finally:
            # Done, failed, or cancelled (client gone): abort what still runs (blocks freed).
            for job in live.jobs:
                self.engine.abort(job)
                self._jobs.pop(job, None)
            self.num_inflight -= len(live.jobs)
            live.jobs.clear()
            self._rids.discard(rid)
            self.channels.request_ended(channel)

    async def channel(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The output channel of one ingress (``req["channel"]``): see output_channel.py."""
        async for msg in self.channels.serve(str(req["channel"]), {"replica": self.replica_id}):
            yield msg

    async def _pump(self) -> None:
        """Each engine step's outputs into their requests' channels (one wake-up per step)."""
        while True:
            try:
                outs = await self.engine.outputs()
            except Exception as e:  # the engine stopped: fail everyone, never hang them
                logger.error("engine of replica %s stopped: %r", self.replica_id, e)
                self.engine_error = e
                dead = e if isinstance(e, EngineDeadError) else EngineDeadError(str(e))
                for live in set(self._jobs.values()):
                    live.end(api_error(dead, live.rid))
                return
            now = time.monotonic()
            for out in outs:
                live = self._jobs.get(out.request_id)
                if live is None:
                    continue  # aborted meanwhile
                if out.finish_reason == "error":
                    live.end(api_error(out.error or RuntimeError("engine error"), live.rid))
                    continue
                if live.first:
                    live.first = False
                    self.ttft.add(now - live.start, now)
                live.box.put(live.rid, output_delta(live.jobs[out.request_id], out))
                if out.finished:
                    del live.jobs[out.request_id]
                    del self._jobs[out.request_id]
                    self.num_inflight -= 1
                    if not live.jobs:
                        live.end()

    # -- stats for Serve ----------------------------------------------------------------------
    # async so Serve runs them on the replica's event loop, never in a thread beside generate().
    async def record_routing_stats(self) -> dict[str, Any]:
        self._ensure_tasks()  # an idle replica still exports its gauges
        self._tracker.apply_events(self.engine.pop_block_events())
        return self._tracker.routing_stats(self.engine.stats())

    async def record_autoscaling_stats(self) -> dict[str, int | float]:
        self._ensure_tasks()
        s = self.engine.stats()
        return {
            "queue_depth": s.num_waiting + s.num_running,
            "num_waiting": s.num_waiting,
            "num_running": s.num_running,
            "kv_cache_usage": s.kv_cache_usage,
            "num_inflight": self.num_inflight,
            **self.ttft.summary(),
        }

    def check_health(self) -> None:
        self.engine.check_health()  # a dead engine (process or thread) or a lost TP worker

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # -- background tasks ---------------------------------------------------------------------
    def _ensure_tasks(self) -> None:
        if self._pump_task is None or self._pump_task.done() and self.engine_error is None:
            self._pump_task = asyncio.ensure_future(self._pump())
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
        m = get_metrics()
        s = self.engine.stats()
        prev = self._last_stats
        labels = {"model": self.model_name, "replica": self.replica_id}
        m.set("num_requests_waiting", s.num_waiting, **labels)
        m.set("num_requests_running", s.num_running, **labels)
        m.set("kv_cache_usage_perc", s.kv_cache_usage, **labels)
        for metric, name in (
            ("prompt_tokens_total", "prompt_tokens_total"),
            ("generation_tokens_total", "generation_tokens_total"),
            ("prefix_cache_queries_total", "prefix_cache_query_tokens"),
            ("prefix_cache_hits_total", "prefix_cache_hit_tokens"),
            ("num_preemptions_total", "num_preemptions"),
            ("spec_decode_num_draft_tokens_total", "spec_draft_tokens"),
            ("spec_decode_num_accepted_tokens_total", "spec_accepted_tokens"),
            ("engine_steps_total", "num_steps"),
            ("engine_step_seconds_total", "step_seconds_total"),
            ("engine_decode_rows_total", "decode_rows_total"),
            ("engine_prefill_tokens_total", "prefill_tokens_total"),
        ):
            delta = getattr(s, name, 0) - (getattr(prev, name, 0) if prev is not None else 0)
            if delta > 0:
                m.inc(metric, delta, **labels)
        self._last_stats = s


def default_engine(mc: Any) -> EngineClient:
    """The replica's engine: the engine loop on a thread of the replica, or (``engine_process``)
    the engine core in a process of its own; tensor-parallel shards 1..N-1 as Ray actors."""
    config = mc.engine_config()
    launcher = master_addr = None
    if config.tensor_parallel_size > 1:
        import ray

        from deployments.tp_worker import launch_workers

        launcher, master_addr = launch_workers, ray.util.get_node_ip_address()
    if mc.engine_process:
        from engine.engine_core import EngineCoreClient

        return EngineCoreClient(config, launcher=launcher, master_addr=master_addr)
    from engine.async_engine import AsyncEngine
    from engine.tp_runner import make_llm_engine

    kw = {"master_addr": master_addr} if master_addr else {}
    if launcher is None:
        return AsyncEngine(lambda: make_llm_engine(config))
    return AsyncEngine(lambda: make_llm_engine(config, launcher, **kw))


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit tests)
        return "local"
