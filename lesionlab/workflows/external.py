"""External validation: each model and their ensemble on an image set from elsewhere, with the study's trust parts.

DICOM images in the set (`.dcm`, or named without a suffix and found by their preamble) are decoded like any image;
their headers are written to `dicom_metadata.csv` (image_id, age, sex, localization, body_site, manufacturer,
device_model, polarization, contact_method, immersion_media, magnification, ..., UIDs), the table to pass to
`lesionlab subgroups --metadata` to split the external results by device or polarisation, and a metadata-fusion
model reads each image's age, sex and localization from it.

The set is read in the models' label set (lesionlab.labels, from their sidecars): the ground truth must have one
column per class of it, in its order; a truth file of another label set is refused in one line naming it. Classes
present/absent, metrics and the conformal coverage of the flag class (MEL; MALIGNANT for `binary`) are the models'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lesionlab.config import StudyConfig
from lesionlab.data.dicom import header_table
from lesionlab.data.isic_csv import probs_frame, truth_frame, write_isic_csv
from lesionlab.data.subsets import external_table
from lesionlab.data.tables import read_csv_checked
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.evaluation.trust import trust_metrics
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_csv, atomic_write_json
from lesionlab.labels import BUILTIN, LabelSet, label_set_of
from lesionlab.models import file_stem, read_meta
from lesionlab.study_folder import StudyFolder


def models_label_set(checkpoints: list[Path]) -> LabelSet:
    """The label set every checkpoint was trained for, from the sidecars (no weights loaded); a one-line UserError
    when they differ (their probability columns would not mean the same classes)."""
    sets = {Path(ck): label_set_of(read_meta(ck)) for ck in checkpoints}
    first = next(iter(sets.values()))
    for ck, s in sets.items():
        if (s.name, s.classes) != (first.name, first.classes):
            raise UserError(f"{ck} was trained for label set {s.name!r}, {checkpoints[0]} for {first.name!r}; give "
                            "models of one label set")
    return first


def check_truth_label_set(truth: str | Path, lset: LabelSet) -> None:
    """Refuse ISIC-format ground truth whose class columns are not `lset`'s classes in order (one line naming the
    file, the label set its columns are, when a built-in one, and the models')."""
    cols = [c.strip() for c in read_csv_checked(truth, "ground truth", nrows=0).columns if c.strip() != "image"]
    if cols == list(lset.classes):
        return
    theirs = next((f"label set {s.name!r} ({', '.join(cols)})" for s in BUILTIN.values() if list(s.classes) == cols),
                  f"class columns {', '.join(cols) or 'none'}")
    raise UserError(f"{truth}: ground truth in {theirs}, but the models were trained for label set {lset.name!r} "
                    f"({', '.join(lset.classes)}); give ground truth with columns image,{','.join(lset.classes)}")


def evaluate_external(checkpoints: list[Path], images: str | Path, truth: str | Path, out_dir: str | Path,
                      cfg: StudyConfig, *, skip_invalid: bool = False, progress: bool = True,
                      trust: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each model and (with two or more) their ensemble on an external set: a metrics folder per model and summary.json.

    With `trust` (trust.json, fitted on the internal validation split) each model's metrics also get calibration
    before/after and conformal coverage, with the temperatures and thresholds unchanged."""
    from lesionlab.evaluation.ensemble import mean_probabilities
    from lesionlab.evaluation.evaluate import evaluate_arrays
    from lesionlab.inference.predictor import infer_table
    from lesionlab.report.evaluation_files import plot_trust_reliability, write_evaluation

    out = Path(out_dir)
    lset = models_label_set(checkpoints)
    check_truth_label_set(truth, lset)
    df = external_table(images, truth, skip_invalid=skip_invalid, classes=lset.classes)
    headers = header_table(list(df["path"]))
    if headers is not None:
        atomic_write_csv(out / "dicom_metadata.csv", headers)
        by_id = headers.set_index("image_id")
        for col in ("age", "sex", "localization"):  # what a fused model reads from its frame
            if col in by_id.columns and col not in df.columns:
                df[col] = df["image_id"].map(by_id[col])
    probs = infer_table(checkpoints, df, device=cfg.train.device, precision=cfg.train.precision, tta=cfg.eval.tta,
                        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, progress=progress)
    # written where a study folder keeps a split's predictions, with the models' classes as columns (a StudyFolder
    # would take them from a config.yaml this folder does not have)
    folder = StudyFolder(out)
    for name, p in probs.items():
        write_isic_csv(folder.prediction_file(name, "external"), probs_frame(df["image_id"], p, lset.classes))
    write_isic_csv(folder.truth_file("external"), truth_frame(df, lset.classes))
    if len(probs) > 1:
        probs[ENSEMBLE] = mean_probabilities(list(probs.values()))
    y = np.array([lset.index[c] for c in df["label"]])
    flag = lset.flag
    summary = {"images": str(images), "truth": str(truth), "n": len(df), "label_set": lset.name,
               "classes": list(lset.classes), "flag_class": flag,
               "classes_present": [c for c in lset.classes if (df["label"] == c).any()],
               "classes_absent": [c for c in lset.classes if not (df["label"] == c).any()], "models": {},
               "dicom_images": 0 if headers is None else len(headers),
               "dicom_metadata": None if headers is None else str(out / "dicom_metadata.csv")}
    for n, p in probs.items():
        m = evaluate_arrays(y, p, cfg=cfg.eval, classes=lset.classes)
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
                # the flag class's coverage (MEL for ham7/isic2019), under the key the report reads
                "MEL_coverage": s["per_class"].get(flag, {}).get("coverage", {}).get("value"),
                "flag_coverage": s["per_class"].get(flag, {}).get("coverage", {}).get("value"),
                "mean_set_size": s["mean_set_size"]["value"]}
    atomic_write_json(out / "summary.json", summary)
    return summary
