"""Model bundles: ensemble members (safetensors + sidecars), the melanoma threshold and a hashed manifest.

A bundle is what a clinic deploys. Loading it checks every file's SHA-256 against the manifest and never
unpickles anything.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lesionlab import __version__
from lesionlab.data.isic_csv import read_isic_csv
from lesionlab.evaluation.operating_points import at_threshold, threshold_for_sensitivity
from lesionlab.exceptions import UserError
from lesionlab.inference.predictor import Predictor, find_checkpoints, load_predictors, unique_names
from lesionlab.io import atomic_write_json, sha256_file
from lesionlab.labels import CLASS_INDEX, CLASSES, DISPLAY_NAMES
from lesionlab.models import META_FILE, WEIGHTS_FILE, file_stem, read_meta

MANIFEST = "manifest.json"


FORMAT_VERSION = 1


def _find_study(checkpoint: Path) -> Path | None:
    """The study folder a checkpoint was trained in (it holds steps.json and predictions/), if any."""
    for parent in list(checkpoint.resolve().parents)[:3]:
        if (parent / "steps.json").exists() and (parent / "predictions").is_dir():
            return parent
    return None


def validation_threshold(study: Path, names: list[str], target: float) -> dict[str, Any]:
    """Melanoma threshold for the ensemble of `names`, chosen on the study's validation predictions."""
    from lesionlab.data.isic_csv import align
    from lesionlab.inference.ensemble import mean_probabilities

    pred_dir = study / "predictions"
    truth = read_isic_csv(pred_dir / "truth_val.csv", kind="truth")
    probs = []
    y = None
    for n in names:
        f = pred_dir / f"{n}_val.csv"
        if not f.exists():
            raise UserError(f"{f} not found: cannot choose the threshold on validation; pass --threshold")
        y, p, _ = align(truth, read_isic_csv(f, kind="prediction"))
        probs.append(p)
    ens = mean_probabilities(probs)
    mel = CLASS_INDEX["MEL"]
    thr = threshold_for_sensitivity(y == mel, ens[:, mel], target)
    if thr is None:
        raise UserError(f"{study}: the validation split has no melanoma; pass --threshold")
    at = at_threshold(y == mel, ens[:, mel], thr)
    return {"value": thr, "target_sensitivity": target, "source": f"validation split of {study}",
            "validation_sensitivity": at["sensitivity"], "validation_specificity": at["specificity"]}


