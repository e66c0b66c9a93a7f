"""build_app(cfg): the Serve application — one OpenAIIngress + one LLMServer deployment per model.

``app_builder(args)`` is the import path for Serve config files and KubeRay's ``serveConfigV2``
(``import_path: deployments.app:app_builder``, ``args: {"cluster": <cluster config dict>}``).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.config import ClusterConfig, ModelConfig
from deployments.autoscaling_policy import GRACEFUL_SHUTDOWN_OPTIONS, serve_autoscaling_config
from deployments.ingress import OpenAIIngress
from deployments.llm_server import LLMServer
from deployments.names import INGRESS_NAME, server_name

ROUTER_CLASS = "deployments.request_router:PrefixAwareRouter"
RAY_ROUTER_CLASS = "deployments.ray_prefix_router:RayPrefixAffinityRouter"  # comparison peer
# Ongoing streams one ingress replica holds; each costs a coroutine, not a thread.
INGRESS_MAX_ONGOING = 2048
CHANNEL_SLOTS = 4  # per model replica: room for the ingress replicas' output channels


def router_config(cfg: ClusterConfig, mc: ModelConfig) -> RequestRouterConfig:
    r = cfg.router
    if r.policy == "ray_prefix_affinity":
        kwargs = {}
        if r.ray_imbalanced_threshold is not None:
            kwargs["imbalanced_threshold"] = r.ray_imbalanced_threshold
        return RequestRouterConfig(
            request_router_class=RAY_ROUTER_CLASS,
            request_router_kwargs=kwargs,
            request_routing_stats_period_s=r.stats_period_s,
        )
    return RequestRouterConfig(
        request_router_class=ROUTER_CLASS,
        request_router_kwargs=router_kwargs(cfg, mc),
        request_routing_stats_period_s=r.stats_period_s,
    )


def router_kwargs(cfg: ClusterConfig, mc: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"policy": cfg.router.policy, "model": mc.name}
    if cfg.router.policy == "prefix_aware":
        kwargs["imbalance"] = cfg.router.imbalance
    return kwargs


def max_replicas(mc: ModelConfig) -> int:
    return mc.autoscaling.max_replicas if mc.autoscaling is not None else mc.initial_replicas()


def server_options(cfg: ClusterConfig, mc: ModelConfig) -> dict[str, Any]:
    """Serve deployment options of one model's LLMServer."""
    ec = mc.engine_config()
    res = mc.resources_per_replica
    opts: dict[str, Any] = {
        "name": server_name(mc.name),
        # Serve sends a replica at most what its engine runs plus its queue. Requests beyond wait
        # at the caller (the ingress), up to one queue's worth per replica, then get a 429 with
        # Retry-After. Serve counts requests still being routed as queued too, so the caller
        # queue must absorb a burst, not only overflow.
        # (+ CHANNEL_SLOTS: the ingresses' output channels are calls too.)
        "max_ongoing_requests": ec.max_num_seqs + mc.max_queued_requests + CHANNEL_SLOTS,
        "max_queued_requests": mc.max_queued_requests * max_replicas(mc),
        # Drain on scale-down / redeploy: the autoscaling module owns what its scale-down needs.
        **GRACEFUL_SHUTDOWN_OPTIONS,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60.0,  # a step on a busy CPU can hold the loop a while
    }
    tp = mc.tensor_parallel_size
    if tp > 1:
        # One bundle per shard; the replica actor (shard 0) sits in the first one.
        per = {"CPU": res.num_cpus / tp}
        if res.num_gpus:
            per["GPU"] = res.num_gpus / tp
        opts["placement_group_bundles"] = [dict(per) for _ in range(tp)]
        opts["placement_group_strategy"] = mc.placement_strategy
        opts["ray_actor_options"] = {
            "num_cpus": per["CPU"],
            "num_gpus": per.get("GPU", 0.0),
        }
    else:
        opts["ray_actor_options"] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if mc.autoscaling is None:
        opts["num_replicas"] = mc.num_replicas
    else:
        a = mc.autoscaling
        opts["autoscaling_config"] = serve_autoscaling_config(
            mc.name, a.min_replicas, a.max_replicas, mc.initial_replicas()
        )
    opts["request_router_config"] = router_config(cfg, mc)
    return opts


def build_app(cfg: ClusterConfig) -> serve.Application:
    servers = {}
    for mc in cfg.models:
        opts = server_options(cfg, mc)
        if mc.tensor_parallel_size > 1:  # more shards than the cluster can place: refuse now
            from deployments.tp_worker import check_placeable

            check_placeable(mc.name, opts)
        dep = serve.deployment(LLMServer).options(**opts)
        servers[mc.name] = dep.bind(mc.model_dump(mode="json"))
    ingress = serve.deployment(OpenAIIngress).options(
        name=INGRESS_NAME,
        num_replicas=cfg.http.ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        # The ingress is I/O bound; it must not take a CPU slot a model replica needs.
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(cfg.model_dump(mode="json"), servers)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve config entry point: ``args = {"cluster": <ClusterConfig as a dict>}``."""
    if not isinstance(args, dict) or "cluster" not in args:
        raise ValueError("args: expected {'cluster': <cluster config mapping>}")
    return build_app(ClusterConfig.model_validate(args["cluster"]))
