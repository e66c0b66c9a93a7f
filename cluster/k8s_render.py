"""Render KubeRay manifests from a ClusterConfig: one source of truth for local and Kubernetes.

``render_overlay(cfg, profile)`` returns the files of a kustomize overlay
(``k8s/overlays/<profile>``): a RayService whose ``serveConfigV2`` is ``render_serve_config(cfg)``
(HTTP on 0.0.0.0:8000), worker groups sized from the models' replica resources, and (gpu) the
node-placement patch, models volume and API-key Secret generator. ``render_base()`` returns
``k8s/base`` (the Grafana dashboards ConfigMap and the PodMonitor), which does not depend on the
cluster file. ``render_manifests`` returns what ``kustomize build`` of that overlay yields, as
objects, for ``kubectl apply -f -``.

Decisions (also in k8s/README.md):
- upgradeStrategy: cpu-demo ``NewCluster`` (zero-downtime; a second CPU cluster is cheap); gpu
  ``None``: GPU clusters rarely fit two copies, so KubeRay must not start a second cluster on a
  rayClusterConfig change. serveConfigV2 edits still apply in place (Serve rolls replicas itself).
- The Service on port 8000 is KubeRay's ``spec.serveService``: KubeRay keeps its selector on the
  active cluster's ready serve pods across upgrades, which a hand-written Service cannot.
- Head pod: ``num-cpus: 0`` so model replicas never land there; the ingress (0 CPUs) and the Serve
  proxy do. One replica per worker pod: pod resources = one replica's resources.
- Node selectors/tolerations are a JSON6902 patch: kustomize replaces CRD lists whole in strategic
  merges (it knows no merge keys for workerGroupSpecs), so a path-addressed patch is the safe form.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import yaml

from cluster.config import ClusterConfig
from cluster.k8s_base import (
    APP_LABEL,
    METRICS_PORT,
    dump_stream,
    dump_yaml,
    render_base,
    render_base_objects,
)
from cluster.ray_runtime import serving_env
from cluster.serve_config import render_serve_config

NAME = "fleetlm"
IMAGE = "fleetlm"  # kustomize `images:` rewrites it; tag set there too
RAY_VERSION = "2.60.0"
SERVE_PORT = 8000
API_KEY_SECRET = "fleetlm-api-keys"
MODELS_PVC = "fleetlm-models"
MODELS_DIR = "/models"

__all__ = [
    "PROFILES",
    "Profile",
    "dump_stream",
    "dump_yaml",
    "render_base",
    "render_manifests",
    "render_overlay",
]


@dataclass(frozen=True)
class Profile:
    """What differs between the two overlays."""

    name: str
    upgrade_strategy: str
    image_tag: str
    head_cpu: str
    head_memory: str
    worker_memory: str
    idle_timeout_s: int
    gpu: bool


PROFILES = {
    "cpu-demo": Profile("cpu-demo", "NewCluster", "0.1.0-cpu", "2", "4Gi", "4Gi", 60, False),
    "gpu": Profile("gpu", "None", "0.1.0-gpu", "4", "16Gi", "48Gi", 300, True),
}

# Probes as KubeRay injects them for Ray >= 2.53 (we write them out so they are reviewed and
# versioned with the rest). Ray's health endpoints are exempt from token auth.
AGENT_PORT = 52365  # dashboard agent: /api/healthz checks the raylet, and on the head the GCS too
_RAYLET = f"wget -T 2 -q -O- http://localhost:{AGENT_PORT}/api/local_raylet_healthz | grep success"
_SERVE = f"wget -T 2 -q -O- http://localhost:{SERVE_PORT}/-/healthz | grep success"


def _http_probe(delay_s: int, timeout_s: int, failure_threshold: int) -> dict:
    return {
        "httpGet": {"path": "/api/healthz", "port": AGENT_PORT},
        "initialDelaySeconds": delay_s,
        "periodSeconds": 5,
        "timeoutSeconds": timeout_s,
        "failureThreshold": failure_threshold,
    }


def _serve_readiness() -> dict:
    # A worker takes traffic only while its Serve proxy is healthy; one failure removes it from
    # the serve Service at once (KubeRay checks the head's proxy itself, not by probe).
    return {
        "exec": {"command": ["bash", "-c", f"{_RAYLET} && {_SERVE}"]},
        "initialDelaySeconds": 10,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 1,
    }


def _container(name: str, cpu: str, memory: str, gpus: int, head: bool, env: list) -> dict:
    ports = [{"containerPort": METRICS_PORT, "name": "metrics"}]
    if head:
        ports = [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": SERVE_PORT, "name": "serve"},
            *ports,
        ]
    else:
        ports.insert(0, {"containerPort": SERVE_PORT, "name": "serve"})
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    c: dict[str, Any] = {
        "name": name,
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "ports": ports,
        # Ray sizes itself from the limits; requests = limits gives the pod Guaranteed QoS.
        "resources": {"requests": dict(limits), "limits": limits},
        "env": env,
        # A replica still loading its model keeps the raylet healthy: liveness only watches Ray.
        "livenessProbe": _http_probe(30, 5 if head else 2, 120),
        # Ready: head = raylet + GCS up; worker = raylet up and its Serve proxy healthy.
        "readinessProbe": _http_probe(10, 5, 10) if head else _serve_readiness(),
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }
    return c


def _env(cfg: ClusterConfig) -> list[dict]:
    env: list[dict] = [
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        # Workers at nice 0 (Ray's default is 15; the replicas are the workload here) and Serve's
        # proxy talking gRPC to the replicas (cluster/ray_runtime.py).
        *({"name": k, "value": v} for k, v in serving_env().items()),
    ]
    for key in cfg.api_keys:
        if key.env is not None:
            ref = {"name": API_KEY_SECRET, "key": key.env}
            env.append({"name": key.env, "valueFrom": {"secretKeyRef": ref}})
    return env


def _pod(container: dict, profile: Profile) -> dict:
    spec: dict[str, Any] = {"containers": [container]}
    if profile.gpu:
        container["volumeMounts"] = [{"name": "models", "mountPath": MODELS_DIR, "readOnly": True}]
        spec["volumes"] = [
            {"name": "models", "persistentVolumeClaim": {"claimName": MODELS_PVC, "readOnly": True}}
        ]
    return {"metadata": {"labels": {"app.kubernetes.io/name": APP_LABEL}}, "spec": spec}


def _worker_group(cfg: ClusterConfig, profile: Profile, env: list) -> dict:
    # One replica per pod: the pod offers the largest replica's resources.
    cpus = max(1, max(math.ceil(m.resources_per_replica.num_cpus) for m in cfg.models))
    gpus = max(math.ceil(m.resources_per_replica.num_gpus) for m in cfg.models)
    if profile.gpu and gpus == 0:
        raise ValueError("resources_per_replica.num_gpus: the gpu profile needs num_gpus >= 1")
    if not profile.gpu and gpus:
        raise ValueError("resources_per_replica.num_gpus: the cpu-demo profile has no GPUs")
    lo = sum(
        m.autoscaling.min_replicas if m.autoscaling else m.initial_replicas() for m in cfg.models
    )
    hi = sum(
        m.autoscaling.max_replicas if m.autoscaling else m.initial_replicas() for m in cfg.models
    )
    group = "gpu" if profile.gpu else "cpu"
    container = _container("ray-worker", str(cpus), profile.worker_memory, gpus, False, env)
    return {
        "groupName": group,
        "replicas": lo,
        "minReplicas": lo,
        "maxReplicas": hi,
        "idleTimeoutSeconds": profile.idle_timeout_s,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": _pod(container, profile),
    }


def render_rayservice(cfg: ClusterConfig, profile: Profile) -> dict:
    serve_cfg = render_serve_config(cfg, host="0.0.0.0", port=SERVE_PORT)
    env = _env(cfg)
    head = _container("ray-head", profile.head_cpu, profile.head_memory, 0, True, env)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": APP_LABEL}},
        "spec": {
            "upgradeStrategy": {"type": profile.upgrade_strategy},
            "serveConfigV2": yaml.safe_dump(serve_cfg, sort_keys=False),
            "serveService": {
                "metadata": {
                    "name": f"{NAME}-serve",
                    "labels": {"app.kubernetes.io/name": APP_LABEL},
                },
                "spec": {"ports": [{"name": "serve", "port": SERVE_PORT, "targetPort": "serve"}]},
            },
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": profile.idle_timeout_s,
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "512Mi"},
                        "limits": {"cpu": "500m", "memory": "512Mi"},
                    },
                },
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    "rayStartParams": {
                        "num-cpus": "0",
                        "dashboard-host": "0.0.0.0",
                        "metrics-export-port": str(METRICS_PORT),
                    },
                    "template": _pod(head, profile),
                },
                "workerGroupSpecs": [_worker_group(cfg, profile, env)],
            },
        },
    }


def _gpu_node_patch() -> list[dict]:
    """JSON6902 ops placing GPU workers on GPU nodes (edit for your cloud's labels and taints)."""
    base = "/spec/rayClusterConfig/workerGroupSpecs/0/template/spec"
    return [
        {"op": "add", "path": f"{base}/nodeSelector", "value": {"nvidia.com/gpu.present": "true"}},
        {
            "op": "add",
            "path": f"{base}/tolerations",
            "value": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    ]


def _models_pvc() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": MODELS_PVC, "labels": {"app.kubernetes.io/name": APP_LABEL}},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "resources": {"requests": {"storage": "50Gi"}},
        },
    }


