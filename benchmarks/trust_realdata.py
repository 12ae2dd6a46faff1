"""Calibration and conformal coverage of a real-data study's models (issue 10's acceptance), from its folder.

    python benchmarks/trust_realdata.py --study ~/lesionlab-runs/ham10000-cpu --out ~/lesionlab-runs/trust-ham10000 \
        [--doc docs/trust-ham10000.md] [--set trust.method=aps] [--bootstrap 1000]

For every trained model of the study (runs/<arch>/model.safetensors) and their ensemble (mean probability):
temperature fitted on the validation split, conformal thresholds on the scaled validation probabilities, then on
the test split ECE / classwise ECE / Brier / NLL before and after with lesion-bootstrap CIs, coverage and set size.
Probabilities come from the study's predictions/ folder when it has them for a model, otherwise from inference
here (cached under --out/predictions, keyed by the checkpoint's SHA-256). A model whose training step is not done
yet is used with its best checkpoint so far and flagged as such. Never writes into the study folder.

Acceptance (issue 10): ensemble ECE after scaling <= 0.05 and below the ECE before; marginal coverage within 0.03 of
the target; melanoma coverage >= 0.87. Exit code 1 with --check when one fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.config import load_config
from lesionlab.data.isic_csv import align, read_isic_csv
from lesionlab.evaluation.ensemble import ENSEMBLE, mean_probabilities
from lesionlab.evaluation.trust import (
    TRUST_FILE,
    fit_trust,
    trust_metrics,
    trust_table,
    write_trust,
)
from lesionlab.io import atomic_write_json, sha256_file
from lesionlab.models import WEIGHTS_FILE, file_stem
from lesionlab.report.evaluation_files import plot_trust_reliability
from lesionlab.study_folder import StudyFolder

ACCEPT = {"ece_after_max": 0.05, "coverage_tolerance": 0.03, "mel_coverage_min": 0.87}
ARCH_ORDER = ("resnet101", "resnext101_32x4d", "seresnet101", "seresnext101_32x4d")


def trained_models(study: StudyFolder) -> list[dict[str, Any]]:
    """The study's models (runs/*/model.json) with their training status (steps.json) and prediction files.

    A model is usable when the study has its validation and test predictions (weights then optional: a study made
    on another machine can travel as its small files) or its weights (inference here)."""
    steps = study.steps()
    out = []
    for arch in study.trained_models():
        rec = steps.get(f"train {arch}", {})
        finished = rec.get("status") in ("ran", "reused") or bool(rec.get("done"))  # steps.json, new or old format
        use_preds = finished and all(study.has_probabilities([arch], t) for t in ("val", "test"))
        if not use_preds and not study.weights_file(arch).exists():
            continue
        hist = study.history(arch)
        out.append({"name": arch, "dir": study.run_dir(arch), "finished": finished, "study_predictions": use_preds,
                    "epochs": len(hist) if hist is not None else None})
    out.sort(key=lambda m: ARCH_ORDER.index(m["name"]) if m["name"] in ARCH_ORDER else len(ARCH_ORDER))
    return out


def model_probs(study: StudyFolder, out: Path, models: list[dict[str, Any]], cfg, data: Path | None,
                ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], dict[str, list[str]], dict]:
    """Labels, {tag: {name: probs}}, image ids per tag, and where each model's probabilities came from.

    Probabilities made here go into `out` laid out as a study folder's predictions (StudyFolder), keyed by the
    checkpoint's SHA-256 in the inference record."""
    from lesionlab.inference.predictor import Predictor

    here = StudyFolder(out)
    need_inference = any(not m["study_predictions"] for m in models)
    frames = study.frames(data, splits=("val", "test")) if need_inference else None
    source = study if all(study.truth_file(t).exists() for t in ("val", "test")) and not need_inference else here
    if source is here:
        frames = frames or study.frames(data, splits=("val", "test"))
        for t in ("val", "test"):
            here.write_truth(t, frames[t])
    sources: dict[str, Any] = {}
    ys, probs, ids = {}, {"val": {}, "test": {}}, {}
    for m in models:
        name = m["name"]
        sha = sha256_file(study.weights_file(name)) if study.weights_file(name).exists() else None
        if m["study_predictions"]:
            where, src = study, "study predictions/"
        else:
            where = here
            rec = here.inference_record(name)
            if not (rec and rec.get("weights_sha256") == sha and here.has_probabilities([name], "val")
                    and here.has_probabilities([name], "test")):
                pr = Predictor(m["dir"], device=cfg.train.device, precision=cfg.train.precision)
                for t in ("val", "test"):
                    p = pr.predict_frame(frames[t], batch_size=cfg.data.batch_size, num_workers=0, progress=True)
                    here.write_probabilities(name, t, frames[t]["image_id"], p)
                here.write_inference_record(name, {**pr.engine_info(), "weights_sha256": sha})
            src = f"inference here ({cfg.train.device}, precision {cfg.train.precision})"
        sources[name] = {"probabilities": src, "checkpoint_sha256": sha, "training_finished": m["finished"],
                         "epochs_trained": m["epochs"]}
        for t in ("val", "test"):
            truth = source.truth(t)
            ys[t], probs[t][name], ids[t] = align(truth, read_isic_csv(where.prediction_file(name, t), kind="prediction"))
    if len(models) > 1:
        for t in probs:
            probs[t][ENSEMBLE] = mean_probabilities(list(probs[t].values()))
    return ys, probs, ids, sources


