"""Power of two choices: sample two distinct candidates at random, send to the less loaded one.

Load is the same figure prefix_aware uses (waiting + running + sent since the last stats); on equal
load the first sampled wins. Cache contents are ignored: this is the cache-blind baseline (Ray
Serve's default router does the same on its own queue-length probes).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.policy import Decision, ReplicaView, check_candidates


class Pow2Policy:
    name = "pow2"
    reasons = ("pow2",)

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(
        self,
        request_hashes: Sequence[int],
        replicas: Sequence[ReplicaView],
        session_id: str | None = None,
    ) -> Decision:
        check_candidates(replicas)
        if len(replicas) == 1:
            return Decision(replicas[0].replica_id, "pow2")
        a, b = self._rng.sample(range(len(replicas)), 2)
        ra, rb = replicas[a], replicas[b]
        return Decision((rb if rb.load < ra.load else ra).replica_id, "pow2")
