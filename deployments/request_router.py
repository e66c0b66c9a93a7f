"""Ray Serve glue for fleetlm's routing policies: a ``RequestRouter`` subclass.

Set on the replica deployment (it runs inside every caller's handle, e.g. the ingress)::

    RequestRouterConfig(
        request_router_class="deployments.request_router:PrefixAwareRouter",
        request_router_kwargs={"policy": "prefix_aware", "imbalance": 8, "model": "demo"},
        request_routing_stats_period_s=1.0,
    )

kwargs: ``policy`` (router/registry.py names; default prefix_aware), that policy's parameters
(e.g. ``imbalance``, ``min_match_blocks``, ``seed``), ``assumed_ttl_s`` (router/prefix_index.py) and
``model`` (metric label; default the deployment name).

Contract with the caller: ``handle.generate.remote(req)`` where ``req`` is a dict holding
``"block_hashes": list[int]`` (engine/block_hash.py over the prompt's token ids, the engine's block
size) and optionally ``"session_id": str`` (for the session policy). A request without them routes
as "cold". A call with ``"target_replica": <replica unique id>`` (an output channel) goes to that
replica. Replicas report ``record_routing_stats()`` from router.replica_stats.ReplicaCacheTracker.

Everything here is non-blocking: the router reads the stats Ray already pushed to this process
(``replica.routing_stats``), decides in memory (router/router_state.py) and returns ranks of one
replica each, the policy's choice first, so Ray falls back to the next when the chosen one is at
``max_ongoing_requests``. Decisions are counted when Ray confirms the send (``on_request_routed``),
by reason (affinity, balance, cold, ..., and "fallback" when Ray had to use another rank).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments.metrics import get_metrics
from router.prefix_index import DEFAULT_ASSUMED_TTL_S
from router.registry import DEFAULT_POLICY, make_policy
from router.router_state import RouterState

logger = logging.getLogger("ray.serve")

DECISIONS_METRIC = "router_decisions_total"  # cluster/metrics.py spec: labels model, policy, reason


def request_fields(pending_request: PendingRequest | None) -> tuple[list[int], str | None]:
    """(block_hashes, session_id) of a pending request; ([], None) when it carries none.

    Looks at the first positional argument, then the keyword arguments, for a dict with
    "block_hashes". Malformed values are ignored (the request routes as cold) rather than raised:
    an exception here would strand the request inside Ray's routing loop.
    """
    if pending_request is None:
        return [], None
    candidates = list(pending_request.args[:1]) + list(pending_request.kwargs.values())
    for obj in candidates:
        if isinstance(obj, dict) and ("block_hashes" in obj or "session_id" in obj):
            hashes = obj.get("block_hashes") or []
            if not isinstance(hashes, list | tuple) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hashes
            ):
                logger.warning("fleetlm router: request block_hashes is not a list of ints; cold")
                hashes = []
            session = obj.get("session_id")
            return list(hashes), session if isinstance(session, str) else None
    return [], None


def target_replica(pending_request: PendingRequest | None) -> str | None:
    """The replica a call asks for by id (``{"target_replica": id}``: output channels), or None."""
    if pending_request is None or not pending_request.args:
        return None
    obj = pending_request.args[0]
    if isinstance(obj, dict):
        target = obj.get("target_replica")
        if isinstance(target, str):
            return target
    return None


class _Counter:
    """Decision counts: in this process (``counts``, for tests and status) and as a Ray metric."""

    def __init__(self, model: str, policy: str) -> None:
        self.model = model
        self.policy = policy
        self.counts: dict[str, int] = {}
        self._metrics = get_metrics()

    def inc(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        try:
            self._metrics.inc(DECISIONS_METRIC, model=self.model, policy=self.policy, reason=reason)
        except Exception:  # a metrics failure must never fail routing
            logger.exception("fleetlm router: recording %s failed", DECISIONS_METRIC)


class PrefixAwareRouter(RequestRouter):
    """fleetlm's request router: any policy of router/registry.py (prefix_aware by default)."""

    def initialize_state(
        self,
        policy: str = DEFAULT_POLICY,
        assumed_ttl_s: float = DEFAULT_ASSUMED_TTL_S,
        model: str | None = None,
        **policy_params: Any,
    ) -> None:
        self.policy_name = policy
        self.state = RouterState(make_policy(policy, **policy_params), assumed_ttl_s=assumed_ttl_s)
        self.decisions = _Counter(model or self._deployment_id.name, policy)
        self._bad_stats: set[str] = set()  # replicas already warned about

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.state.retain(rid.unique_id for rid in self._replica_id_set)

    def _refresh(self, replicas: Sequence[RunningReplica]) -> None:
        for r in replicas:
            rid = r.replica_id.unique_id
            try:
                self.state.update_stats(rid, r.routing_stats or {})
            except ValueError as e:
                if rid not in self._bad_stats:
                    self._bad_stats.add(rid)
                    logger.warning("fleetlm router: ignoring routing stats of %s: %s", rid, e)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        target = target_replica(pending_request)
        if target is not None:
            # An output channel: not a request, so no decision is booked or counted. A replica
            # that is gone answers as another one, and the caller sees that in its first message.
            return [[by_id[target]]] if target in by_id else [[by_id[i]] for i in sorted(by_id)]
        ids = sorted(by_id)
        self._refresh(candidate_replicas)
        hashes, session_id = request_fields(pending_request)
        if pending_request is None:
            chosen = self.state.policy.choose(hashes, self.state.views(ids), session_id).replica_id
        else:
            request_id = pending_request.metadata.internal_request_id
            chosen = self.state.choose(request_id, hashes, ids, session_id).replica_id
            # Every candidate is in the ranks below: if none accepts, back off before the next
            # round instead of spinning.
            pending_request.routing_context.should_backoff = True
        return [[by_id[rid]] for rid in self.state.ranked(ids, chosen)]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        reason = self.state.on_routed(
            pending_request.metadata.internal_request_id, replica_id.unique_id
        )
        if reason is not None:
            self.decisions.inc(reason)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.state.on_completed(internal_request_id)