def acceptance(res: dict[str, Any], target: float) -> dict[str, Any]:
    c, s = res["calibration"], res["conformal"]
    ece_b, ece_a = c["before"]["ece"]["value"], c["after"]["ece"]["value"]
    cov = s["coverage"]["value"]
    mel = s["per_class"]["MEL"]["coverage"]["value"]
    checks = {
        "ece_after_at_most_0.05": ece_a <= ACCEPT["ece_after_max"],
        "ece_after_below_before": ece_a < ece_b,
        "coverage_within_3_points": abs(cov - target) <= ACCEPT["coverage_tolerance"],
        "mel_coverage_at_least_0.87": mel is not None and mel >= ACCEPT["mel_coverage_min"],
    }
    return {"ece_before": ece_b, "ece_after": ece_a, "coverage": cov, "mel_coverage": mel, "checks": checks,
            "passed": all(checks.values())}


def evaluate(ys: dict[str, np.ndarray], probs: dict[str, dict[str, np.ndarray]], ids: dict[str, list[str]],
             lesion_of: dict[str, str], out: Path, cfg, *, sources: dict[str, Any], source: str, n_boot: int,
             t0: float) -> dict[str, Any]:
    """Fit on validation, measure on test; writes trust.json, trust_metrics.json and reliability diagrams to out."""
    out.mkdir(parents=True, exist_ok=True)
    trust = fit_trust(ys["val"], probs["val"], cfg.trust)
    write_trust(out / TRUST_FILE, trust)
    groups = np.array([lesion_of.get(i, i) for i in ids["test"]])
    results, compare = {}, {}
    for name, p in probs["test"].items():
        results[name] = trust_metrics(ys["test"], p, trust, name, val=(ys["val"], probs["val"][name]), groups=groups,
                                      n_boot=n_boot, ci=cfg.eval.ci)
        compare[name] = results[name].pop("conformal_variants")
        plot_trust_reliability(results[name], out / f"reliability_{file_stem(name)}.png", title=f"{name}, test split")
    main_model = ENSEMBLE if ENSEMBLE in results else next(iter(results))
    summary = {
        "study": source, "models": sources, "main_model": main_model, "n_val": len(ys["val"]),
        "n_test": len(ys["test"]), "trust_config": trust["config"], "ci_level": cfg.eval.ci, "bootstrap": n_boot,
        "table": trust_table(results), "acceptance": acceptance(results[main_model], cfg.trust.coverage),
        "conformal_variants": compare, "results": results,
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "python": sys.version.split()[0]},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(out / "trust_metrics.json", summary)
    return summary


def run(study: Path, out: Path, *, data: Path | None = None, overrides: list[str] | None = None,
        n_boot: int = 1000) -> dict[str, Any]:
    """A study folder's models and ensemble (see the module docstring)."""
    t0 = time.perf_counter()
    study, out = Path(study).expanduser(), Path(out).expanduser()
    if out.resolve() == study.resolve() or study.resolve() in out.resolve().parents:
        raise SystemExit(f"--out {out} must lie outside the study folder {study}")
    sf = StudyFolder(study)
    cfg = load_config(sf.config_file, overrides)
    models = trained_models(sf)
    if not models:
        raise SystemExit(f"{study}: no trained model (runs/*/{WEIGHTS_FILE}, or a finished one with predictions/)")
    ys, probs, ids, sources = model_probs(sf, out, models, cfg, data)
    lesion_of = sf.lesion_of()
    return evaluate(ys, probs, ids, lesion_of, out, cfg, sources=sources, source=str(study), n_boot=n_boot, t0=t0)


