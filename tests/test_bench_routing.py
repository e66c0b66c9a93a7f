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
    w1 = {"fleetlm": 130.0, "vllm": 100.0, "fleetlm_offline": 200.0}
    w1["fleetlm_direct_ingress"] = 150.0
    t = targets({"W1_http": w1})
    assert t["w1_target_met"] and t["w1_served_over_offline"] == pytest.approx(0.65)
    assert t["w1_direct_ingress_ratio_vs_vllm"] == pytest.approx(1.5)
    assert t["w1_direct_ingress_over_offline"] == pytest.approx(0.75)


def test_w1_runs_each_send_prompts_of_their_own():
    from bench.routing import w1_seeds
    from cluster.bench.workloads import make_workload

    seeds = w1_seeds(parse_args(["--w1-repeats", "3", "--seed", "5"]))
    assert seeds == [5, 6, 7, 8]  # the unmeasured run, then three measured ones
    firsts = {tuple(make_workload("W1", seed=s).requests[0].prompt[:16]) for s in seeds}
    assert len(firsts) == len(seeds)  # no run's first block is another run's


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


def test_w6_sizing_prompts_and_ideal_hit_rate():
    from bench.w6 import W6, ideal_hit_rates

    w = W6()
    # 40% of 24 x 1024 prefix tokens = 9830.4 -> 615 blocks; 8 running requests x (128 + 32) / 16.
    assert w.kv_blocks() == (615, 80)
    small = W6(tenants=2, prefix_len=32, users=2, question_len=16, output_len=4, rates=(1, 2))
    prompts = small.prompts()
    assert len(prompts) == 4 and all(len(p) == 48 for p in prompts)
    assert prompts[0][:32] == prompts[1][:32] != prompts[2][:32] == prompts[3][:32]
    assert prompts[0][32:] != prompts[1][32:]
    steps = W6(**{**small.__dict__, "step_s": 3}).steps()
    assert [len(s.requests) for s in steps] == [3, 6] and [s.rate for s in steps] == [1, 2]

    def spec(tag):
        from cluster.bench.workloads import RequestSpec

        return RequestSpec([0] * 48, 4, 48, tag=tag)

    class Step:
        def __init__(self, tags):
            self.requests = [spec(t) for t in tags]

    # t0u0 misses; t0u1 hits the tenant's 32-token prefix; t0u0 again hits (48 - 1) // 16 = 2
    # blocks = 32 tokens; t1u0 misses. Second step: every prompt seen -> 32 of 48 each.
    rates = ideal_hit_rates([Step(["t0u0", "t0u1", "t0u0", "t1u0"]), Step(["t1u1", "t1u0"])], 32)
    assert rates == [pytest.approx(64 / 192), pytest.approx(64 / 96)]


def test_w6_tenant_skew_draws_zipf_popularity():
    from bench.w6 import W6, tenant_of

    assert W6(tenants=3).tenant_weights() == [pytest.approx(1 / 3)] * 3
    w = W6(tenants=3, tenant_skew=1.0, rates=(50.0,), step_s=40.0)
    # 1, 1/2, 1/3 normalised: 6/11, 3/11, 2/11
    assert w.tenant_weights() == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    (step,) = w.steps()
    counts = [sum(1 for r in step.requests if tenant_of(r.tag) == f"t{k}") for k in range(3)]
    assert len(step.requests) == 2000 and counts[0] > counts[1] > counts[2]
    assert counts[0] / 2000 == pytest.approx(6 / 11, abs=0.04)
    # each request's prompt is its tag's prompt
    prompts = w.prompts()
    for r in step.requests[:50]:
        t, u = (int(x) for x in r.tag[1:].split("u"))
        assert r.prompt == prompts[t * w.users + u]
    with pytest.raises(ValueError, match="tenant_skew"):
        W6(tenant_skew=-1.0)


def test_w6_summary_takes_the_highest_rate_pow2_completes_and_targets():
    from bench.routing import w6_summary, w6_targets

    def rows(p90s, failed=(0, 0, 0)):
        return [
            {
                "rate": r,
                "p90_ttft_ms": p,
                "mean_ttft_ms": p / 2,
                "hit_rate": 0.5,
                "output_tok_s": 100.0,
                "ideal_hit_rate": 0.8,
                "failed": f,
            }
            for r, p, f in zip((1.0, 2.0, 3.0), p90s, failed, strict=True)
        ]

    steps = {
        "pow2": rows((100, 200, 9000), failed=(0, 0, 3)),
        "ray_prefix_affinity": rows((90, 150, 800)),
        "prefix_aware": rows((50, 60, 70)),
    }
    s = w6_summary(steps)
    assert s["rate"] == 2.0 and s["rates"] == [1.0, 2.0, 3.0]
    assert s["prefix_aware"]["p90_ttft_ms"] == 60 and s["pow2"]["p90_ttft_ms"] == 200
    t = w6_targets(s)
    assert t["p90_ttft_ratio_vs_ray"] == pytest.approx(0.4) and t["p90_ttft_vs_ray_met"]
    assert t["p90_ttft_ratio_vs_pow2"] == pytest.approx(0.3) and t["p90_ttft_vs_pow2_met"]
    assert t["hit_rate_vs_ideal"] == pytest.approx(0.625) and not t["hit_rate_vs_ideal_met"]
    assert not t["output_tok_s_vs_ray_met"]


def test_routing_sim_w6_runs_every_policy_and_ray_partitions_tenants():
    from bench.routing_sim import simulate_w6
    from bench.w6 import W6

    w = W6(tenants=4, prefix_len=64, users=2, question_len=16, output_len=4, rates=(2.0,))
    w = W6(**{**w.__dict__, "step_s": 10.0})
    for policy in ("prefix_aware", "ray_prefix_affinity", "pow2", "round_robin"):
        r = simulate_w6(policy, w, replicas=2)
        (step,) = r["steps"]
        assert step["requests"] == 20 and step["failed"] == 0
        assert 0 < step["hit_rate"] <= step["ideal_hit_rate"] + 1e-9
    ray_ = simulate_w6("ray_prefix_affinity", w, replicas=2)
    # The first prompt of each tenant goes to the replica with the fewest characters in Ray's
    # tree, later ones follow their tenant: 2 tenants per replica, none on both.
    assert ray_["tenants_per_replica"] == [2, 2]
