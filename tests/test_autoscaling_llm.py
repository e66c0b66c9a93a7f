"""The fleetlm policy driving real LLMServer replicas (demo-small, 2 running sequences each) on a
local Ray Serve: the replicas' own record_autoscaling_stats() (engine waiting + running, TTFT)
feed decide(); a burst scales 1 -> 2, the quiet after it scales back to 1 while requests are still
streaming, and every request gets all its tokens."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.ray

APP = "autoscaling-llm-test"
MODEL = "demo-small"
DEP = f"LLMServer-{MODEL}"
BURST_TOKENS = 256
POLICY = f"""
models:
  {MODEL}:
    target_queue_depth: 2
    min_replicas: 1
    max_replicas: 2
    scale_up_window_s: 1
    scale_down_window_s: 3
    scale_up_cooldown_s: 1
    scale_down_cooldown_s: 3
"""


def replica_states() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[APP].deployments[DEP].replica_states)


async def one(handle, mux, i: int, max_tokens: int) -> tuple[str | None, int]:
    """One request as the ingress sends it (tokens through the replica's output channel)."""
    from deployments.replica_call import call_deltas, open_call

    rid = f"as-{i}"
    req = {
        "request_id": rid,
        "prompt_token_ids": [(7 * i + k) % 200 + 5 for k in range(24)],
        "sampling": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0},
    }
    n = 0
    try:
        call = await open_call(handle, mux, req, rid, MODEL)
        async for items in call_deltas(call):
            n += sum(len(d["token_ids"]) for _, d in items)
    except Exception as e:
        return repr(e), n
    return None, n


def test_llm_replicas_scale_on_engine_queue_and_drain_on_scale_down(ray_session):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from autoscaling.policy_file import parse_policy
    from deployments.app import ROUTER_CLASS
    from deployments.autoscaling_policy import (
        GRACEFUL_SHUTDOWN_OPTIONS,
        get_history,
        put_policy,
        serve_autoscaling_config,
    )
    from deployments.llm_server import LLMServer
    from deployments.replica_call import new_channel_mux

    put_policy(parse_policy(POLICY), "test")
    mc = {
        "name": MODEL,
        "model": MODEL,
        "engine": {"max_num_seqs": 2, "num_threads": 1},
        "max_queued_requests": 16,
    }
    dep = serve.deployment(LLMServer).options(
        name=DEP,
        max_ongoing_requests=18,
        ray_actor_options={"num_cpus": 0.01},
        autoscaling_config=serve_autoscaling_config(MODEL, min_replicas=1, max_replicas=2),
        # Output channels are opened on a given replica: fleetlm's router honours that.
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS),
        **GRACEFUL_SHUTDOWN_OPTIONS,
    )
    handle = serve.run(dep.bind(mc), name=APP, route_prefix=None)
    try:
        states: list[dict[str, int]] = []

        async def drive() -> list[tuple[str | None, int]]:
            mux = new_channel_mux(handle)
            tasks = []
            # burst: 24 requests of 256 tokens in 0.5 s (a queue of several seconds even on a
            # fast engine: 2 running sequences), then a trickle for 24 s that keeps requests
            # streaming while the second replica is chosen for removal and drains
            for i in range(24):
                tasks.append(asyncio.create_task(one(handle, mux, i, BURST_TOKENS)))
                await asyncio.sleep(0.02)
            for i in range(24, 36):
                tasks.append(asyncio.create_task(one(handle, mux, i, 32)))
                states.append(await asyncio.to_thread(replica_states))
                await asyncio.sleep(2.0)
            try:
                return await asyncio.gather(*tasks)
            finally:
                await mux.close()

        t0 = time.time()
        results = asyncio.run(drive())
        assert [e for e, _ in results if e] == []
        assert [n for _, n in results] == [BURST_TOKENS] * 24 + [32] * 12
        hist = get_history(DEP)[DEP]
        ups = [e for e in hist if e["t"] >= t0 and e["reason"].startswith("scale up 1->2")]
        assert ups, hist
        assert ups[0]["t"] - t0 < 10, hist  # the burst is seen within seconds
        # back to one replica; the removed one drained its streams (no request failed above)
        deadline = time.time() + 60
        while time.time() < deadline and replica_states() != {"RUNNING": 1}:
            time.sleep(0.5)
        assert replica_states() == {"RUNNING": 1}, states
        hist = get_history(DEP)[DEP]
        assert any(e["reason"].startswith("scale down 2->1") for e in hist), hist
    finally:
        serve.delete(APP)