HEADER = (
    "# Generated from {src}; edit that file, then regenerate:\n"
    "#   fleetlm render k8s -c {src} --profile {profile} --out k8s/overlays/{profile}\n"
)
PATCH_HEADER = (
    "# Places GPU workers on GPU nodes: edit for your cloud's node labels and taints.\n"
    "# `fleetlm render k8s --out` writes this file only when it is absent.\n"
)


def render_overlay(cfg: ClusterConfig, profile_name: str, source: str = "cluster.yaml") -> dict:
    """Overlay files, relative path -> text, for ``k8s/overlays/<profile>``."""
    if profile_name not in PROFILES:
        raise ValueError(f"profile: unknown {profile_name!r}; choose one of {sorted(PROFILES)}")
    profile = PROFILES[profile_name]
    header = HEADER.format(src=source, profile=profile_name)
    files = {"rayservice.yaml": header + dump_yaml(render_rayservice(cfg, profile))}
    kust: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../base", "rayservice.yaml"],
        "images": [{"name": IMAGE, "newName": "fleetlm", "newTag": profile.image_tag}],
    }
    if profile.gpu:
        files["models-pvc.yaml"] = header + dump_yaml(_models_pvc())
        files["gpu-nodes-patch.yaml"] = PATCH_HEADER + dump_yaml(_gpu_node_patch())
        kust["resources"].append("models-pvc.yaml")
        kust["patches"] = [
            {"path": "gpu-nodes-patch.yaml", "target": {"kind": "RayService", "name": NAME}}
        ]
    env_keys = api_key_env_names(cfg)
    if env_keys:
        # The real file is git-ignored; the example shows its shape. Without it kustomize fails,
        # so nobody deploys with a default key.
        files["api-keys.env.example"] = "".join(
            f"{k}=replace-with-a-long-random-key\n" for k in env_keys
        )
        files[".gitignore"] = "api-keys.env\n"
        kust["secretGenerator"] = [{"name": API_KEY_SECRET, "envs": ["api-keys.env"]}]
        kust["generatorOptions"] = {"disableNameSuffixHash": True}
    files["kustomization.yaml"] = header + dump_yaml(kust)
    return files


