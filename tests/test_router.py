"""Ray-free router algorithms: prefix index, replica stats round trip, policies, router state."""

from __future__ import annotations

import pytest

from engine.block_hash import block_hashes
from engine.outputs import BlockEvent, EngineStats
from router.policy import ReplicaView
from router.pow2 import Pow2Policy
from router.prefix_aware import PrefixAwarePolicy
from router.prefix_index import PrefixIndex
from router.registry import make_policy, policy_params
from router.replica_stats import (
    ReplicaCacheTracker,
    pack_hashes,
    parse_routing_stats,
    unpack_hashes,
)
from router.round_robin import RoundRobinPolicy
from router.router_state import RouterState
from router.session import SessionPolicy

BS = 4


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def stats(waiting: int = 0, running: int = 0, free: int = 10, total: int = 10) -> EngineStats:
    return EngineStats(waiting, running, free, total, 0, 0, 0, 0, 0)


def prompt(group: int, question: int, prefix_blocks: int = 3) -> list[int]:
    """prefix_blocks full blocks shared by the group, then one block unique to the question."""
    return [1000 + group] * (BS * prefix_blocks) + [question] * BS


def view(rid: str, load: int, cached: list[int] = (), clock: Clock | None = None) -> ReplicaView:
    idx = PrefixIndex(clock=clock or Clock())
    idx.replace(cached, version=1)
    return ReplicaView(rid, load, idx)


# --- prefix index --------------------------------------------------------------------------------


def test_longest_prefix_counts_leading_blocks_only():
    h = block_hashes(list(range(20)), BS)  # 5 blocks
    idx = PrefixIndex()
    idx.replace([h[0], h[1], h[3], h[4]], version=7)
    assert idx.version == 7
    assert idx.longest_prefix(h) == 2  # h[2] missing stops the run, h[3], h[4] don't count
    assert idx.longest_prefix(h[:1]) == 1
    assert idx.longest_prefix([]) == 0
    assert idx.longest_prefix(block_hashes(list(range(1, 21)), BS)) == 0


def test_events_store_remove_clear():
    h = block_hashes(list(range(12)), BS)
    idx = PrefixIndex()
    assert idx.apply_events([BlockEvent("stored", h)]) is True
    assert idx.longest_prefix(h) == 3
    assert idx.apply_events([BlockEvent("removed", [h[1]])]) is True
    assert idx.longest_prefix(h) == 1
    assert idx.apply_events([BlockEvent("removed", [h[1]])]) is False  # already gone
    assert idx.apply_events([BlockEvent("cleared", [])]) is True
    assert len(idx) == 0
    with pytest.raises(ValueError, match="kind"):
        idx.apply_events([BlockEvent("evicted", [1])])


def test_assumed_hashes_outlive_reports_until_ttl():
    clock = Clock()
    h = block_hashes(list(range(12)), BS)
    idx = PrefixIndex(assumed_ttl_s=10, clock=clock)
    idx.assume(h)  # sent at t=100: assumed until t=110
    assert idx.longest_prefix(h) == 3
    clock.t += 5
    idx.replace([h[0]], version=1)  # the report confirms one block; the history keeps all three
    assert idx.num_assumed() == 3 and idx.longest_prefix(h) == 3
    idx.replace([], version=2)  # reported evicted: still routed here until the TTL runs out
    assert idx.longest_prefix(h) == 3
    idx.assume(h[:1])  # t=105: h[0] sent again, now assumed until t=115
    clock.t += 6
    assert idx.longest_prefix(h) == 1
    idx.replace([h[0], h[1]], version=3)
    assert idx.longest_prefix(h) == 2 and idx.num_assumed() == 1
    clock.t += 5
    idx.replace([], version=4)
    assert idx.longest_prefix(h) == 0 and idx.num_assumed() == 0
    no_history = PrefixIndex(assumed_ttl_s=0, clock=clock)
    no_history.assume(h)
    assert no_history.longest_prefix(h) == 0


