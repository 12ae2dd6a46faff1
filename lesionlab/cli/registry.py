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


class _DataAction(argparse.Action):
    """`--data` once gives a Path (as before); given again, the list of folders (several sources, each in its own
    layout: lesionlab.data.multi), which read_table and run_study accept."""

    def __call__(self, parser, namespace, values, option_string=None):
        prev = getattr(namespace, self.dest, None)
        if prev is None:
            setattr(namespace, self.dest, Path(values))
        else:
            setattr(namespace, self.dest, [*(prev if isinstance(prev, list) else [prev]), Path(values)])


def _data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", action=_DataAction, required=required,
                   help="dataset folder (images anywhere below it), in any layout `lesionlab datasets layouts` lists; "
                        "repeat for several sources")
    p.add_argument("--metadata", type=Path, help="HAM10000 metadata CSV or ISIC ground-truth CSV (default: found in --data)")
    p.add_argument("--groupings", type=Path, help="ISIC lesion groupings CSV (image, lesion_id)")
    p.add_argument("--skip-invalid", action="store_true", help="leave out invalid rows/images (listed in a CSV) instead of stopping")


def _config_args(p: argparse.ArgumentParser, default: str | None = "paper") -> None:
    p.add_argument("--config", default=default, help="YAML config path or a shipped name: paper, demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")


