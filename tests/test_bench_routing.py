"""bench/routing.py's W2 cache sizing and target arithmetic (no cluster started)."""

from __future__ import annotations

import pytest

from bench.routing import parse_args, targets, w2_kv_blocks


def test_w2_kv_sizing_keeps_the_prefix_share_beside_running_room():
    # WORKLOADS.md W2: 16 x 512 prefix tokens; 60% = 4915.2 tokens -> 308 blocks of 16. Each
    # request is 512 + 64 + 64 = 640 tokens = 40 blocks, 32 of them the shared prefix: 8 own.
    assert w2_kv_blocks(16, 512, 0.6, 640, 8) == (308, 64)
    assert w2_kv_blocks(16, 512, 0.6, 640, 0) == (308, 0)
    # A prefix not a multiple of the block: its partial block counts as the request's own.
    assert w2_kv_blocks(4, 100, 0.5, 150, 2) == (13, 2 * (10 - 6))
    # A tiny fraction still fits one whole request (41 blocks for 640 tokens).
    assert w2_kv_blocks(1, 512, 0.01, 640, 0) == (41, 0)
    assert w2_kv_blocks(1, 512, 0.01, 640, 2) == (41 - 16, 16)


def test_parse_args_defaults_and_errors(capsys):
    a = parse_args([])
    assert a.room_requests is None and a.w1_threads >= 1 and a.kv_fraction == 0.6
    assert parse_args(["--room-requests", "0"]).room_requests == 0
    for bad, field in (
        (["--room-requests", "-1"], "--room-requests"),
        (["--w1-threads", "0"], "--w1-threads"),
        (["--policies", "random"], "--policies"),
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert field in capsys.readouterr().err


def test_targets_ratios():
    row = {"hit_rate": 0.8, "mean_ttft_ms": 300.0}
    t = targets({"W2": {"prefix_aware": row, "pow2": {"hit_rate": 0.4, "mean_ttft_ms": 1000.0}}})
    assert t["hit_rate_ratio_vs_pow2"] == pytest.approx(2.0) and t["hit_rate_target_met"]
    assert t["mean_ttft_ratio_vs_pow2"] == pytest.approx(0.3) and t["ttft_target_met"]
    t = targets({"W1_http": {"fleetlm": 90.0, "vllm": 100.0}})
    assert t["w1_ratio_vs_vllm"] == pytest.approx(0.9) and not t["w1_target_met"]


def test_routing_sim_prefix_aware_keeps_groups_on_one_replica():
    from bench.routing_sim import simulate

    small = dict(groups=4, prompts_per_group=6, prefix_len=64, question_len=16, output_len=4)
    small["concurrency"] = 4
    pa = simulate("prefix_aware", kv_blocks=40, imbalance=100, **small)
    rr = simulate("round_robin", kv_blocks=40, **small)
    assert pa["decisions"]["cold"] == 4 and pa["groups_on_every_replica"] == 0
    assert sum(pa["prefix_outcome"].values()) == 24 == sum(pa["decisions"].values())
    assert rr["groups_on_every_replica"] == 4
    assert pa["hit_rate"] > rr["hit_rate"]


def test_cpu_busy_fraction_is_a_fraction_and_wait_for_quiet_returns():
    from bench.routing import cpu_busy_fraction, wait_for_quiet

    assert 0.0 <= cpu_busy_fraction(0.05) <= 1.0
    assert 0.0 <= wait_for_quiet(max_busy=1.0, timeout_s=1.0) <= 1.0  # 100% busy counts as quiet
