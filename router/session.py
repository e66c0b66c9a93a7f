"""session: requests carrying the same session id go to the same replica (e.g. one chat's turns).

The replica is picked by rendezvous (highest random weight) hashing of (session id, replica id):
every router instance agrees without shared state, and adding or removing a replica moves only the
sessions that belonged to it. Requests without a session id go to the least loaded replica (reason
"cold"). Load is ignored for sessions: stickiness is the point; the autoscaler adds capacity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from router.policy import Decision, ReplicaView, check_candidates, least_loaded


def _weight(session_id: str, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{session_id}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SessionPolicy:
    name = "session"
    reasons = ("session", "cold")

    def choose(
        self,
        request_hashes: Sequence[int],
        replicas: Sequence[ReplicaView],
        session_id: str | None = None,
    ) -> Decision:
        check_candidates(replicas)
        if not session_id:
            return Decision(least_loaded(replicas).replica_id, "cold")
        r = max(replicas, key=lambda r: _weight(session_id, r.replica_id))
        return Decision(r.replica_id, "session")
