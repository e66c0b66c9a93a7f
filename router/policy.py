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

    def placed(self, request_hashes: Sequence[int], num_blocks: int) -> bool:
        """Whether this router itself recently sent the prompt's first ``num_blocks`` blocks here
        (as a placement, not a spill): the replica is that prefix's home."""
        return num_blocks > 0 and self.index.is_assumed(request_hashes[num_blocks - 1])

    def footprint(self) -> int:
        """Distinct blocks this router recently placed here (its share of the working set)."""
        return self.index.num_assumed()


class Decision(NamedTuple):
    replica_id: str
    reason: str


class Policy(Protocol):
    name: str
    reasons: tuple[str, ...]  # every reason choose() can return (metric label values)
    # Reasons for which the chosen replica is not the prompt's home, only a spill target: the
    # router does not record the prompt's blocks as placed there (RouterState). Optional.
    spill_reasons: tuple[str, ...]

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
