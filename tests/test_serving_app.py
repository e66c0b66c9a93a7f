"""build_app's deployment options (no Ray started): names, capacity, drain, router, scaling, TP."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig
from deployments.app import CHANNEL_SLOTS, app_builder, server_options
from deployments.names import server_name


def _cfg(**model):
    base = {"name": "m", "model": "demo-small", "engine": {"max_num_seqs": 8}}
    return ClusterConfig.model_validate({"models": [{**base, **model}]})


def test_fixed_replicas_capacity_and_drain():
    cfg = _cfg(num_replicas=3, max_queued_requests=5)
    o = server_options(cfg, cfg.models[0])
    assert o["name"] == "LLMServer-m" and o["num_replicas"] == 3
    # Serve sends a replica what its engine runs plus its queue (and the ingresses' output
    # channels); the caller queues 5 per replica.
    assert o["max_ongoing_requests"] == 13 + CHANNEL_SLOTS and o["max_queued_requests"] == 15
    assert o["graceful_shutdown_timeout_s"] >= 60  # running generations get time to finish
    assert o["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_router_config_carries_the_policy():
    cfg = ClusterConfig.model_validate(
        {
            "models": [{"name": "m", "model": "demo-small"}],
            "router": {"policy": "prefix_aware", "imbalance": 3, "stats_period_s": 0.5},
        }
    )
    rc = server_options(cfg, cfg.models[0])["request_router_config"]
    assert rc.request_router_class == "deployments.request_router:PrefixAwareRouter"
    assert rc.request_router_kwargs == {"policy": "prefix_aware", "model": "m", "imbalance": 3}
    assert rc.request_routing_stats_period_s == 0.5


def test_autoscaling_bounds_reach_serve():
    cfg = _cfg(autoscaling={"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2})
    o = server_options(cfg, cfg.models[0])
    assert "num_replicas" not in o
    a = o["autoscaling_config"]
    assert (a["min_replicas"], a["max_replicas"], a["initial_replicas"]) == (1, 4, 2)
    assert o["max_queued_requests"] == 64 * 4  # the default queue per replica, at most replicas


def test_tensor_parallel_gets_one_bundle_per_shard():
    cfg = ClusterConfig.model_validate(
        {
            "models": [
                {
                    "name": "tp",
                    "model": "demo-small",
                    "tensor_parallel_size": 2,
                    "resources_per_replica": {"num_cpus": 2},
                }
            ]
        }
    )
    o = server_options(cfg, cfg.models[0])
    assert o["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert o["placement_group_strategy"] == "PACK"
    assert o["ray_actor_options"]["num_cpus"] == 1.0  # the replica sits in bundle 0


def test_deployment_names_are_path_safe():
    assert server_name("org/model:v1") == "LLMServer-org_model_v1"


def test_app_builder_validates_args():
    with pytest.raises(ValueError, match="cluster"):
        app_builder({})
    with pytest.raises(ValueError):
        app_builder({"cluster": {"models": []}})
