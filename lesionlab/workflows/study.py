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
        code=("lesionlab.evaluation.calibration",),   # the code it runs (hashed: a fix re-runs it); see STEP_CODE
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

import numpy as np
import pandas as pd

from lesionlab.config import StudyConfig
from lesionlab.data.split import (
    published_split,
    read_duplicates,
    read_split,
    split_and_check,
    summary_table,
    write_split,
)
from lesionlab.data.subsets import split_frames, subset_frame
from lesionlab.data.tables import read_table
from lesionlab.data.validation import drop_invalid, validate
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.evaluation.metrics import summarize
from lesionlab.evaluation.trust import (
    fit_trust,
    trust_metrics,
)
from lesionlab.exceptions import UserError
from lesionlab.explain.gallery import make_gallery
from lesionlab.io import atomic_write_csv, sha256_file
from lesionlab.labels import get_label_set
from lesionlab.models import file_stem
from lesionlab.report.study_report import report_study
from lesionlab.study_folder import StudyFolder
from lesionlab.training.provenance import TRAINING_CODE
from lesionlab.workflows.external import evaluate_external
from lesionlab.workflows.infer import predict_split_files
from lesionlab.workflows.steps import (
    HASHES_FILE,
    STEPS_FILE,
    Steps,
    folder_lock,
    remove_path,
    section,
)

log = logging.getLogger(__name__)

# Files and folders that only `run_study` writes into a study folder; `reset_study` removes these (and the
# outputs recorded in steps.json), never anything else. `data` is removed only when the study made it (synth).
STUDY_FILES = ("steps.json", HASHES_FILE, "config.yaml", "report.html", "report.md", "figures", "dataset.json",
               "validation_problems.csv", "splits.csv", "split_summary.csv", "runs", "predictions", "eval", "errors",
               "gallery", "external", "cache", "reader_study", "cross_site")


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


# ----------------------------------------------------------------------------- the code each step runs


# Hashed into each step's fingerprint (lesionlab.workflows.steps.code_digest): a fix re-runs the steps that run the
# changed code and, through their outputs, what reads them; nothing else. By hand rather than an import closure,
# which would drag in every module a step's module imports for a name (infer -> the bundle code -> ...); as narrow
# as the work is costly (training: modules), as wide as it is cheap (evaluation: the package). This module is not
# listed: it wires the steps together, and hashing it would re-run every step on any edit; a step's numbers come
# from the libraries listed. What training runs is lesionlab.training.provenance's TRAINING_CODE.
_IMAGES = ("lesionlab.data.images", "lesionlab.data.color", "lesionlab.data.transforms", "lesionlab.data.gpu_augment",
           "lesionlab.data.dataset",
           "lesionlab.data.cache", "lesionlab.data.metadata", "lesionlab.data.tables", "lesionlab.data.subsets")
_PREDICT = ("lesionlab.inference", "lesionlab.models", "lesionlab.runtime", "lesionlab.labels", *_IMAGES)
_EVAL = ("lesionlab.evaluation", "lesionlab.labels", "lesionlab.data.isic_csv", "lesionlab.report.evaluation_files",
         "lesionlab.report.figures")