def test_history_queries_and_count_drop_expired_entries():
    clock = Clock()
    h = block_hashes(prompt(1, 1), BS)
    idx = PrefixIndex(assumed_ttl_s=10, clock=clock)
    idx.replace(h[:1], version=1)  # reported only: not history
    assert not idx.is_assumed(h[0])
    idx.assume(h[:2])  # t=100, until 110
    clock.t = 105
    idx.assume(h[1:4])  # h[1] refreshed until 115; h[2], h[3] until 115
    assert [idx.is_assumed(x) for x in h] == [True, True, True, True]
    assert idx.num_assumed() == 4
    clock.t = 110  # h[0] expires (expiry 110 is not > 110)
    assert [idx.is_assumed(x) for x in h] == [False, True, True, True]
    assert idx.num_assumed() == 3
    assert idx.longest_prefix(h) == 4  # h[0] is still reported
    clock.t = 115
    assert idx.num_assumed() == 0 and not idx.is_assumed(h[3])


def test_assumed_history_is_capped_least_recent_first():
    h = block_hashes(list(range(16)), BS)  # 4 blocks
    idx = PrefixIndex(assumed_ttl_s=10, max_assumed=3)
    idx.assume(h[:2])
    idx.assume(h[:1])  # h[0] is now the most recent, h[1] the least
    idx.assume(h[2:4])  # 4 entries > 3: h[1] goes
    assert idx.num_assumed() == 3
    assert idx.longest_prefix(h) == 1
    assert h[2] in idx and h[3] in idx
    with pytest.raises(ValueError, match="max_assumed"):
        PrefixIndex(max_assumed=-1)


# --- replica stats -------------------------------------------------------------------------------


def test_pack_round_trip_extremes():
    hs = [0, 1, -1, 2**63 - 1, -(2**63), hash((0, (1, 2), ()))]
    blob = pack_hashes(hs)
    assert len(blob) == 8 * len(hs)
    assert blob[:8] == b"\0" * 8 and blob[8:16] == b"\1" + b"\0" * 7  # little-endian
    assert unpack_hashes(blob) == hs
    with pytest.raises(ValueError, match="int64"):
        pack_hashes([2**63])
    with pytest.raises(ValueError, match="multiple of 8"):
        unpack_hashes(b"\0" * 7)


def test_tracker_reports_cache_from_events():
    tr = ReplicaCacheTracker(block_size=BS)
    h = block_hashes(prompt(1, 1), BS)
    d0 = tr.routing_stats(stats(waiting=2, running=3, free=7))
    assert d0["seq"] == 1 and d0["cache_version"] == 0 and d0["num_hashes"] == 0
    tr.apply_events([BlockEvent("stored", h), BlockEvent("removed", [h[3]])])
    d1 = tr.routing_stats(stats(waiting=2, running=3, free=7))
    assert d1["seq"] == 2 and d1["cache_version"] == 1
    p = parse_routing_stats(d1)
    assert p is not None
    assert (p.num_waiting, p.num_running, p.load, p.num_free_blocks, p.num_total_blocks) == (
        2,
        3,
        5,
        7,
        10,
    )
    assert p.block_size == BS and p.truncated is False
    assert p.hashes() == h[:3]
    # No change: same version, same blob; seq still advances.
    tr.apply_events([BlockEvent("removed", [h[3]])])
    d2 = tr.routing_stats(stats())
    assert d2["seq"] == 3 and d2["cache_version"] == 1 and d2["hashes"] == d1["hashes"]


def test_tracker_truncates_to_most_recent():
    tr = ReplicaCacheTracker(block_size=BS, max_hashes=2)
    tr.apply_events([BlockEvent("stored", [10, 20, 30]), BlockEvent("stored", [10])])
    p = parse_routing_stats(tr.routing_stats(stats()))
    assert p is not None and p.truncated is True
    assert p.hashes() == [30, 10]  # 10 was re-stored last, 20 is the oldest


