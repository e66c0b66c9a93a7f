"""Render a ClusterConfig as a Ray Serve config (for `serve deploy` and KubeRay's serveConfigV2).

One application whose builder, ``deployments.app:app_builder``, receives the whole cluster
description as ``args: {"cluster": {...}}`` and builds the ingress plus one LLM deployment per
model. Deployment overrides carry only what Serve changes without restarting replicas
(``num_replicas`` of fixed-size models), so an operator editing the replica count in the rendered
file gets a rescale, not a reload. Autoscaled models keep their ``autoscaling_config`` (with the
fleetlm policy) in code: Serve replaces an overridden ``autoscaling_config`` whole, which would drop
the policy. ``args`` holds only the fields the cluster file set (the builder fills in defaults), so
the rendered file stays readable.
"""

from __future__ import annotations

from typing import Any

from cluster.config import ClusterConfig
from deployments.names import server_name

APP_NAME = "fleetlm"
IMPORT_PATH = "deployments.app:app_builder"


def render_serve_config(
    cfg: ClusterConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    app_name: str = APP_NAME,
) -> dict[str, Any]:
    """A plain dict that validates as ``ray.serve.schema.ServeDeploySchema``.

    host/port override ``cfg.http`` (e.g. 0.0.0.0 inside a Kubernetes pod). API keys stay as written
    (sha256 digests or env variable names, never the keys), so the rendered file is safe to commit.
    """
    deployments: list[dict[str, Any]] = []
    for m in cfg.models:
        if m.autoscaling is None:
            name = server_name(m.name)
            deployments.append({"name": name, "num_replicas": m.num_replicas})
    app: dict[str, Any] = {
        "name": app_name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": {"cluster": cfg.model_dump(mode="json", exclude_unset=True)},
    }
    if deployments:
        app["deployments"] = deployments
    return {
        "proxy_location": "EveryNode",
        "http_options": {
            "host": host if host is not None else cfg.http.host,
            "port": port if port is not None else cfg.http.port,
        },
        "applications": [app],
    }
