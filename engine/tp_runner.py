"""Tensor-parallel model runner: shard 0 (in the engine's process) drives N-1 worker shards.

``TPRunner`` has ModelRunner's interface (``forward(sched_out, token_ids) -> logits``,
``num_blocks``, ``vocab_size``, ``hf_config``, ``device``), so
``LLMEngine(config, runner_factory=...)`` schedules, samples and streams exactly as with one shard.
Each step shard 0 broadcasts the SchedulerOutput and the scheduled token ids (ids and counts only:
for request i the window ``token_ids[i][computed : computed + scheduled]``, never whole histories)
over the control group; all shards run the forward (row-parallel layers all-reduce); shard 0 alone
runs the LM head and samples.

Workers are started by a *launcher* (``Callable[[TPInit], TPWorkers]``), so this module stays free
of Ray: ``deployments/tp_worker.py`` places Ray actors in the replica's placement group;
``local_launcher`` spawns local processes (tests, bench). Every worker runs :func:`run_worker`.

Faults: a dead peer makes the next collective raise (gloo: "connection closed by peer"; a hung peer:
the tensor group's timeout), so ``forward`` raises and the engine loop fails its requests with
EngineDeadError instead of hanging; ``check_health`` also reports a worker that died while idle.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import AutoConfig

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_runner import ModelRunner, resolve_device
from engine.outputs import RunnerOutput, SchedulerOutput
from engine.tensor_parallel import TPGroup, open_store, plan_heads

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0  # a tensor collective that waits longer than this means a hung peer


@dataclass
class TPInit:
    """What a worker needs to join shard 0's group (picklable)."""

    config: dict[str, Any]  # EngineConfig.to_dict()
    model_path: str
    master_addr: str
    port: int
    world_size: int
    timeout_s: float = DEFAULT_TIMEOUT_S


class TPWorkers(Protocol):
    def dead(self) -> str | None:
        """Why a worker is gone, or None while all run."""

    def stop(self) -> None: ...


Launcher = Callable[[TPInit], TPWorkers]


class _Window:
    """Token ids of one request as the worker sees them: only ``[start, start + len(ids))``."""

    __slots__ = ("start", "ids")

    def __init__(self, start: int, ids: list[int]) -> None:
        self.start, self.ids = start, ids

    def __getitem__(self, s: slice) -> list[int]:
        assert s.start == self.start and s.stop == self.start + len(self.ids), (s, self.start)
        return self.ids


def _windows(out: SchedulerOutput, token_ids: list[list[int]]) -> list[tuple[int, list[int]]]:
    return [
        (c, ids[c : c + n])
        for ids, c, n in zip(
            token_ids, out.num_computed_tokens, out.num_scheduled_tokens, strict=True
        )
    ]


