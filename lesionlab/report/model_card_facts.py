"""The facts of a model card, read from a study folder (through `StudyFolder`) and, when there is one, the manifest of
the bundle made from it. Reads only: nothing is re-estimated, so the card says what the study measured.

Optional outputs (metrics, trust, refusals, subgroups, cross-site, external sets) that the study did not write become
sections with status "not run" and the reason; only a folder that is not a study at all is an error.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from lesionlab import __version__
from lesionlab.data.licences import dataset_licences, licence_warning
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.exceptions import UserError
from lesionlab.models import file_stem
from lesionlab.report.model_card import NOT_RUN, REPORTED, ModelCard, not_run
from lesionlab.study_folder import StudyFolder

# Files `lesionlab cross-site` may leave as its matrix, first found wins; else the folder's first CSV (by name).
CROSS_SITE_TABLES = ("matrix.csv", "cross_site.csv", "summary.csv")
_SKIN_TONE = re.compile(r"fitz|skin[_ ]?tone|skin[_ ]?type|fitspatrick", re.IGNORECASE)
_CI_METRICS = ("balanced_accuracy", "accuracy", "macro_auc", "macro_f1")


def _clean(v: Any) -> Any:
    """JSON-safe scalars: NaN/inf -> None, numpy numbers -> Python, floats rounded for reading."""
    if hasattr(v, "item") and not isinstance(v, str | bytes):
        v = v.item()
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, 4)
    return v


def _ci(d: Any) -> dict[str, Any]:
    if isinstance(d, dict):
        return {"value": _clean(d.get("value")), "lo": _clean(d.get("lo")), "hi": _clean(d.get("hi"))}
    return {"value": _clean(d), "lo": None, "hi": None}


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): _clean(v) for k, v in r.items()} for r in df.to_dict("records")]


# ----------------------------------------------------------------------------- sections


def _data(sf: StudyFolder, record: dict[str, Any] | None, synthetic: bool, split: pd.DataFrame | None,
          classes: tuple[str, ...]) -> dict[str, Any]:
    if record is None:
        return not_run(f"{sf.dataset_file.name} is missing: the study's validate step has not run", sources=[],
                       synthetic=synthetic, total_images=0, per_class=[], sites=[], caveats=[], leaky_columns=[],
                       skin_tone_column="")
    per_class = []
    if sf.split_summary_file.exists():
        summ = pd.read_csv(sf.split_summary_file)
        per_class = [{"class": r["class"], **{k: int(r.get(f"{k}_images", 0)) for k in ("train", "val", "test")},
                      "all": int(r.get("all_images", 0))} for r in summ.to_dict("records")]
    elif split is not None:
        for c in [*classes, "total"]:
            rows = split if c == "total" else split[split["label"] == c]
            per_class.append({"class": c, **{k: int((rows["split"] == k).sum()) for k in ("train", "val", "test")},
                              "all": len(rows)})
    leaky = record.get("leaky_columns")
    if leaky is None:  # ham7 single-source dataset.json keeps them in a note only
        note = next((n for n in record.get("notes", []) if n.startswith("columns that give the label away")), "")
        leaky = [c.strip() for c in note.split(":", 1)[1].split(",")] if ":" in note else []
    tone = record.get("skin_tone") or ""
    if isinstance(tone, dict | list):  # several sources: one column per source
        tone = ", ".join(sorted({str(v) for v in (tone.values() if isinstance(tone, dict) else tone) if v}))
    return {"status": REPORTED, "synthetic": synthetic, "sources": dataset_licences(record, synthetic=synthetic),
            "total_images": int(len(split)) if split is not None else int(record.get("rows") or 0),
            "per_class": per_class, "sites": _sites(record, split), "caveats": list(record.get("caveats") or []),
            "leaky_columns": [str(c) for c in leaky], "skin_tone_column": str(tone)}


def _sites(record: dict[str, Any], split: pd.DataFrame | None) -> list[dict[str, Any]]:
    """Images per acquisition site: the sources of a multi-source study, or a single source's site column (HAM10000's
    `dataset`: vidir_molemax, vidir_modern, rosendahl, vienna_dias)."""
    if record.get("sources"):
        return [{"site": s.get("name"), "images": s.get("rows")} for s in record["sources"]]
    src = Path(str(record.get("source", "")))
    if split is None or not src.is_file() or src.suffix.lower() != ".csv":
        return []
    try:
        head = pd.read_csv(src, nrows=0)
        col = next((c for c in ("dataset", "source", "site") if c in head.columns), None)
        if col is None or "image_id" not in head.columns:
            return []
        meta = pd.read_csv(src, usecols=["image_id", col], dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return []  # the card still stands without site counts; the study validated this file when it ran
    counts = meta[meta["image_id"].isin(set(split["image_id"]))][col].value_counts()
    return [{"site": str(k), "images": int(v)} for k, v in counts.items()]


def _split(sf: StudyFolder, cfg, split: pd.DataFrame | None, multi: bool) -> dict[str, Any]:
    from lesionlab.data.split import check_split

    if split is None:
        return not_run(f"{sf.split_file.name} is missing: the study's split step has not run")
    leaks = check_split(split)
    cross = sf.root / "cross_source_summary.csv"
    return {
        "status": REPORTED,
        "method": ("the dataset's published split (split.published), checked for images without a part and lesions "
                   "in two parts; saved as splits.csv" if getattr(cfg.split, "published", False) else
                   "lesion-grouped (images of one lesion, and known duplicates, in one split), stratified by class"
                   + (" and source" if multi else "") + "; computed once and saved as splits.csv"),
        "fractions": {"train": round(cfg.split.train, 4), "val": round(cfg.split.val, 4),
                      "test": round(cfg.split.test, 4)},
        "seed": cfg.split.seed,
        "images": {k: int((split["split"] == k).sum()) for k in ("train", "val", "test")},
        "lesions": {k: int(split.loc[split["split"] == k, "lesion_id"].nunique()) for k in ("train", "val", "test")},
        "lesions_across_splits": len(leaks),
        "duplicate_groups": int(split["group_id"].astype(str).str.contains("+", regex=False).groupby(
            split["group_id"]).any().sum()),
        "cross_source_duplicates": _records(pd.read_csv(cross)) if cross.exists() else [],
        "checked": "when this card was made, on splits.csv (lesionlab.data.split.check_split)",
    }


def _training(sf: StudyFolder, cfg, names: list[str]) -> dict[str, Any]:
    t, d = cfg.train, cfg.data
    aug = [f"random rotation up to {d.rotation:g} degrees"] if d.rotation else []
    aug += [x for x, on in (("horizontal flips", d.hflip), ("vertical flips", d.vflip)) if on]
    if d.color_jitter:
        aug.append(f"colour jitter {d.color_jitter:g}")
    sizes = sorted({int(m["input_size"]) for m in (sf.model_meta(n) for n in names) if m and m.get("input_size")})
    return {
        "status": REPORTED,
        "archs": list(names) or list(t.archs),
        "pretrained": t.pretrained,
        "input_size": ", ".join(str(s) for s in sizes) or (str(d.image_size) if d.image_size else "model default"),
        "crop": f"centre crop keeping {d.crop_fraction:.0%} of each side, then resized",
        "epochs": f"at most {t.epochs}",
        "loss": "cross-entropy" + (", weighted by inverse class frequency of the training split (class imbalance)"
                                   if t.class_weighting else ", unweighted"),
        "optimizer": f"Adam, learning rate {t.lr:g}, weight decay {t.weight_decay:g} (lesionlab.training.fit)",
        "batch_size": d.batch_size,
        "early_stopping": f"on {t.monitor}, patience {t.patience}, min delta {t.min_delta:g}; best epoch kept",
        "augmentation": "; ".join(aug) or "none",
        "color_constancy": d.color_constancy,
        "metadata_columns": list(t.metadata),
        "precision": t.precision,
        "device": t.device,
        "seed": t.seed,
    }


def _members(sf: StudyFolder, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for n in names:
        meta = sf.model_meta(n) or {}
        hist = sf.history(n)
        out.append({"name": n, "arch": meta.get("arch", n), "timm_id": meta.get("timm_id"),
                    "pretrained": meta.get("pretrained"), "input_size": meta.get("input_size"),
                    "epochs_run": int(len(hist)) if hist is not None else None})
    return out


def _headline(sf: StudyFolder, names: list[str], manifest: dict[str, Any] | None) -> tuple[str | None, str]:
    """The model the card's numbers are about, and why: the bundle's (its single member, or the study's ensemble when
    the bundle holds every study model), else the study's ensemble, else its only model."""
    have = {n: sf.metrics_file(n).exists() for n in [*names, ENSEMBLE]}
    if manifest is not None:
        members = [m["name"] for m in manifest.get("members", [])]
        if len(members) == 1:
            n = next((x for x in names if file_stem(x) == members[0]), members[0])
            return (n, "the bundle's single member") if sf.metrics_file(n).exists() else (None, "")
        if {file_stem(n) for n in names} == set(members) and have[ENSEMBLE]:
            return ENSEMBLE, "the bundle: the mean of all the study's models"
        return None, ("the bundle's members are a subset of the study's models; the study measured their ensemble "
                      "only as part of the whole")
    if have[ENSEMBLE]:
        return ENSEMBLE, "the study's ensemble (mean of its models' probabilities)"
    found = [n for n in names if have[n]]
    return (found[0], "the study's only evaluated model") if found else (None, "")


