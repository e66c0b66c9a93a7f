"""What a replica's ``record_routing_stats()`` returns, and the router's parser for it.

Replica side, the deployment keeps one ``ReplicaCacheTracker`` per engine::

    tracker.apply_events(engine.pop_block_events())      # after steps, or just before reporting
    return tracker.routing_stats(engine.stats())         # from record_routing_stats()

The dict is plain (Ray pickles it to the controller, which broadcasts it to every router with the
replica's other info) and compact: the cached block hashes travel as one little-endian int64 bytes
blob (8 bytes per block; 4096 cached blocks = 32 KiB), with ``cache_version`` bumped whenever the
set changes, so a router re-decodes the blob only when it changed. ``seq`` is bumped on every
report, so a router knows its count of "requests sent since the last stats" can restart from zero.

Keys (``FORMAT`` = 1): format, seq, cache_version, num_waiting, num_running, num_free_blocks,
num_total_blocks, block_size, num_hashes, truncated, hashes (bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.outputs import BlockEvent, EngineStats

FORMAT = 1
DEFAULT_MAX_HASHES = 65536  # 512 KiB per report at most
_INT_FIELDS = (
    "seq",
    "cache_version",
    "num_waiting",
    "num_running",
    "num_free_blocks",
    "num_total_blocks",
    "block_size",
    "num_hashes",
)


def pack_hashes(hashes: Iterable[int]) -> bytes:
    """Block hashes (signed 64-bit, as Python's hash returns) -> little-endian int64 blob."""
    try:
        return np.fromiter(hashes, dtype="<i8").tobytes()
    except OverflowError as e:
        raise ValueError(f"hashes: a block hash does not fit in int64 ({e})") from None


def unpack_hashes(blob: bytes) -> list[int]:
    if len(blob) % 8:
        raise ValueError(f"hashes: blob length must be a multiple of 8, got {len(blob)}")
    return np.frombuffer(blob, dtype="<i8").tolist()


@dataclass
class ReplicaRoutingStats:
    """Parsed routing stats of one replica. ``hashes_blob`` is decoded on demand (``hashes()``)."""

    seq: int
    cache_version: int
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    num_hashes: int
    truncated: bool
    hashes_blob: bytes = b""

    @property
    def load(self) -> int:
        return self.num_waiting + self.num_running

    def hashes(self) -> list[int]:
        return unpack_hashes(self.hashes_blob)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT}
        for name in _INT_FIELDS:
            d[name] = getattr(self, name)
        d["truncated"] = self.truncated
        d["hashes"] = self.hashes_blob
        return d


def parse_routing_stats(d: Mapping[str, Any]) -> ReplicaRoutingStats | None:
    """The router's view of a replica's ``routing_stats``; None when it reported nothing yet.

    Raises ValueError naming the field when the dict is malformed.
    """
    if not d:
        return None
    if d.get("format") != FORMAT:
        raise ValueError(f"routing_stats.format: expected {FORMAT}, got {d.get('format')!r}")
    ints: dict[str, int] = {}
    for name in _INT_FIELDS:
        v = d.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"routing_stats.{name}: expected an int >= 0, got {v!r}")
        ints[name] = v
    blob = d.get("hashes", b"")
    if not isinstance(blob, bytes | bytearray):
        raise ValueError(f"routing_stats.hashes: expected bytes, got {type(blob).__name__}")
    if len(blob) != 8 * ints["num_hashes"]:
        raise ValueError(
            f"routing_stats.hashes: {len(blob)} bytes for num_hashes={ints['num_hashes']}"
        )
    return ReplicaRoutingStats(
        **ints, truncated=bool(d.get("truncated", False)), hashes_blob=bytes(blob)
    )


class ReplicaCacheTracker:
    """Replica-side: the prefix cache's block hashes, kept from the engine's BlockEvents.

    Insertion order is store order (a re-stored hash moves to the end), so when the set exceeds
    ``max_hashes`` the report keeps the most recently stored ones (the engine's LRU evicts them
    last).
    """

    def __init__(self, block_size: int, max_hashes: int = DEFAULT_MAX_HASHES) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not isinstance(max_hashes, int) or max_hashes < 0:
            raise ValueError(f"max_hashes must be an integer >= 0, got {max_hashes!r}")
        self.block_size = block_size
        self.max_hashes = max_hashes
        self._hashes: dict[int, None] = {}  # ordered set, oldest first
        self.cache_version = 0
        self._seq = 0
        self._blob: bytes | None = b""  # packed report of the current version (None: stale)
        self._truncated = False

    def apply_events(self, events: Iterable[BlockEvent]) -> None:
        changed = False
        for ev in events:
            if ev.kind == "stored":
                for h in ev.block_hashes:
                    self._hashes.pop(h, None)
                    self._hashes[h] = None
                changed |= bool(ev.block_hashes)
            elif ev.kind == "removed":
                for h in ev.block_hashes:
                    if h in self._hashes:
                        del self._hashes[h]
                        changed = True
            elif ev.kind == "cleared":
                changed |= bool(self._hashes)
                self._hashes.clear()
            else:
                raise ValueError(f"BlockEvent.kind must be stored|removed|cleared, got {ev.kind!r}")
        if changed:
            self.cache_version += 1
            self._blob = None

    def hashes(self) -> list[int]:
        return list(self._hashes)

    def routing_stats(self, stats: EngineStats) -> dict[str, Any]:
        """The dict for ``record_routing_stats()`` (see the module docstring for its keys)."""
        if self._blob is None:
            kept = self._hashes
            self._truncated = len(kept) > self.max_hashes
            if self._truncated:
                skip = len(kept) - self.max_hashes
                it = iter(kept)
                for _ in range(skip):
                    next(it)
                self._blob = pack_hashes(it)
            else:
                self._blob = pack_hashes(kept)
        self._seq += 1
        return ReplicaRoutingStats(
            seq=self._seq,
            cache_version=self.cache_version,
            num_waiting=stats.num_waiting,
            num_running=stats.num_running,
            num_free_blocks=stats.num_free_blocks,
            num_total_blocks=stats.num_total_blocks,
            block_size=self.block_size,
            num_hashes=len(self._blob) // 8,
            truncated=self._truncated,
            hashes_blob=self._blob,
        ).to_dict()
