"""Round robin: candidates in turn, ignoring load and cache. A baseline for benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from router.policy import Decision, ReplicaView, check_candidates


class RoundRobinPolicy:
    name = "round_robin"
    reasons = ("round_robin",)

    def __init__(self) -> None:
        self._next = 0

    def choose(
        self,
        request_hashes: Sequence[int],
        replicas: Sequence[ReplicaView],
        session_id: str | None = None,
    ) -> Decision:
        check_candidates(replicas)
        r = replicas[self._next % len(replicas)]
        self._next += 1
        return Decision(r.replica_id, "round_robin")
