"""The one interface every routing policy implements, and what it sees of each replica.

A policy is a small object with ``choose(request_hashes, replicas, session_id=None) -> Decision``:
``request_hashes`` are the prompt's chained block hashes (engine/block_hash.py ``block_hashes``),
``replicas`` the candidates in a stable order (ties go to the earlier one). Policies are Ray-free
and deterministic given their inputs (and seed), so they are tested with exact numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from router.prefix_index import PrefixIndex


@dataclass
class ReplicaView:
    replica_id: str
    # waiting + running from the replica's last stats, plus requests this router sent it since.
    load: int
    index: PrefixIndex

    def match(self, request_hashes: Sequence[int]) -> int:
        """Leading blocks of the prompt this replica holds (reported or assumed)."""
        return self.index.longest_prefix(request_hashes)


class Decision(NamedTuple):
    replica_id: str
    reason: str


class Policy(Protocol):
    name: str
    reasons: tuple[str, ...]  # every reason choose() can return (metric label values)

    def choose(
        self,
        request_hashes: Sequence[int],
        replicas: Sequence[ReplicaView],
        session_id: str | None = None,
    ) -> Decision: ...


def least_loaded(replicas: Sequence[ReplicaView]) -> ReplicaView:
    """The replica with the smallest load; the earliest one on ties."""
    check_candidates(replicas)
    return min(replicas, key=lambda r: r.load)  # min() keeps the first of equal keys


def check_candidates(replicas: Sequence[ReplicaView]) -> None:
    if not replicas:
        raise ValueError("replicas: no candidate replica to choose from")