STEP_CODE: dict[str, tuple[str, ...]] = {
    "synth": ("lesionlab.data.synth", "lesionlab.data.images"),
    "validate": ("lesionlab.data.tables", "lesionlab.data.validation", "lesionlab.data.images", "lesionlab.labels"),
    "split": ("lesionlab.data.split", "lesionlab.labels"),
    "train": TRAINING_CODE,
    "truth": ("lesionlab.data.isic_csv", "lesionlab.data.subsets", "lesionlab.labels"),
    "infer": ("lesionlab.workflows.infer", "lesionlab.data.isic_csv", *_PREDICT),
    "ensemble": ("lesionlab.evaluation.ensemble", "lesionlab.data.isic_csv"),
    "trust": ("lesionlab.evaluation.trust", "lesionlab.evaluation.calibration", "lesionlab.evaluation.conformal"),
    "metrics": _EVAL,
    "errors": ("lesionlab.evaluation.error_analysis", "lesionlab.evaluation.metrics"),
    "subgroups": _EVAL,
    "gallery": ("lesionlab.explain", *_PREDICT),
    "external": ("lesionlab.workflows.external", "lesionlab.workflows.infer", *_PREDICT, *_EVAL),
    "consistency": ("lesionlab.workflows.robustness", "lesionlab.evaluation"),
    # the costly steps (inference under every perturbation, OOD features of the training split) name the evaluation
    # modules they run rather than the package: a fix to calibration need not re-run the perturbations
    "robustness": ("lesionlab.workflows.robustness", "lesionlab.data.perturbations", "lesionlab.evaluation.robustness",
                   "lesionlab.evaluation.consistency", "lesionlab.evaluation.metrics", "lesionlab.evaluation.bootstrap",
                   "lesionlab.evaluation.ensemble", "lesionlab.report.figures", *_PREDICT),
    "cross-site": ("lesionlab.workflows.cross_site", "lesionlab.report.cross_site", "lesionlab.evaluation",
                   "lesionlab.clinic.screening", "lesionlab.clinic.ood_model", "lesionlab.data.split",
                   *TRAINING_CODE, *_PREDICT),
    "reader-study": ("lesionlab.workflows.reader_study.simulate", "lesionlab.workflows.reader_study.analyse",
                     "lesionlab.evaluation.mrmc", "lesionlab.evaluation.readers", "lesionlab.report.reader_study",
                     "lesionlab.clinic.screening"),
    "ood": ("lesionlab.workflows.refusal", "lesionlab.clinic.screening", "lesionlab.clinic.ood_model",
            "lesionlab.clinic.trust", "lesionlab.evaluation.selective",
            "lesionlab.data.ood_images", "lesionlab.data.quality",
            "lesionlab.evaluation.ood", "lesionlab.evaluation.calibration", "lesionlab.evaluation.conformal",
            "lesionlab.evaluation.ensemble", "lesionlab.report.figures", *_PREDICT),
}


