"""The whole protocol as fingerprinted steps: synth -> validate -> split -> train -> infer -> ensemble -> metrics ->
errors -> gallery -> external -> report.

Every step runs through `lesionlab.workflows.steps.Steps`: a step is reused while its outputs still match the config
values, input files and upstream steps it depends on, and re-run otherwise, with the reason in `steps.json`,
the log and the report (how fingerprints and reasons work, and why no pipeline library: lesionlab.workflows.steps).
Steps recorded earlier but not part of this run (an architecture dropped from `train.archs`) have their
outputs removed, so `runs/` and `predictions/` never hold models the report does not describe. `--fresh`
(`reset_study`) deletes what the study wrote (the outputs recorded in steps.json and the study's own files) and
nothing else.

Adding a step (calibration, robustness, subgroups, ...)::

    steps.run(
        "calibration",                               # unique name; shown in steps.json, the log and the report
        lambda: fit_calibration(...),                # does the work; reads its inputs, writes `outputs`
        config={"eval": section(cfg.eval, keep=("bootstrap",)), "calibration": cfg.calibration},
        inputs=[out / "splits.csv"],                 # files read that no upstream step wrote (optional)
        upstream=[*infer_steps, "metrics"],          # steps whose outputs it reads
        outputs=[out / "calibration"],               # what it writes, inside the study folder
    )

Pass only the config sections (or keys, via `section(..., keep=/drop=)`) the step reads: a key it does not read
would re-run it needlessly, a key it reads but does not declare would let a stale result through. The report
(`lesionlab.report.study_report`) reads the outputs; it runs on every call (it is cheap and shows this run's
step statuses).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.config import StudyConfig, save_config
from lesionlab.data.split import read_duplicates, read_split, split_and_check, summary_table, write_split
from lesionlab.data.subsets import split_frames, subset_frame
from lesionlab.data.tables import read_table
from lesionlab.data.validation import drop_invalid, validate
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.evaluation.metrics import summarize
from lesionlab.evaluation.trust import (
    TRUST_FILE,
    fit_trust,
    read_trust,
    trust_metrics,
    write_trust,
)
from lesionlab.exceptions import UserError
from lesionlab.explain.gallery import make_gallery
from lesionlab.io import atomic_write_csv, atomic_write_json, sha256_file
from lesionlab.models import file_stem
from lesionlab.report.study_report import report_study
from lesionlab.workflows.external import evaluate_external
from lesionlab.workflows.infer import predict_split_files
from lesionlab.workflows.steps import (
    HASHES_FILE,
    STEPS_FILE,
    Steps,
    changed_keys,
    flatten_config,
    name_list,
    remove_path,
    section,
)

log = logging.getLogger(__name__)

# Files and folders that only `run_study` writes into a study folder; `reset_study` removes these (and the
# outputs recorded in steps.json), never anything else. `data` is removed only when the study made it (synth).
STUDY_FILES = ("steps.json", HASHES_FILE, "config.yaml", "report.html", "report.md", "figures", "dataset.json",
               "validation_problems.csv", "splits.csv", "split_summary.csv", "runs", "predictions", "eval", "errors",
               "gallery", "external", "cache")


# ----------------------------------------------------------------------------- --fresh


def reset_study(out: str | Path) -> list[str]:
    """`--fresh`: delete what the study wrote into `out` (recorded step outputs and the study's own files).

    Nothing is deleted from a folder without steps.json (it was not written by `lesionlab study`).
    """
    out = Path(out)
    f = out / STEPS_FILE
    if not f.exists():
        return []
    recorded = json.loads(f.read_text())
    names = set(STUDY_FILES)
    if "synth" in recorded:
        names.add("data")
    for rec in recorded.values():
        names.update(rec.get("outputs", []))
    removed = []
    for n in sorted(names, key=lambda s: (s == STEPS_FILE, s)):  # steps.json last: a crash leaves a resumable state
        p = out / n
        if not p.resolve().is_relative_to(out.resolve()) or p.resolve() == out.resolve():
            continue
        if p.exists() or p.is_symlink():
            remove_path(p)
            removed.append(n)
    log.info("--fresh: removed %s from %s", ", ".join(removed) or "nothing", out)
    return removed


# ----------------------------------------------------------------------------- the train step's extra check


# Data settings that cannot change a trained model (an item is the same with or without workers and cache, by
# construction: EpochSampler, ImageCache; see training.fit.RESUME_FREE), so changing them retrains nothing.
TRAIN_FREE_DATA = ("num_workers", "cache", "cache_dir")


def train_config(cfg: StudyConfig, arch: str) -> dict[str, Any]:
    """The config values one architecture's training reads (not the other architectures, workers or the cache)."""
    from lesionlab.models.fusion import fusion_free

    free = tuple(k.split(".", 1)[1] for k in fusion_free(cfg.train.metadata))
    return {"arch": arch, "train": section(cfg.train, drop=("archs", *free)), "data": section(cfg.data, drop=TRAIN_FREE_DATA)}


def run_folder_mismatch(run_dir: Path, cfg: StudyConfig, arch: str, split_hash: str) -> str | None:
    """Why the checkpoint in `run_dir` (its model.json sidecar) was not trained by this config on this split, or None."""
    from lesionlab import models

    meta_file = Path(run_dir) / models.META_FILE
    if not meta_file.exists():
        return None
    from lesionlab.models.fusion import fusion_free

    meta = json.loads(meta_file.read_text())
    want = flatten_config(train_config(cfg, arch))
    had_train = meta.get("config", {}).get("train", {})
    free = {"archs", *(k.split(".", 1)[1] for k in fusion_free(had_train.get("metadata")))}
    had = flatten_config({"arch": meta.get("arch"), "train": {k: v for k, v in had_train.items() if k not in free},
                          "data": {k: v for k, v in meta.get("config", {}).get("data", {}).items()
                                   if k not in TRAIN_FREE_DATA}})
    keys = changed_keys(had, want)
    if keys:
        return f"run folder trained with another config: {name_list(keys)}"
    if meta.get("split_sha256") != split_hash:
        return "run folder trained on another split (split SHA-256 differs)"
    return None


# ----------------------------------------------------------------------------- the protocol


def load_probs(pred_dir: Path, names: list[str], tag: str) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """(y_true, {name: probs}, image ids) from the CSVs written by `predict_split_files`."""
    from lesionlab.data.isic_csv import align, read_isic_csv

    truth = read_isic_csv(pred_dir / f"truth_{tag}.csv", kind="truth")
    out = {}
    y, ids = None, None
    for n in names:
        y, p, ids = align(truth, read_isic_csv(pred_dir / f"{file_stem(n)}_{tag}.csv", kind="prediction"))
        out[n] = p
    return y, out, ids


def _check_archs(archs: list[str]) -> None:
    seen = set()
    for a in archs:
        if a in seen:
            # Two runs of one architecture with one config and seed are the same model twice; an "ensemble" of
            # them would claim an agreement that means nothing.
            raise UserError(f"train.archs lists {a} twice; give each architecture once (one study trains one model "
                            "per architecture with one config and seed)")
        seen.add(a)


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    metadata: str | Path | None = None,
    duplicates: str | Path | None = None,
    skip_invalid: bool = False,
    progress: bool = True,
    fresh: bool = False,
) -> Path:
    """Run the protocol into `out_dir`, reusing every step whose inputs are unchanged; returns the HTML report path.

    Args:
        fresh: first delete what an earlier study wrote into `out_dir` (see `reset_study`).
    """
    from lesionlab import models
    from lesionlab.data.isic_csv import probs_frame, truth_frame, write_isic_csv
    from lesionlab.evaluation.ensemble import mean_probabilities
    from lesionlab.evaluation.error_analysis import analyse_errors, write_errors
    from lesionlab.evaluation.evaluate import evaluate_arrays
    from lesionlab.report.evaluation_files import plot_trust_reliability, write_evaluation
    from lesionlab.training.fit import RESUME_FILE, check_resume, fit

    out = Path(out_dir)
    archs = models.expand_archs(cfg.train.archs)
    if not archs:
        raise UserError("train.archs is empty; give at least one architecture")
    _check_archs(archs)
    if fresh:
        reset_study(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    save_config(cfg, out / "config.yaml")

    if data is None:
        if cfg.synth_images <= 0:
            raise UserError("give --data DIR (or use a config with synth_images > 0, such as demo)")
        from lesionlab.data.synth import make_synthetic

        data = out / "data"
        steps.run("synth", lambda: make_synthetic(data, n_images=cfg.synth_images, seed=cfg.split.seed,
                                                  size=tuple(cfg.synth_size), progress=progress),
                  config={"synth_images": cfg.synth_images, "synth_size": cfg.synth_size, "split.seed": cfg.split.seed},
                  outputs=[Path(data)])
    table = read_table(data, metadata)
    image_files = sorted({Path(p) for p in table.df["path"] if p})

    def do_validate():
        rep = validate(table, max_pixels=cfg.data.max_image_pixels, progress=progress)
        rep.write_csv(out / "validation_problems.csv")
        blocking = [p for p in rep.problems if p.kind != "image without a row"]
        if blocking and not skip_invalid:
            raise UserError(rep.summary())
        atomic_write_json(out / "dataset.json", {"source": str(table.source), "layout": table.layout,
                                                 "rows": len(table.df), "problems": rep.counts(), "notes": rep.notes})

    steps.run("validate", do_validate, config={"data.max_image_pixels": cfg.data.max_image_pixels},
              # the content hashes of the table and images, not the synth step: the same data given as --data
              # later (or made again) is the same input
              inputs={"metadata": table.source, "images": image_files},
              outputs=[out / "dataset.json", out / "validation_problems.csv"])
    # the validate step (now or in an earlier run) saved its problems: drop those rows without validating again
    bad = pd.read_csv(out / "validation_problems.csv", dtype=str, keep_default_na=False)
    table = drop_invalid(table, set(bad.loc[bad["problem"] != "image without a row", "image_id"]))
    split_path = out / "splits.csv"

    def do_split():
        dups = read_duplicates(duplicates) if duplicates else None
        sp = split_and_check(table.df, fractions=(cfg.split.train, cfg.split.val, cfg.split.test), seed=cfg.split.seed,
                             duplicates=dups)
        write_split(sp, split_path)
        atomic_write_csv(out / "split_summary.csv", summary_table(sp))

    steps.run("split", do_split, config={"split": cfg.split}, inputs={"duplicates": duplicates} if duplicates else (),
              upstream=["validate"], outputs=[split_path, out / "split_summary.csv"])
    sp = read_split(split_path)
    split_hash = sha256_file(split_path)
    tr, va = split_frames(table, sp)
    te = subset_frame(table, sp, "test")
    runs = out / "runs"
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
    train_steps = []
    for arch in archs:
        run_dir = runs / file_stem(arch)

        def do_train(a=arch, d=run_dir):
            why = run_folder_mismatch(d, cfg, a, split_hash)
            if not why and (d / RESUME_FILE).exists():
                try:
                    check_resume(d / RESUME_FILE, a, cfg, split_hash)
                except UserError as e:
                    why = str(e)
            if why:  # a leftover from another config (or an older LesionLab): start this model over
                log.info("train %s: %s; starting over", a, why)
                remove_path(d)
            return fit(a, tr, va, cfg, d, cache_dir=cache_dir, resume=True, split_hash=split_hash, progress=progress)

        def check_train(a=arch, d=run_dir):
            if not (d / models.WEIGHTS_FILE).exists():
                return f"outputs missing: {steps.rel(d / models.WEIGHTS_FILE)}"
            return run_folder_mismatch(d, cfg, a, split_hash)

        steps.run(f"train {arch}", do_train, config=train_config(cfg, arch), upstream=["split"], outputs=[run_dir],
                  check=check_train, resumable=True)
        train_steps.append(f"train {arch}")
    names = list(archs)  # the registry name is what model.json records as "arch"
    pred_dir = out / "predictions"
    frames = {"val": va, "test": te}

    def do_truth():
        for tag, frame in frames.items():
            write_isic_csv(pred_dir / f"truth_{tag}.csv", truth_frame(frame))

    steps.run("truth", do_truth, upstream=["split"], outputs=[pred_dir / f"truth_{t}.csv" for t in frames])
    infer_cfg = {"eval.tta": cfg.eval.tta, "train.device": cfg.train.device, "train.precision": cfg.train.precision}
    infer_steps = []
    for arch in archs:
        d = runs / file_stem(arch)
        steps.run(f"infer {arch}", lambda d=d: [predict_split_files([d], f, pred_dir, t, cfg, progress=progress, truth=False)
                                                for t, f in frames.items()],
                  config=infer_cfg, upstream=[f"train {arch}", "split"],
                  outputs=[*(pred_dir / f"{file_stem(arch)}_{t}.csv" for t in frames),
                           pred_dir / f"{file_stem(arch)}_inference.json"])
        infer_steps.append(f"infer {arch}")

    ens_steps = []
    if len(names) > 1:  # ensemble = mean of the members' probabilities, on both splits
        def do_ensemble():
            for tag in frames:
                _, probs, ids = load_probs(pred_dir, names, tag)
                write_isic_csv(pred_dir / f"{ENSEMBLE}_{tag}.csv", probs_frame(ids, mean_probabilities(list(probs.values()))))

        steps.run("ensemble", do_ensemble, upstream=["truth", *infer_steps],
                  outputs=[pred_dir / f"{ENSEMBLE}_{t}.csv" for t in frames])
        ens_steps = ["ensemble"]
    all_names = [*names, ENSEMBLE] if len(names) > 1 else names
    prob_steps = ["truth", *infer_steps, *ens_steps]
    yv, pv, _ = load_probs(pred_dir, all_names, "val")
    yt, pt, test_ids = load_probs(pred_dir, all_names, "test")
    lesion_of = dict(zip(sp["image_id"], sp["group_id"], strict=True))
    groups = np.array([lesion_of.get(i, i) for i in test_ids])
    # temperatures and conformal thresholds per model and for the ensemble, fitted on the validation split
    trust_file = out / TRUST_FILE
    steps.run("trust", lambda: write_trust(trust_file, fit_trust(yv, pv, cfg.trust)), config={"trust": cfg.trust},
              upstream=prob_steps, outputs=[trust_file])

    def do_metrics():
        trust = read_trust(trust_file)
        for n in all_names:
            m = evaluate_arrays(yt, pt[n], cfg=cfg.eval, groups=groups, val=(yv, pv[n]))
            m["val"] = {k: v for k, v in summarize(yv, pv[n]).items() if k in ("macro", "accuracy", "balanced_accuracy")}
            m.update(trust_metrics(yt, pt[n], trust, n, val=(yv, pv[n]), groups=groups, n_boot=cfg.eval.bootstrap,
                                   ci=cfg.eval.ci))  # "calibration", "conformal", "conformal_variants"
            write_evaluation(m, yt, pt[n], out / "eval" / file_stem(n), title=n)
            plot_trust_reliability(m, out / "eval" / file_stem(n) / "reliability.png", title=f"{n}, test split")

    steps.run("metrics", do_metrics, config={"eval": section(cfg.eval, drop=("tta", "error_class"))},
              upstream=["split", *prob_steps, "trust"], outputs=[out / "eval" / file_stem(n) for n in all_names],
              check=lambda: None if all((out / "eval" / file_stem(n) / "metrics.json").exists() for n in all_names)
              else "outputs missing: eval/*/metrics.json")
    mets = {n: json.loads((out / "eval" / file_stem(n) / "metrics.json").read_text()) for n in all_names}
    best = max(names, key=lambda n: (mets[n]["val"]["balanced_accuracy"] or 0, mets[n]["val"]["macro"]["auc"] or 0))

    steps.run("errors", lambda: write_errors(analyse_errors(test_ids, yt, {n: pt[n] for n in names}, best=best,
                                                            cls=cfg.eval.error_class), out / "errors"),
              config={"eval.error_class": cfg.eval.error_class}, upstream=[*prob_steps, "metrics"],
              outputs=[out / "errors"])
    from lesionlab.evaluation.subgroups import subgroup_columns
    from lesionlab.report.evaluation_files import write_subgroups

    sub_cols = list(dict.fromkeys([*subgroup_columns(table.df), *cfg.eval.subgroup_columns]))
    if sub_cols:  # subgroup performance over the metadata columns present (sex, age bands, site, ...)
        sub_names = [best, *([ENSEMBLE] if ENSEMBLE in all_names else [])]
        steps.run("subgroups", lambda: write_subgroups(
            out / "subgroups", yt, {n: pt[n] for n in sub_names}, test_ids, table.df, groups=groups,
            columns=sub_cols, n_boot=cfg.eval.bootstrap, ci=cfg.eval.ci, min_images=cfg.eval.subgroup_min_images,
            file_names={n: file_stem(n) for n in sub_names}),
            config={"eval": section(cfg.eval, keep=("bootstrap", "ci", "subgroup_columns", "subgroup_min_images")),
                    "subgroups.columns": sub_cols},  # the columns found in the table, not only those named
            inputs={"metadata": Path(table.source)}, upstream=["split", *prob_steps, "metrics"],
            outputs=[out / "subgroups"])
    if cfg.explain.gallery:
        steps.run("gallery", lambda: make_gallery([runs / file_stem(a) for a in archs], te, yt, pt, best, out / "gallery",
                                                  cfg, test_ids),
                  config={"explain": cfg.explain, "train.device": cfg.train.device},
                  upstream=["split", *train_steps, *prob_steps, "metrics"], outputs=[out / "gallery"])
    for ext in cfg.external:
        d = out / "external" / file_stem(ext.name)
        ext_images = sorted(_external_paths(ext.images), key=str) if Path(ext.images).is_dir() else []
        steps.run(f"external {ext.name}", lambda e=ext, d=d: evaluate_external(
            [runs / file_stem(a) for a in archs], e.images, e.truth, d, cfg, skip_invalid=skip_invalid, progress=progress,
            trust=read_trust(trust_file)),
            config={"external": {"name": ext.name, "images": ext.images, "truth": ext.truth},
                    "eval": section(cfg.eval, drop=("error_class",)), **infer_cfg},
            inputs={"truth": Path(ext.truth), "images": ext_images}, upstream=[*train_steps, "trust"], outputs=[d])
    if cfg.robustness.enabled:  # lesion consistency (from the stored test predictions) and acquisition robustness
        from lesionlab.workflows.robustness import run_robustness, write_consistency

        steps.run("consistency", lambda: write_consistency(out / "consistency", groups, pt, yt, n_boot=cfg.eval.bootstrap,
                                                           ci=cfg.eval.ci, seed=cfg.robustness.seed),
                  config={"eval": section(cfg.eval, keep=("bootstrap", "ci")), "robustness.seed": cfg.robustness.seed},
                  upstream=["split", *prob_steps], outputs=[out / "consistency"])
        te_groups = te["image_id"].map(lesion_of).fillna(te["image_id"]).to_numpy()
        steps.run("robustness", lambda: run_robustness([runs / file_stem(a) for a in archs], te, out / "robustness", cfg,
                                                       lesion_ids=te_groups, consistency=False,
                                                       progress=progress),
                  config={"robustness": cfg.robustness, "data.max_image_pixels": cfg.data.max_image_pixels,
                          "train.device": cfg.train.device, "train.precision": cfg.train.precision},
                  upstream=["split", *train_steps], outputs=[out / "robustness"])
    if cfg.ood.method != "none":  # refusal of unevaluable images: OOD scores in / out for the report's Trust section
        def do_ood():
            from lesionlab.clinic.ood_model import fit_ood
            from lesionlab.inference.predictor import load_predictors
            from lesionlab.workflows.refusal import ood_report

            preds = load_predictors([runs / file_stem(a) for a in archs], device=cfg.train.device,
                                    precision=cfg.train.precision)
            ood = fit_ood(preds, tr, va, cfg.ood, batch_size=cfg.data.batch_size, progress=progress)
            ood_report(preds, ood, te, cfg.quality, out / "ood", n_degraded=min(100, len(te)),
                       batch_size=cfg.data.batch_size, progress=progress)

        steps.run("ood", do_ood, config={"ood": cfg.ood, "quality": cfg.quality, "train.device": cfg.train.device,
                                         "train.precision": cfg.train.precision},
                  upstream=["split", *train_steps], outputs=[out / "ood"])
    t = time.perf_counter()
    steps.record("report", "ran", "always runs (cheap; shows this run's step statuses)", 0.0)
    steps.prune(keep=[Path(data)])  # after the report's record: it is part of every study, never "removed"
    html_path = report_study(out, cfg, names, all_names, best, mets)
    steps.record("report", "ran", "always runs (cheap; shows this run's step statuses)", time.perf_counter() - t)
    return html_path


def _external_paths(images: str | Path) -> list[Path]:
    from lesionlab.data.images import find_images

    return list(find_images(images).values())


