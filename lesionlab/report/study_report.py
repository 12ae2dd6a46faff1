"""The study report builder: reads a study folder's files and writes report.html and report.md."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pandas as pd

from lesionlab import __version__
from lesionlab.config import StudyConfig
from lesionlab.evaluation.ensemble import ENSEMBLE
from lesionlab.models import file_stem
from lesionlab.study_folder import StudyFolder


def _versions() -> dict[str, str]:
    import timm
    import torch

    return {"lesionlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "platform": platform.platform(), "cpu": platform.processor() or platform.machine()}


def _ci_text(d: dict | None) -> str:
    from lesionlab.report.document import fmt

    d = d or {}
    return fmt(d.get("value"), d.get("lo"), d.get("hi"))


def trust_section(rep, out: Path, all_names: list[str], mets: dict[str, dict]) -> None:
    """The report's "Trust" section: temperature scaling and conformal prediction sets on the test split, from the
    `calibration` / `conformal` entries of each model's metrics.json and its reliability diagram."""
    sf = StudyFolder(out)
    from lesionlab.report.document import fmt

    have = [n for n in all_names if "calibration" in mets[n]]
    if not have:
        return
    flag_coverage = sf.label_set().metric_title("MEL_coverage")
    rep.heading("Trust: calibrated probabilities and prediction sets")
    c0 = mets[have[0]]["conformal"]
    rep.para("Temperature scaling (Guo et al. 2017): each model's logits (for the ensemble, log of the mean "
             "probability) are divided by one temperature T fitted on the validation split by negative log-likelihood; "
             "T > 1 softens over-confident probabilities, T < 1 sharpens under-confident ones; the predicted class never "
             "changes. ECE: 15 equal-width bins of the top-1 probability. Test split, 95% CIs by lesion bootstrap "
             "(binned measures such as ECE are biased upwards under resampling, so their intervals can sit above the "
             "point estimate).")
    rows = []
    for n in have:
        c = mets[n]["calibration"]
        rows.append({"model": n, "T": fmt(c["temperature"]),
                     **{f"{label} before": _ci_text(c["before"][k]) for k, label in
                        (("ece", "ECE"), ("classwise_ece", "classwise ECE"), ("brier", "Brier"), ("nll", "NLL"))},
                     **{f"{label} after": _ci_text(c["after"][k]) for k, label in
                        (("ece", "ECE"), ("classwise_ece", "classwise ECE"), ("brier", "Brier"), ("nll", "NLL"))}})
    rep.table(pd.DataFrame(rows)[["model", "T", "ECE before", "ECE after", "classwise ECE before", "classwise ECE after",
                                  "Brier before", "Brier after", "NLL before", "NLL after"]])
    rep.figures_row([(sf.eval_dir(n) / "reliability.png", f"{n}: before / after") for n in have])
    rep.md.append("Reliability diagrams: `eval/<model>/reliability.png`\n")
    rep.para(f"Conformal prediction sets (the differential): {c0['method'].upper()} scores"
             f"{', one threshold per class (Mondrian), so coverage holds for every class' if c0['mondrian'] else ''}, "
             f"calibrated on the validation split for coverage {c0['target_coverage']:.2f} (the set holds the true class "
             "at least that often on exchangeable images). Test split:")
    rows = []
    for n in have:
        s = mets[n]["conformal"]
        per = [v["coverage"]["value"] for v in s["per_class"].values() if v["coverage"]["value"] is not None]
        rows.append({"model": n, "coverage": _ci_text(s["coverage"]), flag_coverage: _ci_text(next(iter(s["per_class"].values()))["coverage"]),
                     "lowest class coverage": fmt(min(per) if per else None),
                     "mean set size": _ci_text(s["mean_set_size"]), "single-class sets": fmt(s["singleton"]["value"]),
                     "empty sets": fmt(s["empty"]["value"])})
    rep.table(pd.DataFrame(rows))
    main = ENSEMBLE if ENSEMBLE in have else have[0]
    always = [k for k, t in zip(mets[main]["conformal"]["per_class"], mets[main]["conformal"]["thresholds"], strict=True)
              if t is None]
    if always:
        rep.note(f"{', '.join(always)}: too few validation images of the class for a threshold at this coverage "
                 "(a per-class threshold needs at least 1/(1 - coverage) - 1 of them), so the class is in every set.")
    s = mets[main]["conformal"]
    rep.para(f"Per class ({main}):")
    rep.table(pd.DataFrame([{"class": k, "test images": v["n"], "coverage": _ci_text(v["coverage"]),
                             "mean set size": _ci_text(v["mean_set_size"])} for k, v in s["per_class"].items()]))
    variants = mets[main].get("conformal_variants")
    if variants:
        rep.para(f"Every conformal method, marginal and per class ({main}; fitted on validation, measured on test):")
        rep.table(pd.DataFrame([{"method": v["method"], "per class": "yes" if v["mondrian"] else "no",
                                 "coverage": fmt(v["coverage"]), flag_coverage: fmt(v["MEL_coverage"]),
                                 "lowest class coverage": fmt(v["min_class_coverage"]),
                                 "mean set size": fmt(v["mean_set_size"]), "empty sets": fmt(v["empty"])} for v in variants]))
    ext_rows = []
    for sfile in sorted(sf.folder("external").glob("*/summary.json")) if sf.folder("external").exists() else []:
        sm = json.loads(sfile.read_text())
        for n, v in sm.get("trust", {}).items():
            ext_rows.append({"set": sfile.parent.name, "model": n, "ECE before": fmt(v["ece_before"]),
                             "ECE after": fmt(v["ece_after"]), "coverage": fmt(v["coverage"]),
                             flag_coverage: fmt(v["MEL_coverage"]), "mean set size": fmt(v["mean_set_size"])})
    if ext_rows:
        rep.para("External sets (temperatures and thresholds from the internal validation split, unchanged):")
        rep.table(pd.DataFrame(ext_rows))
    ood_part(rep, out)


