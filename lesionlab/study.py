"""The whole protocol end to end: validate -> split -> train -> infer -> metrics -> ensemble -> errors -> explain -> report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.config import StudyConfig, save_config
from lesionlab.data.split import (
    check_split,
    make_split,
    read_duplicates,
    read_split,
    summary_table,
    write_split,
)
from lesionlab.data.subsets import external_table, split_frames, subset_frame
from lesionlab.data.tables import HAM_METADATA, read_table
from lesionlab.data.validation import drop_invalid, validate
from lesionlab.evaluation.metrics import summarize
from lesionlab.exceptions import UserError
from lesionlab.explain.gallery import make_gallery
from lesionlab.inference.ensemble import ENSEMBLE
from lesionlab.io import atomic_write_csv, atomic_write_json, sha256_file
from lesionlab.labels import CLASS_INDEX, CLASSES
from lesionlab.models import file_stem
from lesionlab.report.study_report import report_study

log = logging.getLogger(__name__)





class Steps:
    """Resumable steps: a step whose name is recorded as done in steps.json (and whose outputs exist) is skipped."""

    def __init__(self, out: Path):
        self.file = out / "steps.json"
        self.state: dict[str, Any] = json.loads(self.file.read_text()) if self.file.exists() else {}

    def run(self, name: str, fn: Callable[[], Any], *, outputs: list[Path] | None = None) -> Any:
        rec = self.state.get(name)
        if rec and rec.get("done") and all(Path(o).exists() for o in outputs or []):
            log.info("step %s: done earlier (%.1fs), skipped", name, rec["seconds"])
            return None
        log.info("step %s ...", name)
        t = time.perf_counter()
        result = fn()
        self.state[name] = {"done": True, "seconds": round(time.perf_counter() - t, 2)}
        atomic_write_json(self.file, self.state)
        return result


def predict_split_files(checkpoints: list[Path], df: pd.DataFrame, out_dir: Path, tag: str, cfg: StudyConfig,
                        *, progress: bool = True) -> dict[str, np.ndarray]:
    """Per-model probability CSVs `<arch>_<tag>.csv` and `truth_<tag>.csv` (ISIC format) for a frame."""
    from lesionlab.data.isic_csv import probs_frame, truth_frame, write_isic_csv
    from lesionlab.inference.predictor import infer_table

    probs = infer_table(checkpoints, df, device=cfg.train.device, precision=cfg.train.precision, tta=cfg.eval.tta,
                        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, progress=progress)
    for name, p in probs.items():
        write_isic_csv(out_dir / f"{file_stem(name)}_{tag}.csv", probs_frame(df["image_id"], p))
    write_isic_csv(out_dir / f"truth_{tag}.csv", truth_frame(df))
    return probs


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


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    metadata: str | Path | None = None,
    duplicates: str | Path | None = None,
    skip_invalid: bool = False,
    progress: bool = True,
) -> Path:
    """Run (or resume) the whole protocol into `out_dir`; returns the HTML report path."""
    from lesionlab import models
    from lesionlab.data.isic_csv import probs_frame, write_isic_csv
    from lesionlab.evaluation.error_analysis import analyse_errors
    from lesionlab.evaluation.evaluate import evaluate_arrays, write_evaluation
    from lesionlab.inference.ensemble import mean_probabilities
    from lesionlab.inference.predictor import find_checkpoints
    from lesionlab.training.fit import fit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    save_config(cfg, out / "config.yaml")
    archs = models.expand_archs(cfg.train.archs)

    if data is None:
        if cfg.synth_images <= 0:
            raise UserError("give --data DIR (or use a config with synth_images > 0, such as demo)")
        from lesionlab.data.synth import make_synthetic

        data = out / "data"
        steps.run("synth", lambda: make_synthetic(data, n_images=cfg.synth_images, seed=cfg.split.seed,
                                                  size=tuple(cfg.synth_size), progress=progress),
                  outputs=[Path(data) / HAM_METADATA])

    def do_validate():
        table = read_table(data, metadata)
        rep = validate(table, max_pixels=cfg.data.max_image_pixels, progress=progress)
        rep.write_csv(out / "validation_problems.csv")
        blocking = [p for p in rep.problems if p.kind != "image without a row"]
        if blocking and not skip_invalid:
            raise UserError(rep.summary())
        atomic_write_json(out / "dataset.json", {"source": str(table.source), "layout": table.layout,
                                                 "rows": len(table.df), "problems": rep.counts(), "notes": rep.notes})

    steps.run("validate", do_validate, outputs=[out / "dataset.json"])
    # the validate step (now or in an earlier run) saved its problems: drop those rows without validating again
    bad = pd.read_csv(out / "validation_problems.csv", dtype=str, keep_default_na=False)
    table = drop_invalid(read_table(data, metadata),
                                 set(bad.loc[bad["problem"] != "image without a row", "image_id"]))
    split_path = out / "splits.csv"

    def do_split():
        dups = read_duplicates(duplicates) if duplicates else None
        sp = make_split(table.df, fractions=(cfg.split.train, cfg.split.val, cfg.split.test), seed=cfg.split.seed,
                              duplicates=dups)
        if check_split(sp, dups):
            raise RuntimeError("split leaks")  # impossible by construction
        write_split(sp, split_path)
        atomic_write_csv(out / "split_summary.csv", summary_table(sp))

    steps.run("split", do_split, outputs=[split_path])
    sp = read_split(split_path)
    split_hash = sha256_file(split_path)
    tr, va = split_frames(table, sp)
    te = subset_frame(table, sp, "test")
    runs = out / "runs"
    for arch in archs:
        steps.run(f"train {arch}", lambda a=arch: fit(
            a, tr, va, cfg, runs / file_stem(a), cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache",
            resume=True, split_hash=split_hash, progress=progress), outputs=[runs / file_stem(arch) / models.WEIGHTS_FILE])
    checkpoints = find_checkpoints([runs / file_stem(a) for a in archs])
    names = [json.loads((c / models.META_FILE).read_text())["arch"] for c in checkpoints]
    pred_dir = out / "predictions"
    for tag, frame in (("val", va), ("test", te)):
        steps.run(f"infer {tag}", lambda t=tag, f=frame: predict_split_files(checkpoints, f, pred_dir, t, cfg, progress=progress),
                  outputs=[pred_dir / f"truth_{tag}.csv"])

    # ensemble = mean of the members' probabilities, on both splits
    def do_ensemble():
        for tag in ("val", "test"):
            _, probs, ids = load_probs(pred_dir, names, tag)
            write_isic_csv(pred_dir / f"{ENSEMBLE}_{tag}.csv", probs_frame(ids, mean_probabilities(list(probs.values()))))

    steps.run("ensemble", do_ensemble, outputs=[pred_dir / f"{ENSEMBLE}_test.csv"])
    all_names = [*names, ENSEMBLE] if len(names) > 1 else names
    yv, pv, _ = load_probs(pred_dir, all_names, "val")
    yt, pt, test_ids = load_probs(pred_dir, all_names, "test")
    lesion_of = dict(zip(sp["image_id"], sp["group_id"], strict=True))
    groups = np.array([lesion_of.get(i, i) for i in test_ids])

    def do_metrics():
        for n in all_names:
            m = evaluate_arrays(yt, pt[n], cfg=cfg.eval, groups=groups, val=(yv, pv[n]))
            m["val"] = {k: v for k, v in summarize(yv, pv[n]).items() if k in ("macro", "accuracy", "balanced_accuracy")}
            write_evaluation(m, yt, pt[n], out / "eval" / file_stem(n), title=n)

    steps.run("metrics", do_metrics, outputs=[out / "eval" / file_stem(n) / "metrics.json" for n in all_names])
    mets = {n: json.loads((out / "eval" / file_stem(n) / "metrics.json").read_text()) for n in all_names}
    best = max(names, key=lambda n: (mets[n]["val"]["balanced_accuracy"] or 0, mets[n]["val"]["macro"]["auc"] or 0))

    def do_errors():
        res = analyse_errors(test_ids, yt, {n: pt[n] for n in names}, best=best, cls=cfg.eval.error_class)
        d = out / "errors"
        atomic_write_csv(d / "misclassified.csv", res["images"])
        atomic_write_csv(d / "confusions.csv", res["confusions"])
        atomic_write_csv(d / "agreement.csv", res["agreement"])
        atomic_write_json(d / "summary.json", res["summary"])

    steps.run("errors", do_errors, outputs=[out / "errors" / "summary.json"])
    if cfg.explain.gallery:
        steps.run("gallery", lambda: make_gallery(checkpoints, te, yt, pt, best, out / "gallery", cfg, test_ids),
                  outputs=[out / "gallery" / "gallery.json"])
    for ext in cfg.external:
        steps.run(f"external {ext.name}", lambda e=ext: evaluate_external(
            checkpoints, e.images, e.truth, out / "external" / file_stem(e.name), cfg, skip_invalid=skip_invalid, progress=progress),
            outputs=[out / "external" / file_stem(ext.name) / "summary.json"])
    t = time.perf_counter()
    html_path = report_study(out, cfg, names, all_names, best, mets)
    steps.state["report"] = {"done": True, "seconds": round(time.perf_counter() - t, 2)}
    atomic_write_json(steps.file, steps.state)
    return html_path


def evaluate_external(checkpoints: list[Path], images: str | Path, truth: str | Path, out_dir: str | Path,
                      cfg: StudyConfig, *, skip_invalid: bool = False, progress: bool = True) -> dict[str, Any]:
    """Each model and their ensemble on an external set: a metrics folder per model and summary.json."""
    from lesionlab.evaluation.evaluate import evaluate_arrays, write_evaluation
    from lesionlab.inference.ensemble import mean_probabilities

    out = Path(out_dir)
    df = external_table(images, truth, skip_invalid=skip_invalid)
    probs = predict_split_files(checkpoints, df, out / "predictions", "external", cfg, progress=progress)
    if len(probs) > 1:
        probs[ENSEMBLE] = mean_probabilities(list(probs.values()))
    y = np.array([CLASS_INDEX[c] for c in df["label"]])
    summary = {"images": str(images), "truth": str(truth), "n": len(df),
               "classes_present": [c for c in CLASSES if (df["label"] == c).any()],
               "classes_absent": [c for c in CLASSES if not (df["label"] == c).any()], "models": {}}
    for n, p in probs.items():
        m = evaluate_arrays(y, p, cfg=cfg.eval)
        write_evaluation(m, y, p, out / file_stem(n), title=f"{n} on {Path(truth).stem}")
        summary["models"][n] = {"macro": m["macro"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]}
    atomic_write_json(out / "summary.json", summary)
    return summary

