"""A fake EngineClient (engine/async_engine.py) and a fake Serve handle, so the serving layer
(LLMServer, the ingress's replica calls, output channels) is tested in milliseconds without a model.

FakeEngine: every step, each running request gets one token, ``token_for(prompt, params, i)`` (its
text ``"<id>"``), until max_tokens ("length"), a stop_token_id ("stop") or an injected failure. The
request rules are the real ones (engine/request_checks.py) over small limits.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from engine.async_engine import EngineDeadError, error_output
from engine.outputs import BlockEvent, EngineStats, RequestOutput, TokenLogprob
from engine.request_checks import RequestLimits, check_request
from engine.sampling_params import SamplingParams

LIMITS = RequestLimits(vocab_size=100, max_model_len=64, num_blocks=32, block_size=4)
FAIL_TOKEN = 99  # a prompt holding this token fails inside the engine at its first step


def token_for(prompt: list[int], params: SamplingParams, i: int) -> int:
    seed = params.seed or 0
    return (sum(prompt) * 7 + seed * 13 + i * 3) % 90 + 1


class FakeEngine:
    block_size = LIMITS.block_size
    max_model_len = LIMITS.max_model_len

    def __init__(self, step_s: float = 0.001) -> None:
        self.step_s = step_s
        self.running: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.dead: BaseException | None = None
        self.num_steps = 0
        self._wake = asyncio.Event()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if self.dead is not None:
            raise EngineDeadError(str(self.dead))
        check_request(prompt_token_ids, params, LIMITS)
        self.running[request_id] = (list(prompt_token_ids), params, [])
        self.added.append(request_id)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        if self.running.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def kill(self, error: str = "engine core process exited (code -9)") -> None:
        self.dead = EngineDeadError(error)
        self._wake.set()

    async def outputs(self) -> list[RequestOutput]:
        while True:
            if self.dead is not None:
                raise self.dead
            if self.running:
                await asyncio.sleep(self.step_s)
                outs = self._step()
                if outs:
                    return outs
                continue
            self._wake.clear()
            await self._wake.wait()

    def _step(self) -> list[RequestOutput]:
        self.num_steps += 1
        outs = []
        for rid, (prompt, p, toks) in list(self.running.items()):
            if FAIL_TOKEN in prompt:
                del self.running[rid]
                outs.append(error_output(rid, RuntimeError("injected failure")))
                continue
            t = token_for(prompt, p, len(toks))
            toks.append(t)
            reason = "stop" if t in p.stop_token_ids else None
            if reason is None and len(toks) >= (p.max_tokens or 16):
                reason = "length"
            lps = None
            if p.logprobs is not None:
                lps = [TokenLogprob(t, -0.5, [(t, -0.5), (t + 1, -1.5)][: max(1, p.logprobs)])]
            outs.append(
                RequestOutput(
                    request_id=rid,
                    new_token_ids=[t],
                    new_text=f"<{t}>",
                    finished=reason is not None,
                    finish_reason=reason,
                    num_prompt_tokens=len(prompt),
                    num_output_tokens=len(toks),
                    logprobs=lps,
                )
            )
            if reason is not None:
                del self.running[rid]
        return outs

    def stats(self) -> EngineStats:
        used = sum(-(-(len(p) + len(t)) // LIMITS.block_size) for p, _, t in self.running.values())
        return EngineStats(
            num_waiting=0,
            num_running=len(self.running),
            num_free_blocks=LIMITS.num_blocks - used,
            num_total_blocks=LIMITS.num_blocks,
            prefix_cache_hit_tokens=0,
            prefix_cache_query_tokens=0,
            num_preemptions=0,
            prompt_tokens_total=0,
            generation_tokens_total=0,
            num_steps=self.num_steps,
        )

    def pop_block_events(self) -> list[BlockEvent]:
        return []

    def check_health(self) -> None:
        if self.dead is not None:
            raise self.dead

    def shutdown(self) -> None:
        pass


class FakeCall:
    """A streamed handle call as Serve runs it: the method runs in its own task; ``cancel()``
    cancels that task (Serve's cancellation), which closes the replica's generator."""

    def __init__(self, agen: Any, error: BaseException | None = None) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.error = error
        self.task = asyncio.ensure_future(self._pump(agen)) if error is None else None

    async def _pump(self, agen: Any) -> None:
        try:
            async for msg in agen:
                self.queue.put_nowait(msg)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self.queue.put_nowait(e)
            return
        finally:
            with contextlib.suppress(BaseException):
                await agen.aclose()
        self.queue.put_nowait(StopAsyncIteration())

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> Any:
        if self.error is not None:
            raise self.error
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.queue.put_nowait(item)
            raise item
        return item

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class FakeHandle:
    """``handle.options(stream=True).generate.remote(req)`` / ``.channel.remote(req)`` reaching
    one LLMServer (or failing with ``error``)."""

    def __init__(self, server: Any = None, error: BaseException | None = None) -> None:
        self.server = server
        self.error = error
        self.reqs: list[dict[str, Any]] = []
        self.calls: list[FakeCall] = []
        self._method = ""

    def options(self, **kw: Any) -> FakeHandle:
        return self

    @property
    def generate(self) -> FakeHandle:
        self._method = "generate"
        return self

    @property
    def channel(self) -> FakeHandle:
        self._method = "channel"
        return self

    def remote(self, req: dict[str, Any]) -> FakeCall:
        if self._method == "generate":
            self.reqs.append(req)
        if self.error is not None:
            call = FakeCall(None, self.error)
        else:
            call = FakeCall(getattr(self.server, self._method)(req))
        self.calls.append(call)
        return call
