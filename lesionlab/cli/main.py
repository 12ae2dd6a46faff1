"""Command line entry point: argument parsing only; every command calls library functions.

Each module below registers its sub-commands with `registry.command`; importing it is what adds them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from lesionlab import __version__
from lesionlab.cli import (  # noqa: F401  (each registers its sub-commands)
    commands,
    cross_site,  # noqa: F401  (lesionlab cross-site)
    datasets,  # noqa: F401  (lesionlab datasets)
    model_card,  # noqa: F401  (lesionlab model-card)
    reader_study,
    service,
)
from lesionlab.cli.registry import COMMANDS
from lesionlab.exceptions import UserError


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(
        prog="lesionlab",
        description="LesionLab: dermoscopy lesion classification. Decision support for clinicians, not a diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"lesionlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners = {}
    for name, (add, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        runners[name] = add(sp)
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(runners[args.command](args) or 0)
    except UserError as e:
        print(f"lesionlab {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lesionlab {args.command}: interrupted", file=sys.stderr)
        return 130


