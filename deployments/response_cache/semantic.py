"""Semantic response cache index: unit prompt embeddings per partition, cosine search, guard, LRU.

A partition is one (tenant namespace, model, exact context) hash (see keys.semantic_split): a
lookup only ever searches its own partition, so tenants and differing system prompts or sampling
fields never share answers. Within the partition the stored rows form a dense float32 matrix
[n, dim]; a search is one matrix-vector product (cosine = dot, rows are unit norm), then candidates
at or above the threshold are tried best first through the lexical guard (guard.py).

Bounds: max_entries over all partitions, least recently used (stored or served) evicted first;
ttl_s from the time of storing. Row removal swaps the partition's last row into the hole, O(dim).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.response_cache.guard import TextFeatures, features, guard_reason


@dataclass
class _Entry:
    partition: str
    text: str
    feats: TextFeatures
    blob: str  # the response as JSON text
    expires_at: float
    row: int  # index into its partition's matrix


@dataclass
class _Partition:
    mat: np.ndarray  # [capacity, dim] float32; rows [0, n) are live
    ids: list[int] = field(default_factory=list)  # entry id of each live row
    by_text: dict[str, int] = field(default_factory=dict)  # exact text -> entry id


@dataclass
class SemanticHit:
    response: dict[str, Any]
    similarity: float
    matched_text: str


class SemanticIndex:
    def __init__(
        self,
        dim: int,
        threshold: float,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        use_guard: bool = True,
    ):
        assert 0.0 < threshold <= 1.0 and max_entries >= 1, "validated by CacheConfig"
        self.dim = dim
        self.threshold = threshold
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self.use_guard = use_guard
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._parts: dict[str, _Partition] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self.guard_rejections: Counter[str] = Counter()
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def search(self, partition: str, vec: np.ndarray, text: str) -> SemanticHit | None:
        """Best stored prompt in `partition` with cosine >= threshold that passes the guard."""
        qf = features(text) if self.use_guard else None
        with self._lock:
            part = self._parts.get(partition)
            if part is None or not part.ids:
                return None
            n = len(part.ids)
            sims = part.mat[:n] @ vec.astype(np.float32, copy=False)  # [n]
            order = np.flatnonzero(sims >= self.threshold)
            order = order[np.argsort(-sims[order], kind="stable")]
            now = self.clock()
            expired: list[int] = []
            hit: tuple[int, float] | None = None
            for row in order:
                eid = part.ids[row]
                e = self._entries[eid]
                if now >= e.expires_at:
                    expired.append(eid)
                    continue
                if qf is not None:
                    reason = guard_reason(qf, e.feats)
                    if reason is not None:
                        self.guard_rejections[reason] += 1
                        continue
                hit = (eid, float(sims[row]))
                break
            for eid in expired:  # after the loop: removal moves rows
                self._remove(eid)
                self.expirations += 1
            if hit is None:
                return None
            eid, sim = hit
            self._entries.move_to_end(eid)
            e = self._entries[eid]
            blob, matched = e.blob, e.text
        return SemanticHit(json.loads(blob), sim, matched)

    def add(self, partition: str, vec: np.ndarray, text: str, response: dict[str, Any]) -> None:
        blob = json.dumps(response, separators=(",", ":"), ensure_ascii=False)
        feats = features(text)
        with self._lock:
            old_part = self._parts.get(partition)
            old = old_part.by_text.get(text) if old_part is not None else None
            if old is not None:  # same prompt again: the newer answer replaces the old one
                self._remove(old)  # (may drop the partition if it held only this entry)
            part = self._parts.get(partition)
            if part is None:
                part = self._parts[partition] = _Partition(np.empty((8, self.dim), np.float32))
            n = len(part.ids)
            if n == part.mat.shape[0]:  # grow by doubling: amortised O(dim) per add
                part.mat = np.concatenate([part.mat, np.empty_like(part.mat)])
            part.mat[n] = vec
            eid = self._next_id
            self._next_id += 1
            part.ids.append(eid)
            part.by_text[text] = eid
            self._entries[eid] = _Entry(partition, text, feats, blob, self.clock() + self.ttl_s, n)
            while len(self._entries) > self.max_entries:
                self._remove(next(iter(self._entries)))
                self.evictions += 1

    def _remove(self, eid: int) -> None:
        e = self._entries.pop(eid)
        part = self._parts[e.partition]
        last = len(part.ids) - 1
        if e.row != last:  # move the last row into the hole
            moved = part.ids[last]
            part.mat[e.row] = part.mat[last]
            part.ids[e.row] = moved
            self._entries[moved].row = e.row
        part.ids.pop()
        del part.by_text[e.text]
        if not part.ids:
            del self._parts[e.partition]

    def check_invariants(self) -> None:
        """For tests: rows, ids and entries agree."""
        with self._lock:
            total = 0
            for pid, part in self._parts.items():
                total += len(part.ids)
                for row, eid in enumerate(part.ids):
                    e = self._entries[eid]
                    assert e.partition == pid and e.row == row and part.by_text[e.text] == eid
            assert total == len(self._entries)
