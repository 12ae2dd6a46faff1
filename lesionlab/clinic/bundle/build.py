"""`lesionlab bundle`: seal a study's models, its melanoma threshold and trust parts into a bundle folder.

Sealed means:
- every member is the model the study's validated numbers came from: the study's infer step records the SHA-256 of
  the weights it ran (`predictions/<model>_inference.json`), and a member whose weights differ is refused, naming
  the file (a run resumed or retrained after the study, or another study's `--study`);
- the bundle is built in a temporary folder beside `--out` and renamed into place, so a killed run leaves no
  half bundle (and no stale file a later load could pick up);
- an int8 body ships only where it agrees with the validated path (the precision and TTA the threshold was chosen
  under) on top-1 and on the melanoma flag at the bundle's threshold;
- the manifest records the inference settings (TTA, precision, engine) the threshold was chosen under;
- a bundle made from a study carries its model card (model_card.md / .html / .json, lesionlab.report.model_card),
  hashed in the manifest like the weights, and the licences of the data it was trained on (`data_licences`); when a
  licence forbids commercial use (HAM10000: CC BY-NC 4.0) or is unknown, the build logs the warning.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lesionlab import __version__
from lesionlab.clinic.bundle.manifest import FORMAT_VERSION, MANIFEST, PRECISIONS
from lesionlab.clinic.screening import FLAG_COLUMN, ensemble_probabilities, melanoma_flags
from lesionlab.clinic.trust import fit_bundle_ood, fit_calibration, fit_error_refusal
from lesionlab.config import StudyConfig
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.evaluation.metrics import summarize
from lesionlab.evaluation.operating_points import at_threshold, threshold_for_sensitivity
from lesionlab.exceptions import UserError
from lesionlab.inference.predictor import Predictor, find_checkpoints, load_predictors, unique_names
from lesionlab.io import atomic_write_json, sha256_file
from lesionlab.labels import label_set_of
from lesionlab.models import META_FILE, WEIGHTS_FILE, file_stem, read_meta
from lesionlab.report.model_card import licence_warning, model_card_files
from lesionlab.study_folder import StudyFolder

log = logging.getLogger(__name__)

INT8_CALIBRATION_IMAGES = 64  # ONNX Runtime's quantiser needs tens of images for activation ranges
INT8_CHECK_IMAGES = 500  # further validation images the int8 body must agree with the validated path on


def recorded_precision(study: StudyFolder, members: list[str]) -> tuple[str | None, list[Path]]:
    """The precision the study's infer steps recorded for these members, if every one has a record and they
    agree; else None. Also the record files read."""
    records = [study.inference_record(m) for m in members]
    if not members or any(r is None for r in records):
        return None, []
    found = {r["precision"] for r in records}
    files = [study.inference_record_file(m) for m in members]
    if len(found) != 1:
        raise UserError(f"the study's members ran at different precisions ({', '.join(sorted(found))}; "
                        f"{study.predictions_dir}/*_inference.json); their ensemble threshold has no single setting")
    return found.pop(), files


def study_inference_settings(study: StudyFolder, *, members: list[str], precision: str | None = None) -> dict[str, Any]:
    """TTA, precision and engine the study's validation predictions (hence its threshold) were made with.

    Read from the study's config.yaml (`eval.tta`, `train.precision`). A study run at precision `auto` resolved it
    on its own machine: its infer steps record what it resolved to, per model, and that is used (`precision`, from
    the command line, may only confirm it). The study's infer steps always run the torch engine.
    """
    if not study.has_config():  # not written by `lesionlab study` (which always saves it): settings unknown
        log.warning("%s not found: the threshold's TTA is taken as off (the study default) and its precision "
                    "as unknown", study.config_file)
        return {"tta": False, "precision": precision, "engine": "torch",
                "source": f"{study.root} has no config.yaml; TTA assumed off" + ("" if precision else ", precision unknown")}
    cfg = study.config()
    out = {"tta": bool(cfg.eval.tta), "precision": cfg.train.precision, "engine": "torch",
           "source": f"config.yaml of {study.root}"}
    if cfg.train.precision != "auto":
        if precision is not None and precision != cfg.train.precision:
            raise UserError(f"--precision {precision} differs from the study's train.precision "
                            f"{cfg.train.precision} ({study.config_file}); leave --precision out")
        return out
    recorded, files = recorded_precision(study, members)
    if recorded is None:  # make_bundle has checked every member's record (check_member_weights): a bug if here
        raise UserError(f"{study.predictions_dir}: the study's infer steps recorded no precision for {', '.join(members)}; "
                        "re-run `lesionlab study`")
    if precision is not None and precision != recorded:
        raise UserError(f"--precision {precision} differs from the {recorded} the study's models ran at "
                        f"({files[0]}); leave --precision out")
    out.update(precision=recorded, source=f"config.yaml of {study.root} (precision auto, resolved to {recorded} "
                                           "by the study's infer steps: predictions/*_inference.json)")
    return out


def check_member_weights(study: StudyFolder, name: str, checkpoint: Path) -> str:
    """The weights' SHA-256, if they are the ones the study's infer step ran; else a UserError naming the file."""
    record_file = study.inference_record_file(name)
    rec = study.inference_record(name)
    weights = checkpoint / WEIGHTS_FILE
    if rec is None:
        raise UserError(f"{record_file} not found: the study records no weights for {name}'s validation predictions, "
                        f"so its threshold and trust parts cannot be tied to {weights}; re-run `lesionlab study` "
                        f"into {study.root}")
    want = rec.get("weights_sha256")
    if not want:
        raise UserError(f"{record_file} records no weights SHA-256 (made by an older LesionLab); re-run `lesionlab "
                        f"study` into {study.root} to refresh its infer steps")
    got = sha256_file(weights)
    if got != want:
        raise UserError(f"{weights} is not the model the study validated ({record_file} records weights "
                        f"{want[:12]}, the file has {got[:12]}: retrained or resumed after the study's infer step, or "
                        f"another study's model); re-run `lesionlab study` so the threshold is fitted on these weights")
    return got


def calibrated_threshold(y: np.ndarray, cal: np.ndarray, target: float, study: StudyFolder) -> dict[str, Any]:
    """The melanoma threshold on the calibrated ensemble's validation probabilities (what predict shows)."""
    mel = FLAG_COLUMN  # the label set's flag class (MEL; MALIGNANT under binary)
    thr = threshold_for_sensitivity(y == mel, cal[:, mel], target)
    if thr is None:
        raise UserError(f"{study.root}: the validation split has no {study.label_set().flag} image; pass --threshold")
    at = at_threshold(y == mel, cal[:, mel], thr)
    return {"value": thr, "target_sensitivity": target, "source": f"validation split of {study.root}",
            "probabilities": "calibrated ensemble", "validation_sensitivity": at["sensitivity"],
            "validation_specificity": at["specificity"]}


