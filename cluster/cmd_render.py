"""`fleetlm render serve-config [-c FILE]`: print the Serve config for `serve deploy` / KubeRay.

Other renderers (e.g. `render k8s`) join the `render` group through a module listed in
RENDER_MODULES exposing ``register_render(render_subparsers)`` (or ``add_parser``); a missing module
is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import yaml

from cluster.cli import CLIError
from cluster.config import ClusterConfig, default_config, load_cluster_config
from cluster.serve_config import render_serve_config

RENDER_MODULES = ["cluster.cmd_render_k8s"]


def register(sub: argparse._SubParsersAction) -> None:
    render = sub.add_parser("render", help="print deployable config rendered from a cluster YAML")
    rsub = render.add_subparsers(dest="render_what", metavar="WHAT")
    sc = rsub.add_parser(
        "serve-config", help="Ray Serve config YAML (serve deploy, KubeRay serveConfigV2)"
    )
    sc.add_argument("-c", "--config", help="cluster YAML (default: the demo model)")
    sc.add_argument("--model", help="one local HF model folder with defaults, instead of -c")
    sc.add_argument("--host", help="HTTP bind address to render (e.g. 0.0.0.0 in a pod)")
    sc.add_argument("--port", type=int, help="HTTP port to render")
    sc.add_argument("-o", "--output", help="write to this file instead of stdout")
    sc.set_defaults(func=cmd_render_serve_config)
    render.set_defaults(func=lambda args: (render.print_help(), 2)[1])
    for name in RENDER_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        hook = getattr(mod, "register_render", None) or getattr(mod, "add_parser", None)
        if hook is not None:
            hook(rsub)


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    if getattr(args, "config", None) and getattr(args, "model", None):
        raise CLIError("give -c/--config or --model, not both")
    if getattr(args, "config", None):
        return load_cluster_config(args.config)
    return default_config(getattr(args, "model", None) or "demo")


def dump_yaml(data: object, output: str | None) -> None:
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)


def cmd_render_serve_config(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    dump_yaml(render_serve_config(cfg, host=args.host, port=args.port), args.output)
    return 0
