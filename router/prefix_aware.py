# prefix_aware: cache affinity first, load balance as a guard.
#
# Inputs
#   h[0..n)   the prompt's chained block hashes (engine/block_hash.py; only full blocks, so a prompt
#             shorter than one block has n = 0).
#   for each candidate replica r, in a stable order (the Ray glue sorts by replica id):
#     match(r) = largest k such that h[0..k) are all in r's index: the block hashes r last
#                reported as cached, plus hashes this router assumed r stored because it sent r a
#                prompt holding them less than assumed_ttl_s ago, even if r has since reported
#                them evicted (router/prefix_index.py; default 120 s).
#     load(r)  = requests queued or running on r: other routers' (r's last reported num_waiting +
#                num_running, less this router's own outstanding there when the report arrived)
#                plus this router's own outstanding on r now (router/router_state.py).
#     home(r)  = r is where this router itself last placed the matched prefix: h[match(r) - 1] is in
#                r's history (assumed, not only reported), i.e. r got it by a cold or affinity
#                decision within assumed_ttl_s (balance spills are not recorded, see below).
#     footprint(r) = distinct blocks in r's history: the working set this router placed on r.
#
# Parameters (defaults)
#   imbalance = 32        largest load gap tolerated for affinity (absolute requests, >= 0).
#                         Each spill recomputes a whole prefix on a replica that lacks it and
#                         takes cache there: under load that work raises the queues, which
#                         makes more spills (simulated W6 on 8 replicas past saturation: 231
#                         spills and hit rate 0.48 at 8, none and 0.65 at 32; W2 had its best
#                         TTFT from 16 up). The gap still bounds a hot prefix's queue.
#   min_match_blocks = 1  a match shorter than this counts as no match (>= 1).
#
# Algorithm
#   1. least = the replica with the smallest load (earliest on ties); min_load = load(least).
#   2. best_match = max over r of match(r). If best_match < min_match_blocks, the prefix is new:
#      among the replicas with load(r) - min_load <= imbalance choose the smallest footprint
#      (then the smallest load, then the earliest), reason "cold". New prefixes go where the
#      least cache is claimed, so the prefix -> replica partition stays even in cache demand
#      (SGLang's cache-aware router picks the smallest radix tree the same way); load is the guard.
#   3. best = among the replicas with match == best_match, a home one first, then the least
#      loaded, then the earliest. A prefix that spilled to a second replica goes back to its home
#      once the home is within the imbalance again, so the spill copy ages out of the second cache
#      instead of the prefix alternating between two replicas and occupying both caches.
#   4. If load(best) - min_load > imbalance: choose least, reason "balance" (the cached replica is
#      too far behind; recomputing the prefix elsewhere is cheaper than queueing). Otherwise choose
#      best, reason "affinity".
#   Every decision is counted by reason: affinity, balance, cold.
#
# After a cold or affinity choice the router records that the chosen replica now holds h[0..n)
# (its history) and counts one more request sent to it, so the next request of the same prefix
# follows even before the replica reports again. After a balance choice it only counts the
# request: a spill is not a placement (spill_reasons). This follows SGLang's cache-aware policy
# (sgl-router), with the replica's own reported cache (exact block hashes) beside the router's
# history instead of an approximate radix tree of request texts, and a single absolute load
# threshold.
"""prefix_aware routing policy (algorithm and defaults in the comment above)."""

from __future__ import annotations

from collections.abc import Sequence

from router.policy import Decision, ReplicaView, check_candidates, least_loaded

DEFAULT_IMBALANCE = 32
DEFAULT_MIN_MATCH_BLOCKS = 1


class PrefixAwarePolicy:
    name = "prefix_aware"
    reasons = ("affinity", "balance", "cold")
    spill_reasons = ("balance",)

    def __init__(
        self, imbalance: int = DEFAULT_IMBALANCE, min_match_blocks: int = DEFAULT_MIN_MATCH_BLOCKS
    ) -> None:
        if not isinstance(imbalance, int) or isinstance(imbalance, bool) or imbalance < 0:
            raise ValueError(f"imbalance must be an integer >= 0, got {imbalance!r}")
        if (
            not isinstance(min_match_blocks, int)
            or isinstance(min_match_blocks, bool)
            or min_match_blocks < 1
        ):
            raise ValueError(f"min_match_blocks must be an integer >= 1, got {min_match_blocks!r}")
        self.imbalance = imbalance
        self.min_match_blocks = min_match_blocks

    def choose(
        self,
        request_hashes: Sequence[int],
        replicas: Sequence[ReplicaView],
        session_id: str | None = None,
    ) -> Decision:
        check_candidates(replicas)
        least = least_loaded(replicas)
        matches = [r.match(request_hashes) for r in replicas]
        best_match = max(matches)
        if best_match < self.min_match_blocks:
            within = [r for r in replicas if r.load - least.load <= self.imbalance]
            # min() keeps the earliest of equal keys
            chosen = min(within, key=lambda r: (r.footprint(), r.load))
            return Decision(chosen.replica_id, "cold")
        best = min(
            (r for r, m in zip(replicas, matches, strict=True) if m == best_match),
            key=lambda r: (not r.placed(request_hashes, best_match), r.load),
        )
        if best.load - least.load > self.imbalance:
            return Decision(least.replica_id, "balance")
        return Decision(best.replica_id, "affinity")