def ensemble_test_metrics(study: StudyFolder | None, names: list[str]) -> dict[str, Any] | None:
    """The bundle's ensemble on the study's test split, for any number of members: the study's own ensemble
    metrics (with CIs) when the bundle has exactly its models, else computed from the members' test predictions."""
    if study is None or len(names) < 2:
        return None
    trained = sorted(file_stem(n) for n in unique_names(study.trained_models()))
    if sorted(names) == trained and study.metrics_summary(ENSEMBLE):
        return {**study.metrics_summary(ENSEMBLE), "source": f"eval/{ENSEMBLE}/metrics.json of {study.root}"}
    if not study.has_probabilities(names, "test"):
        return None
    y, probs, _ = study.probabilities(names, "test")
    m = summarize(y, np.mean(list(probs.values()), axis=0), study.classes)
    flag = study.label_set().flag
    return {"macro": m["macro"], "balanced_accuracy": m["balanced_accuracy"], flag: m["per_class"][flag],
            "source": f"mean of these members' test predictions in {study.predictions_dir}"}


# ----------------------------------------------------------------------------- int8 bodies


def _int8_images(study: StudyFolder | None, data: str | Path | None) -> tuple[list[Image.Image], list[Image.Image]]:
    """Validation images of the study: a calibration set and a disjoint agreement-check set (fixed seed)."""
    from lesionlab.data.images import load_image

    if study is None or not study.split_file.exists():
        raise UserError("--int8 calibrates on the study's validation images; pass --study STUDY_DIR")
    val = study.frames(data, splits=("val",))["val"]
    order = np.random.default_rng(0).permutation(len(val))
    n_cal = INT8_CALIBRATION_IMAGES
    n_check = min(INT8_CHECK_IMAGES, len(val) - n_cal)
    if n_check < 100:
        raise UserError(f"--int8: the study's validation split has {len(val)} images; it needs at least "
                        f"{n_cal + 100} (calibration + agreement check)")
    paths = val["path"].to_numpy()
    return ([load_image(paths[i]) for i in order[:n_cal]], [load_image(paths[i]) for i in order[n_cal:n_cal + n_check]])


