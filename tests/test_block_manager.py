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