def ood_part(rep, out: Path) -> None:
    """Refusal of unevaluable images (ood/ood.json and ood/ood_scores.png from `report.ood_report`), if made."""
    sf = StudyFolder(out)
    from lesionlab.report.document import fmt

    f = sf.ood_summary_file
    if not f.exists():
        return
    s = sf.ood_summary()
    rep.para(f"Refusal of unevaluable images (quality checks, then the ensemble's out-of-distribution score against "
             f"the threshold {s['threshold']:.3f} that 95% of the validation split passes): {s['test_refused']:.1%} of "
             f"the {s['test_images']} test images are refused ({s['test_refused_by_quality']:.1%} by a quality check, "
             f"{s['test_refused_by_ood']:.1%} by the OOD score). Images the models should refuse:")
    rep.table(pd.DataFrame([{"set": r["set"], "images": r["images"], "refused": fmt(r["refused"]),
                             "by quality": fmt(r["refused_by_quality"]), "by OOD score": fmt(r["refused_by_ood"]),
                             "OOD AUROC": fmt(r["auroc"]), "FPR at 95% TPR": fmt(r["fpr_at_95_tpr"])} for r in s["sets"]]))
    rep.figure(sf.folder("ood") / "ood_scores.png", "OOD score: test split vs. images to refuse", md_rel="ood/ood_scores.png")


