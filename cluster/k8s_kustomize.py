"""The subset of ``kustomize build`` that k8s/ uses, to check overlays offline (no kubectl here).

Supported kustomization keys: resources (files or directories), patches (JSON6902 op lists with a
kind/name target), images (name -> newName/newTag), secretGenerator (envs/literals, with
``generatorOptions.disableNameSuffixHash: true``). Anything else is a ValueError, so an overlay that
grows a feature this subset ignores fails the tests instead of passing unchecked.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

_KEYS = {
    "apiVersion", "kind", "resources", "patches", "images", "secretGenerator", "generatorOptions",
}  # fmt: skip


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"patch path: must start with '/', got {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json6902(obj: dict, ops: list[dict]) -> dict:
    """A copy of ``obj`` with RFC 6902 ``add``/``replace``/``remove`` ops applied."""
    out = copy.deepcopy(obj)
    for op in ops:
        kind = op.get("op")
        parts = _pointer(op["path"])
        parent: Any = out
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[idx] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[idx]
            else:
                raise ValueError(f"patch op: unsupported {kind!r}")
        else:
            if kind in ("replace", "remove") and last not in parent:
                raise ValueError(f"patch path: {op['path']} does not exist")
            if kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            else:
                raise ValueError(f"patch op: unsupported {kind!r}")
    return out


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _env_file(path: Path) -> dict[str, str]:
    data = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            data[k] = v
    return data


def build(directory: str | Path, env_fallback_suffix: str | None = None) -> list[dict]:
    """Objects of ``kustomize build DIR``.

    ``env_fallback_suffix`` (e.g. ".example"): read ``FILE.example`` when a secretGenerator env
    file is absent (tests; real builds need the file).
    """
    d = Path(directory)
    kust = yaml.safe_load((d / "kustomization.yaml").read_text())
    unknown = set(kust) - _KEYS
    if unknown:
        raise ValueError(f"{d}/kustomization.yaml: unsupported keys {sorted(unknown)}")
    objs: list[dict] = []
    for res in kust.get("resources", []):
        p = d / res
        objs.extend(build(p, env_fallback_suffix) if p.is_dir() else _load_docs(p))
    if kust.get("secretGenerator"):
        if not kust.get("generatorOptions", {}).get("disableNameSuffixHash"):
            raise ValueError("generatorOptions.disableNameSuffixHash: must be true here")
        for gen in kust["secretGenerator"]:
            data: dict[str, str] = {}
            for env in gen.get("envs", []):
                p = d / env
                if not p.exists() and env_fallback_suffix:
                    p = d / (env + env_fallback_suffix)
                data.update(_env_file(p))
            for lit in gen.get("literals", []):
                k, _, v = lit.partition("=")
                data[k] = v
            objs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": gen["name"]},
                    "type": "Opaque",
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
                }
            )
    for patch in kust.get("patches", []):
        ops = yaml.safe_load((d / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise ValueError(
                f"{patch['path']}: only JSON6902 patches (a list of ops) are supported"
            )
        tgt = patch["target"]
        hits = [
            i
            for i, o in enumerate(objs)
            if o["kind"] == tgt["kind"] and o["metadata"]["name"] == tgt["name"]
        ]
        if len(hits) != 1:
            raise ValueError(f"{patch['path']}: target {tgt} matches {len(hits)} objects")
        objs[hits[0]] = apply_json6902(objs[hits[0]], ops)
    for img in kust.get("images", []):
        for o in objs:
            for c in _containers(o):
                name, _, _tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img['newTag']}"
    return objs


def _containers(obj: dict) -> list[dict]:
    """Containers of a RayService/RayCluster's head and worker groups (other kinds: none)."""
    spec = obj.get("spec", {})
    if obj.get("kind") == "RayService":
        spec = spec.get("rayClusterConfig", {})
    elif obj.get("kind") != "RayCluster":
        return []
    groups = [spec.get("headGroupSpec", {}), *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g.get("template", {}).get("spec", {}).get("containers", [])]
