"""Where `fleetlm up` records the cluster it runs, so `status` and `down` in other shells find it.

One JSON file, ``$FLEETLM_STATE_DIR/cluster.json`` (default ``~/.cache/fleetlm/cluster.json``). It
holds addresses and process ids only, never keys or tokens.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


def state_dir() -> Path:
    d = os.environ.get("FLEETLM_STATE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "fleetlm"


@dataclass
class ClusterState:
    ray_address: str  # GCS address "HOST:PORT" the CLI connects to
    url: str  # Serve HTTP base URL clients use
    app_name: str
    head_pid: int | None  # `ray start --head --block` process we started; None: joined a cluster
    auth_mode: str  # RAY_AUTH_MODE to connect with ("token" or "disabled")
    address_file: str | None = None  # ray_current_cluster our head wrote (removed on `down`)
    models: list[str] = field(default_factory=list)
    config_path: str | None = None
    detached: bool = True
    started_at: float = field(default_factory=time.time)
    drain_timeout_s: float = 30.0  # http.drain_timeout_s: `down` drains this long at most


def state_path() -> Path:
    return state_dir() / "cluster.json"


def save_state(state: ClusterState) -> Path:
    p = state_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(p)  # atomic: a concurrent `status` never reads half a file
    return p


def load_state() -> ClusterState | None:
    p = state_path()
    try:
        data = json.loads(p.read_text())
        return ClusterState(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        return None  # a file from another version: treat as absent


def clear_state() -> None:
    try:
        state_path().unlink()
    except FileNotFoundError:
        pass
