"""Ray Serve glue for the fleetlm autoscaling policy: a fixed policy class that Serve's controller
calls every control-loop tick (0.1 s), translating the AutoscalingContext into an
autoscaling.decide.Snapshot and calling decide().

Live edits without restarts: the parameters are not in the deployment's config (a change of
policy_kwargs restarts every replica) but in Ray's internal KV store (GCS), namespace "fleetlm",
key "autoscaling/policy", which `fleetlm policy apply` writes. The controller re-reads it at most
every REFRESH_S seconds, so an edit takes effect within about a second, and the store outlives a
controller restart. Each deployment's recent decisions (a bounded list with reasons) are written
back to "autoscaling/history/<deployment>" for `fleetlm policy history`.

Replicas report (record_autoscaling_stats, deployments/llm_server.py): num_waiting, num_running,
kv_cache_usage, ttft_p90_s and ttft_samples. Requests queued in Serve's handles in front of the
replicas come from the context's total_queued_requests.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

from ray.experimental import internal_kv
from ray.serve.config import AutoscalingContext

from autoscaling.decide import Params, ReplicaLoad, Snapshot, State, decide
from autoscaling.policy_file import Policy
from deployments.names import model_of

logger = logging.getLogger("ray.serve")

KV_NAMESPACE = "fleetlm"
POLICY_KEY = "autoscaling/policy"
HISTORY_PREFIX = "autoscaling/history/"
HISTORY_LEN = 200  # decisions kept per deployment
REFRESH_S = 1.0  # policy re-read period in the controller
HISTORY_FLUSH_S = 2.0  # unchanged-count entries are written at most this often
STATE_KEY = "fleetlm"  # our part of Serve's policy_state dict

# Deployment options the replica deployment needs so a scale-down drains instead of cutting
# streams: Serve stops routing to a replica chosen for removal, then waits until its ongoing
# requests finish (checking every wait_loop_s) for at most timeout_s before killing it.
GRACEFUL_SHUTDOWN_OPTIONS = {
    "graceful_shutdown_timeout_s": 300.0,
    "graceful_shutdown_wait_loop_s": 0.5,
}


def serve_autoscaling_config(
    model: str,
    min_replicas: int,
    max_replicas: int,
    initial_replicas: int | None = None,
) -> dict[str, Any]:
    """The replica deployment's `autoscaling_config` (a dict Serve validates into its
    AutoscalingConfig). min/max are hard bounds Serve enforces; the live policy's own min/max apply
    inside them (min_replicas 0 here lets the policy's scale_to_zero_after_s work). Serve's own
    delays and factors are neutral, so decide() alone sets the pace (Serve's defaults would add a
    30 s upscale and a 600 s downscale delay after it); replicas push metrics every second over a
    2 s look-back. The policy class and its kwargs never change, so no edit restarts replicas."""
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": initial_replicas,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "downscale_to_zero_delay_s": 0.0,
        "metrics_interval_s": 1.0,
        "look_back_period_s": 2.0,
        "policy": {
            "policy_function": "deployments.autoscaling_policy:FleetlmPolicy",
            "policy_kwargs": {"model": model},
        },
    }


# -- the store ------------------------------------------------------------------------------------
def put_policy(policy: Policy, source: str) -> dict[str, Any]:
    """Store a validated policy as the live one; returns the stored record (with its version)."""
    prev = get_policy_record()
    record = {
        "version": (prev["version"] + 1) if prev else 1,
        "applied_at": time.time(),
        "source": source,
        "policy": policy.to_dict(),
    }
    internal_kv._internal_kv_put(POLICY_KEY, json.dumps(record), namespace=KV_NAMESPACE)
    return record


def get_policy_record() -> dict[str, Any] | None:
    raw = internal_kv._internal_kv_get(POLICY_KEY, namespace=KV_NAMESPACE)
    return json.loads(raw) if raw else None


def get_history(deployment: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Recent decisions per deployment, oldest first."""
    keys = (
        [f"{HISTORY_PREFIX}{deployment}".encode()]
        if deployment
        else internal_kv._internal_kv_list(HISTORY_PREFIX, namespace=KV_NAMESPACE)
    )
    out = {}
    for key in sorted(keys):
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw:
            out[key.decode()[len(HISTORY_PREFIX) :]] = json.loads(raw)
    return out


# -- the policy -----------------------------------------------------------------------------------
class FleetlmPolicy:
    """Serve instantiates this once per deployment in the controller (policy_kwargs: the model
    name) and calls it every tick; it must never raise or block for long."""

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        self.policy = Policy({}, {})
        self.version = 0
        self.read_at = -1e9
        self.history: list[dict[str, Any]] = []
        self.dirty_since: float | None = None
        self.last_kind = ""
        self.last_version = -1
        self.history_loaded = False  # continue the stored history after a controller restart

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time or time.time()
        self._refresh(now)
        if not self.history_loaded:
            self.history_loaded = True
            try:
                self.history = get_history(ctx.deployment_name).get(ctx.deployment_name, [])
            except Exception:  # no store (unit tests) or GCS hiccup: start a fresh history
                self.history = []
        model = self.model or model_of(ctx.deployment_name)
        params = _within_serve_bounds(self.policy.params_for(model), ctx)
        snap = snapshot_from_context(ctx, now)
        state = State.from_dict(ctx.policy_state.get(STATE_KEY))
        replicas, reason, state = decide(snap, params, state)
        self._record(ctx, now, snap, replicas, reason)
        return replicas, {**ctx.policy_state, STATE_KEY: state.to_dict()}

    def _refresh(self, now: float) -> None:
        if now - self.read_at < REFRESH_S:
            return
        self.read_at = now
        try:
            record = get_policy_record()
            if record and record["version"] != self.version:
                self.policy = Policy.from_dict(record["policy"], source=record.get("source", ""))
                self.version = record["version"]
                logger.info("fleetlm autoscaling policy v%d loaded", self.version)
        except Exception as e:  # keep the last good policy: the store is advisory, scaling isn't
            logger.warning("fleetlm autoscaling policy kept at v%d: %s", self.version, e)

    def _record(
        self, ctx: AutoscalingContext, now: float, snap: Snapshot, n: int, reason: str
    ) -> None:
        kind = reason.split(":", 1)[0]  # e.g. "hold at 2", "scale up 1->3"
        changed = n != ctx.target_num_replicas
        new_kind = kind != self.last_kind or changed or self.version != self.last_version
        self._export(ctx, snap, n, new_kind)
        if new_kind:
            self.last_kind, self.last_version = kind, self.version
            self.history.append(
                {
                    "t": round(now, 3),
                    "from": ctx.target_num_replicas,
                    "to": n,
                    "running": ctx.current_num_replicas,
                    "load": round(snap.load, 2),
                    "reason": reason,
                    "policy_version": self.version,
                }
            )
            del self.history[:-HISTORY_LEN]
            self.dirty_since = self.dirty_since or now
        due = self.dirty_since is not None and now - self.dirty_since >= HISTORY_FLUSH_S
        if self.dirty_since is not None and (changed or due):
            try:
                key = f"{HISTORY_PREFIX}{ctx.deployment_name}"
                internal_kv._internal_kv_put(key, json.dumps(self.history), namespace=KV_NAMESPACE)
                self.dirty_since = None
            except Exception as e:
                logger.warning("fleetlm autoscaling history not written: %s", e)

    def _export(self, ctx: AutoscalingContext, snap: Snapshot, n: int, new_kind: bool) -> None:
        """Replica gauges every tick; a decision counted when its kind changes (a fixed word as
        the label: scale_up, scale_down, to_zero, hold)."""
        try:
            from deployments.metrics import get_metrics

            m = get_metrics()
            model = self.model or model_of(ctx.deployment_name)
            m.set("replicas_current", ctx.current_num_replicas, model=model)
            m.set("replicas_target", n, model=model)
            m.set("autoscaling_queue_depth", snap.load, model=model)
            if new_kind:
                cur = ctx.target_num_replicas
                word = "hold" if n == cur else "scale_up" if n > cur else "scale_down"
                word = "to_zero" if n == 0 and cur > 0 else word
                m.inc("autoscaling_decisions_total", 1, model=model, reason=word)
        except Exception as e:  # metrics are advisory: never let them stop scaling
            logger.debug("autoscaling metrics not exported: %s", e)


def snapshot_from_context(ctx: AutoscalingContext, now: float) -> Snapshot:
    """Each running replica's latest reported stats; the handles' queued requests in front."""
    raw = ctx.raw_metrics or {}

    def latest(metric: str, replica: Any) -> float | None:
        series = raw.get(metric, {}).get(replica)
        if not series:
            return None
        return max(series, key=lambda p: p.timestamp).value

    loads = []
    for rid in ctx.running_replicas:
        waiting, running = latest("num_waiting", rid), latest("num_running", rid)
        if waiting is None and running is None:
            continue  # not reporting yet (just started): no load to count
        samples = latest("ttft_samples", rid) or 0
        loads.append(
            ReplicaLoad(
                waiting=waiting or 0.0,
                running=running or 0.0,
                kv_usage=latest("kv_cache_usage", rid) or 0.0,
                ttft_s=latest("ttft_p90_s", rid) if samples > 0 else None,
            )
        )
    queued = ctx.total_queued_requests or 0.0
    if not loads and ctx.current_num_replicas == 0:
        # Scaled to zero: only the handles know about waiting requests.
        queued = max(queued, ctx.total_num_requests or 0.0)
    return Snapshot(
        now=now, current_replicas=ctx.target_num_replicas, replicas=loads, queued=queued
    )


_ADAPTERS: dict[str, FleetlmPolicy] = {}  # per deployment, in the controller process


def fleetlm_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Function form for `AutoscalingPolicy(policy_function="deployments.autoscaling_policy:
    fleetlm_policy")`: the model name comes from the deployment name (LLMServer-<model>)."""
    key = f"{ctx.app_name}/{ctx.deployment_name}"
    if key not in _ADAPTERS:
        _ADAPTERS[key] = FleetlmPolicy()
    return _ADAPTERS[key](ctx)


def _within_serve_bounds(p: Params, ctx: AutoscalingContext) -> Params:
    """The live policy may not leave the deployment's hard bounds (which Serve clamps anyway)."""
    hi = max(1, min(p.max_replicas, ctx.capacity_adjusted_max_replicas))
    lo = min(max(p.min_replicas, ctx.capacity_adjusted_min_replicas), hi)
    if (lo, hi) == (p.min_replicas, p.max_replicas):
        return p
    return replace(p, min_replicas=lo, max_replicas=hi)