def _int8_probs(pr: Predictor, body, images: list[Image.Image], tta: bool) -> np.ndarray:
    """Probabilities with the member's body replaced by an int8 body (head in fp32, TTA views as the bundle's)."""
    from lesionlab.inference.tta import tta_views

    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            x = pr.prepare(images[i:i + 32])
            views = tta_views(x) if tta else [x]
            p = sum(torch.softmax(pr._head(torch.from_numpy(body(v.float().contiguous().numpy()))), 1) for v in views)
            out.append((p / len(views)).numpy())
    return np.concatenate(out)


def _flags(probs: dict[str, np.ndarray], trust: dict[str, Any] | None, threshold: float) -> np.ndarray:
    """Melanoma flags of the calibrated ensemble, computed by the screening pipeline's own functions."""
    return melanoma_flags(ensemble_probabilities(probs, trust), threshold)


def int8_members(tmp: Path, names: list[str], images: tuple[list[Image.Image], list[Image.Image]],
                 settings: dict[str, Any], threshold: float, trust: dict[str, Any] | None, *,
                 progress: bool = True) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """Quantise each member's body to int8 on validation images and keep it only where it agrees with the
    validated path: >= 99% top-1 agreement for the member, and >= 99% agreement of the ensemble's melanoma flag at
    the bundle's threshold, with that member swapped to int8 and with every accepted int8 body at once.

    Returns per member the record (also written as int8.json beside it) and the files to hash.
    """
    from lesionlab.inference import engines

    engines.require(engines.INT8)
    calibration, check = images
    validated = settings.get("precision") if settings.get("precision") in ("fp32", "bf16") else "fp32"
    tta = bool(settings.get("tta"))
    ref, q8, records = {}, {}, {}
    for name in names:
        dest = tmp / "members" / name
        pr = Predictor(dest, device="cpu", precision=validated, engine="torch")
        if pr.encoding is not None:
            raise UserError(f"--int8: member {name} also reads metadata; int8 bodies are made for image-only members")
        engines.quantize_int8(dest / engines.ONNX_FILE, pr.prepare(calibration).numpy(), dest / engines.INT8_FILE)
        body = engines.load_body(engines.INT8, dest / engines.INT8_FILE)
        ref[name] = np.concatenate([pr.predict_images(check[i:i + 32], tta=tta) for i in range(0, len(check), 32)])
        q8[name] = _int8_probs(pr, body, check, tta)
        del body
    flags = _flags(ref, trust, threshold)
    for name in names:
        top1 = engines.top1_agreement(ref[name], q8[name])
        flag = float(np.mean(_flags({**ref, name: q8[name]}, trust, threshold) == flags))
        records[name] = {
            "accepted": bool(top1 >= engines.INT8_MIN_AGREEMENT and flag >= engines.INT8_MIN_AGREEMENT),
            "top1_agreement": round(top1, 4), "melanoma_flag_agreement": round(flag, 4), "images": len(check),
            "min_agreement": engines.INT8_MIN_AGREEMENT, "calibration_images": len(calibration),
            "reference": f"torch at {validated}, TTA {'on' if tta else 'off'} (the path the threshold was chosen on)",
            "threshold": threshold, "calibrated_on": "validation split",
            "max_prob_diff": float(np.abs(ref[name] - q8[name]).max()),
            "method": "ONNX Runtime static quantisation, QDQ, per-channel int8 weights, uint8 activations (MinMax)"}
    accepted = [n for n in names if records[n]["accepted"]]
    if accepted:  # `auto` may pick int8 for every member at once: that ensemble must keep the flag too
        together = float(np.mean(_flags({**ref, **{n: q8[n] for n in accepted}}, trust, threshold) == flags))
        for n in accepted:
            records[n]["melanoma_flag_agreement_all_int8"] = round(together, 4)
            if together < engines.INT8_MIN_AGREEMENT:
                records[n]["accepted"] = False
                records[n]["rejected_because"] = "the ensemble with every int8 body flags melanoma differently"
    out = {}
    for name in names:
        dest, rec = tmp / "members" / name, records[name]
        if not rec["accepted"]:
            (dest / engines.INT8_FILE).unlink()
        atomic_write_json(dest / engines.INT8_RECORD, rec)
        if progress:
            print(f"{name}: int8 agreement with the validated path on {len(check)} validation images: top-1 "
                  f"{rec['top1_agreement']:.2%}, melanoma flag {rec['melanoma_flag_agreement']:.2%} -> "
                  + ("shipped" if rec["accepted"] else f"not shipped (below {engines.INT8_MIN_AGREEMENT:.0%})"))
        out[name] = (rec, ([engines.INT8_FILE] if rec["accepted"] else []) + [engines.INT8_RECORD])
    return out