def test_parse_rejects_bad_fields():
    good = ReplicaCacheTracker(BS).routing_stats(stats())
    assert parse_routing_stats({}) is None
    with pytest.raises(ValueError, match="routing_stats.format"):
        parse_routing_stats({**good, "format": 2})
    with pytest.raises(ValueError, match="routing_stats.num_waiting"):
        parse_routing_stats({**good, "num_waiting": -1})
    with pytest.raises(ValueError, match="routing_stats.hashes"):
        parse_routing_stats({**good, "hashes": "abc"})
    with pytest.raises(ValueError, match="routing_stats.hashes"):
        parse_routing_stats({**good, "hashes": b"\0" * 8})  # num_hashes says 0
    with pytest.raises(ValueError, match="block_size"):
        ReplicaCacheTracker(0)


# --- policies ------------------------------------------------------------------------------------


def test_prefix_aware_affinity_balance_cold():
    h = block_hashes(prompt(1, 1), BS)
    pol = PrefixAwarePolicy(imbalance=4)
    a, b, c = view("a", 3), view("b", 6, h[:2]), view("c", 5, h[:3])
    # Longest match wins although others are less loaded (gap 5-3=2 <= 4).
    assert pol.choose(h, [a, b, c]) == ("c", "affinity")
    # Gap 8-3=5 > 4: the least loaded wins.
    c.load = 8
    assert pol.choose(h, [a, b, c]) == ("a", "balance")
    # Exactly the threshold still keeps affinity.
    c.load = 7
    assert pol.choose(h, [a, b, c]) == ("c", "affinity")
    # Nothing cached anywhere: least loaded, earliest on ties.
    other = block_hashes(prompt(2, 1), BS)
    b.load = 3
    assert pol.choose(other, [a, b, c]) == ("a", "cold")
    assert pol.choose(other, [b, a, c]) == ("b", "cold")
    # A prompt shorter than one block has no hashes: cold.
    assert pol.choose([], [a, b, c])[1] == "cold"


def test_prefix_aware_default_imbalance_is_32_requests():
    h = block_hashes(prompt(1, 1), BS)
    pol = PrefixAwarePolicy()
    assert pol.imbalance == 32
    for home_load, expected in ((32, ("b", "affinity")), (33, ("a", "balance"))):
        a, b = view("a", 0), view("b", home_load, h)
        assert pol.choose(h, [a, b]) == expected


def test_prefix_aware_ties_on_match_go_to_least_loaded_and_min_match():
    h = block_hashes(prompt(1, 1), BS)
    a, b, c = view("a", 2, h[:2]), view("b", 1, h[:2]), view("c", 0)
    assert PrefixAwarePolicy().choose(h, [a, b, c]) == ("b", "affinity")
    # A 2-block match is below min_match_blocks=3: treated as cold.
    assert PrefixAwarePolicy(min_match_blocks=3).choose(h, [a, b, c]) == ("c", "cold")


def history_view(rid: str, load: int, placed: list[list[int]] = (), cached: list[int] = ()):
    v = view(rid, load, cached)
    for hs in placed:
        v.index.assume(hs)
    return v


def test_prefix_aware_cold_goes_to_smallest_footprint_within_imbalance():
    g1, g2, g3 = (block_hashes(prompt(g, 1), BS) for g in (1, 2, 3))
    pol = PrefixAwarePolicy(imbalance=4)
    # "a" was given two prefixes (8 blocks), "b" one (4), "c" none but it is 5 busier than "a".
    a = history_view("a", 1, [g1, g2])
    b = history_view("b", 3, [block_hashes(prompt(4, 1), BS)])
    c = history_view("c", 6)
    assert [v.footprint() for v in (a, b, c)] == [8, 4, 0]
    assert pol.choose(g3, [a, b, c]) == ("b", "cold")  # c is beyond the imbalance
    c.load = 5
    assert pol.choose(g3, [a, b, c]) == ("c", "cold")  # gap 4: c is within, and holds least
    # Equal footprints: the least loaded, then the earliest.
    assert pol.choose(g3, [history_view("x", 2), history_view("y", 1)]) == ("y", "cold")
    assert pol.choose(g3, [history_view("x", 1), history_view("y", 1)]) == ("x", "cold")