def subgroups_section(rep, out: Path) -> None:
    """The report's "Subgroup performance" section (subgroups/, when the metadata had columns to split by)."""
    sf = StudyFolder(out)
    from lesionlab.report.document import fmt as _fmt

    lset = sf.label_set()
    flag = lset.flag_title
    f = sf.folder("subgroups") / "subgroups.csv"
    if not f.exists():
        return
    t = pd.read_csv(f, keep_default_na=False, na_values=[""])
    rep.heading("Subgroup performance")
    rep.para("Test-split metrics per subgroup of each metadata column (age in bands), with 95% CIs from a bootstrap "
             "over each subgroup's lesions. Flagged: the subgroup's whole CI lies below the overall value. Small: fewer "
             f"images than eval.subgroup_min_images or no {flag} image (shown, not hidden; its CIs are wide or "
             f"undefined). {_cap(lset.metric_title('MEL_sensitivity'))} and specificity at the argmax.")
    for model in dict.fromkeys(t["model"]):
        rows = t[t["model"] == model]
        rep.figure(sf.folder("subgroups") / f"subgroups_{file_stem(model)}.png", f"{model}: subgroups",
                   md_rel=f"subgroups/subgroups_{file_stem(model)}.png")
        cells = []
        for _, r in rows.iterrows():
            cell = {"model": model, "column": r["column"], "subgroup": r["subgroup"], "images": int(r["n_images"]),
                    "lesions": int(r["n_lesions"]), lset.metric_title("n_MEL"): int(r["n_MEL"])}
            for m in ("balanced_accuracy", "MEL_sensitivity", "MEL_auc"):
                vals = [None if pd.isna(r[k]) else r[k] for k in (m, f"{m}_lo", f"{m}_hi")]
                cell[lset.metric_title(m)] = _fmt(*vals)
            # an empty CSV cell reads as NaN, which is truthy: test for it, not `or ""`
            cell["flagged"] = "" if pd.isna(r["flagged"]) else ", ".join(
                lset.metric_title(k) for k in str(r["flagged"]).split(";") if k)
            cell["note"] = "" if pd.isna(r["note"]) else str(r["note"])
            cells.append(cell)
        rep.table(pd.DataFrame(cells))
    flagged = t[t["flagged"].notna() & (t["flagged"].astype(str) != "")]  # all-empty reads as float NaN
    rep.para(f"{len(flagged)} subgroup row(s) flagged; every metric with its CI: subgroups/subgroups.csv.")


def robustness_section(rep, out: Path) -> None:
    """The report's "Robustness" section: metric vs severity under acquisition perturbations (robustness/) and
    lesion-level consistency (consistency/), when the study made them."""
    sf = StudyFolder(out)
    from lesionlab.report.document import fmt as _fmt

    def fmt(v, lo=None, hi=None):  # CSV cells: NaN means "not defined"
        return _fmt(*(None if pd.isna(x) else x for x in (v, lo, hi)))

    lset = sf.label_set()
    rob, cons = sf.folder("robustness") / "robustness.json", sf.folder("consistency") / "lesion_consistency.csv"
    if not rob.exists() and not cons.exists():
        return
    rep.heading("Robustness: acquisition and lesion consistency")
    if rob.exists():
        info = json.loads(rob.read_text())
        rep.para(f"{info['perturbed_images']} test images (a seeded sample of {info['images']}; seed {info['seed']}"
                 f"{', TTA' if info['tta'] else ''}) under {info['conditions']} controlled perturbations of the photograph "
                 f"({', '.join(info['perturbations'])}), each at graded severities, before each model's own preprocessing. "
                 "Flip rate: share of images whose predicted class differs from the unperturbed one. Deltas are "
                 f"perturbed minus unperturbed (balanced accuracy, {lset.metric_title('MEL_sensitivity')}, macro AUC).")
        rep.figures_row([(sf.folder("robustness") / f"robustness_{m}.png", lset.metric_title(m))
                         for m in ("flip_rate", "delta_balanced_accuracy", "delta_mel_sensitivity", "delta_macro_auc")
                         if (sf.folder("robustness") / f"robustness_{m}.png").exists()])
        rep.md.append("Figures: `robustness/robustness_<metric>.png`; every condition: `robustness/robustness.csv`\n")
        summ = pd.read_csv(sf.folder("robustness") / "robustness_summary.csv")
        shown = summ[summ["model"] == ENSEMBLE] if (summ["model"] == ENSEMBLE).any() else summ
        rep.para(f"Worst case over the severities, per perturbation ({shown['model'].iloc[0] if len(shown) else ''}; "
                 "all models in robustness/robustness_summary.csv):")
        rep.table(shown.round(3))
    if cons.exists():
        c = pd.read_csv(cons)
        rep.para("Lesion consistency: test lesions with two or more images (other angles, zoom levels or days); the share "
                 "whose images all get the same predicted class, and the share whose images are all correct (95% CI, "
                 "bootstrap over lesions).")
        rep.table(pd.DataFrame([{"model": r["model"], "lesions": r["lesions"], "images": r["images"],
                                 "same class": fmt(r["consistent_share"], r["consistent_lo"], r["consistent_hi"]),
                                 "all correct": fmt(r.get("all_correct_share"), r.get("all_correct_lo"), r.get("all_correct_hi"))}
                                for _, r in c.iterrows()]))
        lm_file = sf.folder("consistency") / "lesion_metrics.csv"
        lm = pd.read_csv(lm_file) if lm_file.exists() and lm_file.stat().st_size > 1 else pd.DataFrame()
        if len(lm):
            lm["text"] = [fmt(v, lo, hi) for v, lo, hi in zip(lm["value"], lm["lo"], lm["hi"], strict=True)]
            wide = lm.pivot_table(index=["model", "metric"], columns="level", values="text", aggfunc="first").reset_index()
            rep.para("Image level vs lesion level (mean probability over a lesion's images, one vote per lesion); "
                     "both CIs resample lesions:")
            rep.table(wide)


