"""Table tests of decide(): exact replica counts and reasons, tick by tick."""

from __future__ import annotations

import pytest

from autoscaling.decide import Params, ReplicaLoad, Snapshot, State, decide


def run(params: Params, ticks: list[tuple], start: int = 1) -> list[tuple[float, int, str]]:
    """ticks: (time, queued, [(waiting, running, ttft_s|None), ...]). The replica count decided at
    each tick feeds the next one, as the Serve controller does."""
    cur, state, out = start, State(), []
    for t, queued, reps in ticks:
        snap = Snapshot(
            now=t,
            current_replicas=cur,
            replicas=[ReplicaLoad(waiting=w, running=r, ttft_s=x) for w, r, x in reps],
            queued=queued,
        )
        cur, reason, state = decide(snap, params, state)
        out.append((t, cur, reason))
    return out


def one(load: float, ttft: float | None = None) -> list[tuple]:
    return [(0.0, load, ttft)]


P = Params(
    target_queue_depth=4,
    min_replicas=1,
    max_replicas=6,
    scale_up_window_s=0,
    scale_down_window_s=0,
    scale_up_cooldown_s=0,
    scale_down_cooldown_s=0,
    max_step_up=10,
    max_step_down=10,
)


@pytest.mark.parametrize(
    "load,start,expected,reason",
    [
        (4, 1, 1, "hold at 1: load 4.0 / target 4.0 per replica wants 1"),
        (5, 1, 2, "scale up 1->2: load 5.0 / target 4.0 per replica wants 2"),
        (12, 2, 3, "scale up 2->3: load 12.0 / target 4.0 per replica wants 3"),
        (
            100,
            1,
            6,
            "scale up 1->6: load 100.0 / target 4.0 per replica wants 25 (bounded to 6 by [1, 6])",
        ),
        (
            0,
            3,
            1,
            "scale down 3->1: load 0.0 / target 4.0 per replica wants 0 (bounded to 1 by [1, 6])",
        ),
        (8, 3, 2, "scale down 3->2: load 8.0 / target 4.0 per replica wants 2"),
    ],
)
def test_target_queue_depth_and_bounds(load, start, expected, reason):
    [(_, n, why)] = run(P, [(0.0, 0, [(load, 0, None)])], start=start)
    assert (n, why) == (expected, reason)


def test_queued_in_front_and_running_count_as_load():
    # 3 queued at the handle + (2 waiting + 4 running) + (0 + 4) = 13 -> ceil(13/4) = 4
    [(_, n, why)] = run(P, [(0.0, 3, [(2, 4, None), (0, 4, None)])], start=2)
    assert n == 4
    assert why == "scale up 2->4: load 13.0 / target 4.0 per replica wants 4"


def test_scale_up_window_needs_sustained_load():
    p = Params(
        target_queue_depth=4,
        max_replicas=8,
        scale_up_window_s=3,
        scale_down_window_s=0,
        scale_down_cooldown_s=0,
    )
    ticks = [
        (0.0, 0, [(12, 0, None)]),  # wants 3
        (1.0, 0, [(12, 0, None)]),
        (2.0, 0, [(0, 0, None)]),  # spike ends: wants 1 (the down window is 0, but it is at 1)
        (3.0, 0, [(20, 0, None)]),  # wants 5
        (4.0, 0, [(8, 0, None)]),  # wants 2
        (5.0, 0, [(20, 0, None)]),
        (6.0, 0, [(20, 0, None)]),  # window [3, 6]: values 5, 2, 5, 5 -> lowest 2
    ]
    got = [(t, n) for t, n, _ in run(p, ticks)]
    assert got == [(0.0, 1), (1.0, 1), (2.0, 1), (3.0, 1), (4.0, 1), (5.0, 1), (6.0, 2)]
    out = run(p, ticks)
    assert out[1][2] == (
        "scale-up held at 1: load 12.0 / target 4.0 per replica wants 3; "
        "wanted for 1.0s of 3.0s window"
    )
    assert out[6][2] == "scale up 1->2: load 20.0 / target 4.0 per replica wants 5"


