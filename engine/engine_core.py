"""The engine core in a process of its own (as vLLM V1's EngineCore): ``EngineCoreClient`` is the
replica's EngineClient; ``main`` is the child process, which runs the same engine loop as
AsyncEngine's thread (scheduler, runner, detokenizer) with a GIL of its own.

Why: in one process the engine thread and the replica's streaming (Ray Serve's event loop, pickling,
the channel's messages) take turns on one GIL; a step waits for the replica's Python and vice
versa. In two processes they overlap.

Wire: two OS pipes carrying pickled messages (``multiprocessing.connection.Connection`` framing).

    parent -> child   ("init", config dict, model path, master addr)   once, first
                      [("add", rid, ids, params) | ("abort", rid), ...] one message per event-loop
                                                                        turn, however many calls
    child -> parent   ("launch", TPInit)          tensor parallel: start shards 1..N-1 (the parent
                                                  can place Ray actors, the child is not in Ray)
                      ("ready", RequestLimits, EngineStats)
                      ("out", [RequestOutput], EngineStats, [BlockEvent])   one per engine step
                      ("failed", message)         start-up or a step failed; the child exits

The child is a plain ``python -m engine.engine_core`` (not multiprocessing's spawn, which would
re-import the parent's __main__, here Ray's worker script). It exits when its parent goes away (the
pipe reaches EOF). When the child dies, every request in flight fails with EngineDeadError and
``check_health`` raises, so Serve replaces the replica.

With ``FLEETLM_STEP_TRACE=PREFIX`` in its environment the child writes one JSON line per loop turn
to PREFIX.<pid> (step wall and CPU seconds, decode rows, prompt tokens, idle waits);
bench/served_steps.py sums it up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from engine.async_engine import EngineDeadError, EngineLoop, OutputBuffer
from engine.config import EngineConfig
from engine.outputs import BlockEvent, EngineStats, RequestOutput
from engine.request_checks import RequestLimits, check_request
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5
TRACE_ENV = "FLEETLM_STEP_TRACE"


class EngineCoreClient:
    """EngineClient whose engine loop runs in a child process; see the module docstring."""

    def __init__(
        self,
        config: EngineConfig,
        model_path: str | None = None,
        launcher: Any = None,
        master_addr: str | None = None,
    ) -> None:
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        # OpenMP threads that wait spin for a while by default. Beside the replica, ingress and
        # proxy on the same cores, a spinning thread holds a core another of those needs, and a
        # descheduled one holds up its siblings' barrier: on 2 busy cores the engine core spent
        # 4x the CPU per token of the same loop on a replica thread, at a quarter of the
        # throughput; sleeping at once brought it level (BENCHMARKS.md, serving path).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.engine_core", str(p2c_r), str(c2p_w)],
            pass_fds=(p2c_r, c2p_w),
            env=env,
        )
        os.close(p2c_r)
        os.close(c2p_w)
        self._tx = Connection(p2c_w, readable=False)
        self._rx = Connection(c2p_r, writable=False)
        self._send_lock = threading.Lock()
        self._pending: list[tuple] = []
        self._buffer = OutputBuffer()
        self._events: list[BlockEvent] = []
        self.workers: Any = None  # tensor-parallel shards started for the child
        try:
            self._send(("init", config.to_dict(), model_path, master_addr))
            self.limits, self._stats = self._start(launcher)
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = self.limits.max_model_len
        self.block_size = self.limits.block_size
        self._reader = threading.Thread(target=self._read, name="fleetlm-core-rx", daemon=True)
        self._reader.start()

    def _start(self, launcher: Any) -> tuple[RequestLimits, EngineStats]:
        while True:
            try:
                msg = self._rx.recv()
            except EOFError:
                raise RuntimeError(
                    f"engine core exited during start-up (code {self.proc.wait()})"
                ) from None
            if msg[0] == "launch":
                if launcher is None:
                    raise RuntimeError("engine core asked for tensor-parallel workers")
                self.workers = launcher(msg[1])
                self._send(("launched",))
            elif msg[0] == "ready":
                return msg[1], msg[2]
            else:
                raise RuntimeError(f"engine core failed to start: {msg[1]}")

    @property
    def error(self) -> BaseException | None:
        return self._buffer.error

    # -- EngineClient ---------------------------------------------------------------------------
    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        ids = list(prompt_token_ids)
        check_request(ids, params, self.limits)  # the child checks again; this one answers now
        self._queue(("add", request_id, ids, params))

    def abort(self, request_id: str) -> None:
        self._queue(("abort", request_id))

    async def outputs(self) -> list[RequestOutput]:
        return await self._buffer.take()

    def stats(self) -> EngineStats:
        return self._stats

    def pop_block_events(self) -> list[BlockEvent]:
        events, self._events = self._events, []
        return events

    def check_health(self) -> None:
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        code = self.proc.poll()
        if code is not None:
            raise EngineDeadError(f"engine core process exited with code {code}")
        if self.workers is not None:
            reason = self.workers.dead()
            if reason is not None:
                raise RuntimeError(f"tensor-parallel worker lost: {reason}")

    def shutdown(self) -> None:
        for conn in (getattr(self, "_tx", None),):
            if conn is not None and not conn.closed:
                conn.close()  # the child sees EOF and exits
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.workers is not None:
            self.workers.stop()
            self.workers = None

    # -- plumbing -------------------------------------------------------------------------------
    def _queue(self, item: tuple) -> None:
        """Calls made in one event-loop turn go to the child as one message."""
        self._pending.append(item)
        if len(self._pending) > 1:
            return
        try:
            asyncio.get_running_loop().call_soon(self._flush)
        except RuntimeError:  # no event loop (a plain caller): send now
            self._flush()

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self._send(batch)
        except (OSError, ValueError) as e:  # the child is gone; the reader reports it
            logger.warning("engine core unreachable: %r", e)

    def _send(self, msg: Any) -> None:
        with self._send_lock:
            self._tx.send(msg)

    def _read(self) -> None:
        """Reader thread: the child's step messages into the output buffer."""
        while True:
            try:
                msg = self._rx.recv()
            except (EOFError, OSError):
                code = self.proc.wait()
                self._buffer.fail(EngineDeadError(f"engine core process exited (code {code})"))
                return
            if msg[0] == "out":
                self._stats = msg[2]
                if msg[3]:
                    self._events.extend(msg[3])
                if msg[1]:
                    self._buffer.push(msg[1])
            elif msg[0] == "failed":
                logger.error("engine core failed: %s", msg[1])
                self._buffer.fail(EngineDeadError(f"engine core failed: {msg[1].splitlines()[-1]}"))


