"""One replica's cached block hashes, as the router sees them.

Two sources feed it:
- the replica's own view: a full snapshot of its prefix cache (``replace``, from the routing stats
  the replica reports, tagged with a version so an unchanged snapshot costs nothing) or the engine's
  ``BlockEvent`` stream (``apply_events``, used replica-side by ``ReplicaCacheTracker``);
- this router's own recent decisions (``assume``): blocks of prompts sent to the replica count as
  present for ``assumed_ttl_s`` seconds after the last prompt holding them was sent there, whatever
  the reports say. Before the replica reports them, this keeps affinity between stats refreshes;
  after the replica reports them evicted, it keeps sending the prefix where it sent it before (the
  replica recomputes and re-caches it) instead of re-placing it as cold. Under cache pressure that
  keeps the prefix -> replica partition stable: with re-placement, prefixes wander and both replicas
  end up caching the same ones (SGLang's cache-aware router keeps only such a history).

Block hashes are chained (engine/block_hash.py): hash i covers tokens [0, (i+1) * block_size), so
"the first k hashes are present" is exactly "the first k blocks of the prompt are cached".
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from engine.outputs import BlockEvent

# Long enough to cover queueing + prefill + one stats refresh, and a prefix's usual idle gaps: a
# prefix whose history lapsed while the replica had evicted it is re-placed as cold, so a short
# history moves prefixes between replicas and unbalances the partition (simulated W6 on 8
# replicas, 96 tenants: 130 cold placements and 13-21 tenants per replica at 30 s, 96 and 12 each
# at 120 s, p90 TTFT 869 -> 748 ms at 12 req/s; W2 alike at both). Still short enough that a
# prefix idle for minutes is re-placed by load. The entry cap bounds memory (about 100 bytes
# each) whatever the request rate.
DEFAULT_ASSUMED_TTL_S = 120.0
DEFAULT_MAX_ASSUMED = 100_000


class PrefixIndex:
    def __init__(
        self,
        assumed_ttl_s: float = DEFAULT_ASSUMED_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        max_assumed: int = DEFAULT_MAX_ASSUMED,
    ) -> None:
        if not assumed_ttl_s >= 0:
            raise ValueError(f"assumed_ttl_s must be >= 0, got {assumed_ttl_s}")
        if not isinstance(max_assumed, int) or max_assumed < 0:
            raise ValueError(f"max_assumed must be an integer >= 0, got {max_assumed!r}")
        self.assumed_ttl_s = assumed_ttl_s
        self.max_assumed = max_assumed
        self._clock = clock
        self._cached: set[int] = set()  # reported by the replica
        # hash -> expiry time (clock units), least recently assumed first (evicted past max_assumed)
        self._assumed: OrderedDict[int, float] = OrderedDict()
        self.version = -1  # version of the last snapshot applied; -1: none yet

    # --- the replica's view -------------------------------------------------------------------

    def replace(self, hashes: Iterable[int], version: int) -> None:
        """Install a full snapshot of the replica's cache (reported as ``version``)."""
        self._cached = set(hashes)
        self.version = version
        if self._assumed:  # drop expired assumptions here, so the dict stays bounded
            now = self._clock()
            self._assumed = OrderedDict((h, e) for h, e in self._assumed.items() if e > now)

    def apply_events(self, events: Iterable[BlockEvent]) -> bool:
        """Apply engine block events in order; True if the cached set changed."""
        changed = False
        for ev in events:
            if ev.kind == "stored":
                before = len(self._cached)
                self._cached.update(ev.block_hashes)
                changed |= len(self._cached) != before
            elif ev.kind == "removed":
                before = len(self._cached)
                self._cached.difference_update(ev.block_hashes)
                changed |= len(self._cached) != before
            elif ev.kind == "cleared":
                changed |= bool(self._cached)
                self._cached.clear()
            else:
                raise ValueError(f"BlockEvent.kind must be stored|removed|cleared, got {ev.kind!r}")
        return changed

    # --- this router's decisions --------------------------------------------------------------

    def assume(self, hashes: Iterable[int]) -> None:
        """Count ``hashes`` as present for ``assumed_ttl_s`` (a prompt with them was just sent)."""
        if self.assumed_ttl_s <= 0:
            return
        expiry = self._clock() + self.assumed_ttl_s
        for h in hashes:
            self._assumed.pop(h, None)
            self._assumed[h] = expiry
        while len(self._assumed) > self.max_assumed:
            self._assumed.popitem(last=False)

    # --- queries ------------------------------------------------------------------------------

    def __contains__(self, block_hash: int) -> bool:
        if block_hash in self._cached:
            return True
        expiry = self._assumed.get(block_hash)
        if expiry is None:
            return False
        if expiry > self._clock():
            return True
        del self._assumed[block_hash]
        return False

    def longest_prefix(self, hashes: Sequence[int]) -> int:
        """Number of leading blocks of a prompt (its chained block hashes) present here."""
        n = 0
        for h in hashes:
            if h not in self:
                break
            n += 1
        return n

    def is_assumed(self, block_hash: int) -> bool:
        """True while ``block_hash`` is in this router's own history (sent here < ttl ago)."""
        expiry = self._assumed.get(block_hash)
        return expiry is not None and expiry > self._clock()

    @property
    def cached(self) -> frozenset[int]:
        """The replica-reported hashes (assumptions excluded)."""
        return frozenset(self._cached)

    def num_assumed(self) -> int:
        """Distinct blocks in this router's unexpired history: what it recently placed here."""
        # Every assume() uses the same ttl on a monotonic clock and re-inserts at the end, so
        # expiry times ascend in the dict's order: expired entries are exactly a leading run.
        now = self._clock()
        while self._assumed:
            h, exp = next(iter(self._assumed.items()))
            if exp > now:
                break
            del self._assumed[h]
        return len(self._assumed)

    def __len__(self) -> int:
        return len(self._cached)