def test_scale_down_window_uses_highest_recent_value():
    p = Params(
        target_queue_depth=4,
        max_replicas=8,
        scale_down_window_s=10,
        scale_down_cooldown_s=0,
        max_step_down=10,
    )
    ticks = [
        (float(t), 0, [(load, 0, None)])
        for t, load in [(0, 16), (5, 8), (10, 0), (15, 0), (20, 0), (25, 0)]
    ]
    out = run(p, ticks, start=4)
    assert [n for _, n, _ in out] == [4, 4, 4, 2, 1, 1]
    # at t=15 the window [5, 15] holds 2, 1, 1 -> highest 2
    assert out[3][2] == (
        "scale down 4->2: load 0.0 / target 4.0 per replica wants 0 (bounded to 1 by [1, 8])"
    )
    assert out[2][2] == (
        "scale-down held at 4: load 0.0 / target 4.0 per replica wants 0 (bounded to 1 by [1, 8]); "
        "wanted for 5.0s of 10.0s window"
    )


def test_cooldowns():
    p = Params(
        target_queue_depth=1,
        max_replicas=10,
        scale_up_cooldown_s=5,
        scale_down_window_s=0,
        scale_down_cooldown_s=8,
        max_step_up=1,
        max_step_down=5,
    )
    ticks = [
        (float(t), 0, [(load, 0, None)])
        for t, load in [(0, 5), (2, 5), (5, 5), (9, 1), (12, 1), (13, 1)]
    ]
    out = run(p, ticks)
    assert [n for _, n, _ in out] == [2, 2, 3, 3, 3, 1]
    assert out[0][2] == "scale up 1->2: load 5.0 / target 1.0 per replica wants 5 (max_step_up 1)"
    assert out[1][2] == (
        "scale-up held at 2: load 5.0 / target 1.0 per replica wants 5; cooldown 2.0s of 5.0s"
    )
    # the scale-down cooldown counts from the last scale-up (t=5)
    assert out[3][2] == (
        "scale-down held at 3: load 1.0 / target 1.0 per replica wants 1; cooldown 4.0s of 8.0s"
    )
    assert out[5][2] == "scale down 3->1: load 1.0 / target 1.0 per replica wants 1"


def test_max_step_down():
    p = Params(
        target_queue_depth=4,
        max_replicas=8,
        scale_down_window_s=0,
        scale_down_cooldown_s=0,
        max_step_down=2,
    )
    out = run(p, [(0.0, 0, [(0, 0, None)]), (1.0, 0, [(0, 0, None)])], start=6)
    assert [n for _, n, _ in out] == [4, 2]
    assert out[0][2].endswith("(max_step_down 2)")


def test_ttft_slo_adds_a_replica_and_blocks_scale_down():
    p = Params(
        target_queue_depth=8,
        max_replicas=4,
        ttft_slo_s=1.0,
        scale_down_window_s=0,
        scale_down_cooldown_s=0,
        scale_up_cooldown_s=0,
    )
    ticks = [
        (0.0, 0, [(2, 4, 2.5)]),  # queue wants 1, SLO violated -> 2
        (1.0, 0, [(1, 2, 1.4), (0, 2, 0.3)]),  # still violated on one replica -> 3
        (2.0, 0, [(0, 1, 0.2), (0, 1, 0.3), (0, 0, None)]),  # met -> down
    ]
    out = run(p, ticks)
    assert [n for _, n, _ in out] == [2, 3, 2]
    assert out[0][2] == (
        "scale up 1->2: load 6.0 / target 8.0 per replica wants 1; TTFT 2.50s > SLO 1.00s wants 2"
    )
    assert out[1][2] == (
        "scale up 2->3: load 5.0 / target 8.0 per replica wants 1; TTFT 1.40s > SLO 1.00s wants 3"
    )
    # SLO violated while the queue wants fewer replicas: hold, never scale down
    p2 = Params(
        target_queue_depth=8,
        max_replicas=3,
        ttft_slo_s=1.0,
        scale_down_window_s=0,
        scale_down_cooldown_s=0,
    )
    [(_, n, why)] = run(p2, [(0.0, 0, [(0, 1, 3.0)] * 3)], start=3)
    assert n == 3
    assert why == (
        "hold at 3: load 3.0 / target 8.0 per replica wants 1; TTFT 3.00s > SLO 1.00s wants 4 "
        "(bounded to 3 by [1, 3])"
    )


def test_scale_to_zero_after_idle_and_back_on_first_request():
    p = Params(
        target_queue_depth=4,
        max_replicas=4,
        scale_to_zero_after_s=30,
        scale_down_window_s=0,
        scale_down_cooldown_s=0,
    )
    ticks = [
        (0.0, 0, [(0, 2, None)]),
        (10.0, 0, [(0, 1, None)]),  # last tick with load: idle from here
        (20.0, 0, [(0, 0, None)]),
        (39.0, 0, [(0, 0, None)]),  # idle 29 s: stays
        (40.0, 0, [(0, 0, None)]),  # idle 30 s: to zero
        (50.0, 0, []),
        (60.0, 1, []),  # first request queued at the handle: back at once
        (61.0, 9, []),  # still no replica reporting; 9 queued, already at 1
    ]
    out = run(p, ticks)
    assert [n for _, n, _ in out] == [1, 1, 1, 1, 0, 0, 1, 3]
    assert out[4][2] == "scale to zero 1->0: idle 30.0s >= scale_to_zero_after_s 30.0"
    assert out[5][2] == "hold at 0: idle, no requests"
    assert out[6][2] == "scale from zero 0->1: 1.0 requests waiting"
    assert out[7][2] == "scale up 1->3: load 9.0 / target 4.0 per replica wants 3"


def test_scale_from_zero_sizes_to_queue_and_max():
    p = Params(target_queue_depth=2, max_replicas=3, scale_to_zero_after_s=0)
    [(_, n, why)] = run(p, [(0.0, 11, [])], start=0)
    assert (n, why) == (3, "scale from zero 0->3: 11.0 requests waiting")


def test_no_scale_to_zero_without_the_option():
    out = run(P, [(float(t), 0, [(0, 0, None)]) for t in (0, 1000, 5000)])
    assert [n for _, n, _ in out] == [1, 1, 1]


def test_state_round_trips_through_a_dict():
    p = Params(scale_up_window_s=5)
    snap = Snapshot(now=1.0, current_replicas=1, replicas=[ReplicaLoad(20, 0)])
    _, _, s = decide(snap, p, State())
    assert State.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"target_queue_depth": 0}, "target_queue_depth"),
        ({"min_replicas": 0}, "min_replicas"),
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
        ({"max_step_up": 0}, "max_step_up"),
        ({"scale_down_window_s": -1}, "scale_down_window_s"),
        ({"ttft_slo_s": 0}, "ttft_slo_s"),
    ],
)
def test_params_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Params(**kwargs)


def test_long_window_at_controller_tick_rate():
    # Serve calls the policy every 0.1 s; a 300 s window spans 3000 ticks. The history keeps change
    # points only, so it stays short and the window still completes.
    p = Params(
        target_queue_depth=4,
        max_replicas=4,
        scale_down_window_s=300,
        scale_down_cooldown_s=0,
        max_step_down=4,
    )
    cur, state, first_down = 3, State(), None
    for k in range(3011):
        t = k * 0.1
        snap = Snapshot(now=t, current_replicas=cur, replicas=[ReplicaLoad(0, 1)])
        cur, _, state = decide(snap, p, state)
        if cur < 3 and first_down is None:
            first_down = t
    assert cur == 1 and first_down == pytest.approx(300.0)
    assert len(state.history) <= 2


def test_stale_ttft_with_nothing_in_flight_does_not_hold_scale_down():
    p = Params(
        target_queue_depth=4,
        max_replicas=4,
        ttft_slo_s=1.0,
        scale_down_window_s=0,
        scale_down_cooldown_s=0,
    )
    [(_, n, why)] = run(p, [(0.0, 0, [(0, 0, 2.5), (0, 0, 3.0)])], start=2)
    assert (n, why) == (
        1,
        "scale down 2->1: load 0.0 / target 4.0 per replica wants 0 (bounded to 1 by [1, 4])",
    )
