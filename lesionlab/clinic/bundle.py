"""Model bundles: ensemble members (safetensors + sidecars), the melanoma threshold and a hashed manifest.

A bundle is what a clinic deploys. Loading it checks every file's SHA-256 against the manifest and never
unpickles anything.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lesionlab import __version__
from lesionlab.clinic.trust import BundleTrust, fit_bundle_ood, fit_calibration, study_config, study_frames
from lesionlab.evaluation.operating_points import at_threshold, threshold_for_sensitivity
from lesionlab.exceptions import UserError
from lesionlab.inference.predictor import Predictor, find_checkpoints, load_predictors, unique_names
from lesionlab.io import atomic_write_json, sha256_file
from lesionlab.labels import CLASS_INDEX, CLASSES, DISPLAY_NAMES
from lesionlab.models import META_FILE, WEIGHTS_FILE, file_stem, read_meta

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
RESEARCH_NOTE = ("Research use only: the models' output for an image they refused as unevaluable. Not a diagnosis "
                 "and not fit to support one.")


FORMAT_VERSION = 1
PRECISIONS = ("fp32", "bf16", "fp16")


def precision_name(dtype: Any) -> str:
    """fp32 / bf16 / fp16 for a Predictor's autocast dtype (None = fp32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def recorded_precision(study: Path, members: list[str]) -> tuple[str | None, list[Path]]:
    """The precision the study's infer steps recorded for these members (`predictions/<member>_inference.json`),
    if every one of them has a record and they agree; else None. Also the record files read."""
    pred = study / "predictions"
    files = [pred / f"{m}_inference.json" for m in members]
    if not files or not all(f.exists() for f in files):
        return None, []
    found = set()
    for f in files:
        try:
            found.add(json.loads(f.read_text())["precision"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{f}: unreadable inference record ({e}); re-run the study's infer steps") from None
    if len(found) != 1:
        raise UserError(f"the study's members ran at different precisions ({', '.join(sorted(found))}; "
                        f"{pred}/*_inference.json); their ensemble threshold has no single setting")
    return found.pop(), files


def study_inference_settings(study: Path, *, members: list[str], precision: str | None = None) -> dict[str, Any]:
    """TTA and precision the study's validation predictions (hence its threshold) were made with.

    Read from the study's config.yaml (`eval.tta`, `train.precision`, `train.device`). A study run at precision
    `auto` resolved it on its own machine: its infer steps record what it resolved to, per model
    (`predictions/<member>_inference.json`), and that is used. For a study without those records (older ones),
    `precision` (from the command line) says what it was; otherwise `auto` is resolved here, on the machine that
    makes the bundle, as the study would have resolved it on the same hardware, and the manifest says so.
    """
    from lesionlab import runtime
    from lesionlab.config import load_config

    cfg_file = study / "config.yaml"
    if not cfg_file.exists():  # not written by `lesionlab study` (which always saves it): settings unknown
        log.warning("%s not found: the threshold's TTA is taken as off (the study default) and its precision "
                    "as unknown", cfg_file)
        return {"tta": False, "precision": precision, "source": f"{study} has no config.yaml; TTA assumed off"
                + ("" if precision else ", precision unknown")}
    cfg = load_config(cfg_file)
    out = {"tta": bool(cfg.eval.tta), "precision": cfg.train.precision, "source": f"config.yaml of {study}"}
    if cfg.train.precision != "auto":
        if precision is not None and precision != cfg.train.precision:
            raise UserError(f"--precision {precision} differs from the study's train.precision "
                            f"{cfg.train.precision} ({cfg_file}); leave --precision out")
        return out
    recorded, files = recorded_precision(study, members)
    if recorded is not None:
        if precision is not None and precision != recorded:
            raise UserError(f"--precision {precision} differs from the {recorded} the study's models ran at "
                            f"({files[0]}); leave --precision out")
        out.update(precision=recorded, source=f"config.yaml of {study} (precision auto, resolved to {recorded} "
                                               "by the study's infer steps: predictions/*_inference.json)")
        return out
    if precision is not None:
        out.update(precision=precision, source=f"config.yaml of {study} (precision auto; stated with --precision)")
        return out
    try:
        dev = runtime.pick_device(cfg.train.device)
    except UserError:
        raise UserError(f"{cfg_file}: the study ran at precision auto on device {cfg.train.device!r}, which this "
                        "machine lacks; pass --precision fp32|bf16|fp16 to say what it resolved to") from None
    out.update(precision=precision_name(runtime.pick_precision("auto", dev)),
               source=f"config.yaml of {study} (precision auto, resolved on the machine that made this bundle)")
    return out


def _find_study(checkpoint: Path) -> Path | None:
    """The study folder a checkpoint was trained in (it holds steps.json and predictions/), if any."""
    for parent in list(checkpoint.resolve().parents)[:3]:
        if (parent / "steps.json").exists() and (parent / "predictions").is_dir():
            return parent
    return None


def calibrated_threshold(y: np.ndarray, cal: np.ndarray, target: float, study: Path) -> dict[str, Any]:
    """The melanoma threshold on the calibrated ensemble's validation probabilities (what predict shows)."""
    mel = CLASS_INDEX["MEL"]
    thr = threshold_for_sensitivity(y == mel, cal[:, mel], target)
    if thr is None:
        raise UserError(f"{study}: the validation split has no melanoma; pass --threshold")
    at = at_threshold(y == mel, cal[:, mel], thr)
    return {"value": thr, "target_sensitivity": target, "source": f"validation split of {study}",
            "probabilities": "calibrated ensemble", "validation_sensitivity": at["sensitivity"],
            "validation_specificity": at["specificity"]}


INT8_CALIBRATION_IMAGES = 64  # ONNX Runtime's quantiser needs tens of images for activation ranges
INT8_CHECK_IMAGES = 500  # further validation images the int8 body must agree with fp32 on


def _int8_images(study_dir: Path | None, data: str | Path | None) -> tuple[list[Image.Image], list[Image.Image]]:
    """Validation images of the study: a calibration set and a disjoint agreement-check set (fixed seed)."""
    from lesionlab.data.images import load_image

    if study_dir is None or not (study_dir / "splits.csv").exists():
        raise UserError("--int8 calibrates on the study's validation images; pass --study STUDY_DIR")
    _, val = study_frames(study_dir, Path(data) if data else None)
    order = np.random.default_rng(0).permutation(len(val))
    n_cal = INT8_CALIBRATION_IMAGES
    n_check = min(INT8_CHECK_IMAGES, len(val) - n_cal)
    if n_check < 100:
        raise UserError(f"--int8: the study's validation split has {len(val)} images; it needs at least "
                        f"{n_cal + 100} (calibration + agreement check)")
    paths = val["path"].to_numpy()
    return ([load_image(paths[i]) for i in order[:n_cal]], [load_image(paths[i]) for i in order[n_cal:n_cal + n_check]])


def _int8_member(dest: Path, name: str, calibration: list[Image.Image], check: list[Image.Image], *,
                 progress: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Quantise one member's body to int8 on validation images; keep it only at >= 99% top-1 agreement with fp32.

    Returns the record (also written as int8.json beside the member) and the files to hash."""
    from lesionlab.inference import engines

    engines.require(engines.INT8)
    pr = Predictor(dest, device="cpu", precision="fp32", engine="torch")
    if pr.encoding is not None:
        raise UserError(f"--int8: member {name} also reads metadata; int8 bodies are made for image-only members")
    x_cal = pr.prepare(calibration).numpy()
    engines.quantize_int8(dest / engines.ONNX_FILE, x_cal, dest / engines.INT8_FILE)
    body = engines.load_body(engines.INT8, dest / engines.INT8_FILE)
    ref, got = [], []
    with torch.inference_mode():
        for i in range(0, len(check), 32):
            x = pr.prepare(check[i:i + 32])
            ref.append(torch.softmax(pr._head(pr._fp32_body(x)), 1).numpy())
            got.append(torch.softmax(pr._head(torch.from_numpy(body(x.numpy()))), 1).numpy())
    ref_p, got_p = np.concatenate(ref), np.concatenate(got)
    agreement = engines.top1_agreement(ref_p, got_p)
    accepted = agreement >= engines.INT8_MIN_AGREEMENT
    record = {"accepted": bool(accepted), "top1_agreement": round(agreement, 4), "images": len(check),
              "min_agreement": engines.INT8_MIN_AGREEMENT, "calibration_images": len(calibration),
              "calibrated_on": "validation split", "max_prob_diff": float(np.abs(ref_p - got_p).max()),
              "method": "ONNX Runtime static quantisation, QDQ, per-channel int8 weights, uint8 activations (MinMax)"}
    del body
    if not accepted:
        (dest / engines.INT8_FILE).unlink()
    atomic_write_json(dest / engines.INT8_RECORD, record)
    if progress:
        print(f"{name}: int8 top-1 agreement with fp32 {agreement:.2%} on {len(check)} validation images -> "
              + ("shipped" if accepted else f"not shipped (below {engines.INT8_MIN_AGREEMENT:.0%})"))
    return record, ([engines.INT8_FILE] if accepted else []) + [engines.INT8_RECORD]


def make_bundle(
    runs: list[str | Path],
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    target_sensitivity: float = 0.90,
    study: str | Path | None = None,
    tta: bool | None = None,
    precision: str | None = None,
    onnx: bool = False,
    data: str | Path | None = None,
    ood: bool = True,
    int8: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Copy the members and write the manifest; returns the manifest.

    The manifest's `inference` records the TTA and precision the threshold was chosen under; predict and the
    service run exactly those. With a study they come from its config (`tta`/`precision` may only confirm
    them, or name what precision `auto` resolved to); with a given `threshold` they are what the caller states
    (default: TTA off, precision unknown).
    """
    cks = find_checkpoints(runs)
    out = Path(out_dir)
    # Trust parts (issue 10): quality thresholds, temperatures + conformal thresholds on the study's validation
    # predictions, the OOD model on its training/validation images. Sections from the study's config.yaml.
    if (out / MANIFEST).exists():
        raise UserError(f"{out} already holds a bundle; choose another --out")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    names = [file_stem(n) for n in unique_names(read_meta(ck).get("arch", ck.name) for ck in cks)]
    study_dir = Path(study) if study else _find_study(cks[0])
    int8_images = _int8_images(study_dir, data) if int8 else None
    if threshold is None:
        if study_dir is None:
            raise UserError("no study folder found beside the runs to choose the melanoma threshold on validation; "
                            "pass --study STUDY_DIR or --threshold X")
        cfg = study_config(study_dir)
        trust, y_val, cal_val = fit_calibration(study_dir, names, cfg.trust)
        thr = calibrated_threshold(y_val, cal_val, target_sensitivity, study_dir)
        settings = study_inference_settings(study_dir, precision=precision, members=names)
        if tta is not None and tta != settings["tta"]:
            raise UserError(f"--{'' if tta else 'no-'}tta differs from the study's eval.tta {settings['tta']} "
                            f"(its validation predictions, which chose the threshold); leave it out")
    else:
        if not 0 <= threshold <= 1:
            raise UserError(f"--threshold {threshold} must be between 0 and 1")
        thr = {"value": threshold, "target_sensitivity": None, "source": "given on the command line"}
        cfg = study_config(study_dir)
        trust = None
        if study_dir is not None and (study_dir / "predictions" / "truth_val.csv").exists():
            trust = fit_calibration(study_dir, names, cfg.trust)[0]
        settings = {"tta": bool(tta), "precision": precision,
                    "source": "stated with the threshold" if precision else "stated with the threshold; precision unknown"}
    members = []
    for name, ck in zip(names, cks, strict=True):
        dest = out / "members" / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in (WEIGHTS_FILE, META_FILE):
            shutil.copy2(ck / f, dest / f)
        meta = read_meta(dest)
        files = [WEIGHTS_FILE, META_FILE]
        if onnx or int8:  # the body as ONNX for the CPU engines (inference/engines.py), hashed like the weights
            from lesionlab.inference.engines import ONNX_FILE, export_body_onnx
            from lesionlab.models import load_checkpoint

            export_body_onnx(load_checkpoint(dest)[0], int(meta["input_size"]), dest / ONNX_FILE)
            files.append(ONNX_FILE)
        int8_record = None
        if int8_images is not None:
            int8_record, int8_files = _int8_member(dest, name, *int8_images, progress=progress)
            files += int8_files
        test_metrics = None
        if study_dir is not None and (study_dir / "eval" / name / "metrics.json").exists():
            m = json.loads((study_dir / "eval" / name / "metrics.json").read_text())
            test_metrics = {"macro": m["macro"], "balanced_accuracy": m["balanced_accuracy"], "MEL": m["per_class"]["MEL"]}
        members.append({
            "name": name, "dir": f"members/{name}", "arch": meta.get("arch"), "timm_id": meta.get("timm_id"),
            "source": str(ck.resolve()), "epoch": meta.get("epoch"), "pretrained": meta.get("pretrained"),
            "split_sha256": meta.get("split_sha256"), "test_metrics": test_metrics, "int8": int8_record,
            "files": {f: sha256_file(dest / f) for f in files},
        })
    ood_entry = None
    if ood and study_dir is not None and cfg.ood.method != "none" and (study_dir / "splits.csv").exists():
        fitted = load_predictors([out / m["dir"] for m in members], device="auto",
                                 precision=settings.get("precision") if settings.get("precision") in ("fp32", "bf16") else "auto")
        for pr, m in zip(fitted, members, strict=True):
            pr.name = m["name"]
        ood_entry = fit_bundle_ood(fitted, study_dir, cfg.ood, out, data=Path(data) if data else None,
                                   progress=progress)
        ood_entry["sha256"] = sha256_file(out / ood_entry["file"])
    ens_metrics = None
    if study_dir is not None and (study_dir / "eval" / "ensemble" / "metrics.json").exists() and len(members) == 4:
        m = json.loads((study_dir / "eval" / "ensemble" / "metrics.json").read_text())
        ens_metrics = {"macro": m["macro"], "balanced_accuracy": m["balanced_accuracy"], "MEL": m["per_class"]["MEL"]}
    manifest = {
        "format_version": FORMAT_VERSION, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "lesionlab_version": __version__, "classes": list(CLASSES), "ensemble": "mean of member probabilities",
        "melanoma_threshold": thr, "inference": settings, "quality": asdict(cfg.quality), "trust": trust,
        "ood": ood_entry, "members": members, "ensemble_test_metrics": ens_metrics,
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
    if manifest.get("ood"):
        f = root / manifest["ood"]["file"]
        if not f.exists():
            raise UserError(f"bundle file {f} is missing")
        if sha256_file(f) != manifest["ood"].get("sha256"):
            raise UserError(f"bundle file {f} does not match its manifest hash (corrupted or modified); re-create the bundle")
    return manifest


def bundle_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The inference settings the bundle's threshold was chosen under; bundles made before they were recorded
    get TTA off (the study's default) and precision None (unknown)."""
    inf = manifest.get("inference")
    if inf is None:
        return {"tta": False, "precision": None, "recorded": False}
    return {"tta": bool(inf["tta"]), "precision": inf.get("precision"), "recorded": True}


class EnsemblePredictor:
    """A verified bundle loaded once and kept warm: ensemble probabilities, melanoma flag, member agreement.

    Runs at the TTA and precision the bundle's melanoma threshold was chosen under (its validated sensitivity
    holds only there); asking for other settings is a UserError that names the bundle's.
    """

    def __init__(self, path: str | Path, *, device: str = "auto", precision: str = "auto", engine: str = "torch"):
        from lesionlab import runtime

        self.root = Path(path)
        self.manifest = verify_bundle(self.root)
        self.threshold = float(self.manifest["melanoma_threshold"]["value"])
        self.threshold_settings = bundle_settings(self.manifest)
        known = self.threshold_settings["precision"]
        if precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision {precision!r} must be auto, fp32 or bf16")
        if known is not None and precision not in ("auto", known):
            raise UserError(f"--precision {precision}: {self.describe_settings()}; leave --precision at auto to use it")
        run_as = precision if known is None else known
        if run_as == "fp16":  # a threshold chosen on a GPU without bf16: only such a GPU reproduces it
            dev = runtime.pick_device(device)
            if dev.type != "cuda" or runtime.pick_precision("auto", dev) is not torch.float16:
                raise UserError(f"{self.describe_settings()}; this machine ({dev}) does not run fp16 autocast")
            run_as = "auto"
        self.members: list[Predictor] = load_predictors([self.root / m["dir"] for m in self.manifest["members"]],
                                                        device=device, precision=run_as, engine=engine)
        for pr, m in zip(self.members, self.manifest["members"], strict=True):
            pr.name = m["name"]
        self.version = sha256_file(self.root / MANIFEST)[:12]
        self.screening = BundleTrust(self.root, self.manifest)
        self.precision = precision_name(self.members[0].amp)
        self.tta = self.threshold_settings["tta"]

    def describe_settings(self) -> str:
        """One phrase naming the settings the threshold was chosen under."""
        t = self.threshold_settings
        prec = t["precision"] or "an unrecorded precision"
        return (f"bundle {self.root}'s melanoma threshold was chosen with TTA {'on' if t['tta'] else 'off'} "
                f"at {prec}{'' if t['recorded'] else ' (an older bundle: TTA assumed off)'}")

    def inference_info(self) -> dict[str, Any]:
        """What predictions run with, and what the threshold was chosen under (for /api/health and answers)."""
        t = self.threshold_settings
        info = {"tta": self.tta, "precision": self.precision,
                "threshold_chosen_with": {"tta": t["tta"], "precision": t["precision"]}, "note": None}
        if not t["recorded"]:
            info["note"] = (f"bundle made before inference settings were recorded: TTA assumed off (refused), the "
                            f"threshold's precision is unknown, running at {self.precision}; re-create the bundle")
        elif t["precision"] is None:
            info["note"] = f"the threshold's precision was not stated when the bundle was made; running at {self.precision}"
        return info

    def resolve_tta(self, tta: bool | None) -> bool:
        """The bundle's TTA setting; a request for the other one is refused."""
        if tta is not None and bool(tta) != self.tta:
            raise UserError(f"TTA {'on' if tta else 'off'} was asked for, but {self.describe_settings()}; "
                            "leave TTA unset to use the bundle's setting")
        return self.tta

    def warm_up(self) -> None:
        """One dummy prediction per member, so one-off work (TorchScript tracing) happens before the first patient."""
        size = self.members[0].spec.input_size
        self.predict([Image.new("RGB", (size * 3 // 2, size), (128, 128, 128))])

    @property
    def device(self) -> str:
        return str(self.members[0].device)

    def predict(self, images: list[Image.Image], *, tta: bool | None = None, research: bool = False,
                metadata: list[dict] | None = None) -> list[dict[str, Any]]:
        """One result per image; `tta` None = the bundle's setting (any other is refused).

        An image that fails a quality check or whose OOD score is above the bundle's threshold gets
        `{"status": "unevaluable", "reasons", "reason_codes", "advice"}` and no diagnosis; with `research` its
        would-be result is added under `research`. Otherwise `{"status": "ok", ...}` (see `result_dict`) with
        calibrated probabilities and the conformal `differential`. `metadata`: one mapping per image (age, sex,
        site) for metadata-fusion members; their results' `metadata` entry says which fields were used or missing.
        """
        tta = self.resolve_tta(tta)
        if not images:
            return []
        outputs = self.screening.member_outputs(self.members, images, tta=tta, metadata=metadata)
        refusals, ood_scores = self.screening.screen(images, outputs)
        ens, members = self.screening.calibrated(outputs)
        diffs = self.screening.differential(ens)
        out = []
        for i in range(len(images)):
            full = self.result_dict(ens[i], {n: p[i] for n, p in members.items()})
            full["differential"] = diffs[i] if diffs is not None else None
            full["ood_score"] = float(ood_scores[i]) if ood_scores is not None else None
            info = self.metadata_info(metadata[i] if metadata else None)
            if info:
                full["metadata"] = info
            if refusals[i] is None:
                out.append({"status": "ok", **full})
            else:
                r = dict(refusals[i])
                if research:
                    r["research"] = {**full, "note": RESEARCH_NOTE}
                out.append(r)
        return out

    def metadata_info(self, row: dict | None) -> dict[str, Any] | None:
        """What the members made of one image's metadata (None: image-only bundle and no metadata given)."""
        fused = [pr for pr in self.members if pr.encoding is not None]
        given = {k: v for k, v in (row or {}).items() if v not in (None, "")}
        if not fused:
            return {"used_by": [], "note": "this bundle's models use the image only; the metadata was ignored"} if given else None
        missing = sorted({f for pr in fused for f in pr.encode_metadata([row or {}], 1)[1][0]})
        info: dict[str, Any] = {"used_by": [pr.name for pr in fused],
                                "fields": sorted({f for pr in fused for f in pr.encoding.fields}), "missing": missing}
        if missing:
            info["note"] = (f"no usable {', '.join(missing)} for the metadata-fusion model(s): answered with the "
                            "missing-value indicators set, which is less reliable; give them for a better estimate")
        return info

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
            "calibrated": self.screening.trust is not None,
            "differential_coverage": self.screening.sets.coverage if self.screening.sets is not None else None,
        }

    def explain(self, image: Image.Image, *, cls: str | None = None):
        from lesionlab.explain.gradcam import explain_image

        return explain_image(self.members, image, cls=cls)

