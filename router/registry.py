"""Policy names as the cluster YAML spells them -> policy objects, with their parameters checked."""

from __future__ import annotations

import inspect
from typing import Any

from router.policy import Policy
from router.pow2 import Pow2Policy
from router.prefix_aware import PrefixAwarePolicy
from router.round_robin import RoundRobinPolicy
from router.session import SessionPolicy

POLICIES: dict[str, type] = {
    "prefix_aware": PrefixAwarePolicy,
    "pow2": Pow2Policy,
    "round_robin": RoundRobinPolicy,
    "session": SessionPolicy,
}
DEFAULT_POLICY = "prefix_aware"


def policy_params(name: str) -> list[str]:
    """The keyword parameters policy ``name`` accepts."""
    return [p for p in inspect.signature(_cls(name)).parameters if p != "self"]


def _cls(name: str) -> type:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"policy: unknown policy {name!r}; allowed: {sorted(POLICIES)}") from None


def make_policy(name: str = DEFAULT_POLICY, **params: Any) -> Policy:
    """Build policy ``name``; ValueError naming the parameter when one is unknown or invalid."""
    cls = _cls(name)
    allowed = policy_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"policy {name!r}: unknown parameter(s) {unknown}; allowed: {allowed}")
    return cls(**params)