def _performance(sf: StudyFolder, model: str | None, why: str, names: list[str], classes: tuple[str, ...],
                 flag: str) -> dict[str, Any]:
    if model is None:
        return not_run(why or "the study's metrics step has not run (no eval/<model>/metrics.json)")
    m = sf.metrics(model)
    ci = m.get("ci", {})
    per_class = []
    for c in classes:
        row: dict[str, Any] = {"class": c, "support": int(m["per_class"][c].get("support", 0))}
        for k in ("sensitivity", "specificity", "precision", "f1", "auc"):
            row[k] = _clean(m["per_class"][c].get(k))
            row[f"{k}_lo"] = _clean(ci.get(f"{c}_{k}", {}).get("lo"))
            row[f"{k}_hi"] = _clean(ci.get(f"{c}_{k}", {}).get("hi"))
        per_class.append(row)
    summary = {
        "balanced_accuracy": _ci(ci.get("balanced_accuracy", m.get("balanced_accuracy"))),
        "accuracy": _ci(ci.get("accuracy", m.get("accuracy"))),
        "macro_auc": _ci(ci.get("macro_auc", m["macro"].get("auc"))),
        "macro_f1": _ci(ci.get("macro_f1", m["macro"].get("f1"))),
    }
    op = (m.get("operating_points") or {}).get(flag) or {}
    at = op.get("at_threshold")
    op_text = (f"{flag} flagged at probability >= {at['threshold']:.3f} ({op.get('threshold_source', '')}): "
               f"sensitivity {_clean(at.get('sensitivity'))}, specificity {_clean(at.get('specificity'))} on test"
               if at else "")
    models = []
    for n in [*names, ENSEMBLE]:
        mm = sf.metrics(n) if sf.metrics_file(n).exists() else None
        if mm:
            c2 = mm.get("ci", {})
            models.append({"name": n, "balanced_accuracy": _ci(c2.get("balanced_accuracy", mm["balanced_accuracy"])),
                           "macro_auc": _ci(c2.get("macro_auc", mm["macro"].get("auc")))})
    return {"status": REPORTED, "reason": why, "model": model, "n_test": int(m.get("n", 0)),
            "ci_level": _clean(m.get("ci_level")), "ci_resampling": m.get("ci_resampling", "image"),
            "per_class": per_class, "summary": summary, "models": models, "operating_point": op_text}


