"""Paged KV cache bookkeeping: fixed-size blocks, block tables, ref counts, automatic prefix
caching.

A block is either in use (ref_cnt > 0) or in the free queue. A free block may still hold a valid
cached prefix (it keeps its hash); it is only forgotten when it is popped from the head of the free
queue for reuse. Freed blocks go to the tail, so eviction is LRU. A request's blocks are freed
tail-first, so the end of a prompt is evicted before its (more widely shared) beginning.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.outputs import BlockEvent
from engine.sequence import Request


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # stored tokens, compared on a hit (hash collisions)
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)
    reused: bool = False  # served a prefix-cache hit since it was filled (slru: protected)
    protected: bool = False  # free and in the protected queue (slru)


class FreeBlockQueue:
    """Doubly linked list of free blocks.

    A linked list rather than a deque because a prefix-cache hit must take a block out of the
    *middle* of the queue (it is free but cached, and now reused) in O(1).
    """

    def __init__(self, blocks: list[Block]) -> None:
        self.head = Block(-1)  # sentinels
        self.tail = Block(-1)
        self.head.next, self.tail.prev = self.tail, self.head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self.num_free

    def append(self, block: Block) -> None:
        last = self.tail.prev
        assert last is not None
        last.next, block.prev, block.next, self.tail.prev = block, last, self.tail, block
        self.num_free += 1

    def remove(self, block: Block) -> None:
        assert block.prev is not None and block.next is not None, "block not in free queue"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.num_free -= 1

    def popleft(self) -> Block:
        first = self.head.next
        if first is self.tail or first is None:
            raise ValueError("no free blocks")
        self.remove(first)
        return first

    def ids(self) -> list[int]:
        out, b = [], self.head.next
        while b is not None and b is not self.tail:
            out.append(b.block_id)
            b = b.next
        return out


EVICTION_POLICIES = ("lru", "slru")
PROTECTED_FRACTION = 0.8


class BlockManager:
    """Paged KV blocks. Free blocks keep their cached contents until evicted: ``eviction="lru"``
    evicts the least recently freed first; ``"slru"`` (segmented LRU) first evicts blocks that
    never served a prefix-cache hit (e.g. a finished request's own question and output) and only
    then, least recently freed first, blocks that did (shared prefixes), of which at most
    PROTECTED_FRACTION of the pool stay protected."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        eviction: str = "lru",
    ) -> None:
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.eviction = eviction
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)  # lru: every free block; slru: probation
        self.protected_queue = FreeBlockQueue([])  # slru: free blocks that served a hit
        # slru: at most this many free blocks are protected; beyond, the least recently freed
        # one goes back to probation (so stale prefixes age out instead of holding the cache).
        self.protected_cap = max(1, int(PROTECTED_FRACTION * num_blocks))
        self.cached: dict[int, Block] = {}  # block hash -> block holding it
        self.hit_tokens = 0
        self.query_tokens = 0
        # A deque: appended by the engine thread, drained by another (append/popleft are atomic).
        self.events: deque[BlockEvent] = deque()
        # Undrained events (an offline engine has no reader) beyond this many are replaced by
        # the state they lead to, so the queue never outgrows the cache it describes.
        self.max_events = 2 * num_blocks + 1024

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue) + len(self.protected_queue)

    def get_computed_blocks(self, req: Request) -> list[Block]:
        """Leading blocks of ``req`` already in the cache (not yet referenced by ``req``).

        At least one token is always left to compute, so a fully cached prompt still produces
        logits.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for i, h in enumerate(req.block_hashes[:max_blocks]):
            b = self.cached.get(h)
            if b is None or b.token_ids != req.block_tokens(i):
                break
            hits.append(b)
        return hits

    def record_query(self, req: Request, num_hit_blocks: int) -> None:
        self.query_tokens += req.num_tokens
        self.hit_tokens += num_hit_blocks * self.block_size

    # -- allocation ---------------------------------------------------------------------------
    def can_allocate(self, req: Request, num_new_tokens: int, computed: list[Block] = ()) -> bool:
        return self._num_needed(req, num_new_tokens, computed) <= self.num_free_blocks

    def _num_needed(self, req: Request, num_new_tokens: int, computed: list[Block]) -> int:
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_required = -(-total // self.block_size)
        num_new = max(0, num_required - len(req.block_table) - len(computed))
        # Cached-but-free hits leave the free queue when touched, so they count against it too.
        num_evictable_hits = sum(1 for b in computed if b.ref_cnt == 0)
        return num_new + num_evictable_hits

    def allocate(self, req: Request, num_new_tokens: int, computed: list[Block] = ()) -> bool:
        """Give ``req`` the ``computed`` hit blocks plus enough fresh blocks for ``num_new_tokens``
        more tokens. Returns False (changing nothing) when the pool can't hold them."""
        if not self.can_allocate(req, num_new_tokens, computed):
            return False
        for b in computed:
            if b.ref_cnt == 0:
                self._unfree(b)
            b.ref_cnt += 1
            b.reused = True
            req.block_table.append(b.block_id)
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_required = -(-total // self.block_size)
        while len(req.block_table) < num_required:
            b = self._pop_free()
            self._evict(b)
            b.ref_cnt = 1
            req.block_table.append(b.block_id)
        return True

    def _pop_free(self) -> Block:
        """The block to reuse next: probation (or the only queue) first, then protected."""
        if len(self.free_queue):
            return self.free_queue.popleft()
        b = self.protected_queue.popleft()
        b.protected = False
        return b

    def _unfree(self, b: Block) -> None:
        (self.protected_queue if b.protected else self.free_queue).remove(b)
        b.protected = False

    def _release(self, b: Block) -> None:
        """``b`` reached ref count 0: it joins a free queue's most recent end, still cached."""
        if self.eviction == "slru" and b.reused and b.block_hash is not None:
            b.protected = True
            self.protected_queue.append(b)
            if len(self.protected_queue) > self.protected_cap:
                old = self.protected_queue.popleft()
                old.protected = old.reused = False
                self.free_queue.append(old)
        else:
            self.free_queue.append(b)

    def _evict(self, b: Block) -> None:
        b.reused = False
        if b.block_hash is not None:
            if self.cached.get(b.block_hash) is b:
                del self.cached[b.block_hash]
                self._event(BlockEvent("removed", [b.block_hash]))
            b.block_hash = None
            b.token_ids = None

    def free(self, req: Request) -> None:
        """Drop ``req``'s references; blocks reaching zero join the free queue tail-first."""
        for bid in reversed(req.block_table):
            b = self.blocks[bid]
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0
            if b.ref_cnt == 0:
                self._release(b)
        req.block_table = []

    def trim(self, req: Request, num_tokens: int) -> None:
        """Roll back: drop ``req``'s tail blocks beyond what ``num_tokens`` tokens need (blocks that
        only held rejected draft tokens). They were never published to the prefix cache."""
        keep = -(-num_tokens // self.block_size)
        while len(req.block_table) > keep:
            b = self.blocks[req.block_table.pop()]
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._release(b)

    def cache_full_blocks(self, req: Request) -> None:
        """Publish ``req``'s blocks that are full *and* computed into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_hashes))
        stored = []
        for i in range(num_full):
            b = self.blocks[req.block_table[i]]
            if b.block_hash is not None:
                continue  # already cached (a hit, or published in an earlier step)
            h = req.block_hashes[i]
            if h in self.cached:
                continue  # an identical block is already cached; this copy stays private
            b.block_hash, b.token_ids = h, req.block_tokens(i)
            self.cached[h] = b
            stored.append(h)
        if stored:
            self._event(BlockEvent("stored", stored))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (only possible when no block is in use)."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for b in self.blocks:
            b.block_hash = b.token_ids = None
            b.reused = False
        self.cached.clear()
        self._event(BlockEvent("cleared", []))
        return True

    def _event(self, ev: BlockEvent) -> None:
        self.events.append(ev)
        if len(self.events) > self.max_events:
            # A reader applying "cleared" then "stored" of every cached hash ends in the same
            # state as applying the whole queue (a reader mid-drain of the old queue too: this
            # pair follows whatever it took). One new object, not a mutation of the old queue.
            self.events = deque(
                [BlockEvent("cleared", []), BlockEvent("stored", list(self.cached))]
            )

    def pop_events(self) -> list[BlockEvent]:
        out = []
        while self.events:
            out.append(self.events.popleft())
        return out