class TPRunner:
    """Shard 0 of a tensor-parallel group; see the module docstring."""

    def __init__(
        self,
        config: EngineConfig,
        model_path: str,
        launcher: Launcher,
        master_addr: str = "127.0.0.1",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        n = config.tensor_parallel_size
        # Refuse an impossible layout before any worker starts.
        plan_heads(AutoConfig.from_pretrained(model_path), n)
        store, port = open_store(n)
        init = TPInit(config.to_dict(), model_path, master_addr, port, n, timeout_s)
        self.workers = launcher(init)
        try:
            device = resolve_device(config.device)
            share_cores(config, device)
            self.group = TPGroup(store, 0, n, device, timeout_s)
            self.runner = ModelRunner(config, model_path, tp_group=self.group)
            blocks = self.group.all_gather_int(self.runner.num_blocks)
        except BaseException:
            self.workers.stop()
            raise
        if len(set(blocks)) != 1:
            self.shutdown()
            raise RuntimeError(f"tensor-parallel shards disagree on KV blocks: {blocks}")
        self.store = store  # rank 0 hosts the store; it lives as long as the group
        self.num_blocks = self.runner.num_blocks
        self.vocab_size = self.runner.vocab_size
        self.hf_config = self.runner.hf_config
        self.device = self.runner.device
        self._closed = False

    @property
    def sampler(self):
        return self.runner.sampler

    def forward(self, out: SchedulerOutput, token_ids: list[list[int]]) -> torch.Tensor:
        self.group.broadcast_object((out, _windows(out, token_ids)))
        return self.runner.forward(out, token_ids)

    def execute_model(self, out: SchedulerOutput, reqs) -> RunnerOutput:
        token_ids = [r.token_ids + d for r, d in zip(reqs, out.spec_token_ids, strict=True)]
        return self.sampler.sample_step(self.forward(out, token_ids), out, reqs)

    @property
    def comm_s(self) -> float:
        """Seconds shard 0 spent in collectives (includes waiting for the slowest shard)."""
        return self.group.comm_s

    def check_health(self) -> None:
        reason = self.workers.dead()
        if reason is not None:
            raise RuntimeError(f"tensor-parallel worker lost: {reason}")

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            if self.workers.dead() is None:
                self.group.broadcast_object(None)  # workers leave their loop
        except RuntimeError:
            pass
        self.workers.stop()


@torch.inference_mode()
def worker_step(runner: ModelRunner, out: SchedulerOutput, windows: list[tuple[int, list[int]]]):
    """A worker's share of one step: the decoder only (the LM head runs on shard 0)."""
    runner.forward(out, [_Window(s, ids) for s, ids in windows], compute_logits=False)


def share_cores(config: EngineConfig, device: torch.device) -> None:
    """On CPU, N shards on one machine split its cores: with every shard running torch's default
    thread count the OpenMP pools fight over the cores and a step gets several times slower."""
    if device.type == "cpu" and not config.num_threads:
        torch.set_num_threads(max(1, torch.get_num_threads() // config.tensor_parallel_size))


def run_worker(init: TPInit, rank: int) -> None:
    """A worker shard's whole life: join, load its slice, run steps until shard 0 says stop."""
    config = EngineConfig.from_dict(init.config)
    device = resolve_device(config.device)
    share_cores(config, device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    group = TPGroup.join(init.master_addr, init.port, rank, init.world_size, device, init.timeout_s)
    path = init.model_path
    if not os.path.isdir(path):  # a worker on another node: build/find the model there
        from engine.models.demo import resolve_model

        path = resolve_model(config.model)
    runner = ModelRunner(config, path, tp_group=group)
    group.all_gather_int(runner.num_blocks)
    logger.info("tensor-parallel shard %d/%d ready", rank, init.world_size)
    while True:
        msg = group.broadcast_object()
        if msg is None:
            return
        worker_step(runner, *msg)


# -- local processes (tests, benchmarks) ---------------------------------------------------------
class _LocalWorkers:
    def __init__(self, procs: list) -> None:
        self.procs = procs

    def dead(self) -> str | None:
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                return f"shard {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def stop(self) -> None:
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


def local_launcher(init: TPInit) -> _LocalWorkers:
    """Start shards 1..N-1 as spawned local processes."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=run_worker, args=(init, r), daemon=True, name=f"fleetlm-tp{r}")
        for r in range(1, init.world_size)
    ]
    for p in procs:
        p.start()
    return _LocalWorkers(procs)


def tp_runner_factory(launcher: Launcher, **kwargs) -> Callable[[EngineConfig, str], TPRunner]:
    """For ``LLMEngine(config, runner_factory=...)``."""
    return lambda config, model_path: TPRunner(config, model_path, launcher, **kwargs)


def make_llm_engine(
    config: EngineConfig, launcher: Launcher = local_launcher, model_path: str | None = None, **kw
) -> LLMEngine:
    """An LLMEngine whose runner is tensor-parallel when ``config.tensor_parallel_size > 1``."""
    if config.tensor_parallel_size == 1:
        return LLMEngine(config, model_path)
    return LLMEngine(config, model_path, runner_factory=tp_runner_factory(launcher, **kw))