def _calibration(sf: StudyFolder, model: str | None, cfg) -> dict[str, Any]:
    m = sf.metrics(model) if model else None
    if not m or "calibration" not in m:
        return not_run("no calibration results: the study's trust and metrics steps have not run"
                       + ("" if sf.trust_file.exists() else " (no trust.json)"))
    c = m["calibration"]
    return {"status": REPORTED, "reason": "", "method": "temperature scaling fitted on validation"
            if cfg.trust.calibration else "none (T = 1)", "temperature": _clean(c.get("temperature")),
            "ece_before": _ci(c["before"].get("ece")), "ece_after": _ci(c["after"].get("ece")),
            "brier_after": _ci(c["after"].get("brier")), "nll_after": _ci(c["after"].get("nll")),
            "ece_bins": cfg.trust.ece_bins}


def _conformal(sf: StudyFolder, model: str | None) -> dict[str, Any]:
    m = sf.metrics(model) if model else None
    if not m or "conformal" not in m:
        return not_run("no conformal results: the study's trust and metrics steps have not run")
    s = m["conformal"]
    return {"status": REPORTED, "reason": "", "method": s.get("method"), "mondrian": bool(s.get("mondrian")),
            "target_coverage": _clean(s.get("target_coverage")), "coverage": _ci(s.get("coverage")),
            "mean_set_size": _ci(s.get("mean_set_size")),
            "per_class_coverage": {c: _clean((v.get("coverage") or {}).get("value"))
                                   for c, v in (s.get("per_class") or {}).items()}}


