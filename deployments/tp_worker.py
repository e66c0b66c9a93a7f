"""Ray glue for tensor-parallel replicas: shards 1..N-1 as ``TPWorker`` actors in the replica's
placement group; shard 0 is the LLMServer replica itself (engine/tp_runner.py does the rest).

Serve reserves the replica's placement group from ``placement_group_bundles`` (deployments/app.py:
one bundle per shard, the replica actor in bundle 0); worker r goes to bundle r with that bundle's
resources. The actors are owned by the replica, so they die with it (Ray fate-sharing) and a
replacement replica starts its own. A worker that dies makes ``check_health`` raise (its ``run``
call finishes), and the engine's next collective fails the requests in flight.
"""

from __future__ import annotations

import logging
import uuid

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.config import EngineConfig
from engine.tp_runner import TPAsyncEngine, TPInit, run_worker

logger = logging.getLogger("ray.serve")

WORKER_NAME_PREFIX = "fleetlm-tp-"  # named actors, so operators (and tests) can find them


@ray.remote(max_restarts=0, max_concurrency=2)  # run() blocks for the shard's life
class TPWorker:
    def run(self, init: TPInit, rank: int) -> None:
        run_worker(init, rank)

    def placement_group_id(self) -> str | None:
        return ray.get_runtime_context().get_placement_group_id()


class RayWorkers:
    """The replica's view of its worker actors (engine.tp_runner.TPWorkers)."""

    def __init__(self, actors: list, refs: list) -> None:
        self.actors, self.refs = actors, refs

    def dead(self) -> str | None:
        # A run() call that finished means its shard left the group: it died, failed, or stopped.
        done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        if not done:
            return None
        rank = self.refs.index(done[0]) + 1
        try:
            ray.get(done[0], timeout=1)
        except Exception as e:  # RayActorError when killed, the worker's own error otherwise
            return f"shard {rank}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return f"shard {rank} stopped"

    def stop(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass


def launch_workers(init: TPInit) -> RayWorkers:
    """Start shards 1..N-1 in the current (the replica's) placement group."""
    pg = ray.util.get_current_placement_group()
    if pg is None:
        raise ValueError(
            f"tensor_parallel_size={init.world_size} needs the replica to run in a placement group "
            "(Serve's placement_group_bundles: one bundle per shard)"
        )
    bundles = pg.bundle_specs
    if len(bundles) < init.world_size:
        raise ValueError(
            f"tensor_parallel_size={init.world_size} but the replica's placement group has "
            f"{len(bundles)} bundles"
        )
    tag = uuid.uuid4().hex[:8]
    actors, refs = [], []
    for rank in range(1, init.world_size):
        spec = bundles[rank]
        actor = TPWorker.options(
            name=f"{WORKER_NAME_PREFIX}{tag}-{rank}",
            num_cpus=spec.get("CPU", 0),
            num_gpus=spec.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank
            ),
        ).remote()
        actors.append(actor)
        refs.append(actor.run.remote(init, rank))
    logger.info("started %d tensor-parallel worker(s) %s-*", len(actors), tag)
    return RayWorkers(actors, refs)


def tp_async_engine(config: EngineConfig) -> TPAsyncEngine:
    """The replica's engine when ``tensor_parallel_size > 1``: shard 0 here, the rest as actors."""
    return TPAsyncEngine(config, launch_workers, master_addr=ray.util.get_node_ip_address())
