"""What one router instance knows about its replicas, between their stats reports. Ray-free.

Per replica: a PrefixIndex (reported cache + assumed blocks), the last parsed routing stats and
the requests this router has outstanding there.

Load (requests): the report's waiting + running, less this router's own requests outstanding when
the report arrived (what remains is other routers' traffic), plus this router's requests
outstanding now. A report is a snapshot taken a while before it arrives and is replaced only
every stats period: counting it whole kept requests that had finished since in the load until the
next report, so a replica that had just completed requests looked busiest and lost the next ones.

``choose()`` runs the policy over that view and books the decision at once (the next request must
see it, even before Ray confirms the send); ``on_routed()`` settles it when Ray reports where the
request actually went (a full replica may have rejected it and Ray tried the next rank), and
returns the reason to count.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.policy import Decision, Policy, ReplicaView
from router.prefix_index import DEFAULT_ASSUMED_TTL_S, PrefixIndex
from router.replica_stats import ReplicaRoutingStats, parse_routing_stats

MAX_OPEN_DECISIONS = 10_000  # decisions awaiting on_routed(); older ones are dropped (cancelled)
MAX_IN_FLIGHT = 100_000  # routed requests awaiting on_completed(); older ones are dropped


@dataclass
class _Replica:
    index: PrefixIndex
    stats: ReplicaRoutingStats | None = None
    # Requests this router booked here (chosen or routed) that have not completed: exact for this
    # router's own traffic whatever the reports' age.
    num_outstanding: int = 0
    outstanding_at_report: int = 0  # num_outstanding when ``stats`` arrived

    @property
    def load(self) -> int:
        others = max(0, self.stats.load - self.outstanding_at_report) if self.stats else 0
        return others + self.num_outstanding


@dataclass
class _Booked:
    decision: Decision
    hashes: list[int] = field(default_factory=list)


class RouterState:
    def __init__(
        self,
        policy: Policy,
        assumed_ttl_s: float = DEFAULT_ASSUMED_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._spill_reasons = frozenset(getattr(policy, "spill_reasons", ()))
        self.assumed_ttl_s = assumed_ttl_s
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._open: OrderedDict[str, _Booked] = OrderedDict()  # chosen, not yet confirmed sent
        self._in_flight: OrderedDict[str, _Booked] = OrderedDict()  # sent, not yet completed

    def _get(self, replica_id: str) -> _Replica:
        r = self._replicas.get(replica_id)
        if r is None:
            r = _Replica(PrefixIndex(self.assumed_ttl_s, self._clock))
            self._replicas[replica_id] = r
        return r

    # --- replica reports ----------------------------------------------------------------------

    def update_stats(self, replica_id: str, routing_stats: Mapping[str, Any]) -> None:
        """Feed a replica's latest ``routing_stats`` dict; cheap when nothing new was reported.

        Raises ValueError (naming the field) for a malformed dict; the previous view is kept.
        """
        r = self._get(replica_id)
        if not routing_stats or (r.stats is not None and routing_stats.get("seq") == r.stats.seq):
            return
        stats = parse_routing_stats(routing_stats)
        assert stats is not None
        if stats.cache_version != r.index.version:
            r.index.replace(stats.hashes(), stats.cache_version)
        r.stats = stats
        r.outstanding_at_report = r.num_outstanding

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget replicas not in ``replica_ids`` (they left the deployment)."""
        keep = set(replica_ids)
        for rid in [rid for rid in self._replicas if rid not in keep]:
            del self._replicas[rid]

    # --- decisions ----------------------------------------------------------------------------

    def views(self, candidate_ids: Sequence[str]) -> list[ReplicaView]:
        out = []
        for rid in candidate_ids:
            r = self._get(rid)
            out.append(ReplicaView(rid, r.load, r.index))
        return out

    def load(self, replica_id: str) -> int:
        return self._get(replica_id).load

    def choose(
        self,
        request_id: str,
        request_hashes: Sequence[int],
        candidate_ids: Sequence[str],
        session_id: str | None = None,
    ) -> Decision:
        """Run the policy and book the decision; a repeated request_id undoes its last one first."""
        self._undo(self._open.pop(request_id, None))
        decision = self.policy.choose(request_hashes, self.views(candidate_ids), session_id)
        booked = self._book(decision, request_hashes)
        if decision.reason not in self._spill_reasons:
            self._get(decision.replica_id).index.assume(request_hashes)
        self._open[request_id] = booked
        while len(self._open) > MAX_OPEN_DECISIONS:
            self._undo(self._open.popitem(last=False)[1])
        return decision

    def on_routed(self, request_id: str, replica_id: str) -> str | None:
        """Settle a booked decision; returns the reason to count ("fallback" when the request went
        to another replica than the policy chose), or None for a request this router never chose."""
        booked = self._open.pop(request_id, None)
        if booked is None:
            return None
        reason = booked.decision.reason
        if booked.decision.replica_id != replica_id:
            # The chosen replica was full and Ray used another rank: a spill, like a balance
            # decision, so the prompt's blocks are not recorded as placed there.
            self._undo(booked)
            booked = self._book(Decision(replica_id, "fallback"), booked.hashes)
            reason = "fallback"
        booked.hashes = []  # not needed any more; keep the in-flight table small
        self._in_flight[request_id] = booked
        while len(self._in_flight) > MAX_IN_FLIGHT:
            self._undo(self._in_flight.popitem(last=False)[1])
        return reason

    def on_completed(self, request_id: str) -> None:
        """A routed request finished (any outcome): it no longer adds to its replica's load."""
        self._undo(self._in_flight.pop(request_id, None))

    def forget(self, request_id: str) -> None:
        """Drop a booked decision whose request was cancelled before being sent."""
        self._undo(self._open.pop(request_id, None))

    def _book(self, decision: Decision, request_hashes: Sequence[int]) -> _Booked:
        """Count a request on its replica (one more outstanding)."""
        self._get(decision.replica_id).num_outstanding += 1
        return _Booked(decision, list(request_hashes))

    def _undo(self, booked: _Booked | None) -> None:
        # Assumed hashes stay (they expire); only the load count is given back.
        if booked is None:
            return
        r = self._replicas.get(booked.decision.replica_id)
        if r is None:
            return
        if r.num_outstanding > 0:
            r.num_outstanding -= 1

    def ranked(self, candidate_ids: Sequence[str], chosen: str) -> list[str]:
        """``chosen`` first, then the other candidates by load (Ray tries them in order if the
        chosen replica is at max_ongoing_requests)."""
        rest = sorted((rid for rid in candidate_ids if rid != chosen), key=self.load)
        return [chosen, *rest]
