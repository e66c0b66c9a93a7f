"""Ray glue for tensor-parallel replicas: shards 1..N-1 as ``TPWorker`` actors in the replica's
placement group; shard 0 is the replica's engine core (engine/engine_core.py, which asks the replica
to start the workers: it is not in Ray itself; engine/tp_runner.py does the rest).

Serve reserves the replica's placement group from ``placement_group_bundles`` (deployments/app.py:
one bundle per shard, the replica actor in bundle 0); worker r goes to bundle r with that bundle's
resources. The actors are owned by the replica, so they die with it (Ray fate-sharing) and a
replacement replica starts its own. A worker that dies makes ``check_health`` raise (its ``run``
call finishes), and the engine's next collective fails the requests in flight.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.tp_runner import TPInit, run_worker

logger = logging.getLogger("ray.serve")

WORKER_NAME_PREFIX = "fleetlm-tp-"  # named actors, so operators (and tests) can find them


@ray.remote(max_restarts=0, max_concurrency=2)  # run() blocks for the shard's life
class TPWorker:
    def run(self, init: TPInit, rank: int) -> None:
        try:
            run_worker(init, rank)
        except BaseException:
            # Leave no half-joined shard behind: exiting closes its sockets, so shard 0's pending
            # collective fails at once, and this call's ref reports the actor's death.
            logger.exception("tensor-parallel shard %d failed", rank)
            os._exit(1)

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


# -- can the cluster place one replica at all? ----------------------------------------------
def placement_problem(
    bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]
) -> str | None:
    """Why one replica's bundles can never be placed on nodes of these total resources (None:
    they can). STRICT_PACK needs every bundle on one node; PACK and SPREAD (both soft) need each
    bundle on some node, first-fit by size."""
    need_keys = sorted({k for b in bundles for k, v in b.items() if v > 0})

    def fits(cap: dict[str, float], b: dict[str, float]) -> bool:
        return all(cap.get(k, 0.0) + 1e-9 >= v for k, v in b.items() if v > 0)

    total = {k: sum(b.get(k, 0.0) for b in bundles) for k in need_keys}
    if strategy == "STRICT_PACK":
        if any(fits(n, total) for n in nodes):
            return None
        best = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in need_keys}
        return f"STRICT_PACK needs {total} on one node; the largest node has {best}"
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: -sum(b.values())):
        node = next((n for n in free if fits(n, b)), None)
        if node is None:
            have = {k: sum(n.get(k, 0.0) for n in nodes) for k in need_keys}
            return f"{len(bundles)} bundles need {total} in all; the cluster has {have}"
        for k, v in b.items():
            node[k] = node.get(k, 0.0) - v
    return None


def check_placeable(model_name: str, options: dict[str, Any]) -> None:
    """ValueError when a replica of this deployment could never be placed on the running cluster.

    Skipped outside a Ray driver and on KubeRay (``KUBERAY_GEN_RAY_START_CMD`` is set in its pods),
    where the autoscaler adds GPU nodes only after the placement group asks for them."""
    bundles = options.get("placement_group_bundles")
    if not bundles or not ray.is_initialized() or os.environ.get("KUBERAY_GEN_RAY_START_CMD"):
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problem = placement_problem(bundles, options.get("placement_group_strategy", "PACK"), nodes)
    if problem is not None:
        raise ValueError(
            f"model {model_name!r}: tensor_parallel_size={len(bundles)} cannot be placed on this "
            f"cluster: {problem}; lower tensor_parallel_size or resources_per_replica"
        )