def test_prefix_aware_equal_match_prefers_the_prefix_home():
    h = block_hashes(prompt(1, 1), BS)
    # Both report the prefix; "a" is its home (this router placed it there), "b" holds a spill
    # copy and is less loaded: affinity goes home, so b's copy ages out.
    a = history_view("a", 5, [h[:3]], cached=h[:3])
    b = history_view("b", 1, cached=h[:3])
    assert a.placed(h, 3) and not b.placed(h, 3) and not a.placed(h, 0)
    assert PrefixAwarePolicy(imbalance=4).choose(h, [b, a]) == ("a", "affinity")
    # The home beyond the imbalance: spill to the least loaded.
    a.load = 6
    assert PrefixAwarePolicy(imbalance=4).choose(h, [b, a]) == ("b", "balance")
    # A longer match elsewhere still wins over a shorter home.
    c = history_view("c", 2, cached=h)
    assert PrefixAwarePolicy(imbalance=8).choose(h, [a, b, c]) == ("c", "affinity")


def test_prefix_aware_validates_params():
    with pytest.raises(ValueError, match="imbalance"):
        PrefixAwarePolicy(imbalance=-1)
    with pytest.raises(ValueError, match="min_match_blocks"):
        PrefixAwarePolicy(min_match_blocks=0)
    with pytest.raises(ValueError, match="replicas"):
        PrefixAwarePolicy().choose([], [])


def test_pow2_picks_less_loaded_of_two_samples():
    replicas = [view("a", 5), view("b", 1), view("c", 9)]
    pol = Pow2Policy(seed=3)
    picks = [pol.choose([], replicas).replica_id for _ in range(300)]
    # "c" is never the less loaded of any pair; "b" wins every pair it is in (2 of 3 pairs).
    assert "c" not in picks
    assert 170 < picks.count("b") < 230
    assert Pow2Policy().choose([], replicas[:1]) == ("a", "pow2")


def test_round_robin_cycles():
    replicas = [view("a", 9), view("b", 0)]
    pol = RoundRobinPolicy()
    assert [pol.choose([], replicas).replica_id for _ in range(5)] == ["a", "b", "a", "b", "a"]


def test_session_is_sticky_and_moves_only_lost_sessions():
    pol = SessionPolicy()
    three = [view("a", 0), view("b", 0), view("c", 0)]
    sessions = [f"s{i}" for i in range(60)]
    placed = {s: pol.choose([], three, session_id=s).replica_id for s in sessions}
    assert {pol.choose([], three, session_id=s).replica_id for s in ["s1"] * 5} == {placed["s1"]}
    assert set(placed.values()) == {"a", "b", "c"}
    two = [r for r in three if r.replica_id != "c"]
    for s in sessions:
        if placed[s] != "c":
            assert pol.choose([], two, session_id=s).replica_id == placed[s]
    assert pol.choose([], [view("a", 3), view("b", 1)]) == ("b", "cold")


def test_registry():
    assert isinstance(make_policy("prefix_aware", imbalance=2), PrefixAwarePolicy)
    assert policy_params("prefix_aware") == ["imbalance", "min_match_blocks"]
    with pytest.raises(ValueError, match="unknown policy 'random'"):
        make_policy("random")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['imbalanse'\]"):
        make_policy("prefix_aware", imbalanse=3)


# --- router state --------------------------------------------------------------------------------


def report(tracker: ReplicaCacheTracker, waiting: int = 0, running: int = 0) -> dict:
    return tracker.routing_stats(stats(waiting, running))


