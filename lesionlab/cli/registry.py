"""The sub-command registry and the argument groups several commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register `add_args(parser)` + `run(args)` for a sub-command (a registry, not if/elif)."""

    def deco(fn):
        COMMANDS[name] = (fn, help)
        return fn

    return deco


def _data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", type=Path, required=required, help="dataset folder (images anywhere below it)")
    p.add_argument("--metadata", type=Path, help="HAM10000 metadata CSV or ISIC ground-truth CSV (default: found in --data)")
    p.add_argument("--groupings", type=Path, help="ISIC lesion groupings CSV (image, lesion_id)")
    p.add_argument("--skip-invalid", action="store_true", help="leave out invalid rows/images (listed in a CSV) instead of stopping")


def _config_args(p: argparse.ArgumentParser, default: str | None = "paper") -> None:
    p.add_argument("--config", default=default, help="YAML config path or a shipped name: paper, demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")


