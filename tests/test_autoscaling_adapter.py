"""The Serve adapter's translation, on hand-built AutoscalingContexts (no Ray running)."""

from __future__ import annotations

from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscaling.decide import Params
from deployments.autoscaling_policy import (
    STATE_KEY,
    FleetlmPolicy,
    _within_serve_bounds,
    serve_autoscaling_config,
    snapshot_from_context,
)

DEP = DeploymentID(name="LLMServer-demo", app_name="fleetlm")
R = [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(3)]


def series(*values: float) -> list[TimeStampedValue]:
    return [TimeStampedValue(timestamp=100.0 + i, value=v) for i, v in enumerate(values)]


def ctx(raw, *, target=3, running=3, queued=0.0, total=0.0, lo=1, hi=4, state=None):
    return AutoscalingContext(
        deployment_id=DEP,
        deployment_name=DEP.name,
        app_name=DEP.app_name,
        current_num_replicas=running,
        target_num_replicas=target,
        running_replicas=R[:running],
        total_num_requests=total,
        total_queued_requests=queued,
        aggregated_metrics={},
        raw_metrics=raw,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=1000.0,
        config=None,
    )


RAW = {
    # the latest sample of each series counts
    "num_waiting": {R[0]: series(9, 3), R[1]: series(0)},
    "num_running": {R[0]: series(1, 4), R[1]: series(2)},
    "kv_cache_usage": {R[0]: series(0.5), R[1]: series(0.25)},
    "ttft_samples": {R[0]: series(5), R[1]: series(0)},
    "ttft_p90_s": {R[0]: series(0.8, 1.7), R[1]: series(0.0)},
    # R[2] has not reported yet: left out
}


def test_snapshot_takes_latest_per_replica_and_queued_in_front():
    snap = snapshot_from_context(ctx(RAW, queued=2.0), now=1000.0)
    assert snap.current_replicas == 3
    assert len(snap.replicas) == 2
    r0, r1 = snap.replicas
    assert (r0.waiting, r0.running, r0.kv_usage, r0.ttft_s) == (3, 4, 0.5, 1.7)
    assert (r1.waiting, r1.running, r1.ttft_s) == (0, 2, None)  # no TTFT samples: no TTFT
    assert snap.load == 2 + 3 + 4 + 2
    assert snap.worst_ttft_s == 1.7


def test_at_zero_replicas_the_handles_requests_count():
    snap = snapshot_from_context(ctx({}, target=0, running=0, queued=0.0, total=3.0), now=1.0)
    assert (snap.current_replicas, snap.load) == (0, 3.0)


def test_live_bounds_stay_inside_serves():
    p = Params(min_replicas=2, max_replicas=8)
    assert _within_serve_bounds(p, ctx(RAW, lo=1, hi=4)) == Params(min_replicas=2, max_replicas=4)
    assert _within_serve_bounds(p, ctx(RAW, lo=3, hi=8)).min_replicas == 3
    assert _within_serve_bounds(p, ctx(RAW, lo=1, hi=8)) is p


def test_policy_call_decides_and_keeps_state_in_policy_state():
    # No Ray here: the store can't be read, so the built-in defaults run (target 4 per replica).
    pol = FleetlmPolicy(model="demo")
    n, state = pol(ctx(RAW, queued=2.0, target=2, state={"serve_key": 1}))
    assert n == 3  # load 11 / 4 -> 3, within [1, 4]
    assert state["serve_key"] == 1 and state[STATE_KEY]["last_scale_up"] == 1000.0
    assert pol.history[-1]["reason"] == "scale up 2->3: load 11.0 / target 4.0 per replica wants 3"
    assert (pol.history[-1]["from"], pol.history[-1]["to"]) == (2, 3)


def test_serve_config_is_valid_and_neutral():
    c = AutoscalingConfig(**serve_autoscaling_config("demo", 0, 3, initial_replicas=1))
    assert (c.min_replicas, c.max_replicas, c.initial_replicas) == (0, 3, 1)
    assert (c.upscale_delay_s, c.downscale_delay_s, c.downscale_to_zero_delay_s) == (0, 0, 0)
    assert c.policy.policy_function == "deployments.autoscaling_policy:FleetlmPolicy"
    assert c.policy.policy_kwargs == {"model": "demo"}