def _cap(text: str) -> str:
    """Upper-case the first letter only (str.capitalize would turn "AUC" into "auc")."""
    return text[:1].upper() + text[1:]


def _flag(m: dict) -> str:
    """The label set's flag class of a metrics.json (its first class: MEL, or MALIGNANT under binary); the report's
    "MEL" columns are about it (lesionlab.labels)."""
    return m["classes"][0]


def _csv_or_empty(path: Path) -> pd.DataFrame:
    """A CSV table, or an empty frame where the file is missing or has no rows (e.g. every cell was skipped)."""
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def report_study(out: Path, cfg: StudyConfig, names: list[str], all_names: list[str], best: str,
                 mets: dict[str, dict]) -> Path:
    """Write report.html (self-contained) and report.md from the study folder's files."""
    from lesionlab.report.document import PAPER_RESNEXT, Report, fmt, metric_table

    sf = StudyFolder(out)
    from lesionlab.labels import get_label_set
    from lesionlab.report.figures import plot_history

    lset = get_label_set(cfg.data.labels)
    flag_sens, flag_auc = lset.metric_title("MEL_sensitivity"), lset.metric_title("MEL_auc")
    rep = Report(f"LesionLab study: {cfg.name}")
    rep.raw_html('<p class="warn">Decision support, not a diagnosis: these numbers describe models on one dataset. '
                 "Every suspicious lesion still needs a clinician's examination and, where indicated, histopathology.</p>")
    rep.md.append("> **Decision support, not a diagnosis.** These numbers describe models on one dataset.\n")
    ds = sf.dataset()
    rep.heading("Dataset and split")
    rep.para(f"Source: {ds['source']} ({ds['layout']} layout, {ds['rows']} rows). Problems found: {ds['problems'] or 'none'}.")
    for n in ds.get("notes", []):
        rep.note(n)
    rep.para("The dataset's published split (split.published; checked: every image has a part, no lesion and no "
             "known duplicate pair in two splits):" if cfg.split.published else
             "Lesion-grouped, diagnosis-stratified split (no lesion, and no known duplicate pair, in two splits):")
    rep.table(pd.read_csv(sf.split_summary_file))
    ds = sf.dataset() if sf.dataset_file.exists() else {}
    if ds.get("label_set"):
        rep.para(f"Label set: {ds['label_set']}; columns never fed to a model (they give the label away): "
                 f"{', '.join(ds.get('leaky_columns') or []) or 'none'}.")
        for c in ds.get("caveats") or []:
            rep.note(c)
    cross = sf.root / "cross_source_summary.csv"
    if cross.exists():  # several sources (lesionlab.data.multi)
        rep.heading("Leakage: images in two sources", 3)
        found = pd.read_csv(cross)
        rep.para("Images present in two sources, and how they were found: "
                 + "; ".join(f"{int(r['images'])} by {r['how']} (kept {r['kept']})" for _, r in found.iterrows())
                 + ". The split keeps each lesion (and each such pair) in one part; every part is stratified by "
                   "source and class.")
        rep.table(found)

    rep.heading("Training")
    hists = {n: h for n in names if (h := sf.history(n)) is not None}
    plot_history(hists, sf.folder("figures") / "history.png")
    rep.figure(sf.folder("figures") / "history.png", "loss per epoch (solid: validation, dashed: training)", md_rel="figures/history.png")
    rows = []
    for n in names:
        meta = sf.model_meta(n)
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
                     flag_sens: fmt(m["per_class"][_flag(m)]["sensitivity"]),
                     flag_auc: fmt(m["per_class"][_flag(m)]["auc"])})
    if lset.name == "ham7":  # the paper's numbers are HAM10000's seven classes: no comparison under another set
        comp.append({"model": "paper: ResNeXt-101 (HAM10000, 224px, ImageNet)", **{k: fmt(PAPER_RESNEXT["macro"][k])
                     for k in ("precision", "sensitivity", "specificity", "f1", "auc")}, "accuracy": "",
                     "balanced acc.": "", flag_sens: fmt(PAPER_RESNEXT["MEL"]["sensitivity"]),
                     flag_auc: fmt(PAPER_RESNEXT["MEL"]["auc"])})
    rep.para("Macro averages over the classes present in the test split:")
    rep.table(pd.DataFrame(comp))
    if ENSEMBLE not in mets:
        rep.note(f"One model ({best}): there is no ensemble row (an ensemble needs two or more architectures in "
                 "train.archs).")
    else:
        e, b = mets[ENSEMBLE], mets[best]
        rep.para(f"Ensemble vs best single model ({best}): balanced accuracy {fmt(e['balanced_accuracy'])} vs "
                 f"{fmt(b['balanced_accuracy'])}; macro AUC {fmt(e['macro']['auc'])} vs {fmt(b['macro']['auc'])}; "
                 f"{flag_sens} {fmt(e['per_class'][_flag(e)]['sensitivity'])} vs "
                 f"{fmt(b['per_class'][_flag(b)]['sensitivity'])}.")
    for n in all_names:
        rep.heading(f"{n}: per-class metrics (test)", 3)
        rep.table(metric_table(mets[n]))
        for note in mets[n].get("notes", []):
            rep.note(note)
        d = sf.eval_dir(n)
        rep.figures_row([(d / "confusion_counts.png", "confusion (counts)"), (d / "confusion_normalized.png", "row-normalised"),
                         (d / "roc.png", "ROC one-vs-rest")])
        rep.md.append(f"Figures: `eval/{file_stem(n)}/confusion_counts.png`, `confusion_normalized.png`, `roc.png`\n")

    rep.heading(f"{_cap(lset.flag_title)} operating points (test)")
    ops_rows = []
    for n in all_names:
        ops = mets[n]["operating_points"].get(_flag(mets[n]), {})
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
    rep.para(f"The threshold is chosen on the validation split for {flag_sens} >= {cfg.eval.target_sensitivity:.2f} "
             "and applied unchanged to the test split; the fixed-specificity/sensitivity columns are read off the test ROC "
             "(optimistic, for comparison only).")
    rep.table(pd.DataFrame(ops_rows))

    trust_section(rep, out, all_names, mets)
    robustness_section(rep, out)
    subgroups_section(rep, out)

    rep.heading("Error analysis")
    s = json.loads((sf.folder("errors") / "summary.json").read_text())
    several = len(names) > 1
    text = (f"{s['class']} images misclassified by the best model ({s['best_model']}): {s['errors_of_best']} of "
            f"{s['positives']}.")
    if several:
        text += (f" Made by all models: {s['errors_made_by_all']}; rescued by at least one other model: "
                 f"{s['rescued_by_at_least_one']}.")
    rep.para(text)
    confusions = pd.read_csv(sf.folder("errors") / "confusions.csv")
    if len(confusions):
        rep.para("Most frequent confusions of the best model (true -> predicted):")
        rep.table(confusions)
    else:
        rep.para("The best model made no errors on the test split.")
    if several:
        rep.para("Pairwise agreement between models (share of identical predictions, Cohen's kappa, share both wrong):")
        rep.table(pd.read_csv(sf.folder("errors") / "agreement.csv").round(3))
    else:
        rep.note("One model: no model-agreement table and no rescue counts (they compare two or more models).")
    mis = pd.read_csv(sf.folder("errors") / "misclassified.csv")
    if len(mis):
        rep.para(f"Misclassified {s['class']} images (first 15; full list in errors/misclassified.csv):")
        rep.table(mis.head(15).round(3))

    gal = sf.folder("gallery") / "gallery.json"
    if gal.exists():
        rep.heading("Grad-CAM gallery (test split)")
        rep.para("Each row: the image (the centre crop the models see), then each member's Grad-CAM for the class the "
                 "ensemble predicts, then their mean. Red = most important for that class, blue = least.")
        for e in json.loads(gal.read_text()):
            rep.figure(sf.folder("gallery") / e["file"], f"{e['category']}: {e['image']}", md_rel=f"gallery/{e['file']}")
    ext_dir = sf.folder("external")
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

    xs_md = sf.folder("cross_site") / "cross_site.md"
    if xs_md.exists():  # `cross_site.enabled` on several sources: the matrix, its heat maps, refusal per site
        rep.heading("Cross-site validation")
        matrix = _csv_or_empty(sf.folder("cross_site") / "matrix.csv")
        keep = [c for c in ("variant", "train", "test", "images", "balanced_accuracy", "balanced_accuracy_drop",
                            "macro_auc", "MEL_auc", "ece", "coverage") if c in matrix.columns]
        rep.para("Trained on the sources named under train, tested on their own internal test split and on every "
                 "other source, on the classes both share (full tables with CIs, refusal per site and the commands: "
                 "cross_site/cross_site.md).")
        cells = json.loads((sf.folder("cross_site") / "cross_site.json").read_text()).get("cells", [])
        skipped = sorted({f"{c['train']} -> {c['test']}: {c['skipped']}" for c in cells if "skipped" in c})
        if skipped:
            rep.para(f"Not evaluated ({len(skipped)}): " + "; ".join(skipped) + ".")
        if len(matrix):
            rep.table(matrix[keep].round(3).rename(columns={c: lset.metric_title(c) for c in keep
                                                            if c not in ("variant", "train", "test", "images")}))
        ref = _csv_or_empty(sf.folder("cross_site") / "refusal.csv")
        if len(ref):  # per target site: the quality + OOD gate, and the score fitted to refuse likely errors
            ref = ref[(ref["test"] != "internal") & ref["rule"].isin(["gate", "combined"])]
            rep.para("Refusal per target site: `gate` is the quality and out-of-distribution gate alone; `combined` "
                     "refuses the images whose score of a wrong answer (OOD score, calibrated confidence and conformal "
                     "set size, fitted on the internal validation) is highest. Accepted images should be at least as "
                     "accurate as all images.")
            rep.table(ref[["variant", "train", "test", "rule", "n", "refusal_rate", "accuracy_all", "accuracy_accepted",
                           "accuracy_refused", "accepted_at_least_all"]].round(3).rename(columns={
                               "n": "images", "refusal_rate": "refused", "accuracy_all": "accuracy (all)",
                               "accuracy_accepted": "accuracy (accepted)", "accuracy_refused": "accuracy (refused)",
                               "accepted_at_least_all": "accepted >= all"}))
        for fig in sorted((sf.folder("cross_site") / "figures").glob("*.png")):
            rep.figure(fig, fig.stem.replace("_", " "), md_rel=f"cross_site/figures/{fig.name}")
    readers = sf.folder("reader_study") / "summary.json"
    if readers.exists():  # `reader_study.simulate` (the demo): simulated readers, labelled as such throughout
        from lesionlab.report.reader_study import add_reader_study_section, figures_of

        summary = json.loads(readers.read_text())
        add_reader_study_section(rep, summary, figures_of(summary), md_dir="reader_study")

    rep.heading("Reproducibility")
    steps = sf.steps()
    rep.para("Each step is keyed by a fingerprint of the config values and files it reads, its upstream steps and "
             "the source code it runs; it ran when one of them changed, and was reused otherwise (steps.json):")
    rep.table(pd.DataFrame([{"step": k, "status": v.get("status", ""), "reason": v.get("reason", ""),
                             "seconds (when made)": v.get("seconds"), "fingerprint": (v.get("fingerprint") or "")[:12]}
                            for k, v in steps.items()]))
    rep.table(pd.DataFrame([_versions()]))
    rep.para(f"Seeds: split {cfg.split.seed}, training {cfg.train.seed}. Effective configuration (config.yaml):")
    import yaml

    cfg_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    rep.raw_html(f"<pre>{cfg_text}</pre>")
    rep.md.append("```yaml\n" + cfg_text + "```\n")
    html_path = sf.root / "report.html"
    rep.write(html_path, sf.root / "report.md")
    return html_path