# The refusal codes of the screening pipeline (lesionlab.clinic.screening.OOD_CODE / ERROR_CODE; the report layer sits
# below clinic, so they are repeated here and tests/test_model_card_gate.py checks they are the same strings).
OOD_CODE, ERROR_CODE = "out_of_distribution", "likely_wrong"
ERROR_SIGNALS = {"ood": "the OOD score", "confidence": "the calibrated confidence (1 - top probability)",
                 "set_size": "the conformal set size"}


def _selective(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """A selective summary (lesionlab.evaluation.selective.selective_summary) for the card, or None."""
    if not d:
        return None
    return {k: _clean(d.get(k)) for k in ("n", "n_refused", "refusal_rate", "accuracy_all", "accuracy_accepted",
                                          "accuracy_refused")}


def _error_refusal(cfg, o: dict[str, Any] | None, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The `likely_wrong` stage: its setting (trust.error_refusal_rate), what it was fitted on, and its refusals with
    the accuracy of accepted vs refused images where they were measured: on validation by the fit (the bundle's
    manifest, or ood.json's `error_refusal` where the study records it), on test by the study's ood step."""
    rate = float(cfg.trust.error_refusal_rate)
    fitted = (manifest or {}).get("error_refusal") or (o or {}).get("error_refusal")
    base = {"code": ERROR_CODE, "configured_rate": rate,
            "rule": "a logistic regression on the OOD score, the calibrated confidence and the conformal set size, "
                    "fitted on the validation split to predict a wrong top-1 answer; an image whose estimated chance "
                    "of a wrong answer is above the threshold that refuses trust.error_refusal_rate of the "
                    "validation images is refused as likely_wrong (lesionlab.clinic.trust, evaluation.selective)"}
    # a study's ood.json records the fitted score since it records test accuracy (`test_accuracy`): with that
    # record and no score, the study fitted none; an older ood.json cannot tell (the note below says so)
    unfitted_study = manifest is None and not fitted and o is not None and "test_accuracy" in o
    if rate == 0 or (manifest is not None and not fitted) or unfitted_study:
        why = ("trust.error_refusal_rate is 0: the likely_wrong refusal is off" if rate == 0 else
               "the study fitted no error score (no validation predictions or trust record to fit it on)"
               if unfitted_study else "the bundle has no error score (no validation predictions to fit it on)")
        return {"status": NOT_RUN, "reason": why, **base, "signals": [], "threshold": None, "fitted_on": "",
                "validation": None, "test": None, "note": ""}
    info = (fitted or {}).get("info") or {}
    test = None
    if o is not None and "test_refused_by_error" in o:
        measured = _selective(o.get("test_accuracy"))  # where the study's ood step measured accuracy with the gate
        test = {"refusal_rate": _clean(o.get("test_refused_by_error")), "images": int(o.get("test_images", 0)),
                "accuracy": measured,
                "note": "" if measured else "accuracy of accepted vs refused test images not recorded by the study's "
                                            "ood step (ood/ood.json)"}
    return {"status": REPORTED, "reason": "", **base,
            "signals": [ERROR_SIGNALS.get(x, x) for x in (fitted or {}).get("signals", [])],
            "threshold": _clean((fitted or {}).get("threshold")),
            "fitted_on": str(info.get("source") or "the study's validation split"),
            "validation": _selective(info.get("validation")),
            "test": test,
            "note": str(info.get("note") or ("" if fitted else "the fitted score (signals, threshold, validation "
                                                               "refusals) is recorded in bundles made from this "
                                                               "study; this card has no bundle"))}


def _gate(cfg, o: dict[str, Any] | None, manifest: dict[str, Any] | None, error: dict[str, Any]) -> list[dict[str, Any]]:
    """The refusal gate, in the order the screening pipeline applies it: the first stage that refuses names the
    reason (lesionlab.clinic.screening.refusal)."""
    from lesionlab.data.quality import ADVICE

    q = cfg.quality
    ood_on = cfg.ood.method != "none" and (manifest is None or bool(manifest.get("ood")))
    # a bundle fits its own OOD model (clinic.trust.fit_bundle_ood): its threshold is the one predict applies
    ood_thr = ((manifest or {}).get("ood") or {}).get("threshold") if manifest else (o or {}).get("threshold")
    return [
        {"stage": 1, "name": "quality checks", "codes": [c for c in ADVICE if c != OOD_CODE], "on": True,
         "rule": f"fixed limits: shorter side >= {q.min_side} px, aspect <= {q.max_aspect:g}, sharpness >= "
                 f"{q.min_sharpness:g}, not under- or over-exposed, not uniform (config quality)",
         "fitted_on": "not fitted (limits set on real HAM10000 images)", "threshold": None},
        {"stage": 2, "name": "out-of-distribution score", "codes": [OOD_CODE], "on": ood_on,
         "rule": f"{cfg.ood.method} distance of the models' penultimate features to the training classes; refused "
                 f"above the threshold that {cfg.ood.target_tpr:.0%} of the validation images pass (config ood)"
                 if ood_on else "off (ood.method none, or a bundle made without it)",
         "fitted_on": "training split (class means, covariance), validation split (threshold)" if ood_on else "",
         "threshold": _clean(ood_thr) if ood_on else None},
        {"stage": 3, "name": "error-targeting refusal", "codes": [ERROR_CODE], "on": error["status"] == REPORTED,
         "rule": error["rule"] if error["status"] == REPORTED else error["reason"],
         "fitted_on": error["fitted_on"], "threshold": error["threshold"]},
    ]


def _site_gate(cross: dict[str, Any]) -> list[dict[str, Any]]:
    """Per external target site of the cross-site matrix: the gate's refusal rate and accuracy accepted vs refused."""
    keep = ("train", "test", "variant", "rule", "refusal_rate", "accuracy_all", "accuracy_accepted", "accuracy_refused")
    return [{k: r.get(k) for k in keep} for r in cross.get("refusal_rows") or []
            if r.get("rule") == "gate" and r.get("test") != "internal"]


def _refusal(sf: StudyFolder, cfg, manifest: dict[str, Any] | None = None,
             cross: dict[str, Any] | None = None) -> dict[str, Any]:
    o = sf.ood_summary()
    error = _error_refusal(cfg, o, manifest)
    gate = {"gate": _gate(cfg, o, manifest, error), "error_refusal": error, "sites": _site_gate(cross or {})}
    if o is None:
        return not_run("ood.method is none: no out-of-distribution model was fitted" if cfg.ood.method == "none"
                       else "the study's ood step has not run (no ood/ood.json)", **gate)
    return {"status": REPORTED, "reason": "", "threshold": _clean(o.get("threshold")),
            "test_images": int(o.get("test_images", 0)), "test_refused": _clean(o.get("test_refused")),
            "test_refused_by_quality": _clean(o.get("test_refused_by_quality")),
            "test_refused_by_ood": _clean(o.get("test_refused_by_ood")),
            "test_refused_by_error": _clean(o.get("test_refused_by_error")),
            "validation_refused": _clean(o.get("validation_refused")),
            "sets": [{"set": s.get("set"), "images": int(s.get("images", 0)), "refused": _clean(s.get("refused")),
                      "refused_by_error": _clean(s.get("refused_by_error")), "auroc": _clean(s.get("auroc"))}
                     for s in o.get("sets", [])],
            **gate}


def _subgroups(sf: StudyFolder, model: str | None, tone_column: str) -> dict[str, Any]:
    f = sf.folder("subgroups") / "subgroups.csv"
    if not f.exists():
        res = not_run("no metadata columns to group by, or the study's subgroups step has not run")
        res["skin_tone"] = not_run("no skin-tone or Fitzpatrick column in the data" if not tone_column
                                   else f"column {tone_column} present but the subgroups step has not run")
        return res
    df = pd.read_csv(f, keep_default_na=False, na_values=[""])
    shown = model if model in set(df.get("model", [])) else (df["model"].iloc[0] if "model" in df and len(df) else "")
    if "model" in df:
        df = df[df["model"] == shown]
    keep = [c for c in ("column", "subgroup", "n_images", "n_lesions") if c in df]
    for metric in [c for c in df.columns if c == "balanced_accuracy" or c.endswith(("_sensitivity", "_auc"))]:
        keep += [c for c in (metric, f"{metric}_lo", f"{metric}_hi") if c in df]
    keep += [c for c in ("flagged", "note") if c in df]
    cols = [str(c) for c in dict.fromkeys(df["column"]) if str(c) != "all"] if "column" in df else []
    tone_col = tone_column if tone_column in cols else next((c for c in cols if _SKIN_TONE.search(c)), "")
    if tone_col:
        t = df[df["column"] == tone_col]
        tone = {"status": REPORTED, "column": tone_col,
                "groups": {str(k): int(v) for k, v in zip(t["subgroup"], t["n_images"], strict=True)}}
    else:
        tone = not_run("no skin-tone or Fitzpatrick column in the data: skin-tone coverage is unknown")
    return {"status": REPORTED, "reason": "", "model": str(shown), "columns": cols, "rows": _records(df[keep]),
            "skin_tone": tone}


def _cross_site(sf: StudyFolder, folder: str | Path | None) -> dict[str, Any]:
    d = Path(folder) if folder else sf.folder("cross_site")
    if not d.is_dir():
        return not_run("no cross-site validation (run `lesionlab cross-site`, or pass --cross-site DIR)")
    table = next((d / n for n in CROSS_SITE_TABLES if (d / n).is_file()), None) or next(iter(sorted(d.glob("*.csv"))),
                                                                                         None)
    if table is None:
        return not_run(f"{d} holds no CSV table of the cross-site matrix")
    rows = pd.read_csv(table)
    if rows.empty:  # every cell skipped (sources too small, too few shared classes): say why
        cells = json.loads((d / "cross_site.json").read_text()).get("cells", []) if (d / "cross_site.json").is_file() else []
        why = sorted({c["skipped"] for c in cells if "skipped" in c})
        return not_run("no cross-site cell was evaluated" + (": " + "; ".join(why) if why else ""))
    refusal = d / "refusal.csv"  # per target site and refusal rule: refused share, accuracy accepted vs refused
    return {"status": REPORTED, "reason": "", "source": str(table), "rows": _records(rows),
            "refusal_rows": _records(pd.read_csv(refusal)) if refusal.is_file() else []}


def _external(sf: StudyFolder) -> dict[str, Any]:
    from lesionlab.io import read_json

    sets = []
    for f in sorted(sf.folder("external").glob("*/summary.json")):
        s = read_json(f, missing="re-run the study's external step")
        for n, m in (s.get("models") or {}).items():
            sets.append({"name": f.parent.name, "model": n, "n": int(s.get("n", s.get("images", 0)) or 0),
                         "balanced_accuracy": _ci(m.get("balanced_accuracy")),
                         "macro_auc": _ci((m.get("macro") or {}).get("auc"))})
    return {"status": REPORTED, "reason": "", "sets": sets} if sets else not_run("no external sets in the config")


def _limitations(data, split, perf, cal, refusal, subgroups, cross, external, classes) -> list[str]:
    out = []
    if data.get("synthetic"):
        out.append("Trained and tested on synthetic images: these numbers say nothing about real lesions.")
    counts = {r["class"]: r["all"] for r in data.get("per_class", []) if r["class"] != "total"}
    if counts and min(counts.values()) > 0:
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)
        out.append(f"Class imbalance: {big} has {counts[big]} images, {small} {counts[small]} "
                   f"({counts[big] / counts[small]:.0f}x); the rare classes' metrics have wide CIs.")
    if cross["status"] != REPORTED and external["status"] != REPORTED:
        out.append("No external validation: every number comes from a held-out split of the training sources; "
                   "expect lower performance at other clinics, devices and populations.")
    elif cross["status"] != REPORTED:
        out.append("No cross-site validation matrix: performance across acquisition sites is not measured.")
    out.append("Acquisition sensitivity: dermoscope, lighting, magnification and compression differ between clinics; "
               "see the study's robustness section, and the refusal rates here.")
    tone = subgroups.get("skin_tone", {})
    if tone.get("status") != REPORTED:
        out.append("Skin-tone coverage is unknown: the data carries no Fitzpatrick type or skin-tone column, and public "
                   "dermoscopy sets are mostly of light skin.")
    out.append("The model answers only with its classes "
               f"({', '.join(classes)}): lesions of other kinds get one of them.")
    if perf["status"] != REPORTED:
        out.append("Test performance not measured: " + perf.get("reason", ""))
    if cal["status"] != REPORTED:
        out.append("Calibration not measured: the probabilities may be over- or under-confident.")
    if refusal["status"] != REPORTED:
        out.append("Refusal of unevaluable images not measured.")
    if refusal.get("error_refusal", {}).get("status") != REPORTED:
        out.append("No error-targeting (likely_wrong) refusal: the gate refuses strangers and poor images, not likely "
                   "errors; on another clinic's dermoscopy the images it accepts may be less accurate than those it "
                   "refuses.")
    if split.get("lesions_across_splits"):
        out.append(f"{split['lesions_across_splits']} leakage findings across splits: test numbers may be optimistic.")
    return out


def _reproduce(sf: StudyFolder, record: dict[str, Any] | None, synthetic: bool, manifest: dict[str, Any] | None,
               bundle_path: str | None, cross: dict[str, Any]) -> list[str]:
    out = str(sf.root)
    if synthetic:
        cmds = [f"lesionlab study --config {sf.config_file} --out {out}   # makes the synthetic images again"]
    else:
        srcs = (record or {}).get("sources") or []
        data = " ".join(f"--data {Path(s['metadata']).parent}" for s in srcs if s.get("metadata")) or (
            f"--data {Path(str((record or {}).get('source', 'DATA'))).parent}")
        cmds = [f"lesionlab study --config {sf.config_file} {data} --out {out}"]
    if cross["status"] == REPORTED:
        cmds.append(f"lesionlab cross-site ...   # as run for {cross['source']}")
    if manifest is not None:
        cmds.append(f"lesionlab bundle --runs {out}/runs --study {out} --out {bundle_path or 'BUNDLE'}")
    cmds.append(f"lesionlab model-card --study {out}" + (f" --bundle {bundle_path}" if bundle_path else "")
                + " --out CARD_DIR")
    return cmds


# ----------------------------------------------------------------------------- the card


def build_card(study_dir: str | Path, bundle_manifest: dict[str, Any] | None = None, *,
               cross_site_dir: str | Path | None = None, bundle_path: str | None = None) -> ModelCard:
    """Every fact of the card, from the study folder and the bundle's manifest (if the card is for a bundle).

    Raises:
        UserError: `study_dir` is not a study folder.
    """
    sf = StudyFolder(study_dir)
    if not sf.is_study():
        raise UserError(f"--study {study_dir} is not a study folder (no steps.json and predictions/ in it); give the "
                        "folder `lesionlab study --out` wrote")
    cfg = sf.config()
    lset = sf.label_set()
    classes = tuple(lset.classes)
    synthetic = "synth" in sf.steps()
    record = sf.dataset() if sf.dataset_file.exists() else None
    split = sf.split() if sf.split_file.exists() else None
    multi = bool(record and record.get("sources") and len(record["sources"]) > 1)
    order = {a: i for i, a in enumerate(cfg.train.archs)}  # the config's order, as the study report lists them
    names = sorted(sf.trained_models(), key=lambda n: order.get(n, len(order))) or list(cfg.train.archs)
    if bundle_manifest is not None:
        members = [m["name"] for m in bundle_manifest.get("members", [])]
        names = [n for n in names if file_stem(n) in members] or members
    model, why = _headline(sf, names if bundle_manifest is None else (sf.trained_models() or names), bundle_manifest)

    data = _data(sf, record, synthetic, split, classes)
    lic_items = data["sources"] if data["status"] == REPORTED else dataset_licences({"layout": ""})
    licences = {"items": lic_items, "warning": licence_warning(lic_items),
                "note": "Licences as their publishers state them (lesionlab.data.licences, with where each is stated); "
                        "a model inherits the terms of its training data. Check at the source: this is not legal "
                        "advice."}
    split_s = _split(sf, cfg, split, multi)
    training = _training(sf, cfg, names)
    perf = _performance(sf, model, why, names, classes, lset.flag)
    cal, conf = _calibration(sf, model, cfg), _conformal(sf, model)
    subgroups = _subgroups(sf, model, data.get("skin_tone_column", ""))
    cross = _cross_site(sf, cross_site_dir)
    refusal = _refusal(sf, cfg, bundle_manifest, cross)
    external = _external(sf)
    bundle = None
    if bundle_manifest is not None:
        bundle = {"path": bundle_path or "", "format_version": bundle_manifest.get("format_version"),
                  "melanoma_threshold": bundle_manifest.get("melanoma_threshold"),
                  "inference": bundle_manifest.get("inference")}
    n = len(names)
    return ModelCard(
        title=f"Model card: {cfg.name}" + (f" (bundle {Path(bundle_path).name})" if bundle_path else ""),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        lesionlab_version=__version__,
        model={"name": model or (names[0] if n == 1 else ENSEMBLE),
               "kind": "single model" if n == 1 else f"ensemble: mean of {n} models' probabilities",
               "members": _members(sf, names), "label_set": lset.name, "classes": list(classes),
               "flag_class": lset.flag, "flag_name": lset.flag_title, "bundle": bundle},
        data=data, licences=licences, split=split_s, training=training, performance=perf, calibration=cal,
        conformal=conf, refusal=refusal, subgroups=subgroups, cross_site=cross, external=external,
        limitations=_limitations(data, split_s, perf, cal, refusal, subgroups, cross, external, classes),
        reproduce=_reproduce(sf, record, synthetic, bundle_manifest, bundle_path, cross),
    )
