"""Exact response cache: key → stored response, bounded by entries and/or bytes, TTL, LRU.

Values are stored as JSON text: the byte bound measures what is really held, and every `get`
returns a fresh dict, so a caller that edits a served response (new id, usage) can't corrupt the
entry. One lock guards the ordered dict; every operation is O(1) apart from the evictions it makes.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    blob: str  # the response as JSON text
    nbytes: int  # UTF-8 size of blob
    expires_at: float


class ExactCache:
    def __init__(
        self,
        max_entries: int | None,
        ttl_s: float,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        assert max_entries is not None or max_bytes is not None, "validated by CacheConfig"
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._nbytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self.expirations = 0

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return None
            if self.clock() >= e.expires_at:
                self._drop(key)
                self.expirations += 1
                return None
            self._entries.move_to_end(key)
            blob = e.blob
        return json.loads(blob)

    def put(self, key: str, value: dict[str, Any]) -> bool:
        """Store `value`; False when it alone exceeds max_bytes (then nothing is stored)."""
        blob = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        size = len(blob.encode())
        if self.max_bytes is not None and size > self.max_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = _Entry(blob, size, self.clock() + self.ttl_s)
            self._nbytes += size
            self._evict()
        return True

    def _drop(self, key: str) -> None:
        e = self._entries.pop(key)
        self._nbytes -= e.nbytes

    def _evict(self) -> None:
        # Least recently used first. Expired entries are dropped lazily when looked up (or by
        # purge_expired); they are bounded by the same limits meanwhile.
        while (self.max_entries is not None and len(self._entries) > self.max_entries) or (
            self.max_bytes is not None and self._nbytes > self.max_bytes
        ):
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.evictions += 1

    def purge_expired(self) -> int:
        """Drop every expired entry (O(n)); returns how many."""
        now = self.clock()
        with self._lock:
            dead = [k for k, e in self._entries.items() if now >= e.expires_at]
            for k in dead:
                self._drop(k)
            self.expirations += len(dead)
        return len(dead)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes
