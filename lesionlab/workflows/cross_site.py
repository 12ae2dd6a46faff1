"""Cross-site validation: train on some sources of a table, test on others, on the classes both share.

For each training set (one source, all but one, or sources given by name) the workflow

1. splits the training sources' images lesion-grouped and stratified by source and class into train / internal
   validation / internal test (lesionlab.data.split; `splits.csv` per training set),
2. trains the configured architectures on it (lesionlab.training.fit; reused while the run folder still matches),
3. fits the bundle's refusal gate on it (lesionlab.clinic.ood_model.fit_ood: quality checks, then the OOD score) and
   runs every image of the internal validation, internal test and each target site through the one screening
   pipeline (lesionlab.clinic.screening.Screener, research mode so every image gets probabilities),
4. per train -> test cell, restricts rows and probability columns to the classes both sides share (at least
   `min_class_images` images each), fits temperature scaling and conformal sets on the internal validation
   (lesionlab.evaluation.trust), and measures balanced accuracy, macro and melanoma AUC, ECE after calibration and
   conformal coverage, each with a lesion-bootstrap CI, on the internal test and on the target site; the drop is
   internal minus external,
5. per target site, compares refusal rules (lesionlab.evaluation.selective): the existing gate, and refusal
   scores fitted on the internal validation to predict a wrong answer from the OOD score alone, the calibrated
   confidence alone, the conformal set size alone and all three together, each thresholded on the internal
   validation for `refusal_rate`; quality refusals stay refused under every rule.

`compare` adds columns: `color` retrains with Shades of Gray colour constancy (data.color_constancy), `tta` runs
the baseline models with test-time augmentation (its calibration and refusal fitted on TTA validation outputs).

Outputs in `out`: `matrix.csv` (one row per training set x test set x variant, the internal test included),
`refusal.csv` (one row per cell x refusal rule), `cross_site.json` (all of it, with risk-coverage curves),
`cross_site.md` and the figures under `figures/` (lesionlab.report.cross_site); per training set its split and runs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.config import StudyConfig, config_from_dict
from lesionlab.data.tables import Table
from lesionlab.evaluation.bootstrap import bootstrap_ci
from lesionlab.evaluation.calibration import calibrate_probs
from lesionlab.evaluation.ensemble import ENSEMBLE, mean_probabilities
from lesionlab.evaluation.metrics import flat_metrics
from lesionlab.evaluation.selective import (
    VARIANTS,
    compare_refusals,
    fit_refusal_score,
    refusal_signals,
    risk_coverage,
)
from lesionlab.evaluation.trust import evaluate_trust, fit_trust, model_trust
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_json, sha256_file
from lesionlab.labels import get_label_set

log = logging.getLogger(__name__)

SCHEMES = ("pairs", "leave-one-out")
COMPARE = ("color", "tta")


# ----------------------------------------------------------------------------- which cells


def plan_cells(sources: Sequence[str], *, scheme: str = "pairs",
               pairs: Sequence[tuple[str, str]] = ()) -> list[tuple[tuple[str, ...], list[str]]]:
    """The training sets and the sites each is tested on.

    Args:
        sources: the source names present.
        scheme: `pairs` (each source alone, tested on every other) or `leave-one-out` (all but one, tested on it);
            ignored when `pairs` is given.
        pairs: explicit (train, test) pairs: `A+B` trains on A and B together; `C` or `C,D` tests on each.
    """
    known = list(dict.fromkeys(sources))
    if len(known) < 2:
        raise UserError(f"cross-site validation needs at least two sources; the table has {len(known)} "
                        f"({', '.join(known) or 'none'})")

    def check(name: str, opt: str) -> str:
        if name not in known:
            raise UserError(f"{opt} names source {name!r}, which the table does not have; known: {', '.join(known)}")
        return name

    if pairs:
        plan: dict[tuple[str, ...], list[str]] = {}
        for train, test in pairs:
            tr = tuple(check(s.strip(), "--train") for s in train.split("+") if s.strip())
            te = [check(s.strip(), "--test") for s in test.split(",") if s.strip()]
            if not tr or not te:
                raise UserError(f"--train {train!r} --test {test!r}: give at least one source on each side")
            both = sorted(set(tr) & set(te))
            if both:
                raise UserError(f"--train {train} --test {test}: {both[0]} is on both sides; test on other sources")
            plan.setdefault(tr, [])
            plan[tr] += [t for t in te if t not in plan[tr]]
        return list(plan.items())
    if scheme == "pairs":
        return [((s,), [t for t in known if t != s]) for s in known]
    if scheme == "leave-one-out":
        return [(tuple(t for t in known if t != s), [s]) for s in known]
    raise UserError(f"--scheme {scheme!r} must be one of {', '.join(SCHEMES)}")


def shared_classes(classes: Sequence[str], train_labels: Sequence[str], test_labels: Sequence[str], *,
                   min_images: int = 1) -> list[str]:
    """The classes (in label-set order) with at least `min_images` images on both sides."""
    a, b = pd.Series(list(train_labels)).value_counts(), pd.Series(list(test_labels)).value_counts()
    return [c for c in classes if a.get(c, 0) >= min_images and b.get(c, 0) >= min_images]


def restrict(y_names: Sequence[str], probs: np.ndarray, classes: Sequence[str], keep: Sequence[str]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose class is in `keep`, their labels as indices into `keep`, and the `keep` probability columns
    renormalised to sum to one: a classifier over the shared classes. Returns (row mask, labels, probabilities)."""
    y_names = np.asarray(y_names, dtype=object)
    rows = np.isin(y_names, list(keep))
    cols = [list(classes).index(c) for c in keep]
    p = np.asarray(probs, float)[rows][:, cols]
    p = p / np.maximum(p.sum(1, keepdims=True), np.finfo(float).tiny)
    y = np.array([list(keep).index(c) for c in y_names[rows]], int)
    return rows, y, p