# ----------------------------------------------------------------------------- the protocol




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

    One study at a time per folder: a second `run_study` into a folder one is running in raises a one-line
    UserError naming the other process (lesionlab.workflows.steps.folder_lock); two at once would train into the
    same run folders, so weights and sidecar could come from different processes, and race on steps.json.

    Args:
        fresh: first delete what an earlier study wrote into `out_dir` (see `reset_study`), under the lock.
    """
    from lesionlab import models

    out = Path(out_dir)
    archs = models.expand_archs(cfg.train.archs)
    if not archs:
        raise UserError("train.archs is empty; give at least one architecture")
    _check_archs(archs)
    if cfg.cross_site.enabled:
        from lesionlab.workflows.cross_site import cross_site_models

        cross_site_models(cfg)  # its architectures and epochs, checked before the first step
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):
        if fresh:
            reset_study(out)  # never the lock file: it is not one of the study's outputs
        return _run_study(cfg, out, archs, data=data, metadata=metadata, duplicates=duplicates,
                          skip_invalid=skip_invalid, progress=progress)


def _run_study(cfg: StudyConfig, out: Path, archs: list[str], *, data: str | Path | None,
               metadata: str | Path | None, duplicates: str | Path | None, skip_invalid: bool, progress: bool) -> Path:
    """`run_study`'s protocol, run while holding the study folder's lock."""
    from lesionlab import models
    from lesionlab.evaluation.ensemble import mean_probabilities
    from lesionlab.evaluation.error_analysis import analyse_errors, write_errors
    from lesionlab.evaluation.evaluate import evaluate_arrays
    from lesionlab.report.evaluation_files import plot_trust_reliability, write_evaluation
    from lesionlab.training.fit import fit
    from lesionlab.training.provenance import EPOCHS, run_folder_mismatch, training_reads

    steps = Steps(out)
    sf = StudyFolder(out)
    sf.write_config(cfg)

    if data is None:
        if cfg.synth_images <= 0:
            raise UserError("give --data DIR (or use a config with synth_images > 0, such as demo)")
        from lesionlab.data.synth import synthesize

        data = out / "data"
        steps.run("synth", lambda: synthesize(data, n_images=cfg.synth_images, seed=cfg.split.seed,
                                              size=tuple(cfg.synth_size), sources=cfg.synth_sources, progress=progress),
                  config={"synth_images": cfg.synth_images, "synth_size": cfg.synth_size, "split.seed": cfg.split.seed,
                          "synth_sources": cfg.synth_sources},
                  outputs=[Path(data)], code=STEP_CODE["synth"])
    lset = get_label_set(cfg.data.labels)
    source_items = [{"data": s.data, "metadata": s.metadata, "name": s.name} for s in cfg.sources]
    if isinstance(data, list | tuple) and len(data) > 1:  # `--data` given more than once
        source_items = [{"data": d} for d in data]
    elif isinstance(data, list | tuple):
        data = data[0]
    if source_items:
        from lesionlab.data.multi import read_sources

        table = read_sources(source_items, labels=lset)
        data = Path(source_items[0]["data"])
    else:
        table = read_table(data, metadata, labels=lset)
    image_files = sorted({Path(p) for p in table.df["path"] if p})

    def do_validate():
        rep = validate(table, max_pixels=cfg.data.max_image_pixels, progress=progress)
        rep.write_csv(sf.validation_problems_file)
        blocking = [p for p in rep.problems if p.kind != "image without a row"]
        if blocking and not skip_invalid:
            raise UserError(rep.summary())
        record = {"source": str(table.source), "layout": table.layout, "rows": len(table.df),
                  "problems": rep.counts(), "notes": rep.notes}
        if lset.name != "ham7" or table.sources:  # ham7 single-source dataset.json stays as it was
            record.update(label_set=lset.name, caveats=lset.caveats_for(
                [s["layout"] for s in table.sources] or [table.layout]), leaky_columns=table.leaky,
                skin_tone=table.skin_tone, sources=table.sources)
        sf.write_dataset(record)

    steps.run("validate", do_validate, config={"data.max_image_pixels": cfg.data.max_image_pixels,
                                               **({"data.labels": cfg.data.labels} if lset.name != "ham7" else {}),
                                               **({"sources": cfg.sources} if cfg.sources else {})},
              # the content hashes of the table and images, not the synth step: the same data given as --data
              # later (or made again) is the same input
              inputs={"metadata": table.source, "images": image_files},
              outputs=[sf.dataset_file, sf.validation_problems_file], code=STEP_CODE["validate"])
    # the validate step (now or in an earlier run) saved its problems: drop those rows without validating again
    bad = pd.read_csv(sf.validation_problems_file, dtype=str, keep_default_na=False)
    table = drop_invalid(table, set(bad.loc[bad["problem"] != "image without a row", "image_id"]))
    split_path = sf.split_file

    multi = table.df["source"].nunique() > 1 if "source" in table.df else False

    def do_split():
        dups = read_duplicates(duplicates) if duplicates else None
        if multi and cfg.split.phash_distance >= 0:  # images two sources share, by perceptual hash
            from lesionlab.data.multi import cross_source_duplicates

            found = cross_source_duplicates(table.df, max_distance=cfg.split.phash_distance)
            atomic_write_csv(out / "cross_source_duplicates.csv", found)
            by_id = sum(s.get("duplicate_ids", 0) for s in table.sources)
            atomic_write_csv(out / "cross_source_summary.csv", pd.DataFrame([
                {"how": "same file id", "images": by_id, "kept": "once (first source's row)"},
                {"how": f"perceptual hash (pHash, <= {cfg.split.phash_distance} bits)", "images": len(found),
                 "kept": "in one split"}]))
            dups = pd.concat([d for d in (dups, found[["from_img", "to_img"]]) if d is not None], ignore_index=True)
        if cfg.split.published:  # the dataset's own split (Derm7pt's index files), checked, instead of ours
            sp = published_split(table.df, duplicates=dups)
        else:
            sp = split_and_check(table.df, fractions=(cfg.split.train, cfg.split.val, cfg.split.test),
                                 seed=cfg.split.seed, duplicates=dups)
        write_split(sp, split_path)
        atomic_write_csv(sf.split_summary_file, summary_table(sp, lset.classes))

    split_outputs = [out / "cross_source_duplicates.csv", out / "cross_source_summary.csv"] if multi else []
    # split.published enters the fingerprint only when on, so studies made before it existed keep their split step
    split_drop = (*(() if multi else ("phash_distance",)), *(() if cfg.split.published else ("published",)))
    steps.run("split", do_split, config={"split": section(cfg.split, drop=split_drop)}, inputs={"duplicates": duplicates} if duplicates else (),
              upstream=["validate"], outputs=[split_path, sf.split_summary_file, *split_outputs],
              code=STEP_CODE["split"])
    sp = read_split(split_path)
    split_hash = sha256_file(split_path)
    tr, va = split_frames(table, sp)
    te = subset_frame(table, sp, "test")
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
    train_steps = []
    for arch in archs:
        run_dir = sf.run_dir(arch)

        def do_train(a=arch, d=run_dir):
            # the rule `train --resume` applies too (training.provenance): continue what matches, to more epochs
            # if asked; start over from anything else (another config, fewer epochs than run, an older LesionLab)
            why = run_folder_mismatch(d, a, cfg, split_hash)
            if why:
                log.info("train %s: %s; starting over", a, why)
                remove_path(d)
            return fit(a, tr, va, cfg, d, cache_dir=cache_dir, resume=True, split_hash=split_hash, progress=progress)

        def check_train(a=arch, d=run_dir):
            if not (d / models.WEIGHTS_FILE).exists():
                return f"outputs missing: {steps.rel(d / models.WEIGHTS_FILE)}"
            return run_folder_mismatch(d, a, cfg, split_hash)

        steps.run(f"train {arch}", do_train, config=training_reads(arch, cfg), upstream=["split"], outputs=[run_dir],
                  check=check_train, resumable=True, continuable=(EPOCHS,), code=STEP_CODE["train"])
        train_steps.append(f"train {arch}")
    names = list(archs)  # the registry name is what model.json records as "arch"
    frames = {"val": va, "test": te}

    def do_truth():
        for tag, frame in frames.items():
            sf.write_truth(tag, frame)

    steps.run("truth", do_truth, upstream=["split"], outputs=[sf.truth_file(t) for t in frames], code=STEP_CODE["truth"])
    infer_cfg = {"eval.tta": cfg.eval.tta, "train.device": cfg.train.device, "train.precision": cfg.train.precision}
    infer_steps = []
    for arch in archs:
        d = sf.run_dir(arch)
        steps.run(f"infer {arch}", lambda d=d: [predict_split_files([d], f, sf, t, cfg, progress=progress, truth=False)
                                                for t, f in frames.items()],
                  config=infer_cfg, upstream=[f"train {arch}", "split"],
                  outputs=[*(sf.prediction_file(arch, t) for t in frames), sf.inference_record_file(arch)],
                  code=STEP_CODE["infer"])
        infer_steps.append(f"infer {arch}")

    ens_steps = []
    if len(names) > 1:  # ensemble = mean of the members' probabilities, on both splits
        def do_ensemble():
            for tag in frames:
                _, probs, ids = sf.probabilities(names, tag)
                sf.write_probabilities(ENSEMBLE, tag, ids, mean_probabilities(list(probs.values())))

        steps.run("ensemble", do_ensemble, upstream=["truth", *infer_steps],
                  outputs=[sf.prediction_file(ENSEMBLE, t) for t in frames], code=STEP_CODE["ensemble"])
        ens_steps = ["ensemble"]
    all_names = [*names, ENSEMBLE] if len(names) > 1 else names
    prob_steps = ["truth", *infer_steps, *ens_steps]
    yv, pv, _ = sf.probabilities(all_names, "val")
    yt, pt, test_ids = sf.probabilities(all_names, "test")
    lesion_of = sf.lesion_of()
    groups = np.array([lesion_of.get(i, i) for i in test_ids])
    # temperatures and conformal thresholds per model and for the ensemble, fitted on the validation split
    trust_file = sf.trust_file
    steps.run("trust", lambda: sf.write_trust(fit_trust(yv, pv, cfg.trust, lset.classes)), config={"trust": cfg.trust},
              upstream=prob_steps, outputs=[trust_file], code=STEP_CODE["trust"])

    def do_metrics():
        trust = sf.trust()
        for n in all_names:
            m = evaluate_arrays(yt, pt[n], cfg=cfg.eval, groups=groups, val=(yv, pv[n]), classes=lset.classes)
            m["val"] = {k: v for k, v in summarize(yv, pv[n], lset.classes).items()
                        if k in ("macro", "accuracy", "balanced_accuracy")}
            m.update(trust_metrics(yt, pt[n], trust, n, val=(yv, pv[n]), groups=groups, n_boot=cfg.eval.bootstrap,
                                   ci=cfg.eval.ci))  # "calibration", "conformal", "conformal_variants"
            write_evaluation(m, yt, pt[n], sf.eval_dir(n), title=n)
            plot_trust_reliability(m, sf.eval_dir(n) / "reliability.png", title=f"{n}, test split")

    steps.run("metrics", do_metrics, config={"eval": section(cfg.eval, drop=("tta", "error_class"))},
              upstream=["split", *prob_steps, "trust"], outputs=[sf.eval_dir(n) for n in all_names],
              check=lambda: None if all(sf.metrics_file(n).exists() for n in all_names)
              else "outputs missing: eval/*/metrics.json", code=STEP_CODE["metrics"])
    mets = {n: sf.metrics(n) for n in all_names}
    if cfg.reader_study.simulate and "MEL" not in lset.classes:
        log.info("reader_study.simulate: skipped, label set %s has no melanoma class", lset.name)
    elif cfg.reader_study.simulate:  # the reader-study section on simulated readers (labelled SIMULATED)
        def do_readers():
            from lesionlab.workflows.reader_study.analyse import run_analysis
            from lesionlab.workflows.reader_study.simulate import ai_cases_from_study, simulate_reads

            rs = cfg.reader_study
            cases, _ = ai_cases_from_study(out, models=names, n=rs.cases, seed=rs.seed, at_most=True)
            reads = simulate_reads(cases, readers=rs.readers, seed=rs.seed, classes=lset.classes,
                                   malignant=lset.malignant)
            run_analysis(reads, cases, sf.folder("reader_study"), simulated=True)

        steps.run("reader-study", do_readers, config={"reader_study": cfg.reader_study},
                  upstream=["ensemble", "trust", "metrics"] if len(names) > 1 else ["trust", "metrics"],
                  outputs=[sf.folder("reader_study")], code=STEP_CODE["reader-study"])
    best = max(names, key=lambda n: (mets[n]["val"]["balanced_accuracy"] or 0, mets[n]["val"]["macro"]["auc"] or 0))

    steps.run("errors", lambda: write_errors(analyse_errors(test_ids, yt, {n: pt[n] for n in names}, best=best,
                                                            cls=cfg.eval.error_class, classes=lset.classes),
                                             sf.folder("errors")),
              config={"eval.error_class": cfg.eval.error_class}, upstream=[*prob_steps, "metrics"],
              outputs=[sf.folder("errors")], code=STEP_CODE["errors"])
    from lesionlab.evaluation.subgroups import subgroup_columns
    from lesionlab.report.evaluation_files import write_subgroups

    sub_cols = list(dict.fromkeys([*subgroup_columns(table.df), *cfg.eval.subgroup_columns]))
    if sub_cols:  # subgroup performance over the metadata columns present (sex, age bands, site, ...)
        sub_names = [best, *([ENSEMBLE] if ENSEMBLE in all_names else [])]
        steps.run("subgroups", lambda: write_subgroups(
            sf.folder("subgroups"), yt, {n: pt[n] for n in sub_names}, test_ids, table.df, groups=groups,
            columns=sub_cols, n_boot=cfg.eval.bootstrap, ci=cfg.eval.ci, min_images=cfg.eval.subgroup_min_images,
            file_names={n: file_stem(n) for n in sub_names}, labels=lset),
            config={"eval": section(cfg.eval, keep=("bootstrap", "ci", "subgroup_columns", "subgroup_min_images")),
                    "subgroups.columns": sub_cols},  # the columns found in the table, not only those named
            inputs={"metadata": Path(table.source)}, upstream=["split", *prob_steps, "metrics"],
            outputs=[sf.folder("subgroups")], code=STEP_CODE["subgroups"])
    if cfg.explain.gallery:
        steps.run("gallery", lambda: make_gallery([sf.run_dir(a) for a in archs], te, yt, pt, best, sf.folder("gallery"),
                                                  cfg, test_ids, lset.classes),
                  config={"explain": cfg.explain, "train.device": cfg.train.device},
                  upstream=["split", *train_steps, *prob_steps, "metrics"], outputs=[sf.folder("gallery")],
                  code=STEP_CODE["gallery"])
    for ext in cfg.external:
        d = sf.folder("external") / file_stem(ext.name)
        ext_images = sorted(_external_paths(ext.images), key=str) if Path(ext.images).is_dir() else []
        steps.run(f"external {ext.name}", lambda e=ext, d=d: evaluate_external(
            [sf.run_dir(a) for a in archs], e.images, e.truth, d, cfg, skip_invalid=skip_invalid, progress=progress,
            trust=sf.trust()),
            config={"external": {"name": ext.name, "images": ext.images, "truth": ext.truth},
                    "eval": section(cfg.eval, drop=("error_class",)), **infer_cfg},
            inputs={"truth": Path(ext.truth), "images": ext_images}, upstream=[*train_steps, "trust"], outputs=[d],
            code=STEP_CODE["external"])
    if cfg.robustness.enabled:  # lesion consistency (from the stored test predictions) and acquisition robustness
        from lesionlab.workflows.robustness import run_robustness, write_consistency

        steps.run("consistency", lambda: write_consistency(sf.folder("consistency"), groups, pt, yt, n_boot=cfg.eval.bootstrap,
                                                           ci=cfg.eval.ci, seed=cfg.robustness.seed),
                  config={"eval": section(cfg.eval, keep=("bootstrap", "ci")), "robustness.seed": cfg.robustness.seed},
                  upstream=["split", *prob_steps], outputs=[sf.folder("consistency")], code=STEP_CODE["consistency"])
        te_groups = te["image_id"].map(lesion_of).fillna(te["image_id"]).to_numpy()
        steps.run("robustness", lambda: run_robustness([sf.run_dir(a) for a in archs], te, sf.folder("robustness"), cfg,
                                                       lesion_ids=te_groups, consistency=False,
                                                       progress=progress),
                  config={"robustness": cfg.robustness, "data.max_image_pixels": cfg.data.max_image_pixels,
                          "train.device": cfg.train.device, "train.precision": cfg.train.precision},
                  upstream=["split", *train_steps], outputs=[sf.folder("robustness")], code=STEP_CODE["robustness"])
    if cfg.ood.method != "none":  # refusal of unevaluable images: OOD scores in / out for the report's Trust section
        def do_ood():
            from lesionlab.clinic.ood_model import fit_ood
            from lesionlab.clinic.screening import Screener
            from lesionlab.clinic.trust import fit_error_refusal, validation_ood_scores
            from lesionlab.evaluation.selective import RefusalScore
            from lesionlab.inference.predictor import load_predictors
            from lesionlab.workflows.refusal import refusal_report

            preds = load_predictors([sf.run_dir(a) for a in archs], device=cfg.train.device,
                                    precision=cfg.train.precision)
            ood, val_out = fit_ood(preds, tr, va, cfg.ood, batch_size=cfg.data.batch_size, progress=progress,
                                   return_val=True)
            # the pipeline a bundle of these models runs: quality, OOD, then the error score fitted on validation
            # (trust.error_refusal_rate), which reads calibrated probabilities and conformal sets (trust.json)
            trust = sf.trust()
            err = fit_error_refusal(sf, [file_stem(a) for a in archs], trust,
                                    validation_ood_scores(ood, val_out, va), cfg.trust)
            # the accuracy of accepted vs refused test images, from the study's ensemble (else best) predictions
            pos = {i: k for k, i in enumerate(test_ids)}
            rows = [pos[i] for i in te["image_id"]]
            probs = pt[ENSEMBLE if ENSEMBLE in pt else best]
            refusal_report(Screener(preds, cfg.quality, ood, trust=trust, tta=cfg.eval.tta,
                                    error=RefusalScore.from_dict(err) if err else None),
                           te, sf.folder("ood"), n_degraded=min(100, len(te)), batch_size=cfg.data.batch_size,
                           progress=progress, correct=np.asarray(probs)[rows].argmax(1) == np.asarray(yt)[rows],
                           error_refusal=err)

        steps.run("ood", do_ood, config={"ood": cfg.ood, "quality": cfg.quality, "trust": cfg.trust,
                                         "eval.tta": cfg.eval.tta, "train.device": cfg.train.device,
                                         "train.precision": cfg.train.precision},
                  upstream=["split", "trust", *train_steps, *prob_steps], outputs=[sf.folder("ood")],
                  code=STEP_CODE["ood"])
    if cfg.cross_site.enabled and not multi:
        log.info("cross_site.enabled: skipped, the data has one source (a `dataset` column or several --data needed)")
    elif cfg.cross_site.enabled:  # train on each source, test on the others (lesionlab.workflows.cross_site)
        from lesionlab.workflows.cross_site import cross_site_models, run_cross_site

        xs = cfg.cross_site
        xs_train = cross_site_models(cfg).train  # what the matrix trains: a change to the study's own models alone
        # (train.archs, train.epochs under cross_site.archs/epochs) leaves it as it is
        steps.run("cross-site", lambda: run_cross_site(
            cfg, sf.folder("cross_site"), data=None, table=table, source_column="source", scheme=xs.scheme,
            compare=xs.compare, refusal_rate=xs.refusal_rate, min_class_images=xs.min_class_images,
            progress=progress),
            config={"cross_site": xs, "data": section(cfg.data, drop=("num_workers", "cache_dir")),
                    "split": section(cfg.split, keep=("train", "val", "test", "seed")), "train": xs_train,
                    "trust": cfg.trust, "ood": cfg.ood,
                    "quality": cfg.quality, "eval": section(cfg.eval, keep=("bootstrap", "ci"))},
            inputs={"metadata": table.source, "images": image_files}, upstream=["validate"],
            outputs=[sf.folder("cross_site")], code=STEP_CODE["cross-site"])
    t = time.perf_counter()
    steps.record("report", "ran", "always runs (cheap; shows this run's step statuses)", 0.0)
    steps.prune(keep=[Path(data)])  # after the report's record: it is part of every study, never "removed"
    html_path = report_study(out, cfg, names, all_names, best, mets)
    steps.record("report", "ran", "always runs (cheap; shows this run's step statuses)", time.perf_counter() - t)
    return html_path


def _external_paths(images: str | Path) -> list[Path]:
    from lesionlab.data.images import find_images

    return list(find_images(images).values())