# -- the child process ---------------------------------------------------------------------------
class _ParentWorkers:
    """Tensor-parallel shards as the child sees them: the parent started them and watches them."""

    def dead(self) -> str | None:
        return None

    def stop(self) -> None:
        pass


def _build_engine(rx: Connection, tx: Connection, init: tuple) -> Any:
    from engine.tp_runner import make_llm_engine

    _, config_dict, model_path, master_addr = init
    config = EngineConfig.from_dict(config_dict)
    if config.tensor_parallel_size == 1:
        return make_llm_engine(config, model_path=model_path)

    def launcher(tp_init: Any) -> _ParentWorkers:
        tx.send(("launch", tp_init))
        if rx.recv()[0] != "launched":
            raise RuntimeError("the parent did not start the tensor-parallel workers")
        return _ParentWorkers()

    kw = {"master_addr": master_addr} if master_addr else {}
    return make_llm_engine(config, launcher, model_path, **kw)


def _receive(rx: Connection, loop: EngineLoop, stop: threading.Event) -> None:
    """Reader thread of the child: queue the parent's adds and aborts for the engine loop."""
    try:
        while True:
            for item in rx.recv():
                if item[0] == "add":
                    loop.queue_add(item[1], item[2], item[3])
                else:
                    loop.queue_abort(item[1])
    except (EOFError, OSError):
        pass  # the parent went away
    stop.set()
    loop.wake.set()


def serve_core(rx: Connection, tx: Connection) -> None:
    try:
        engine = _build_engine(rx, tx, rx.recv())
    except BaseException:
        tx.send(("failed", traceback.format_exc()))
        raise
    stats = engine.stats()
    limits = RequestLimits(
        engine.vocab_size, engine.max_model_len, stats.num_total_blocks, engine.block_size
    )
    tx.send(("ready", limits, stats))
    loop = EngineLoop(engine)
    stop = threading.Event()
    threading.Thread(target=_receive, args=(rx, loop, stop), daemon=True).start()
    last = None
    trace = _open_trace()
    try:
        while not stop.is_set():
            t0, c0, n0 = time.perf_counter(), time.process_time(), engine.num_steps
            outs = loop.run_once(IDLE_WAIT_S)
            t1, c1 = time.perf_counter(), time.process_time()
            events = engine.pop_block_events()
            stats = engine.stats()
            if outs or events or stats != last:  # aborts change the stats without a step
                tx.send(("out", outs, stats, events))
                last = stats
            if trace is not None:
                stepped = engine.num_steps != n0
                rows, prompt = engine.last_step if stepped else (0, 0)
                rec = {
                    "t": t0,
                    "wall": t1 - t0,
                    "cpu": c1 - c0,
                    "send": time.perf_counter() - t1,
                    "step": stepped,
                    "decode_rows": rows,
                    "prefill_tokens": prompt,
                    "waiting": stats.num_waiting,
                    "running": stats.num_running,
                }
                trace.write(json.dumps(rec) + "\n")
    except BaseException:
        logger.exception("engine step failed")
        try:
            tx.send(("failed", traceback.format_exc()))
        except OSError:
            pass
        raise
    finally:
        if trace is not None:
            trace.close()
        close = getattr(engine.runner, "shutdown", None)
        if close is not None:
            close()


def _open_trace() -> Any:
    """The step trace (``FLEETLM_STEP_TRACE=PREFIX``: one JSON line per loop turn into
    PREFIX.<pid>, read by bench/served_steps.py), or None."""
    prefix = os.environ.get(TRACE_ENV)
    if not prefix:
        return None
    return open(f"{prefix}.{os.getpid()}", "w", buffering=1)  # noqa: SIM115 (line-buffered)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="engine-core %(levelname)s %(message)s")
    rx = Connection(int(argv[0]), writable=False)
    tx = Connection(int(argv[1]), readable=False)
    serve_core(rx, tx)


if __name__ == "__main__":
    main(sys.argv[1:])