def test_state_follows_prefix_between_reports_and_counts_load():
    clock = Clock()
    st = RouterState(PrefixAwarePolicy(imbalance=2), assumed_ttl_s=30, clock=clock)
    ta, tb = ReplicaCacheTracker(BS), ReplicaCacheTracker(BS)
    st.update_stats("a", report(ta))
    st.update_stats("b", report(tb))
    ids = ["a", "b"]
    # Two groups arrive cold: they spread by load (the first decision counts as load on "a").
    assert st.choose("r1", block_hashes(prompt(1, 1), BS), ids) == ("a", "cold")
    assert st.choose("r2", block_hashes(prompt(2, 1), BS), ids) == ("b", "cold")
    # Later requests of each group follow their first one before any report says so.
    assert st.choose("r3", block_hashes(prompt(1, 2), BS), ids) == ("a", "affinity")
    assert st.choose("r4", block_hashes(prompt(2, 2), BS), ids) == ("b", "affinity")
    assert st.choose("r5", block_hashes(prompt(1, 3), BS), ids) == ("a", "affinity")
    assert (st.load("a"), st.load("b")) == (3, 2)
    # A fresh report replaces the counts by the replica's queue.
    ta.apply_events([BlockEvent("stored", block_hashes(prompt(1, 1), BS))])
    st.update_stats("a", report(ta, waiting=1, running=5))
    assert st.load("a") == 6
    # "a" is now 6 vs 2: beyond imbalance 2, group 1 spills to "b".
    assert st.choose("r6", block_hashes(prompt(1, 4), BS), ids) == ("b", "balance")


def test_state_balance_spill_is_not_a_placement_and_prefix_returns_home():
    clock = Clock()
    st = RouterState(PrefixAwarePolicy(imbalance=2), assumed_ttl_s=30, clock=clock)
    ta, tb = ReplicaCacheTracker(BS), ReplicaCacheTracker(BS)
    ids = ["a", "b"]
    g1 = [block_hashes(prompt(1, q), BS) for q in range(8)]
    assert st.choose("r1", g1[1], ids) == ("a", "cold")
    # "a" reports a queue of 4 with group 1 cached; "b" idle: gap 4 > 2, group 1 spills to "b".
    ta.apply_events([BlockEvent("stored", g1[1])])
    st.update_stats("a", report(ta, waiting=4))
    st.update_stats("b", report(tb))
    assert st.choose("r2", g1[2], ids) == ("b", "balance")
    assert st.views(["b"])[0].match(g1[3]) == 0  # not recorded as placed on "b"
    # "b" computed and cached the prefix; "a" drains to a queue of 1: both hold the prefix, "b"
    # is less loaded, but group 1 goes back to its home "a".
    tb.apply_events([BlockEvent("stored", g1[2])])
    st.update_stats("b", report(tb))
    st.update_stats("a", report(ta, running=1))
    assert [st.choose(f"r{q}", g1[q], ids) for q in (3, 4)] == [("a", "affinity")] * 2
    # A new group goes where less of the working set was placed: "b" (a holds group 1's blocks).
    assert st.choose("r5", block_hashes(prompt(2, 1), BS), ids) == ("b", "cold")
    # Once a's history of group 1 has lapsed and only "b" still reports it, "b" is the match.
    clock.t += 31
    ta.apply_events([BlockEvent("removed", g1[1])])
    st.update_stats("a", report(ta))
    assert st.choose("r6", g1[6], ids) == ("b", "affinity")


def test_state_unchanged_report_is_skipped_and_bad_report_raises():
    st = RouterState(PrefixAwarePolicy())
    ta = ReplicaCacheTracker(BS)
    d = report(ta, waiting=4)
    st.update_stats("a", d)
    st.choose("r1", [], ["a"])
    st.update_stats("a", d)  # same seq: the sent count is kept
    assert st.load("a") == 5
    with pytest.raises(ValueError, match="routing_stats.num_running"):
        st.update_stats("a", {**report(ta), "num_running": "x"})
    assert st.load("a") == 5


def test_state_fallback_and_retry_rebook_load():
    st = RouterState(RoundRobinPolicy())
    h = block_hashes(prompt(1, 1), BS)
    assert st.choose("r1", h, ["a", "b"]) == ("a", "round_robin")
    assert (st.load("a"), st.load("b")) == (1, 0)
    # Ray says the request went to "b" (a was full): counts move; a spill is not a placement, so
    # "b" does not take the prefix into its history ("a", the policy's choice, keeps it).
    assert st.on_routed("r1", "b") == "fallback"
    assert (st.load("a"), st.load("b")) == (0, 1)
    assert st.views(["b"])[0].match(h) == 0
    assert st.views(["a"])[0].match(h) == 4
    assert st.on_routed("r1", "b") is None  # settled already
    # A re-chosen request undoes its previous booking.
    assert st.choose("r2", h, ["a", "b"]).replica_id == "b"
    assert st.choose("r2", h, ["a", "b"]).replica_id == "a"  # retried: "b" gets its count back
    assert (st.load("a"), st.load("b")) == (1, 1)
    assert st.on_routed("r2", "a") == "round_robin"
    st.choose("r3", h, ["a", "b"])
    st.forget("r3")
    assert st.load("a") + st.load("b") == 2
    st.retain(["b"])
    assert st.views(["a"])[0].load == 0  # forgotten, starts afresh


