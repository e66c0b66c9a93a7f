"""Deploying a fleetlm app on the session's Serve for a test module: the shared setup of the served
tests (deploy build_app(cluster), wait until the proxy routes to it, delete it afterwards)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx


@contextlib.contextmanager
def served_app(
    serve_url: str, cluster: dict[str, Any], name: str, prefix: str, timeout_s: float = 60.0
) -> Iterator[str]:
    """Deploy the cluster mapping as Serve app ``name`` at ``prefix``; yields its base URL once
    its /health answers (the proxy learns a new route shortly after serve.run returns)."""
    from ray import serve

    from cluster.config import ClusterConfig
    from deployments.app import build_app

    serve.run(build_app(ClusterConfig.model_validate(cluster)), name=name, route_prefix=prefix)
    base = serve_url + prefix
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"app {name}: ingress never became healthy"
        time.sleep(0.5)
    try:
        yield base
    finally:
        serve.delete(name)


def openai_client(base: str, api_key: str = "none", timeout: float = 120.0) -> Any:
    """The official client on the app, no retries (a test sees every error)."""
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0, timeout=timeout)