def run_members(members: dict[str, tuple[Path, Path]], truth: tuple[Path, Path], splits: Path, out: Path, *,
                config: Path | None = None, overrides: list[str] | None = None, n_boot: int = 1000,
                note: str = "given prediction files") -> dict[str, Any]:
    """Models given as (validation CSV, test CSV) prediction files, e.g. runs trained outside a study folder."""
    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    sp = pd.read_csv(Path(splits).expanduser(), dtype=str, keep_default_na=False)
    lesion_of = dict(zip(sp["image_id"], sp["group_id"], strict=True))
    ys, probs, ids, sources = {}, {"val": {}, "test": {}}, {}, {}
    for name, files in members.items():
        for tag, f, t in zip(("val", "test"), files, truth, strict=True):
            ys[tag], probs[tag][name], ids[tag] = align(read_isic_csv(Path(t).expanduser(), kind="truth"),
                                                        read_isic_csv(Path(f).expanduser(), kind="prediction"))
        sources[name] = {"probabilities": f"{files[0]}, {files[1]}", "checkpoint_sha256": None,
                         "training_finished": True, "epochs_trained": None}
    if len(members) > 1:
        for t in probs:
            probs[t][ENSEMBLE] = mean_probabilities(list(probs[t].values()))
    return evaluate(ys, probs, ids, lesion_of, Path(out).expanduser(), cfg, sources=sources, source=note,
                    n_boot=n_boot, t0=t0)