# ----------------------------------------------------------------------------- the bundle


def add_model_card(tmp: Path, manifest: dict[str, Any], study: StudyFolder, out: Path) -> str | None:
    """Write the study's model card into the bundle being built (`tmp`) and record it in `manifest`: the card files'
    SHA-256 under `model_card` and the data licences (the card's own licence entries, so the card and the manifest
    cannot disagree) under `data_licences`. Returns the licence warning (None when every licence allows commercial
    use).

    The card describes the bundle as it will be once in place (`out`: its path, members, threshold and inference
    settings come from `manifest`); it cannot name the manifest's hash, which hashes the card.
    """
    files = model_card_files(study.root, manifest, bundle_path=str(out))
    for name, content in files.items():
        (tmp / name).write_bytes(content)  # inside the build folder, which is renamed into place whole
    licences = json.loads(files["model_card.json"])["licences"]["items"]
    manifest["data_licences"] = licences
    manifest["model_card"] = {name: sha256_file(tmp / name) for name in files}
    return licence_warning(licences)


def _partial_folder(out: Path) -> Path:
    """This run's hidden build folder beside `out`; those of killed runs (their process gone) are removed."""
    for old in out.parent.glob(f".{out.name}.partial-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


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
    """Seal the members, threshold and trust parts into `out_dir`; returns the manifest.

    The manifest's `inference` records the TTA, precision and engine the threshold was chosen under; predict and
    the service run exactly those TTA and precision settings and report the engine they run. With a study they
    come from its config and infer records (`tta`/`precision` may only confirm them, or name what precision
    `auto` resolved to); with a given `threshold` they are what the caller states (default: TTA off, precision
    unknown).
    """
    cks = find_checkpoints(runs)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    names = [file_stem(n) for n in unique_names(read_meta(ck).get("arch", ck.name) for ck in cks)]
    sf = StudyFolder(study) if study else StudyFolder.of_checkpoint(cks[0])
    if study and not sf.is_study():
        raise UserError(f"--study {study} is not a study folder (no steps.json and predictions/ in it); give the "
                        "folder `lesionlab study --out` wrote")
    uses_validation = threshold is None or (sf is not None and sf.truth_file("val").exists())
    weights = {n: check_member_weights(sf, n, ck) for n, ck in zip(names, cks, strict=True)} \
        if sf is not None and uses_validation else {}
    int8_images = _int8_images(sf, data) if int8 else None
    cfg = sf.config() if sf is not None else StudyConfig()
    if threshold is None:
        if sf is None:
            raise UserError("no study folder found beside the runs to choose the melanoma threshold on validation; "
                            "pass --study STUDY_DIR or --threshold X")
        trust, y_val, cal_val = fit_calibration(sf, names, cfg.trust)
        thr = calibrated_threshold(y_val, cal_val, target_sensitivity, sf)
        settings = study_inference_settings(sf, precision=precision, members=names)
        if tta is not None and tta != settings["tta"]:
            raise UserError(f"--{'' if tta else 'no-'}tta differs from the study's eval.tta {settings['tta']} "
                            f"(its validation predictions, which chose the threshold); leave it out")
    else:
        if not 0 <= threshold <= 1:
            raise UserError(f"--threshold {threshold} must be between 0 and 1")
        thr = {"value": threshold, "target_sensitivity": None, "source": "given on the command line"}
        trust = fit_calibration(sf, names, cfg.trust)[0] if uses_validation and sf is not None else None
        settings = {"tta": bool(tta), "precision": precision, "engine": "torch",
                    "source": "stated with the threshold" if precision else "stated with the threshold; precision unknown"}
    tmp = _partial_folder(out)
    try:
        members = []
        for name, ck in zip(names, cks, strict=True):
            dest = tmp / "members" / name
            dest.mkdir(parents=True)
            for f in (WEIGHTS_FILE, META_FILE):
                shutil.copy2(ck / f, dest / f)
            if name in weights and sha256_file(dest / WEIGHTS_FILE) != weights[name]:
                raise UserError(f"{ck / WEIGHTS_FILE} changed while the bundle was being made; make it again")
            meta = read_meta(dest)
            files = [WEIGHTS_FILE, META_FILE]
            if onnx or int8:  # the body as ONNX for the CPU engines (inference/engines), hashed like the weights
                from lesionlab.inference.engines import ONNX_FILE, export_body_onnx
                from lesionlab.models import load_checkpoint

                export_body_onnx(load_checkpoint(dest)[0], int(meta["input_size"]), dest / ONNX_FILE)
                files.append(ONNX_FILE)
            members.append({
                "name": name, "dir": f"members/{name}", "arch": meta.get("arch"), "timm_id": meta.get("timm_id"),
                "source": str(ck.resolve()), "epoch": meta.get("epoch"), "pretrained": meta.get("pretrained"),
                "split_sha256": meta.get("split_sha256"), "weights_validated_by_study": name in weights,
                "test_metrics": sf.metrics_summary(name) if name in weights else None, "int8": None, "files": files,
            })
        if int8_images is not None:
            for m, (rec, extra) in zip(members, int8_members(tmp, names, int8_images, settings, float(thr["value"]),
                                                             trust, progress=progress).values(), strict=True):
                m["int8"], m["files"] = rec, m["files"] + extra
        for m in members:
            m["files"] = {f: sha256_file(tmp / m["dir"] / f) for f in m["files"]}
        ood_entry, ood_val = None, None
        if ood and sf is not None and cfg.ood.method != "none" and sf.split_file.exists():
            fitted = load_predictors([tmp / m["dir"] for m in members], device="auto",
                                     precision=settings["precision"] if settings.get("precision") in ("fp32", "bf16") else "auto",
                                     listed_files=[[WEIGHTS_FILE, META_FILE]] * len(members))
            for pr, m in zip(fitted, members, strict=True):
                pr.name = m["name"]
            ood_entry, ood_val = fit_bundle_ood(fitted, sf, cfg.ood, tmp, data=Path(data) if data else None,
                                                progress=progress, val_scores=True)
            ood_entry["sha256"] = sha256_file(tmp / ood_entry["file"])
        sets = {json.dumps(label_set_of(read_meta(tmp / m["dir"])).to_dict(), sort_keys=True) for m in members}
        if len(sets) != 1:
            raise UserError("the members were trained for different label sets; a bundle's members must share one")
        lset = label_set_of(read_meta(tmp / members[0]["dir"]))
        manifest = {
            "format_version": FORMAT_VERSION, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "lesionlab_version": __version__, "classes": list(lset.classes), "label_set": lset.to_dict(),
            "ensemble": "mean of member probabilities",
            "melanoma_threshold": thr, "inference": settings,
            "quality": asdict(cfg.quality),
            "trust": trust, "ood": ood_entry, "members": members,
            # the likely_wrong refusal (clinic.trust.fit_error_refusal; None: off or no validation predictions)
            "error_refusal": fit_error_refusal(sf, names, trust, ood_val, cfg.trust) if sf is not None else None,
            "ensemble_test_metrics": ensemble_test_metrics(sf, names) if len(weights) == len(names) else None,
            "intended_use": "Decision support for trained clinicians; not a diagnosis.",
            "data_licences": None, "model_card": None,
        }
        if sf is not None and sf.is_study():  # every bundle made from a study carries its model card
            warning = add_model_card(tmp, manifest, sf, out)
            if warning:
                log.warning("%s", warning)
        atomic_write_json(tmp / MANIFEST, manifest)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest

