"""Trace replay: the queueing model's numbers on tiny traces, W4's shape, trace files, the PNG."""

from __future__ import annotations

import pytest

from autoscaling.decide import Params
from autoscaling.sim_report import plot
from autoscaling.simulate import Arrival, SimConfig, load_trace, simulate, w4_trace

FIXED1 = Params(min_replicas=1, max_replicas=1)


def test_one_replica_serves_fifo_at_its_token_rate():
    # 10 tokens/s, one request at a time, 10 tokens each: one request per second.
    cfg = SimConfig(tokens_per_s=10, max_running=1, startup_s=0, tick_s=0.1)
    res = simulate([Arrival(0.0, 10)] * 3, FIXED1, cfg)
    # admitted at ticks 0.1, 1.1, 2.1; first token 1/10 s after admission
    assert [round(x, 6) for _, x in res.ttfts] == [0.2, 1.2, 2.2]
    assert res.unfinished == 0
    assert res.slo_violations == 2  # default SLO 1 s
    # the replay runs 60 s past the last arrival; one replica the whole time
    assert res.replica_seconds == pytest.approx(60.0)


def test_scale_up_waits_for_startup_and_counts_replica_seconds():
    p = Params(target_queue_depth=1, max_replicas=3, scale_down_window_s=1000)
    cfg = SimConfig(tokens_per_s=10, max_running=1, startup_s=2.0, step_at_s=0.0)
    res = simulate([Arrival(0.0, 100)] * 3, p, cfg)
    assert res.decisions[0][:2] == (0.1, 3)
    assert res.decisions[0][2] == "scale up 1->3: load 3.0 / target 1.0 per replica wants 3"
    # the two new replicas serve from t = 0.1 + 2.0
    assert res.scale_up_s == pytest.approx(2.1)
    assert [round(x, 6) for _, x in res.ttfts] == [0.2, 2.2, 2.2]
    # 60 s replay; two replicas joined at 0.1 and never left (the down window is long)
    assert res.replica_seconds == pytest.approx(60.0 + 2 * 59.9)


def test_scale_down_drains_and_loses_nothing():
    p = Params(
        target_queue_depth=1,
        max_replicas=4,
        scale_down_window_s=0,
        scale_down_cooldown_s=0,
        max_step_down=4,
    )
    cfg = SimConfig(tokens_per_s=10, max_running=1, startup_s=0.0)
    arrivals = [Arrival(0.0, 30)] * 4 + [Arrival(10.0, 5)]
    res = simulate(arrivals, p, cfg)
    assert res.unfinished == 0
    assert len(res.ttfts) == 5
    # up to 4, then down to 1 once the four 3-second requests are done
    counts = [n for _, n, _ in res.decisions]
    assert counts[0] == 4 and counts[-1] == 1
    down_at = next(t for t, n, _ in res.decisions if n < 4)
    assert 3.0 <= down_at <= 3.5


def test_scale_to_zero_and_back():
    p = Params(target_queue_depth=2, max_replicas=2, scale_to_zero_after_s=5)
    cfg = SimConfig(tokens_per_s=100, max_running=4, startup_s=1.0)
    res = simulate([Arrival(0.0, 10), Arrival(20.0, 10)], p, cfg)
    counts = [(round(t), n) for t, n, _ in res.decisions]
    assert counts[0] == (5, 0)  # idle 5 s after the first request finished at 0.2 s
    assert counts[1] == (20, 1)
    # the second request waited for the cold start: about startup_s
    assert 1.0 <= res.ttfts[1][1] <= 1.3
    assert res.unfinished == 0


def test_w4_shape():
    tr = w4_trace(base_rate=2.0, factor=8.0, low_s=30, step_s=120, tail_s=120, seed=1)
    low = sum(1 for a in tr if a.t < 30) / 30
    step = sum(1 for a in tr if 30 <= a.t < 150) / 120
    tail = sum(1 for a in tr if a.t >= 150) / 120
    assert 1.2 < low < 2.8 and 1.5 < tail < 2.5
    assert 14 < step < 18
    assert max(a.t for a in tr) < 270
    assert tr == w4_trace(base_rate=2.0, seed=1)


def test_trace_file(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"t": 1.5, "output_tokens": 8}\n\n{"t": 0.5}\n')
    assert load_trace(f, output_tokens=16) == [Arrival(0.5, 16), Arrival(1.5, 8)]
    f.write_text('{"t": 1.5}\n{"time": 2}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: .*\"t\""):
        load_trace(f)


def test_policy_changes_the_outcome_and_png(tmp_path):
    tr = w4_trace(base_rate=1.0, low_s=10, step_s=40, tail_s=20)
    cfg = SimConfig(tokens_per_s=200, max_running=8, startup_s=5, step_at_s=10)
    slow = simulate(tr, Params(target_queue_depth=16, max_replicas=6), cfg)
    fast = simulate(tr, Params(target_queue_depth=4, max_replicas=6), cfg)
    assert fast.summary()["max_replicas"] > slow.summary()["max_replicas"]
    assert fast.p99_ttft_s(10, 50) < slow.p99_ttft_s(10, 50)
    assert fast.replica_seconds > slow.replica_seconds
    out = tmp_path / "r.png"
    plot(fast, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="tokens_per_s"):
        SimConfig(tokens_per_s=0)
    with pytest.raises(ValueError, match="max_running"):
        SimConfig(max_running=0)
