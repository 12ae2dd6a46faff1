"""`lesionlab model-card`: argument parsing only (lesionlab.workflows.model_card does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionlab.cli.registry import command


@command("model-card", "the model card of a study (and its bundle): Markdown, HTML and JSON, following TRIPOD+AI")
def _model_card(p: argparse.ArgumentParser):
    p.add_argument("--study", type=Path, required=True, help="the folder `lesionlab study --out` wrote")
    p.add_argument("--bundle", type=Path, help="a bundle made from the study (adds its members and threshold)")
    p.add_argument("--cross-site", type=Path,
                   help="the folder `lesionlab cross-site` wrote (default: STUDY/cross_site when present)")
    p.add_argument("--out", type=Path, required=True, help="folder for model_card.md, .html and .json")

    def run(a: argparse.Namespace) -> int:
        import json

        from lesionlab.workflows.model_card import write_model_card

        written = write_model_card(a.study, a.out, bundle=a.bundle, cross_site=a.cross_site)
        card = json.loads(written["model_card.json"].read_text())
        print(f"wrote {', '.join(str(p) for p in written.values())}")
        if card["licences"]["warning"]:
            print(card["licences"]["warning"])
        return 0

    return run
