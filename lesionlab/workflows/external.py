"""External validation: each model and their ensemble on an image set from elsewhere, with the study's trust parts.

DICOM images in the set (`.dcm`, or named without a suffix and found by their preamble) are decoded like any image;
their headers are written to `dicom_metadata.csv` (image_id, age, sex, localization, body_site, manufacturer,
device_model, polarization, contact_method, immersion_media, magnification, ..., UIDs), the table to pass to
`lesionlab subgroups --metadata` to split the external results by device or polarisation, and a metadata-fusion
model reads each image's age, sex and localization from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lesionlab.config import StudyConfig
from lesionlab.data.dicom import header_table
from lesionlab.data.subsets import external_table
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.evaluation.trust import trust_metrics
from lesionlab.io import atomic_write_csv, atomic_write_json
from lesionlab.labels import CLASS_INDEX, CLASSES
from lesionlab.models import file_stem
from lesionlab.study_folder import StudyFolder
from lesionlab.workflows.infer import predict_split_files


def evaluate_external(checkpoints: list[Path], images: str | Path, truth: str | Path, out_dir: str | Path,
                      cfg: StudyConfig, *, skip_invalid: bool = False, progress: bool = True,
                      trust: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each model and (with two or more) their ensemble on an external set: a metrics folder per model and summary.json.

    With `trust` (trust.json, fitted on the internal validation split) each model's metrics also get calibration
    before/after and conformal coverage, with the temperatures and thresholds unchanged."""
    from lesionlab.evaluation.ensemble import mean_probabilities
    from lesionlab.evaluation.evaluate import evaluate_arrays
    from lesionlab.report.evaluation_files import plot_trust_reliability, write_evaluation

    out = Path(out_dir)
    df = external_table(images, truth, skip_invalid=skip_invalid)
    headers = header_table(list(df["path"]))
    if headers is not None:
        atomic_write_csv(out / "dicom_metadata.csv", headers)
        by_id = headers.set_index("image_id")
        for col in ("age", "sex", "localization"):  # what a fused model reads from its frame
            if col in by_id.columns and col not in df.columns:
                df[col] = df["image_id"].map(by_id[col])
    probs = predict_split_files(checkpoints, df, StudyFolder(out), "external", cfg, progress=progress, record=False)
    if len(probs) > 1:
        probs[ENSEMBLE] = mean_probabilities(list(probs.values()))
    y = np.array([CLASS_INDEX[c] for c in df["label"]])
    summary = {"images": str(images), "truth": str(truth), "n": len(df),
               "classes_present": [c for c in CLASSES if (df["label"] == c).any()],
               "classes_absent": [c for c in CLASSES if not (df["label"] == c).any()], "models": {},
               "dicom_images": 0 if headers is None else len(headers),
               "dicom_metadata": None if headers is None else str(out / "dicom_metadata.csv")}
    for n, p in probs.items():
        m = evaluate_arrays(y, p, cfg=cfg.eval)
        if trust is not None and n in trust["models"]:
            m.update(trust_metrics(y, p, trust, n, n_boot=cfg.eval.bootstrap, ci=cfg.eval.ci))
        write_evaluation(m, y, p, out / file_stem(n), title=f"{n} on {Path(truth).stem}")
        summary["models"][n] = {"macro": m["macro"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]}
        if "calibration" in m:
            plot_trust_reliability(m, out / file_stem(n) / "reliability.png", title=f"{n} on {Path(truth).stem}")
            c, s = m["calibration"], m["conformal"]
            summary.setdefault("trust", {})[n] = {
                "temperature": c["temperature"], "ece_before": c["before"]["ece"]["value"],
                "ece_after": c["after"]["ece"]["value"], "coverage": s["coverage"]["value"],
                "MEL_coverage": s["per_class"].get("MEL", {}).get("coverage", {}).get("value"),
                "mean_set_size": s["mean_set_size"]["value"]}
    atomic_write_json(out / "summary.json", summary)
    return summary