# ----------------------------------------------------------------------------- screening


def screen_frame(screener, df: pd.DataFrame, *, batch_size: int = 64, progress: bool = True,
                 desc: str = "screening") -> dict[str, np.ndarray]:
    """Every image of `df` through the screening pipeline (research mode: probabilities for refused images too).

    Returns:
        {"probs": (N, K) raw ensemble probabilities (TTA-averaged when the screener runs TTA), "plain": the same
         from the untransformed view only, "ood": OOD scores, "quality": refused for quality, "gate": refused}.
    """
    from scipy.special import softmax
    from tqdm.auto import tqdm

    from lesionlab.clinic.screening import refusal_row
    from lesionlab.data.images import load_image

    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("probs", "plain", "ood", "quality", "gate")}
    paths = list(df["path"])
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, disable=not progress, leave=False):
        ims = [load_image(p) for p in paths[start:start + batch_size]]
        answers, outputs = screener.screen_outputs(ims, research=True)
        rows = [refusal_row(a) for a in answers]
        parts["probs"].append(mean_probabilities([o["probs"] for o in outputs.values()]))
        parts["plain"].append(mean_probabilities([softmax(o["logits"], axis=1) for o in outputs.values()]))
        parts["ood"].append(np.array([r["ood_score"] for r in rows], float))
        parts["quality"].append(np.array([bool(r["quality"]) for r in rows]))
        parts["gate"].append(np.array([r["refused"] for r in rows]))
    return {k: np.concatenate(v) for k, v in parts.items()}


# ----------------------------------------------------------------------------- metrics of one cell

_KEYS = ("balanced_accuracy", "macro_auc", "MEL_auc", "accuracy")


def cell_metrics(y: np.ndarray, probs: np.ndarray, groups: np.ndarray, trust: dict[str, Any],
                 classes: Sequence[str], *, n_boot: int, ci: float) -> dict[str, Any]:
    """Balanced accuracy, macro / melanoma AUC (calibrated probabilities), ECE before and after temperature
    scaling, conformal coverage and set size, each {value, lo, hi} with lesion-bootstrap CIs."""
    t, _ = model_trust(trust, ENSEMBLE)
    cal = calibrate_probs(probs, t)

    def stat(yy: np.ndarray, pp: np.ndarray) -> dict[str, float]:
        m = flat_metrics(yy, pp, classes)
        return {k: m.get(k, np.nan) for k in _KEYS}

    flat = bootstrap_ci(y, cal, groups=groups, n_boot=n_boot, ci=ci, stat=stat)
    tr = evaluate_trust(y, probs, trust, ENSEMBLE, groups=groups, n_boot=n_boot, ci=ci)
    c, s = tr["calibration"], tr["conformal"]
    out = {"n": int(len(y)), "lesions": int(len(np.unique(groups))), **{k: flat[k] for k in _KEYS},
           "ece_before": c["before"]["ece"], "ece": c["after"]["ece"], "coverage": s["coverage"],
           "mean_set_size": s["mean_set_size"], "temperature": float(t)}
    if "MEL" not in classes:
        out["MEL_auc"] = {"value": None, "lo": None, "hi": None}
    return out


