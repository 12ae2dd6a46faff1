"""Bundle predictions for image files, as `lesionlab predict` gives them.

Images are read and predicted batch by batch, each with its metadata (for metadata-fusion bundles) and, if asked,
a Grad-CAM overlay; the result has one row per input in the order given (unreadable files and image-less folders
as `{"image", "error"}` rows) and the command's exit status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionlab.clinic.bundle import EnsemblePredictor
from lesionlab.data.image_files import expand_images, readable_images
from lesionlab.data.metadata import lookup_rows, read_metadata
from lesionlab.exceptions import UserError
from lesionlab.explain.overlay import overlay, save_png

MetadataFor = Callable[[list[Path]], list[dict] | None]


def metadata_lookup(metadata: Path | None, given: dict[str, str]) -> MetadataFor:
    """Per-image metadata for a list of image files, or None for all when there is none.

    Args:
        metadata: CSV with `image_id` (the file name without extension) and metadata columns; read now.
        given: values for every image (`age`, `sex`, `localization`); a non-empty CSV value overrides one.
    """
    meta_df = read_metadata(metadata) if metadata else None

    def metadata_for(ps: list[Path]) -> list[dict] | None:
        if meta_df is None and not given:
            return None
        return [{**given, **{k: v for k, v in r.items() if v not in ("", None)}}
                for r in lookup_rows(meta_df, [q.stem for q in ps])]

    return metadata_for


@dataclass
class FileResults:
    """One row per input (results as `EnsemblePredictor.predict` gives them, with `image`), and the failures."""

    rows: list[dict[str, Any]]
    failed: list[tuple[Path, str]]
    inputs: int  # image files found, plus image-less folders

    @property
    def refused(self) -> int:
        return sum(r.get("status") == "unevaluable" for r in self.rows)

    @property
    def exit_code(self) -> int:
        """0 every image evaluated; 3 at least one unevaluable; 1 at least one input failed."""
        return 1 if self.failed else 3 if self.refused else 0


def predict_files(ens: EnsemblePredictor, items: list[Path], *, batch_size: int, tta: bool, research: bool = False,
                  metadata_for: MetadataFor | None = None, explain_dir: Path | None = None,
                  warn: Callable[[str], None] = lambda _: None) -> FileResults:
    """Predict every image file in `items` (folders expanded), `batch_size` images at a time.

    Args:
        metadata_for: per-image metadata for a batch of paths (`metadata_lookup`).
        explain_dir: write a Grad-CAM overlay of the ensemble per evaluated image here.
        warn: receives one line per problem and per metadata note, as they happen.

    Raises:
        UserError: no image files in `items`.
    """
    failed: list[tuple[Path, str]] = []
    paths = expand_images(items, failed, warn)
    if not paths:
        raise UserError("no images found in the given paths")
    rows: list[dict] = []
    for start in range(0, len(paths), batch_size):
        loaded = list(readable_images(paths[start : start + batch_size], failed, warn))
        ok_paths, batch = [p for p, _ in loaded], [im for _, im in loaded]
        results = ens.predict(batch, tta=tta, research=research,
                              metadata=metadata_for(ok_paths) if metadata_for else None)
        for path, im, res in zip(ok_paths, batch, results, strict=True):
            if res.get("metadata", {}).get("note"):
                warn(f"{path}: {res['metadata']['note']}")
            rows.append({"image": str(path), **res})
            if explain_dir and res["status"] == "ok":
                ex = ens.explain(im, res)  # the class the answer shows (screening.explained_class)
                save_png(overlay(ex.display, ex.ensemble), explain_dir / f"{path.stem}_gradcam_{ex.cls}.png")
    rows += [{"image": str(p), "error": err} for p, err in failed]
    order = {str(p): i for i, p in enumerate(paths)}  # image-less folders (not in paths) first
    rows.sort(key=lambda r: order.get(r["image"], -1))
    return FileResults(rows=rows, failed=failed, inputs=len(paths) + sum(str(p) not in order for p, _ in failed))
