"""`fleetlm render k8s -c cluster.yaml [--profile cpu-demo|gpu] [--out DIR] [--base-out DIR]`.

Without --out, prints every manifest (what ``kustomize build`` of the overlay yields) to stdout.
With --out, writes the kustomize overlay files there; --base-out writes ``k8s/base``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.k8s_render import PROFILES

# Hand-edited after the first render (your cloud's GPU node labels and taints): kept if present.
KEEP_IF_PRESENT = frozenset({"gpu-nodes-patch.yaml"})


def write_files(out_dir: Path, files: dict[str, str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rel, text in sorted(files.items()):
        path = out_dir / rel
        if rel in KEEP_IF_PRESENT and path.exists():
            continue
        path.write_text(text)
        paths.append(path)
    return paths


def _cmd(args: argparse.Namespace) -> int:
    from cluster.cli import CLIError
    from cluster.config import load_cluster_config
    from cluster.k8s_render import (
        API_KEY_SECRET,
        api_key_env_names,
        dump_stream,
        render_base,
        render_manifests,
        render_overlay,
    )

    if args.config is None and args.base_out is None:
        raise CLIError("-c/--config: required (unless only --base-out is given)")
    if args.base_out:
        for p in write_files(Path(args.base_out), render_base()):
            print(p, file=sys.stderr)
    if args.config is None:
        return 0
    cfg = load_cluster_config(args.config)
    try:
        if args.out:
            files = render_overlay(cfg, args.profile, source=args.config)
            for p in write_files(Path(args.out), files):
                print(p, file=sys.stderr)
        else:
            sys.stdout.write(dump_stream(render_manifests(cfg, args.profile)))
            keys = api_key_env_names(cfg)
            if keys:
                lits = " ".join(f"--from-literal={k}=YOUR_KEY" for k in keys)
                print(
                    f"note: create the API-key Secret first: kubectl create secret generic "
                    f"{API_KEY_SECRET} {lits}",
                    file=sys.stderr,
                )
    except ValueError as e:
        raise CLIError(f"{args.config}: {e}") from e
    return 0


def add_parser(render_sub: argparse._SubParsersAction) -> None:
    """Add `k8s` to the `render` group (cluster/cmd_render.py calls this)."""
    p = render_sub.add_parser(
        "k8s", help="KubeRay manifests (kustomize overlay) from a cluster file"
    )
    p.add_argument("-c", "--config", help="cluster YAML")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu-demo")
    p.add_argument("--out", help="write the kustomize overlay into DIR (default: print manifests)")
    p.add_argument("--base-out", help="also write k8s/base (dashboards ConfigMap, PodMonitor)")
    p.set_defaults(func=_cmd)
