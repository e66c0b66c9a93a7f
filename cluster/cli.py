"""`fleetlm` command line. Each command group lives in its own module exposing
``register(subparsers)``; a registered parser sets ``func(args) -> int`` via ``set_defaults``."""

from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetlm",
        description="fleetlm: serve open LLMs on Ray Serve behind an OpenAI-compatible API.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Imported here, not at the top: each command module imports CLIError from this one.
    from cluster import (
        cmd_bench,  # bench
        cmd_dashboards,  # dashboards export/push
        cmd_generate,  # generate (offline, engine only)
        cmd_model,  # model build
        cmd_policy,  # policy show/apply/history/simulate
        cmd_render,  # render serve-config, render k8s
        cmd_serve,  # up, down, status
    )

    # In --help order.
    for module in (
        cmd_serve,
        cmd_render,
        cmd_generate,
        cmd_bench,
        cmd_policy,
        cmd_dashboards,
        cmd_model,
    ):
        module.register(sub)
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