def render_manifests(cfg: ClusterConfig, profile_name: str) -> list[dict]:
    """Every object ``kustomize build k8s/overlays/<profile>`` yields, for ``kubectl apply -f -``,
    except the API-key Secret: create that yourself (``api_key_env_names``), so no placeholder key
    is ever applied.
    """
    from cluster.k8s_kustomize import apply_json6902

    if profile_name not in PROFILES:
        raise ValueError(f"profile: unknown {profile_name!r}; choose one of {sorted(PROFILES)}")
    profile = PROFILES[profile_name]
    rs = render_rayservice(cfg, profile)
    if profile.gpu:
        rs = apply_json6902(rs, _gpu_node_patch())
    for c in _containers(rs):
        c["image"] = f"fleetlm:{profile.image_tag}"
    objs = [*render_base_objects(), rs]
    if profile.gpu:
        objs.append(_models_pvc())
    return json.loads(json.dumps(objs))


def api_key_env_names(cfg: ClusterConfig) -> list[str]:
    """Keys the ``fleetlm-api-keys`` Secret must hold (the cluster file's ``api_keys[].env``)."""
    return [k.env for k in cfg.api_keys if k.env is not None]


def _containers(rs: dict) -> list[dict]:
    rc = rs["spec"]["rayClusterConfig"]
    groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]
