"""PrefixAwareRouter on a real local Ray Serve: 2 dummy replicas report the stats the test sets."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from engine.block_hash import block_hashes
from engine.outputs import BlockEvent, EngineStats

pytestmark = pytest.mark.ray

BS = 16


def _hashes(group: int, question: int) -> list[int]:
    return block_hashes([1000 + group] * (4 * BS) + [question] * BS, BS)


def _app(
    control,
    name: str,
    max_ongoing_requests: int = 5,
    router_class: str = "deployments.request_router:PrefixAwareRouter",
    **router_kwargs,
):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    @serve.deployment(
        name=name,
        num_replicas=2,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(
            request_router_class=router_class,
            request_router_kwargs=router_kwargs,
            request_routing_stats_period_s=0.2,
        ),
    )
    class Dummy:
        """Reports whatever cache and queue the test put in ``control`` for this replica."""

        def __init__(self, control) -> None:
            from router.replica_stats import ReplicaCacheTracker

            self.control = control
            self.rid = serve.get_replica_context().replica_id.unique_id
            self.tracker = ReplicaCacheTracker(BS)
            control.register.remote(name, self.rid)

        async def record_routing_stats(self) -> dict:
            cached, waiting = await self.control.get.remote(self.rid)
            self.tracker.apply_events(
                [BlockEvent("cleared", []), BlockEvent("stored", list(cached))]
            )
            return self.tracker.routing_stats(EngineStats(waiting, 0, 100, 100, 0, 0, 0, 0, 0))

        async def generate(self, req: dict) -> str:
            await asyncio.sleep(req.get("sleep_s", 0))
            return self.rid

    return Dummy.bind(control)


@pytest.fixture(scope="module")
def control(ray_session):
    import cloudpickle
    import ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote(num_cpus=0)
    class Control:
        def __init__(self) -> None:
            self.ids: dict[str, list[str]] = {}
            self.state: dict[str, tuple[list[int], int]] = {}

        def register(self, app: str, rid: str) -> None:
            self.ids.setdefault(app, []).append(rid)

        def replica_ids(self, app: str) -> list[str]:
            return sorted(self.ids.get(app, []))

        def set(self, rid: str, cached: list[int], waiting: int) -> None:
            self.state[rid] = (cached, waiting)

        def get(self, rid: str) -> tuple[list[int], int]:
            return self.state.get(rid, ([], 0))

    return Control.remote()


def _deploy(control, name: str, **kwargs):
    import ray
    from ray import serve

    handle = serve.run(_app(control, name, **kwargs), name=name, route_prefix=None)
    deadline = time.time() + 60
    while True:
        ids = ray.get(control.replica_ids.remote(name))
        if len(ids) == 2:
            return handle, ids
        assert time.time() < deadline, "replicas did not register"
        time.sleep(0.1)


def _send(handle, hashes: list[int]) -> str:
    return handle.generate.remote({"block_hashes": hashes, "prompt_token_ids": []}).result(
        timeout_s=30
    )


def _wait_for(pred, what: str, timeout_s: float = 30.0, times: int = 6) -> None:
    """Until ``pred()`` holds ``times`` times in a row (a cold request lands right by chance)."""
    deadline = time.time() + timeout_s
    run = 0
    while run < times:
        run = run + 1 if pred() else 0
        assert time.time() < deadline, f"timed out waiting for {what}"
        if run == 0:
            time.sleep(0.2)


def test_shared_prefix_goes_to_replica_reporting_it_and_overload_is_skipped(control):
    import ray
    from ray import serve

    # assumed_ttl_s=0: only the replicas' reports steer (the router's own bookings don't linger).
    handle, (a, b) = _deploy(control, "router_dummy", assumed_ttl_s=0, imbalance=8)
    try:
        g1, g2 = _hashes(1, 0)[:4], _hashes(2, 0)[:4]
        ray.get([control.set.remote(a, g1, 0), control.set.remote(b, g2, 0)])
        # Wait until the router has seen both reports.
        # Two sends per group: before any report, cold requests alternate a, b, a, b, which
        # would satisfy a one-send-per-group probe by chance.
        _wait_for(
            lambda: (
                [_send(handle, _hashes(1, 99)) for _ in range(2)] == [a, a]
                and [_send(handle, _hashes(2, 99)) for _ in range(2)] == [b, b]
            ),
            "routing stats to reach the router",
        )
        # Group 1 prompts all go to a, group 2 prompts all to b (unique last blocks differ).
        assert [_send(handle, _hashes(1, q)) for q in range(10)] == [a] * 10
        assert [_send(handle, _hashes(2, q)) for q in range(10)] == [b] * 10

        # a now reports a queue of 20 (> b's 0 + imbalance 8): group 1 goes to b instead.
        ray.get(control.set.remote(a, g1, 20))
        _wait_for(lambda: _send(handle, _hashes(1, 98)) == b, "the overload report")
        assert [_send(handle, _hashes(1, q)) for q in range(10)] == [b] * 10
        # Within the imbalance again: affinity returns.
        ray.get(control.set.remote(a, g1, 3))
        _wait_for(lambda: _send(handle, _hashes(1, 97)) == a, "the recovery report")
        assert [_send(handle, _hashes(1, q)) for q in range(5)] == [a] * 5
    finally:
        serve.delete("router_dummy")


def _decision_counts(handle) -> dict[str, int]:
    # The router lives inside this process's handle; reach it through Serve's internals (test only).
    return dict(handle._router._asyncio_router.request_router.decisions.counts)


def test_full_replica_falls_back_to_next_rank_and_decisions_are_counted(control):
    import ray
    from ray import serve

    handle, (a, b) = _deploy(
        control, "router_full", max_ongoing_requests=1, assumed_ttl_s=0, imbalance=100
    )
    try:
        g1 = _hashes(1, 0)[:4]
        ray.get([control.set.remote(a, g1, 0), control.set.remote(b, [], 0)])
        _wait_for(lambda: _send(handle, _hashes(1, 99)) == a, "routing stats to reach the router")
        before = _decision_counts(handle)
        # a holds the prefix but is busy with its one allowed request: Ray takes the next rank.
        slow = handle.generate.remote({"block_hashes": _hashes(1, 1), "sleep_s": 3.0})
        time.sleep(0.5)
        assert _send(handle, _hashes(1, 2)) == b
        assert slow.result(timeout_s=30) == a
        after = _decision_counts(handle)
        assert after.get("affinity", 0) - before.get("affinity", 0) == 1
        assert after.get("fallback", 0) - before.get("fallback", 0) == 1
    finally:
        serve.delete("router_full")


def test_a_call_naming_its_replica_goes_there_and_is_not_a_routing_decision(control):
    from ray import serve

    handle, (a, b) = _deploy(control, "router_target", assumed_ttl_s=0)
    try:
        assert handle.generate.remote({"target_replica": b}).result(timeout_s=30) == b
        before = _decision_counts(handle)
        for target in [a, b, b, a, b, a]:
            got = handle.generate.remote({"target_replica": target}).result(timeout_s=30)
            assert got == target
        assert _decision_counts(handle) == before  # output channels are not requests
        # A replica that is gone: the call still lands (on another one), never hangs.
        got = handle.generate.remote({"target_replica": "gone"}).result(timeout_s=30)
        assert got in (a, b)
    finally:
        serve.delete("router_target")


def test_ray_prefix_affinity_router_on_fleetlm_calls(control):
    """Ray's PrefixCacheAffinityRouter, given fleetlm's call dicts: a prompt goes where its
    prefix went (Ray's text tree), a new prefix to the replica with the fewest characters in the
    tree, and an output-channel call to the replica it names, outside the tree."""
    import ray
    from ray import serve

    handle, (a, b) = _deploy(
        control, "router_ray", router_class="deployments.ray_prefix_router:RayPrefixAffinityRouter"
    )
    try:

        def send(prefix: int, question: int) -> str:
            ids = [prefix] * 64 + [question] * 16
            return handle.generate.remote({"prompt_token_ids": ids}).result(timeout_s=30)

        first = send(1, 0)
        assert [send(1, q) for q in range(1, 8)] == [first] * 7
        other = b if first == a else a
        second = send(2, 0)  # the other replica holds no characters yet: it is the smallest
        assert second == other
        assert [send(2, q) for q in range(1, 8)] == [other] * 7
        for target in [a, b, b, a]:
            got = handle.generate.remote({"target_replica": target}).result(timeout_s=30)
            assert got == target
        assert [send(1, q) for q in range(8, 12)] == [first] * 4
    finally:
        serve.delete("router_ray")
        # Ray's tree actor is detached (Serve kills it only on shutdown): drop it with the app.
        try:
            ray.kill(ray.get_actor("LlmPrefixTreeActor", namespace="serve::router_ray::Dummy"))
        except ValueError:
            pass


def test_ray_prefix_affinity_config_and_prompt_text():
    from cluster.config import ClusterConfig
    from deployments.app import RAY_ROUTER_CLASS, router_config
    from deployments.ray_prefix_router import routing_text

    def rc(**router):
        cfg = ClusterConfig.model_validate({"models": [{"name": "m"}], "router": router})
        return router_config(cfg, cfg.models[0])

    c = rc(policy="ray_prefix_affinity")
    assert c.request_router_class == RAY_ROUTER_CLASS and c.request_router_kwargs == {}
    c = rc(policy="ray_prefix_affinity", ray_imbalanced_threshold=8)
    assert c.request_router_kwargs == {"imbalanced_threshold": 8}
    assert rc(policy="prefix_aware").request_router_kwargs["imbalance"] == 32
    # One character per token, distinct ids to distinct characters (none a surrogate), so text
    # prefixes are token prefixes.
    ids = [0, 1, 2, 0xD800 - 0x4E00 - 1, 0xD800 - 0x4E00, 0xD800 - 0x4E00 + 1, 150_000]
    text = routing_text(ids)
    assert len(text) == len(ids) == len(set(text))
    assert not any(0xD800 <= ord(c) < 0xE000 for c in text)
    assert routing_text(ids[:3]) == text[:3]
    assert text.encode("utf-8")  # encodable: no lone surrogates
