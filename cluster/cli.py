"""`fleetlm` command line. Each command group lives in its own module exposing
``register(subparsers)``; a registered parser sets ``func(args) -> int`` via ``set_defaults``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules contributing subcommands, in --help order (imported when the parser is built: they import
# this module's CLIError).
COMMAND_MODULES = [
    "cluster.cmd_serve",  # up, down, status
    "cluster.cmd_render",  # render serve-config, render k8s
    "cluster.cmd_generate",  # generate (offline, engine only)
    "cluster.cmd_bench",  # bench
    "cluster.cmd_policy",  # policy show/apply/history/simulate
    "cluster.cmd_dashboards",  # dashboards export/push
    "cluster.cmd_model",  # model build
]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetlm",
        description="fleetlm: serve open LLMs on Ray Serve behind an OpenAI-compatible API.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"fleetlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
