"""`lesionlab model-card`: the model card of a study (and of a bundle made from it) written into a folder.

The facts come from `lesionlab.report.model_card_facts` (the study folder and the bundle's manifest), the renderings
from `lesionlab.report.model_card`; this module finds the bundle's manifest (verified, so the card describes the
files that will run) and writes the three files atomically.
"""

from __future__ import annotations

from pathlib import Path

from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write
from lesionlab.report.model_card import model_card_files


def write_model_card(study: str | Path, out_dir: str | Path, *, bundle: str | Path | None = None,
                     cross_site: str | Path | None = None) -> dict[str, Path]:
    """Write model_card.md, model_card.html and model_card.json into `out_dir`; returns file name -> path.

    Args:
        study: the folder `lesionlab study --out` wrote.
        bundle: a bundle folder made from that study (its manifest adds the members, threshold and inference
            settings that predict and serve run).
        cross_site: the folder `lesionlab cross-site` wrote (default: `<study>/cross_site` when present).
    """
    manifest = None
    if bundle is not None:
        from lesionlab.clinic.bundle import verify_bundle

        manifest = verify_bundle(bundle)
    if cross_site is not None and not Path(cross_site).is_dir():
        raise UserError(f"--cross-site {cross_site} is not a folder; give the folder `lesionlab cross-site` wrote")
    files = model_card_files(study, manifest, cross_site_dir=cross_site,
                             bundle_path=str(bundle) if bundle is not None else None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    written = {}
    for name, content in files.items():
        atomic_write(out / name, lambda p, c=content: p.write_bytes(c))
        written[name] = out / name
    return written
