"""Serve deployment names, in one place: the app builder names its deployments with them, the Serve
config renderer overrides deployments by them, and the autoscaling policy maps them back to models.
Ray-free, so the CLI imports it without starting anything."""

from __future__ import annotations

import re

INGRESS_NAME = "OpenAIIngress"
SERVER_PREFIX = "LLMServer-"


def server_name(model_name: str) -> str:
    """Deployment name of a model's replicas (Serve names can't hold '#'; keep them path-safe)."""
    return SERVER_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", model_name)


def model_of(deployment_name: str) -> str:
    """The (path-safe) model name of a replica deployment; other names unchanged."""
    if deployment_name.startswith(SERVER_PREFIX):
        return deployment_name[len(SERVER_PREFIX) :]
    return deployment_name