def _thin(curve: dict[str, list[float]], points: int = 200) -> dict[str, list[float]]:
    n = len(curve["coverage"])
    if n <= points:
        return curve
    keep = np.unique(np.r_[np.linspace(0, n - 1, points).round().astype(int), n - 1])
    return {k: [v[i] for i in keep] for k, v in curve.items()}


def evaluate_cell(val: dict[str, Any], evals: dict[str, dict[str, Any]], classes: Sequence[str],
                  shared: Sequence[str], cfg: StudyConfig, *, refusal_rate: float) -> dict[str, Any]:
    """Trust and refusal fitted on the internal validation (restricted to `shared`), measured on each eval set.

    Args:
        val / evals[name]: {"labels": class names, "groups": lesion ids, "probs", "ood", "quality", "gate"}.
    """
    tcfg = dataclasses.replace(cfg.trust, class_coverage={k: v for k, v in cfg.trust.class_coverage.items()
                                                          if k in shared})
    rows_v, yv, pv = restrict(val["labels"], val["probs"], classes, shared)
    trust = fit_trust(yv, {ENSEMBLE: pv}, tcfg, list(shared))
    t, sets = model_trust(trust, ENSEMBLE)
    cal_v = calibrate_probs(pv, t)
    sig_v = refusal_signals(cal_v, sets.sets(cal_v), val["ood"][rows_v])
    wrong_v = cal_v.argmax(1) != yv
    scores = {name: fit_refusal_score(sig_v, wrong_v, use=use, refusal_rate=refusal_rate)
              for name, use in VARIANTS.items()}
    out: dict[str, Any] = {"classes": list(shared), "temperature": float(t), "n_val": int(len(yv)),
                           "val_accuracy": float(1 - wrong_v.mean()) if len(yv) else None,
                           "refusal_scores": {k: v.to_dict() for k, v in scores.items()}, "sets": {}}
    for name, e in evals.items():
        rows, y, p = restrict(e["labels"], e["probs"], classes, shared)
        if len(y) == 0:
            continue
        groups = np.asarray(e["groups"], dtype=object)[rows]
        m = cell_metrics(y, p, groups, trust, shared, n_boot=cfg.eval.bootstrap, ci=cfg.eval.ci)
        cal = calibrate_probs(p, t)
        correct = cal.argmax(1) == y
        sig = refusal_signals(cal, sets.sets(cal), e["ood"][rows])
        refusals = compare_refusals(correct, sig, scores, gate=e["gate"][rows], quality=e["quality"][rows])
        curves = {k: _thin(risk_coverage(correct, rs.score(sig))) for k, rs in scores.items()}
        out["sets"][name] = {"metrics": m, "refusal": refusals, "risk_coverage": curves}
    return out


# ----------------------------------------------------------------------------- the workflow


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def cross_site_models(cfg: StudyConfig) -> StudyConfig:
    """`cfg` with the models the matrix trains: `cross_site.archs` / `cross_site.epochs` where set, else the study's.

    Raises a one-line UserError for an unknown architecture or a negative epoch count (a study checks this before
    its first step, not when it reaches the matrix).
    """
    from lesionlab import models

    if cfg.cross_site.epochs < 0:
        raise UserError(f"cross_site.epochs is {cfg.cross_site.epochs}; give 0 (the study's train.epochs) or more")
    for arch in models.expand_archs(cfg.cross_site.archs):
        models.resolve(arch)  # names the valid architectures
    c = config_from_dict(cfg.to_dict())
    if cfg.cross_site.archs:
        c.train.archs = list(cfg.cross_site.archs)
    if cfg.cross_site.epochs > 0:
        c.train.epochs = cfg.cross_site.epochs
    return c


def _variant_cfg(cfg: StudyConfig, variant: str) -> StudyConfig:
    c = config_from_dict(cfg.to_dict())
    if variant == "color":
        c.data.color_constancy = "shades_of_gray"
    return c


