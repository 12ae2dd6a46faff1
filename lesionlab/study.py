"""The whole protocol end to end: validate -> split -> train -> infer -> metrics -> ensemble -> errors -> explain -> report."""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab import __version__, dataset, split
from lesionlab.config import StudyConfig, save_config
from lesionlab.errors import UserError
from lesionlab.io import atomic_write_csv, atomic_write_json, sha256_file
from lesionlab.labels import CLASS_INDEX, CLASSES
from lesionlab.metrics import summarize
from lesionlab.models import file_stem


def load_split_tables(
    data: str | Path,
    metadata: str | Path | None,
    split_path: str | Path,
    *,
    skip_invalid: bool = False,
    groupings: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> tuple[dataset.Table, pd.DataFrame, str]:
    """Validated table + checked split file + the split file's SHA-256 (recorded in every checkpoint)."""
    skipped = Path(out_dir) / "skipped.csv" if out_dir else None
    table, _ = dataset.load_valid_table(data, metadata, skip_invalid=skip_invalid, skipped_csv=skipped, groupings=groupings)
    sp = split.read_split(split_path)
    leaks = split.check_split(sp)
    if leaks:
        raise UserError(f"{split_path}: {len(leaks)} lesions are in two splits (first: {leaks[0]}); remake it with `lesionlab split`")
    missing = sorted(set(sp["image_id"]) - set(table.df["image_id"]))
    if missing and not skip_invalid:
        raise UserError(f"{split_path}: {len(missing)} images are not in the (valid) dataset (first: {missing[0]}); "
                        "pass --skip-invalid to leave them out")
    return table, sp, sha256_file(Path(split_path))


def subset_frame(table: dataset.Table, split_df: pd.DataFrame, subset: str) -> pd.DataFrame:
    """Rows of `table` in one split (train/val/test), in split-file order, with path and label."""
    if subset not in split.SPLITS:
        raise UserError(f"--subset {subset!r} must be one of {', '.join(split.SPLITS)}")
    ids = split_df.loc[split_df["split"] == subset, "image_id"]
    df = table.df.set_index("image_id").reindex(ids).dropna(subset=["path"]).reset_index()
    return df


def split_frames(table: dataset.Table, split_df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return subset_frame(table, split_df, "train"), subset_frame(table, split_df, "val")


# ----------------------------------------------------------------------------- the study

log = logging.getLogger(__name__)
ENSEMBLE = "ensemble"


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


def external_table(images: str | Path, truth: str | Path, *, skip_invalid: bool = False) -> pd.DataFrame:
    """Rows (image_id, label, path) of an external set in ISIC ground-truth format."""
    from lesionlab.predict import read_isic_csv

    gt = read_isic_csv(truth, kind="truth")
    found = dataset.find_images(images) if Path(images).is_dir() else None
    if found is None:
        raise UserError(f"external images folder {images} does not exist")
    df = pd.DataFrame({"image_id": gt["image"], "label": [CLASSES[i] for i in gt[list(CLASSES)].to_numpy().argmax(1)]})
    df["path"] = [str(found.get(i, "")) for i in df["image_id"]]
    missing = df[df["path"] == ""]
    if len(missing):
        if not skip_invalid:
            raise UserError(f"{truth}: {len(missing)} images not found under {images} (first: {missing['image_id'].iloc[0]}); "
                            "pass --skip-invalid to leave them out")
        df = df[df["path"] != ""]
    df["lesion_id"] = df["image_id"]
    return df.reset_index(drop=True)


def _versions() -> dict[str, str]:
    import timm
    import torch

    return {"lesionlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "platform": platform.platform(), "cpu": platform.processor() or platform.machine()}


def predict_split_files(checkpoints: list[Path], df: pd.DataFrame, out_dir: Path, tag: str, cfg: StudyConfig,
                        *, progress: bool = True) -> dict[str, np.ndarray]:
    """Per-model probability CSVs `<arch>_<tag>.csv` and `truth_<tag>.csv` (ISIC format) for a frame."""
    from lesionlab.predict import infer_table, probs_frame, truth_frame, write_isic_csv

    probs = infer_table(checkpoints, df, device=cfg.train.device, precision=cfg.train.precision, tta=cfg.eval.tta,
                        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, progress=progress)
    for name, p in probs.items():
        write_isic_csv(out_dir / f"{file_stem(name)}_{tag}.csv", probs_frame(df["image_id"], p))
    write_isic_csv(out_dir / f"truth_{tag}.csv", truth_frame(df))
    return probs


def load_probs(pred_dir: Path, names: list[str], tag: str) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """(y_true, {name: probs}, image ids) from the CSVs written by `predict_split_files`."""
    from lesionlab.predict import align, read_isic_csv

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
    from lesionlab import errors_analysis, evaluate, models, train
    from lesionlab.ensemble import mean_probabilities
    from lesionlab.predict import find_checkpoints, probs_frame, write_isic_csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    save_config(cfg, out / "config.yaml")
    archs = models.expand_archs(cfg.train.archs)

    if data is None:
        if cfg.synth_images <= 0:
            raise UserError("give --data DIR (or use a config with synth_images > 0, such as demo)")
        from lesionlab.synth import make_synthetic

        data = out / "data"
        steps.run("synth", lambda: make_synthetic(data, n_images=cfg.synth_images, seed=cfg.split.seed,
                                                  size=tuple(cfg.synth_size), progress=progress),
                  outputs=[Path(data) / dataset.HAM_METADATA])

    def do_validate():
        table = dataset.read_table(data, metadata)
        rep = dataset.validate(table, max_pixels=cfg.data.max_image_pixels, progress=progress)
        rep.write_csv(out / "validation_problems.csv")
        blocking = [p for p in rep.problems if p.kind != "image without a row"]
        if blocking and not skip_invalid:
            raise UserError(rep.summary())
        atomic_write_json(out / "dataset.json", {"source": str(table.source), "layout": table.layout,
                                                 "rows": len(table.df), "problems": rep.counts(), "notes": rep.notes})

    steps.run("validate", do_validate, outputs=[out / "dataset.json"])
    # the validate step (now or in an earlier run) saved its problems: drop those rows without validating again
    bad = pd.read_csv(out / "validation_problems.csv", dtype=str, keep_default_na=False)
    table = dataset.drop_invalid(dataset.read_table(data, metadata),
                                 set(bad.loc[bad["problem"] != "image without a row", "image_id"]))
    split_path = out / "splits.csv"

    def do_split():
        dups = split.read_duplicates(duplicates) if duplicates else None
        sp = split.make_split(table.df, fractions=(cfg.split.train, cfg.split.val, cfg.split.test), seed=cfg.split.seed,
                              duplicates=dups)
        if split.check_split(sp, dups):
            raise RuntimeError("split leaks")  # impossible by construction
        split.write_split(sp, split_path)
        atomic_write_csv(out / "split_summary.csv", split.summary_table(sp))

    steps.run("split", do_split, outputs=[split_path])
    sp = split.read_split(split_path)
    split_hash = sha256_file(split_path)
    tr, va = split_frames(table, sp)
    te = subset_frame(table, sp, "test")
    runs = out / "runs"
    for arch in archs:
        steps.run(f"train {arch}", lambda a=arch: train.fit(
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
            m = evaluate.evaluate_arrays(yt, pt[n], cfg=cfg.eval, groups=groups, val=(yv, pv[n]))
            m["val"] = {k: v for k, v in summarize(yv, pv[n]).items() if k in ("macro", "accuracy", "balanced_accuracy")}
            evaluate.write_evaluation(m, yt, pt[n], out / "eval" / file_stem(n), title=n)

    steps.run("metrics", do_metrics, outputs=[out / "eval" / file_stem(n) / "metrics.json" for n in all_names])
    mets = {n: json.loads((out / "eval" / file_stem(n) / "metrics.json").read_text()) for n in all_names}
    best = max(names, key=lambda n: (mets[n]["val"]["balanced_accuracy"] or 0, mets[n]["val"]["macro"]["auc"] or 0))

    def do_errors():
        res = errors_analysis.analyse_errors(test_ids, yt, {n: pt[n] for n in names}, best=best, cls=cfg.eval.error_class)
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
    from lesionlab import evaluate
    from lesionlab.ensemble import mean_probabilities

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
        m = evaluate.evaluate_arrays(y, p, cfg=cfg.eval)
        evaluate.write_evaluation(m, y, p, out / file_stem(n), title=f"{n} on {Path(truth).stem}")
        summary["models"][n] = {"macro": m["macro"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]}
    atomic_write_json(out / "summary.json", summary)
    return summary


def make_gallery(checkpoints: list[Path], test_df: pd.DataFrame, y: np.ndarray, probs: dict[str, np.ndarray], best: str,
                 out_dir: Path, cfg: StudyConfig, ids: list[str]) -> None:
    """Grad-CAM panels (members side by side + ensemble) for the categories the study shows."""
    from lesionlab.explain import explain_image, panel
    from lesionlab.predict import load_predictors

    ens = probs.get(ENSEMBLE, probs[best]).argmax(1)
    nv, mel = CLASS_INDEX["NV"], CLASS_INDEX["MEL"]
    cats = [("correct NV", (y == nv) & (ens == nv)), ("correct MEL", (y == mel) & (ens == mel)),
            ("MEL misclassified as NV", (y == mel) & (ens == nv))]
    off = (ens != y) & ~((y == mel) & (ens == nv))
    pairs = pd.Series([(int(a), int(b)) for a, b in zip(y[off], ens[off], strict=True)], dtype=object).value_counts()
    for (a, b), _ in list(pairs.items())[:2]:
        cats.append((f"{CLASSES[a]} misclassified as {CLASSES[b]}", (y == a) & (ens == b)))
    predictors = load_predictors(checkpoints, device=cfg.train.device, precision="fp32")
    path_of = dict(zip(test_df["image_id"], test_df["path"], strict=True))
    entries = []
    for title, mask in cats:
        for i in np.flatnonzero(mask)[: cfg.explain.per_category]:
            iid = ids[i]
            ex = explain_image(predictors, dataset.load_image(path_of[iid]), image_id=iid, method="gradcam")
            f = out_dir / f"{file_stem(title).replace(' ', '_')}_{iid}.png"
            panel(ex, f, title=f"{title}: {iid} (true {CLASSES[y[i]]}, ensemble {CLASSES[ens[i]]}; Grad-CAM for {ex.cls})")
            entries.append({"category": title, "image": iid, "file": f.name})
    atomic_write_json(out_dir / "gallery.json", entries)
    if not entries:
        out_dir.mkdir(parents=True, exist_ok=True)


def report_study(out: Path, cfg: StudyConfig, names: list[str], all_names: list[str], best: str,
                 mets: dict[str, dict]) -> Path:
    """Write report.html (self-contained) and report.md from the study folder's files."""
    from lesionlab import report as R
    from lesionlab.report import PAPER_RESNEXT, Report, fmt, metric_table

    rep = Report(f"LesionLab study: {cfg.name}")
    rep.raw_html('<p class="warn">Decision support, not a diagnosis: these numbers describe models on one dataset. '
                 "Every suspicious lesion still needs a clinician's examination and, where indicated, histopathology.</p>")
    rep.md.append("> **Decision support, not a diagnosis.** These numbers describe models on one dataset.\n")
    ds = json.loads((out / "dataset.json").read_text())
    rep.heading("Dataset and split")
    rep.para(f"Source: {ds['source']} ({ds['layout']} layout, {ds['rows']} rows). Problems found: {ds['problems'] or 'none'}.")
    for n in ds.get("notes", []):
        rep.note(n)
    rep.para("Lesion-grouped, diagnosis-stratified split (no lesion, and no known duplicate pair, in two splits):")
    rep.table(pd.read_csv(out / "split_summary.csv"))

    rep.heading("Training")
    hists = {n: pd.read_csv(out / "runs" / file_stem(n) / "history.csv") for n in names if (out / "runs" / file_stem(n) / "history.csv").exists()}
    R.plot_history(hists, out / "figures" / "history.png")
    rep.figure(out / "figures" / "history.png", "loss per epoch (solid: validation, dashed: training)", md_rel="figures/history.png")
    rows = []
    for n in names:
        meta = json.loads((out / "runs" / file_stem(n) / "model.json").read_text())
        h = hists.get(n)
        rows.append({"model": n, "timm id": meta["timm_id"], "weights": meta["pretrained"], "epochs run": len(h) if h is not None else "",
                     "best epoch": meta["epoch"], "best val loss": fmt(meta["val"]["val_loss"]),
                     "seconds": fmt(float(h["seconds"].sum())) if h is not None else ""})
    rep.table(pd.DataFrame(rows))

    rep.heading("Test results")
    rep.para(f"Best single model, chosen on the validation split by balanced accuracy: {best}. "
             f"95% CIs: percentile bootstrap over lesions ({cfg.eval.bootstrap} resamples).")
    comp = []
    for n in all_names:
        m = mets[n]
        comp.append({"model": n, **{k: fmt(m["macro"][k]) for k in ("precision", "sensitivity", "specificity", "f1", "auc")},
                     "accuracy": fmt(m["accuracy"]), "balanced acc.": fmt(m["balanced_accuracy"],
                     m["ci"].get("balanced_accuracy", {}).get("lo"), m["ci"].get("balanced_accuracy", {}).get("hi")),
                     "MEL sens.": fmt(m["per_class"]["MEL"]["sensitivity"]), "MEL AUC": fmt(m["per_class"]["MEL"]["auc"])})
    comp.append({"model": "paper: ResNeXt-101 (HAM10000, 224px, ImageNet)", **{k: fmt(PAPER_RESNEXT["macro"][k]) for k in
                 ("precision", "sensitivity", "specificity", "f1", "auc")}, "accuracy": "", "balanced acc.": "",
                 "MEL sens.": fmt(PAPER_RESNEXT["MEL"]["sensitivity"]), "MEL AUC": fmt(PAPER_RESNEXT["MEL"]["auc"])})
    rep.para("Macro averages over the classes present in the test split:")
    rep.table(pd.DataFrame(comp))
    if ENSEMBLE in mets:
        e, b = mets[ENSEMBLE], mets[best]
        rep.para(f"Ensemble vs best single model ({best}): balanced accuracy {fmt(e['balanced_accuracy'])} vs "
                 f"{fmt(b['balanced_accuracy'])}; macro AUC {fmt(e['macro']['auc'])} vs {fmt(b['macro']['auc'])}; "
                 f"melanoma sensitivity {fmt(e['per_class']['MEL']['sensitivity'])} vs {fmt(b['per_class']['MEL']['sensitivity'])}.")
    for n in all_names:
        rep.heading(f"{n}: per-class metrics (test)", 3)
        rep.table(metric_table(mets[n]))
        for note in mets[n].get("notes", []):
            rep.note(note)
        d = out / "eval" / file_stem(n)
        rep.figures_row([(d / "confusion_counts.png", "confusion (counts)"), (d / "confusion_normalized.png", "row-normalised"),
                         (d / "roc.png", "ROC one-vs-rest")])
        rep.md.append(f"Figures: `eval/{file_stem(n)}/confusion_counts.png`, `confusion_normalized.png`, `roc.png`\n")

    rep.heading("Melanoma operating points (test)")
    ops_rows = []
    for n in all_names:
        ops = mets[n]["operating_points"].get("MEL", {})
        row = {"model": n}
        for o in ops.get("sensitivity_at_specificity", []):
            row[f"sens @ spec {o['target_specificity']:.2f}"] = fmt(o["sensitivity"])
        for o in ops.get("specificity_at_sensitivity", []):
            row[f"spec @ sens {o['target_sensitivity']:.2f}"] = fmt(o["specificity"])
        at = ops.get("at_threshold")
        if at:
            row["val-chosen threshold"] = fmt(at["threshold"])
            row["test sens / spec at it"] = f"{fmt(at['sensitivity'])} / {fmt(at['specificity'])}"
        ops_rows.append(row)
    rep.para(f"The threshold is chosen on the validation split for melanoma sensitivity >= {cfg.eval.target_sensitivity:.2f} "
             "and applied unchanged to the test split; the fixed-specificity/sensitivity columns are read off the test ROC "
             "(optimistic, for comparison only).")
    rep.table(pd.DataFrame(ops_rows))

    rep.heading("Error analysis")
    s = json.loads((out / "errors" / "summary.json").read_text())
    rep.para(f"{s['class']} images misclassified by the best model ({s['best_model']}): {s['errors_of_best']} of {s['positives']}. "
             f"Made by all models: {s['errors_made_by_all']}; rescued by at least one other model: {s['rescued_by_at_least_one']}.")
    rep.para("Most frequent confusions of the best model (true -> predicted):")
    rep.table(pd.read_csv(out / "errors" / "confusions.csv"))
    rep.para("Pairwise agreement between models (share of identical predictions, Cohen's kappa, share both wrong):")
    rep.table(pd.read_csv(out / "errors" / "agreement.csv").round(3))
    mis = out / "errors" / "misclassified.csv"
    if mis.exists() and mis.stat().st_size > 1:
        try:
            rep.para("Misclassified melanomas (first 15; full list in errors/misclassified.csv):")
            rep.table(pd.read_csv(mis).head(15).round(3))
        except pd.errors.EmptyDataError:
            pass

    gal = out / "gallery" / "gallery.json"
    if gal.exists():
        rep.heading("Grad-CAM gallery (test split)")
        rep.para("Each row: the image (the centre crop the models see), then each member's Grad-CAM for the class the "
                 "ensemble predicts, then their mean. Red = most important for that class, blue = least.")
        for e in json.loads(gal.read_text()):
            rep.figure(out / "gallery" / e["file"], f"{e['category']}: {e['image']}", md_rel=f"gallery/{e['file']}")
    ext_dir = out / "external"
    if ext_dir.exists():
        rep.heading("External validation")
        rows = []
        for sfile in sorted(ext_dir.glob("*/summary.json")):
            sm = json.loads(sfile.read_text())
            for n, v in sm["models"].items():
                rows.append({"set": sfile.parent.name, "n": sm["n"], "model": n, "accuracy": fmt(v["accuracy"]),
                             "balanced acc.": fmt(v["balanced_accuracy"]), "macro AUC": fmt(v["macro"]["auc"]),
                             "absent classes": ", ".join(sm["classes_absent"]) or "none"})
        for n in all_names:
            rows.append({"set": "internal test", "n": mets[n]["n"], "model": n, "accuracy": fmt(mets[n]["accuracy"]),
                         "balanced acc.": fmt(mets[n]["balanced_accuracy"]), "macro AUC": fmt(mets[n]["macro"]["auc"]),
                         "absent classes": ""})
        rep.table(pd.DataFrame(rows))

    rep.heading("Reproducibility")
    steps = json.loads((out / "steps.json").read_text())
    rep.table(pd.DataFrame([{"step": k, "seconds": v["seconds"]} for k, v in steps.items()]))
    rep.table(pd.DataFrame([_versions()]))
    rep.para(f"Seeds: split {cfg.split.seed}, training {cfg.train.seed}. Effective configuration (config.yaml):")
    import yaml

    cfg_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    rep.raw_html(f"<pre>{cfg_text}</pre>")
    rep.md.append("```yaml\n" + cfg_text + "```\n")
    html_path = out / "report.html"
    rep.write(html_path, out / "report.md")
    return html_path