def test_ranked_puts_choice_first_then_by_load():
    st = RouterState(PrefixAwarePolicy())
    st.update_stats("a", report(ReplicaCacheTracker(BS), waiting=5))
    st.update_stats("b", report(ReplicaCacheTracker(BS), waiting=1))
    st.update_stats("c", report(ReplicaCacheTracker(BS), waiting=3))
    assert st.ranked(["a", "b", "c"], "a") == ["a", "b", "c"]
    assert st.ranked(["a", "b", "c"], "c") == ["c", "b", "a"]


def test_state_completed_requests_leave_the_load():
    st = RouterState(PrefixAwarePolicy())
    ta = ReplicaCacheTracker(BS)
    st.update_stats("a", report(ta, running=2))  # another router's 2 requests
    for rid in ("r1", "r2"):
        st.choose(rid, [], ["a"])
        assert st.on_routed(rid, "a") == "cold"
    assert st.load("a") == 4
    st.on_completed("r1")
    assert st.load("a") == 3
    st.on_completed("r1")  # twice: no effect
    assert st.load("a") == 3
    # A report taken while r2 was still queued counts it (2 + 1); once r2 completes it leaves the
    # load at once, not at the next report: 3 - 1 own at arrival = 2 others, + 0 own.
    st.update_stats("a", report(ta, running=3))
    assert st.load("a") == 3
    st.on_completed("r2")
    assert st.load("a") == 2
    st.on_completed("never-routed")
    assert st.load("a") == 2


def test_state_load_is_other_routers_queue_plus_own_outstanding():
    st = RouterState(RoundRobinPolicy())
    ta = ReplicaCacheTracker(BS)
    st.update_stats("a", report(ta))
    for rid in ("r1", "r2", "r3"):
        st.choose(rid, [], ["a"])
    st.on_routed("r1", "a")
    st.on_routed("r2", "a")
    assert st.load("a") == 3  # r3 is chosen, not yet confirmed: it counts too
    # A report taken before the three arrived (queue 0 < 3 own): no other router's requests.
    st.update_stats("a", report(ta, running=0))
    assert st.load("a") == 3
    st.on_completed("r1")
    st.forget("r3")
    assert st.load("a") == 1
    # 5 reported with 1 of ours outstanding: 4 belong to other routers; they stay until the next
    # report while ours leave as they complete.
    st.update_stats("a", report(ta, waiting=2, running=3))
    assert st.load("a") == 5
    st.on_completed("r2")
    assert st.load("a") == 4
    st.update_stats("a", report(ta, running=1))
    assert st.load("a") == 1


def test_request_fields_reads_the_ingress_contract():
    from types import SimpleNamespace

    from deployments.request_router import request_fields

    def pending(*args, **kwargs):
        return SimpleNamespace(args=list(args), kwargs=kwargs)

    h = block_hashes(prompt(1, 1), BS)
    assert request_fields(pending({"block_hashes": h, "prompt_token_ids": [1]})) == (h, None)
    assert request_fields(pending(req={"block_hashes": h, "session_id": "s1"})) == (h, "s1")
    assert request_fields(pending({"session_id": "s2"})) == ([], "s2")
    assert request_fields(pending("text")) == ([], None)
    assert request_fields(None) == ([], None)
    # Malformed hashes route cold instead of raising inside Ray's routing loop.
    assert request_fields(pending({"block_hashes": ["x"]})) == ([], None)
    assert request_fields(pending({"block_hashes": 5, "session_id": 7})) == ([], None)