def _train(df_tr: pd.DataFrame, df_va: pd.DataFrame, cfg: StudyConfig, runs: Path, split_hash: str,
           cache_dir: Path, progress: bool) -> list[Path]:
    """Train (or reuse, when the run folder still matches) every configured architecture."""
    from lesionlab import models
    from lesionlab.training.fit import fit
    from lesionlab.training.provenance import run_folder_mismatch
    from lesionlab.workflows.steps import remove_path

    dirs = []
    for arch in models.expand_archs(cfg.train.archs):
        d = runs / models.file_stem(arch)
        why = run_folder_mismatch(d, arch, cfg, split_hash) if d.exists() else None
        if why:
            log.info("cross-site: %s in %s: %s; training again", arch, d, why)
            remove_path(d)
        fit(arch, df_tr, df_va, cfg, d, cache_dir=cache_dir, resume=True, split_hash=split_hash, progress=progress)
        dirs.append(d)
    return dirs


def run_cross_site(cfg: StudyConfig, out_dir: str | Path, *, data: str | Path | None, metadata: str | Path | None = None,
                   source_column: str = "dataset", scheme: str = "pairs", pairs: Sequence[tuple[str, str]] = (),
                   sources: Sequence[str] = (), compare: Sequence[str] = (), refusal_rate: float = 0.1,
                   min_class_images: int = 10, skip_invalid: bool = False, progress: bool = True,
                   table: Table | None = None) -> dict[str, Any]:
    """Run the cross-site matrix into `out_dir` (see the module docstring); returns cross_site.json's contents.

    Args:
        table: an already validated table (the study's, invalid rows dropped); else read and validated from
            `data` / `metadata`.
        source_column: the table column naming each image's source (HAM10000: `dataset`).
        sources: only these sources (default: all in the table).
        compare: extra variants, any of `color`, `tta`.
        refusal_rate: the share of internal validation images each refusal score refuses.
        min_class_images: a class is shared when both sides have at least this many images of it.
    """
    from lesionlab import models
    from lesionlab.clinic.ood_model import fit_ood
    from lesionlab.clinic.screening import Screener
    from lesionlab.data.split import split_and_check, write_split
    from lesionlab.data.validation import load_valid_table
    from lesionlab.inference.predictor import load_predictors
    from lesionlab.report.cross_site import write_cross_site_report

    bad = sorted(set(compare) - set(COMPARE))
    if bad:
        raise UserError(f"--compare {bad[0]!r} is not a variant; valid: {', '.join(COMPARE)}")
    if not 0 <= refusal_rate < 1:
        raise UserError(f"--refusal-rate {refusal_rate} must be in [0, 1)")
    cfg = cross_site_models(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lset = get_label_set(cfg.data.labels)
    if table is None:
        table, _ = load_valid_table(data, metadata, skip_invalid=skip_invalid, labels=cfg.data.labels,
                                    max_pixels=cfg.data.max_image_pixels, skipped_csv=out / "skipped.csv")
    df = table.df
    if source_column not in df.columns:
        raise UserError(f"{table.source}: no column {source_column!r} naming each image's source; columns: "
                        f"{', '.join(c for c in df.columns if c != 'path')}; pass --source-column")
    df = df[(df["label"].isin(lset.classes)) & (df[source_column].astype(str) != "")].copy()
    df["source"] = df[source_column].astype(str)  # the split stratifies by source and class together
    known = list(dict.fromkeys(sorted(df["source"])))
    if sources:
        missing = [s for s in sources if s not in known]
        if missing:
            raise UserError(f"--sources names {missing[0]!r}, not in column {source_column}; known: {', '.join(known)}")
        known = list(sources)
    plan = plan_cells(known, scheme=scheme, pairs=pairs)
    variants = ["baseline", *(["color"] if "color" in compare else [])]
    use_tta = "tta" in compare
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
    by_source = {s: df[df["source"] == s] for s in known}
    result: dict[str, Any] = {
        "source_column": source_column, "label_set": lset.name, "scheme": "pairs given" if pairs else scheme,
        "refusal_rate": refusal_rate, "min_class_images": min_class_images, "compare": list(compare),
        "sources": {s: {"images": int(len(g)), "lesions": int(g["lesion_id"].nunique()),
                        "classes": {c: int((g["label"] == c).sum()) for c in lset.classes}}
                    for s, g in by_source.items()},
        "archs": models.expand_archs(cfg.train.archs), "epochs": cfg.train.epochs, "image_size": cfg.data.image_size,
        "pretrained": cfg.train.pretrained, "cells": []}
    for k, (train, tests) in enumerate(plan, 1):
        name = "+".join(train)
        folder = out / _slug(name)
        log.info("cross-site [%d/%d]: train on %s (%s), test on %s", k, len(plan), name,
                 ", ".join(f"{s}: {len(by_source[s])} images" for s in train), ", ".join(tests))
        df_g = pd.concat([by_source[s] for s in train], ignore_index=True)
        sp = split_and_check(df_g, fractions=(cfg.split.train, cfg.split.val, cfg.split.test), seed=cfg.split.seed)
        folder.mkdir(parents=True, exist_ok=True)
        write_split(sp, folder / "splits.csv")
        split_hash = sha256_file(folder / "splits.csv")
        df_g["split"] = sp["split"].to_numpy()  # make_split keeps the input order
        parts = {s: df_g[df_g["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
        empty = [s for s, f in parts.items() if f.empty]
        if empty:  # too few lesions at this source to train, validate and test on: its row stays empty
            why = f"{name} has too few lesions for a {'/'.join(empty)} part ({len(df_g)} images)"
            log.warning("cross-site: %s; skipped", why)
            result["cells"].extend({"train": name, "test": t, "variant": v, "skipped": why}
                                   for v in [*variants, *(["tta"] if use_tta else [])] for t in tests)
            continue
        for variant in variants:
            vcfg = _variant_cfg(cfg, variant)
            log.info("cross-site: %s, %s: training %s on %d images (%d validation)", name, variant,
                     ", ".join(vcfg.train.archs), len(parts["train"]), len(parts["val"]))
            dirs = _train(parts["train"], parts["val"], vcfg, folder / variant / "runs", split_hash, cache_dir, progress)
            preds = load_predictors(dirs, device=vcfg.train.device, precision=vcfg.train.precision)
            log.info("cross-site: %s, %s: fitting the refusal gate", name, variant)
            ood = fit_ood(preds, parts["train"], parts["val"], vcfg.ood, batch_size=vcfg.data.batch_size,
                          progress=progress) if vcfg.ood.method != "none" else None
            tta_here = use_tta and variant == "baseline"
            screener = Screener(preds, vcfg.quality, ood, tta=tta_here)
            frames = {"internal": parts["test"], **{t: by_source[t].reset_index(drop=True) for t in tests}}
            screened = {}
            for tag, frame in {"val": parts["val"], **frames}.items():
                log.info("cross-site: %s, %s: screening %s (%d images)", name, variant, tag, len(frame))
                s = screen_frame(screener, frame, batch_size=vcfg.data.batch_size, progress=progress,
                                 desc=f"{name} -> {tag}")
                if ood is None:
                    s["ood"] = np.zeros(len(frame))
                screened[tag] = {"labels": frame["label"].to_numpy(), "groups": frame["lesion_id"].to_numpy(),
                                 "frame": frame, **s}
            runs_of = [("baseline" if variant == "baseline" else variant, "plain")]
            if tta_here:
                runs_of.append(("tta", "probs"))
            for vname, key in runs_of:
                for t in tests:
                    shared = shared_classes(lset.classes, parts["train"]["label"], screened[t]["labels"],
                                            min_images=min_class_images)
                    if len(shared) < 2:
                        log.warning("cross-site: %s -> %s shares %d classes with >= %d images; skipped",
                                    name, t, len(shared), min_class_images)
                        result["cells"].append({"train": name, "test": t, "variant": vname, "skipped":
                                                f"fewer than two shared classes with >= {min_class_images} images"})
                        continue
                    ev = {tag: {**screened[tag], "probs": screened[tag][key]} for tag in ("val", "internal", t)}
                    cell = evaluate_cell(ev["val"], {"internal": ev["internal"], t: ev[t]}, lset.classes, shared,
                                         vcfg, refusal_rate=refusal_rate)
                    cell.update(train=name, test=t, variant=vname)
                    result["cells"].append(cell)
                    log.info("cross-site: %s -> %s (%s): balanced accuracy internal %s, external %s", name, t,
                             vname, _fmt(cell, "internal"), _fmt(cell, t))
            atomic_write_json(out / "cross_site.json", result)  # progress survives an interrupted run
    atomic_write_json(out / "cross_site.json", result)
    write_cross_site_report(result, out, labels=lset)
    return result


def _fmt(cell: dict[str, Any], tag: str) -> str:
    v = cell["sets"].get(tag, {}).get("metrics", {}).get("balanced_accuracy", {}).get("value")
    return "n/a" if v is None else f"{v:.3f}"
