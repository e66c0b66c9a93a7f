"""Exact block ids, ref counts, prefix hits and LRU eviction order of the paged KV block manager."""

import pytest

from engine.block_hash import block_hashes
from engine.block_manager import Block, BlockManager, FreeBlockQueue
from engine.sampling_params import SamplingParams
from engine.sequence import Request

BS = 4


def req(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=4), BS)


def test_free_queue_remove_from_middle_is_o1_and_keeps_order():
    blocks = [Block(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert q.ids() == [0, 1, 3, 4] and len(q) == 4
    assert q.popleft().block_id == 0
    q.append(blocks[2])
    assert q.ids() == [1, 3, 4, 2]


def test_allocate_exact_block_ids_and_refcounts():
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = req("a", list(range(10)))  # 10 tokens -> 3 blocks
    assert bm.allocate(r, 10)
    assert r.block_table == [0, 1, 2]
    assert [bm.blocks[i].ref_cnt for i in range(4)] == [1, 1, 1, 0]
    assert bm.num_free_blocks == 5
    r.num_computed_tokens = 10
    bm.cache_full_blocks(r)  # two full blocks published
    assert set(bm.cached) == set(block_hashes(list(range(10)), BS))
    assert [e.kind for e in bm.pop_events()] == ["stored"]


def test_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = req("a", list(range(12)))
    bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)
    b = req("b", list(range(8)) + [99, 98, 97])  # shares the first 2 blocks
    hits = bm.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    assert bm.allocate(b, 3, hits)
    assert b.block_table == [0, 1, 3]
    assert bm.blocks[0].ref_cnt == 2 and bm.blocks[1].ref_cnt == 2
    bm.record_query(b, len(hits))
    assert (bm.hit_tokens, bm.query_tokens) == (8, 11)


def test_fully_cached_prompt_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = req("a", list(range(8)))
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    b = req("b", list(range(8)))
    assert [h.block_id for h in bm.get_computed_blocks(b)] == [0]  # not both: last token recomputed


def test_hash_collision_is_caught_by_token_compare():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = req("a", [1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    b = req("b", [9, 9, 9, 9, 5])
    b.block_hashes = list(a.block_hashes)  # force a colliding hash
    assert bm.get_computed_blocks(b) == []


def test_freed_blocks_stay_cached_and_are_evicted_lru_tail_first():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = req("a", list(range(12)))
    bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)
    bm.free(a)
    # Free queue: never-used blocks first, then a's blocks tail-first.
    assert bm.free_queue.ids() == [3, 4, 5, 2, 1, 0]
    assert len(bm.cached) == 3  # still cached after free
    bm.pop_events()
    c = req("c", [50 + i for i in range(16)])  # needs 4 blocks: 3, 4, 5, then evicts 2
    assert bm.allocate(c, 16)
    assert c.block_table == [3, 4, 5, 2]
    ev = bm.pop_events()
    assert [(e.kind, e.block_hashes) for e in ev] == [("removed", [a.block_hashes[2]])]
    # a's first two blocks survive and still hit.
    d = req("d", list(range(9)))
    assert [h.block_id for h in bm.get_computed_blocks(d)] == [0, 1]


def test_hit_on_free_block_counts_against_free_pool():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = req("a", list(range(8)))
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    bm.free(a)
    b = req("b", list(range(8)) + [1, 2, 3, 4, 5])  # 2 hit blocks (both free) + 2 new needed
    hits = bm.get_computed_blocks(b)
    assert len(hits) == 2
    assert not bm.can_allocate(b, 5, hits)  # 2 new + 2 evictable hits > 3 free
    assert not bm.allocate(b, 5, hits)
    assert b.block_table == [] and bm.num_free_blocks == 3  # nothing changed


def test_reset_prefix_cache_only_when_idle():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = req("a", list(range(4)))
    bm.allocate(a, 4)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    assert not bm.reset_prefix_cache()
    bm.free(a)
    assert bm.reset_prefix_cache() and bm.cached == {}


@pytest.mark.parametrize("n", [0, 3, 4, 9])
def test_block_hashes_only_full_blocks(n):
    assert len(block_hashes(list(range(n)), BS)) == n // BS


def _run(bm, rid, tokens, hits=True):
    """Admit a request (with its prefix-cache hits), compute it, free it; its blocks stay cached."""
    r = req(rid, tokens)
    computed = bm.get_computed_blocks(r) if hits else []
    assert bm.allocate(r, len(tokens) - len(computed) * BS, computed)
    r.num_computed_tokens = len(tokens)
    bm.cache_full_blocks(r)
    bm.free(r)
    return r


def _cached_ids(bm):
    return sorted(b.block_id for b in bm.cached.values())


def test_slru_evicts_never_hit_blocks_before_shared_prefixes():
    prefix = [100 + i for i in range(8)]  # 2 blocks shared by the group
    for eviction, survivors in (("lru", False), ("slru", True)):
        bm = BlockManager(num_blocks=8, block_size=BS, eviction=eviction)
        _run(bm, "g1", prefix + [1, 2, 3, 4])  # blocks 0, 1 (prefix), 2 (own tail)
        _run(bm, "g2", prefix + [5, 6, 7, 8])  # hits 0, 1; own tail in block 3
        assert bm.blocks[0].reused and bm.blocks[1].reused and not bm.blocks[3].reused
        if eviction == "slru":
            # Freed tail-first: the never-hit tails wait in probation, the prefix is protected.
            assert bm.free_queue.ids() == [4, 5, 6, 7, 2, 3]
            assert bm.protected_queue.ids() == [1, 0]
        # A unique request finishes after the group's (its blocks are the most recently freed),
        # then six blocks' worth of new work: the cache must give up six of its eight blocks.
        _run(bm, "u", [500 + i for i in range(12)])
        _run(bm, "x", [900 + i for i in range(24)])
        prefix_blocks = set(block_hashes(prefix, BS))
        kept = prefix_blocks & set(bm.cached)
        assert (kept == prefix_blocks) is survivors, (eviction, _cached_ids(bm))
        assert bm.num_free_blocks == 8


def test_slru_takes_protected_blocks_least_recently_freed_first_when_probation_is_empty():
    bm = BlockManager(num_blocks=4, block_size=BS, eviction="slru")
    a = [1, 2, 3, 4]
    b = [5, 6, 7, 8]
    _run(bm, "a1", a + [0])  # blocks 0 (a), 1 (tail, 1 token: not full, not cached)
    _run(bm, "b1", b + [0])  # blocks 2 (b), 3
    _run(bm, "a2", a + [9])  # hits block 0
    _run(bm, "b2", b + [9])  # hits block 2; a was freed before b
    assert bm.protected_queue.ids() == [0, 2]
    r = req("big", list(range(200, 216)))  # 4 blocks: probation (2) then protected a, then b
    assert bm.allocate(r, 16)
    assert r.block_table[:2] != [0, 2] and r.block_table[2:] == [0, 2]
    assert not bm.cached  # everything evicted, hashes dropped
    assert not bm.blocks[0].reused and not bm.blocks[0].protected


def test_eviction_policy_is_validated():
    with pytest.raises(ValueError, match="eviction"):
        BlockManager(num_blocks=4, block_size=BS, eviction="fifo")


def test_slru_protected_segment_is_capped_and_the_oldest_goes_back_to_probation():
    bm = BlockManager(num_blocks=10, block_size=BS, eviction="slru")  # cap: 8 protected blocks
    assert bm.protected_cap == 8
    groups = [[10 * g + i for i in range(4)] for g in range(1, 10)]
    for g, toks in enumerate(groups):  # each group's one-block prefix is hit once
        _run(bm, f"a{g}", toks + [0])
        _run(bm, f"b{g}", toks + [1])
    protected = bm.protected_queue.ids()
    assert len(protected) == 8
    first = bm.cached[block_hashes(groups[0], BS)[0]]  # the oldest protected prefix
    assert first.block_id not in protected and not first.protected and not first.reused
    assert first.block_id in bm.free_queue.ids()  # demoted, still cached
    assert bm.num_free_blocks == 10


def _replay(events, state=None):
    """What a reader of the events (the router's prefix index) ends up believing is cached."""
    state = set() if state is None else state
    for e in events:
        if e.kind == "cleared":
            state.clear()
        elif e.kind == "stored":
            state.update(e.block_hashes)
        else:
            state.difference_update(e.block_hashes)
    return state


def test_undrained_events_stay_bounded_and_replay_to_the_cache():
    """An offline engine never reads the events: they must not pile up for the process's life,
    and a reader that does drain (now or partway through) still ends at the cache's state."""
    bm = BlockManager(num_blocks=8, block_size=BS)
    partial, compacted = None, False
    for i in range(1000):  # ~3 events each (one stored, two removed): past the cap
        r = req(f"r{i}", [1000 + 10 * i + j for j in range(9)])  # 2 full blocks each, distinct
        assert bm.allocate(r, 9)
        r.num_computed_tokens = 9
        bm.cache_full_blocks(r)
        bm.free(r)
        assert len(bm.events) <= bm.max_events
        compacted |= bm.events[0].kind == "cleared"
        if i == 150:  # a reader drains once mid-way, then never again until the end
            partial = _replay(bm.pop_events())
    assert compacted
    assert _replay(list(bm.events)) == set(bm.cached) != set()
    assert _replay(bm.pop_events(), partial) == set(bm.cached)
