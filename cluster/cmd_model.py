"""`fleetlm model build [demo|demo-small]`: build an embedded demo model, print its folder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="embedded demo models")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    build = model_sub.add_parser(
        "build",
        help="build an embedded demo model (once; cached under $FLEETLM_CACHE_DIR or "
        "~/.cache/fleetlm/models) and print its folder",
    )
    build.add_argument("name", nargs="?", default="demo", choices=["demo", "demo-small"])
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_build)
    model.set_defaults(func=lambda _args: model.print_help() or 2)


def cmd_build(args: argparse.Namespace) -> int:
    from engine.models.demo import resolve_model

    print(resolve_model(args.name, progress=not args.quiet))
    return 0