def _fmt(v: Any, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _ci(d: dict[str, Any], nd: int = 3) -> str:
    if d.get("lo") is None:
        return _fmt(d.get("value"), nd)
    return f"{_fmt(d['value'], nd)} ({_fmt(d['lo'], nd)}-{_fmt(d['hi'], nd)})"


def markdown(summary: dict[str, Any], command: str, machine_note: str, note: str = "") -> str:
    """The numbers as Markdown tables (docs/trust-ham10000.md); `note` goes under the title."""
    acc = summary["acceptance"]
    cfgt = summary["trust_config"]
    lines = [
        "# Trust on real HAM10000 images: calibration and conformal prediction sets",
        "",
        *([note, ""] if note else []),
        f"Study: `{summary['study']}`; validation split {summary['n_val']} images (fits), test split "
        f"{summary['n_test']} images (measures). Conformal: {cfgt['method'].upper()}"
        f"{', Mondrian (one threshold per class)' if cfgt['mondrian'] else ', marginal'}, target coverage "
        f"{cfgt['coverage']:.2f}"
        + "".join(f", {c} {v:.2f}" for c, v in (cfgt.get("class_coverage") or {}).items())
        + f". CIs: {summary['ci_level']:.0%} percentile bootstrap over lesions, "
        f"{summary['bootstrap']} resamples.",
        "",
        "## Models used",
        "",
        "| model | training | epochs trained | probabilities from |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in summary["models"].items():
        lines.append(f"| {name} | {'finished' if s['training_finished'] else 'NOT finished: best checkpoint so far'} "
                     f"| {s['epochs_trained'] if s['epochs_trained'] is not None else '-'} | {s['probabilities']} |")
    lines += ["", f"## Acceptance ({summary['main_model']}, test split)", "",
              "| check | value | result |", "| --- | --- | --- |",
              f"| ECE after temperature scaling <= 0.05 | {_fmt(acc['ece_after'])} | "
              f"{'pass' if acc['checks']['ece_after_at_most_0.05'] else 'FAIL'} |",
              f"| ECE after < ECE before | {_fmt(acc['ece_after'])} vs {_fmt(acc['ece_before'])} | "
              f"{'pass' if acc['checks']['ece_after_below_before'] else 'FAIL'} |",
              f"| marginal coverage within 0.03 of {cfgt['coverage']:.2f} | {_fmt(acc['coverage'])} | "
              f"{'pass' if acc['checks']['coverage_within_3_points'] else 'FAIL'} |",
              f"| MEL coverage >= 0.87 | {_fmt(acc['mel_coverage'])} | "
              f"{'pass' if acc['checks']['mel_coverage_at_least_0.87'] else 'FAIL'} |",
              "", "## Calibration on the test split (before -> after temperature scaling)", "",
              "| model | T | ECE | classwise ECE | Brier | NLL |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in summary["results"].items():
        c = r["calibration"]
        cells = [f"{_ci(c['before'][k])} -> {_ci(c['after'][k])}" for k in ("ece", "classwise_ece", "brier", "nll")]
        lines.append(f"| {name} | {c['temperature']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "## Conformal sets on the test split", "",
              "| model | coverage | MEL coverage | mean set size | empty sets | single-class sets |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, r in summary["results"].items():
        s = r["conformal"]
        lines.append(f"| {name} | {_ci(s['coverage'])} | {_ci(s['per_class']['MEL']['coverage'])} | "
                     f"{_ci(s['mean_set_size'], 2)} | {_fmt(s['empty']['value'])} | {_fmt(s['singleton']['value'])} |")
    main = summary["main_model"]
    s = summary["results"][main]["conformal"]
    lines += ["", f"Per class ({main}): coverage (CI), images, mean set size", "",
              "| class | n | coverage | mean set size |", "| --- | --- | --- | --- |"]
    for k, v in s["per_class"].items():
        lines.append(f"| {k} | {v['n']} | {_ci(v['coverage'])} | {_ci(v['mean_set_size'], 2)} |")
    lines += ["", f"Every method, marginal and Mondrian ({main}; fitted on validation, measured on test; no CIs):", "",
              "| method | Mondrian | coverage | MEL coverage | lowest class coverage | mean set size | empty |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary["conformal_variants"][main]:
        lines.append(f"| {row['method']} | {'yes' if row['mondrian'] else 'no'} | {_fmt(row['coverage'])} | "
                     f"{_fmt(row['MEL_coverage'])} | {_fmt(row['min_class_coverage'])} | "
                     f"{_fmt(row['mean_set_size'], 2)} | {_fmt(row['empty'])} |")
    lines += ["", "## How to reproduce", "", "```", command, "```", "", machine_note,
              f"The script ran {summary['seconds']} s (inference included when predictions were not cached).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, default=Path("~/lesionlab-runs/ham10000-cpu"))
    ap.add_argument("--out", type=Path, default=Path("~/lesionlab-runs/trust-ham10000"))
    ap.add_argument("--data", type=Path, default=None, help="image folder (default: the study's dataset.json source)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. trust.method=aps")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--doc", type=Path, default=None, help="write the Markdown summary here (e.g. docs/trust-ham10000.md)")
    ap.add_argument("--machine", default="", help="a line that names the machine, for the doc")
    ap.add_argument("--note", type=Path, default=None, help="a Markdown file whose text goes under the doc's title")
    ap.add_argument("--check", action="store_true", help="exit 1 when an acceptance check fails")
    ap.add_argument("--member", action="append", default=[], metavar="NAME=VAL_CSV,TEST_CSV",
                    help="instead of --study: a model's validation and test predictions (repeatable; 2+ = ensemble)")
    ap.add_argument("--truth", metavar="VAL_CSV,TEST_CSV", help="with --member: the ground truth of both splits")
    ap.add_argument("--splits", type=Path, help="with --member: splits.csv (lesion groups for the bootstrap)")
    ap.add_argument("--config", type=Path, default=None, help="with --member: config YAML (default: built-in)")
    ap.add_argument("--source", default="given prediction files", help="with --member: what the models are, for the doc")
    args = ap.parse_args(argv)
    if args.member:
        if not (args.truth and args.splits):
            ap.error("--member needs --truth VAL_CSV,TEST_CSV and --splits splits.csv")
        members = {}
        for m in args.member:
            name, _, files = m.partition("=")
            val, _, test = files.partition(",")
            members[name] = (Path(val), Path(test))
        tv, _, tt = args.truth.partition(",")
        summary = run_members(members, (Path(tv), Path(tt)), args.splits, args.out, config=args.config,
                              overrides=args.overrides, n_boot=args.bootstrap, note=args.source)
    else:
        summary = run(args.study, args.out, data=args.data, overrides=args.overrides, n_boot=args.bootstrap)
    print(json.dumps({"acceptance": summary["acceptance"], "table": summary["table"]}, indent=1))
    if args.doc:
        cmd = "python benchmarks/trust_realdata.py " + " ".join(sys.argv[1:] if argv is None else argv)
        note = args.note.read_text().strip() if args.note else ""
        args.doc.write_text(markdown(summary, cmd, args.machine or f"Machine: {platform.node()}.", note))
        fig = Path(args.out).expanduser() / f"reliability_{file_stem(summary['main_model'])}.png"
        if fig.exists():  # an aggregate figure only, never dataset images
            (args.doc.parent / "figures").mkdir(exist_ok=True)
            shutil.copy(fig, args.doc.parent / "figures" / "trust-ham10000-reliability.png")
    return 1 if args.check and not summary["acceptance"]["passed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
