"""A live policy edit survives `fleetlm down` / `up`: `fleetlm policy apply` also writes the applied
record to ``$FLEETLM_STATE_DIR/policy.json``, and `fleetlm up` puts it back into the new Ray
cluster's KV store, saying in one line which policy runs and where it came from.

The live policy itself lives in Ray's KV store (deployments/autoscaling_policy.py), which a new
head starts empty; without this file an operator's edit would be silently lost on restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.state import state_dir


def policy_path() -> Path:
    return state_dir() / "policy.json"


def remember(record: dict[str, Any]) -> Path:
    """Keep the record `policy apply` stored (version, applied_at, source, policy)."""
    p = policy_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(p)
    return p


def recalled() -> dict[str, Any] | None:
    try:
        rec = json.loads(policy_path().read_text())
    except (FileNotFoundError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "policy" in rec else None


def restore(
    get_live: Callable[[], dict[str, Any] | None],
    put: Callable[[dict[str, Any], str], dict[str, Any]],
) -> str:
    """Make the remembered policy live when the cluster has none; returns the line `up` prints.

    get_live: the cluster's live record or None; put(policy dict, source) stores one."""
    live = get_live()
    if live is not None:
        return (
            f"autoscaling policy: v{live['version']} from {live['source']} "
            "(already live in this Ray cluster)"
        )
    rec = recalled()
    if rec is None:
        return (
            "autoscaling policy: built-in defaults (no `fleetlm policy apply` recorded in "
            f"{policy_path()})"
        )
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("applied_at", 0)))
    put(rec["policy"], str(rec.get("source", "?")))
    return (
        f"autoscaling policy: restored the one applied {when} from {rec.get('source')} "
        f"(kept in {policy_path()}; `fleetlm policy show` prints it)"
    )


def restore_live() -> str:
    """restore() against the connected Ray cluster's policy store."""
    from autoscaling.policy_file import Policy
    from deployments.autoscaling_policy import get_policy_record, put_policy

    return restore(
        get_policy_record, lambda d, source: put_policy(Policy.from_dict(d, source), source)
    )