def make_bundle(
    runs: list[str | Path],
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    target_sensitivity: float = 0.90,
    study: str | Path | None = None,
) -> dict[str, Any]:
    """Copy the members and write the manifest; returns the manifest."""
    cks = find_checkpoints(runs)
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise UserError(f"{out} already holds a bundle; choose another --out")
    names = [file_stem(n) for n in unique_names(read_meta(ck).get("arch", ck.name) for ck in cks)]
    study_dir = Path(study) if study else _find_study(cks[0])
    if threshold is None:
        if study_dir is None:
            raise UserError("no study folder found beside the runs to choose the melanoma threshold on validation; "
                            "pass --study STUDY_DIR or --threshold X")
        thr = validation_threshold(study_dir, names, target_sensitivity)
    else:
        if not 0 <= threshold <= 1:
            raise UserError(f"--threshold {threshold} must be between 0 and 1")
        thr = {"value": threshold, "target_sensitivity": None, "source": "given on the command line"}
    members = []
    for name, ck in zip(names, cks, strict=True):
        dest = out / "members" / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in (WEIGHTS_FILE, META_FILE):
            shutil.copy2(ck / f, dest / f)
        meta = read_meta(dest)
        test_metrics = None
        if study_dir is not None and (study_dir / "eval" / name / "metrics.json").exists():
            m = json.loads((study_dir / "eval" / name / "metrics.json").read_text())
            test_metrics = {"macro": m["macro"], "balanced_accuracy": m["balanced_accuracy"], "MEL": m["per_class"]["MEL"]}
        members.append({
            "name": name, "dir": f"members/{name}", "arch": meta.get("arch"), "timm_id": meta.get("timm_id"),
            "source": str(ck.resolve()), "epoch": meta.get("epoch"), "pretrained": meta.get("pretrained"),
            "split_sha256": meta.get("split_sha256"), "test_metrics": test_metrics,
            "files": {f: sha256_file(dest / f) for f in (WEIGHTS_FILE, META_FILE)},
        })
    ens_metrics = None
    if study_dir is not None and (study_dir / "eval" / "ensemble" / "metrics.json").exists() and len(members) == 4:
        m = json.loads((study_dir / "eval" / "ensemble" / "metrics.json").read_text())
        ens_metrics = {"macro": m["macro"], "balanced_accuracy": m["balanced_accuracy"], "MEL": m["per_class"]["MEL"]}
    manifest = {
        "format_version": FORMAT_VERSION, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "lesionlab_version": __version__, "classes": list(CLASSES), "ensemble": "mean of member probabilities",
        "melanoma_threshold": thr, "members": members, "ensemble_test_metrics": ens_metrics,
        "intended_use": "Decision support for trained clinicians; not a diagnosis.",
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Read the manifest and check every member file's SHA-256; raise UserError on any mismatch."""
    root = Path(path)
    mf = root / MANIFEST
    if not mf.exists():
        raise UserError(f"{root} is not a LesionLab bundle (no {MANIFEST}); make one with `lesionlab bundle`")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{mf}: invalid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("classes") != list(CLASSES):
        raise UserError(f"{mf}: unsupported bundle format or class order")
    for m in manifest["members"]:
        for fname, digest in m["files"].items():
            f = root / m["dir"] / fname
            if not f.exists():
                raise UserError(f"bundle file {f} is missing")
            if sha256_file(f) != digest:
                raise UserError(f"bundle file {f} does not match its manifest hash (corrupted or modified); re-create the bundle")
    return manifest


@dataclass
class BundleInfo:
    version: str
    threshold: float
    members: list[str]


class EnsemblePredictor:
    """A verified bundle loaded once and kept warm: ensemble probabilities, melanoma flag, member agreement."""

    def __init__(self, path: str | Path, *, device: str = "auto", precision: str = "auto"):
        self.root = Path(path)
        self.manifest = verify_bundle(self.root)
        self.threshold = float(self.manifest["melanoma_threshold"]["value"])
        self.members: list[Predictor] = load_predictors([self.root / m["dir"] for m in self.manifest["members"]],
                                                        device=device, precision=precision)
        for pr, m in zip(self.members, self.manifest["members"], strict=True):
            pr.name = m["name"]
        self.version = sha256_file(self.root / MANIFEST)[:12]

    def warm_up(self) -> None:
        """One dummy prediction per member, so one-off work (TorchScript tracing) happens before the first patient."""
        size = self.members[0].spec.input_size
        self.predict([Image.new("RGB", (size * 3 // 2, size), (128, 128, 128))])

    @property
    def device(self) -> str:
        return str(self.members[0].device)

    def predict(self, images: list[Image.Image], *, tta: bool = False) -> list[dict[str, Any]]:
        """One result per image (see `result_dict`)."""
        if not images:
            return []
        member_probs = {pr.name: pr.predict_images(images, tta=tta) for pr in self.members}
        ens = np.mean(list(member_probs.values()), axis=0)
        return [self.result_dict(ens[i], {n: p[i] for n, p in member_probs.items()}) for i in range(len(images))]

    def result_dict(self, probs: np.ndarray, members: dict[str, np.ndarray]) -> dict[str, Any]:
        top = int(np.argmax(probs))
        mel = float(probs[CLASS_INDEX["MEL"]])
        member_rows = {n: {"top": CLASSES[int(np.argmax(p))], "probability": float(p.max()),
                           "melanoma_probability": float(p[CLASS_INDEX["MEL"]])} for n, p in members.items()}
        agree = sum(1 for r in member_rows.values() if r["top"] == CLASSES[top])
        return {
            "probabilities": {c: float(probs[k]) for k, c in enumerate(CLASSES)},
            "top": CLASSES[top], "top_name": DISPLAY_NAMES[CLASSES[top]], "top_probability": float(probs[top]),
            "melanoma_probability": mel, "melanoma_threshold": self.threshold, "melanoma_flag": mel >= self.threshold,
            "members": member_rows, "agreement": f"{agree}/{len(member_rows)}", "members_agreeing": agree,
        }

    def explain(self, image: Image.Image, *, cls: str | None = None):
        from lesionlab.explain.gradcam import explain_image

        return explain_image(self.members, image, cls=cls)

