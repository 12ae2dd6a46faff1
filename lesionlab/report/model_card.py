"""The model card: one record of what a study's model is for, what it learned from and how well it did, written as
Markdown, a self-contained HTML page and machine-readable JSON.

The sections follow the items of the TRIPOD+AI statement (Collins et al., BMJ 2024;385:e078378) that a trained
image classifier can answer from its own study folder; `TRIPOD_AI` maps each item to the card section that answers
it, and the card prints that map. What the study did not run is stated as "not run" (with the reason), never left
out and never an error: a card made before the subgroup or cross-site steps exist is still a card.

The JSON (`card_json`) is the `ModelCard` dataclass as a dict. Its fields (schema version `SCHEMA_VERSION`)::

    schema_version, title, created, lesionlab_version   strings
    model           name, kind, members [{name, arch, timm_id, pretrained, input_size, epochs_run}], label_set,
                    classes, flag_class, flag_name (the flag in metric titles: "melanoma", "malignant"), bundle
                    ({path, format_version, melanoma_threshold, inference} or null)
    intended_use    purpose, users, setting, output, not_for [str]
    data            status, synthetic, sources [licence entries of lesionlab.data.licences.dataset_licences, with
                    images], total_images, per_class [{class, train, val, test, all}], sites [{site, images}],
                    caveats [str], leaky_columns [str], skin_tone_column
    licences        items (= data.sources' licence facts), warning (str or null), note
    split           status, method, fractions {train, val, test}, seed, images {split: n}, lesions {split: n},
                    lesions_across_splits, duplicate_groups, cross_source_duplicates [rows], checked
    training        status, archs, pretrained, input_size, crop, epochs, loss, optimizer, batch_size,
                    early_stopping, augmentation, color_constancy, metadata_columns, precision, device, seed
    performance     status, reason, model, n_test, ci_level, ci_resampling, per_class [{class, support, <metric>,
                    <metric>_lo, <metric>_hi}], summary {balanced_accuracy, accuracy, macro_auc, macro_f1:
                    {value, lo, hi}}, models [{name, balanced_accuracy, macro_auc}], operating_point
    calibration     status, reason, method, temperature, ece_before, ece_after, brier_after, nll_after ({value, lo,
                    hi}), ece_bins
    conformal       status, reason, method, mondrian, target_coverage, coverage, mean_set_size (CI dicts),
                    per_class_coverage {class: value}
    refusal         status, reason, threshold, test_images, test_refused, test_refused_by_quality,
                    test_refused_by_ood, test_refused_by_error, validation_refused, sets [{set, images, refused,
                    refused_by_error, auroc}], gate [{stage, name, codes, on, rule, fitted_on, threshold}: quality
                    checks, OOD score, error-targeting refusal, in the order the pipeline applies them],
                    error_refusal {status, reason, code ("likely_wrong"), configured_rate
                    (trust.error_refusal_rate), rule, signals, threshold, fitted_on, validation and test (each
                    null or {n, n_refused, refusal_rate, accuracy_all, accuracy_accepted, accuracy_refused}; test
                    {refusal_rate, images, accuracy, note}), note}, sites [the gate's refusal rows per external
                    site of the cross-site matrix]; gate, error_refusal and sites are there when "not run" too
    subgroups       status, reason, model, columns, rows [{column, subgroup, n_images, balanced_accuracy, ..., note}],
                    skin_tone {status, column, groups {value: images}}
    cross_site      status, reason, source, rows [matrix.csv rows as `lesionlab cross-site` writes them],
                    refusal_rows [its refusal.csv rows, when present]
    external        status, reason, sets [{name, model, n, balanced_accuracy, macro_auc}]
    limitations     [str]
    reproduce       [str]: shell commands
    tripod_ai       [{item, topic, section}]

Every CI dict is {"value", "lo", "hi"} (numbers or null). Status is "reported" or "not run".
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from lesionlab.data.licences import licence_warning  # noqa: F401  (re-exported for the bundle builder)
from lesionlab.labels import metric_title

SCHEMA_VERSION = "1"
REPORTED, NOT_RUN = "reported", "not run"
CARD_FILES = ("model_card.md", "model_card.html", "model_card.json")

INTENDED_USE = {
    "purpose": "Decision support for clinicians, not a diagnosis: ranks the likely diagnoses of a dermoscopic image of a skin lesion, with calibrated "
               "probabilities, a conformal differential (a set of diagnoses that holds the true one at the stated "
               "rate) and a flag for the label set's flag class (melanoma for ham7 and isic2019).",
    "users": "Clinicians trained in dermoscopy (dermatologists, and general practitioners under their supervision), "
             "and researchers evaluating the model.",
    "setting": "Dermoscopic images of single, pigmented skin lesions taken in clinics like those of the training data.",
    "output": "Probabilities per class, a conformal set of diagnoses, a flag-class alert at a threshold chosen on "
              "validation for a target sensitivity, and a refusal when the image fails the quality checks or lies "
              "outside the training distribution.",
    "not_for": [
        "a diagnosis: it does not replace a clinician's examination or histopathology",
        "use by patients or the public without a clinician",
        "clinical (non-dermoscopic) photographs, unless the model was trained on them",
        "lesions of classes outside the label set (the model always answers with one of its classes)",
        "populations, skin tones or devices the data does not cover (see Limitations)",
    ],
}

# TRIPOD+AI items a trained image classifier answers from its study folder (Collins GS et al. BMJ 2024;385:e078378;
# checklist at tripod-statement.org); numbers as printed there.
TRIPOD_AI: tuple[tuple[str, str, str], ...] = (
    ("3b", "target population, care pathway, intended users", "intended_use"),
    ("3c", "health inequalities across groups", "subgroups"),
    ("5a", "data sources and their representativeness", "data"),
    ("6a", "setting; number and location of centres", "data"),
    ("7", "data preparation and pre-processing", "training"),
    ("8a", "outcome: what is predicted and how it was established", "model"),
    ("10", "sample size", "data"),
    ("12a", "how the data were used: development and evaluation, split", "split"),
    ("12c", "model type, building and internal validation", "training"),
    ("12d", "heterogeneity across clusters (sites)", "cross_site"),
    ("12e", "performance measures: discrimination, calibration", "performance"),
    ("13", "class imbalance", "training"),
    ("14", "fairness", "subgroups"),
    ("15", "model output and thresholds", "intended_use"),
    ("16", "differences between development and evaluation data", "external"),
    ("18e", "data availability (licences)", "licences"),
    ("22", "the model: access and restrictions on re-use", "licences"),
    ("23a", "performance with confidence intervals, key subgroups", "performance"),
    ("23b", "heterogeneity across clusters", "cross_site"),
    ("26", "limitations", "limitations"),
    ("27a", "handling poor-quality or unavailable input", "refusal"),
    ("27b", "users and the expertise they need", "intended_use"),
)


# The JSON's fields, machine-readable (the module docstring says what each holds): every section has these keys
# when its status is "reported"; a "not run" section has at least `status` and `reason`. tests/test_model_card.py
# validates cards against this with pydantic.
SECTION_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("name", "kind", "members", "label_set", "classes", "flag_class", "flag_name", "bundle"),
    "intended_use": ("purpose", "users", "setting", "output", "not_for"),
    "data": ("status", "synthetic", "sources", "total_images", "per_class", "sites", "caveats", "leaky_columns",
             "skin_tone_column"),
    "licences": ("items", "warning", "note"),
    "split": ("status", "method", "fractions", "seed", "images", "lesions", "lesions_across_splits",
              "duplicate_groups", "cross_source_duplicates", "checked"),
    "training": ("status", "archs", "pretrained", "input_size", "crop", "epochs", "loss", "optimizer", "batch_size",
                 "early_stopping", "augmentation", "color_constancy", "metadata_columns", "precision", "device",
                 "seed"),
    "performance": ("status", "reason", "model", "n_test", "ci_level", "ci_resampling", "per_class", "summary",
                    "models", "operating_point"),
    "calibration": ("status", "reason", "method", "temperature", "ece_before", "ece_after", "brier_after",
                    "nll_after", "ece_bins"),
    "conformal": ("status", "reason", "method", "mondrian", "target_coverage", "coverage", "mean_set_size",
                  "per_class_coverage"),
    "refusal": ("status", "reason", "threshold", "test_images", "test_refused", "test_refused_by_quality",
                "test_refused_by_ood", "test_refused_by_error", "validation_refused", "sets", "gate", "error_refusal",
                "sites"),
    "subgroups": ("status", "reason", "model", "columns", "rows", "skin_tone"),
    "cross_site": ("status", "reason", "source", "rows", "refusal_rows"),
    "external": ("status", "reason", "sets"),
}
# Per-source licence entries (data.sources and licences.items): lesionlab.data.licences.dataset_licences.
LICENCE_FIELDS = ("name", "layout", "images", "key", "title", "licence", "url", "citation", "checked",
                  "commercial_use")
CI_FIELDS = ("value", "lo", "hi")


# metric columns of the subgroup and cross-site tables shown under their titles (with every `MEL_*` flag metric)
TITLED = ("balanced_accuracy", "macro_auc", "balanced_accuracy_drop", "mean_set_size", "n_MEL", "accuracy")


def not_run(reason: str, **extra: Any) -> dict[str, Any]:
    """An optional section the study did not produce."""
    return {"status": NOT_RUN, "reason": reason, **extra}


@dataclass
class ModelCard:
    """The card's facts; see the module docstring for every field. Built by
    `lesionlab.report.model_card_facts.build_card`."""

    title: str
    created: str
    lesionlab_version: str
    model: dict[str, Any]
    data: dict[str, Any]
    licences: dict[str, Any]
    split: dict[str, Any]
    training: dict[str, Any]
    performance: dict[str, Any]
    calibration: dict[str, Any]
    conformal: dict[str, Any]
    refusal: dict[str, Any]
    subgroups: dict[str, Any]
    cross_site: dict[str, Any]
    external: dict[str, Any]
    limitations: list[str]
    reproduce: list[str]
    intended_use: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(INTENDED_USE)))
    tripod_ai: list[dict[str, str]] = field(
        default_factory=lambda: [{"item": i, "topic": t, "section": s} for i, t, s in TRIPOD_AI])
    schema_version: str = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- rendering


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(d: Any) -> str:
    """A {value, lo, hi} dict as `0.812 [0.75, 0.87]`."""
    if not isinstance(d, dict):
        return _num(d)
    s = _num(d.get("value"))
    if d.get("lo") is not None and d.get("hi") is not None:
        s += f" [{d['lo']:.2f}, {d['hi']:.2f}]"
    return s


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


class _Doc:
    """Markdown and HTML side by side, section by section (the card's own, small version of report.document.Report,
    which writes files; the bundle needs the bytes)."""

    def __init__(self, title: str):
        self.title = title
        self.md: list[str] = [f"# {title}\n"]
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"\n{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def warn(self, text: str) -> None:
        self.md.append(f"> **{text}**\n")
        self.html.append(f'<p class="warn">{html.escape(text)}</p>')

    def bullets(self, items: list[str]) -> None:
        if not items:
            return
        self.md.append("\n".join(f"- {i}" for i in items) + "\n")
        self.html.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    def facts(self, pairs: list[tuple[str, Any]]) -> None:
        self.table(pd.DataFrame([{"item": k, "value": _num(v) if not isinstance(v, dict) else _ci(v)}
                                 for k, v in pairs]))

    def table(self, df: pd.DataFrame) -> None:
        if df.empty:
            self.para("(none)")
            return
        df = df.astype(str)
        self.md.append(df.to_markdown(index=False) + "\n")
        self.html.append(df.to_html(index=False, escape=True, border=0, classes="t"))

    def code(self, lines: list[str]) -> None:
        self.md.append("```sh\n" + "\n".join(lines) + "\n```\n")
        self.html.append("<pre>" + html.escape("\n".join(lines)) + "</pre>")

    def markdown(self) -> str:
        return "\n".join(self.md)

    def html_page(self) -> str:
        # Self-contained: inline style, no scripts, fonts or images from elsewhere (the card travels in bundles
        # to machines without network access)
        style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
                 "table.t{border-collapse:collapse;font-size:13px;margin:.5em 0}table.t td,table.t th{border-bottom:"
                 "1px solid #ddd;padding:3px 8px;text-align:left}pre{background:#f5f5f5;padding:.6em;overflow-x:auto}"
                 ".warn{background:#fdecea;border-left:4px solid #c0392b;padding:.6em 1em;font-weight:600}")
        return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.html)}"
                "</body></html>\n")


def _compact(rows: list[dict[str, Any]], flag: str = "") -> pd.DataFrame:
    """A table's rows for reading: each metric with `<m>_lo` / `<m>_hi` columns as one `value [lo, hi]` cell, drops
    from internal (`<m>_drop`) kept only for balanced accuracy; numbers to three decimals. With `flag` (the model's
    flag_name), metric columns get their titles (`MEL_auc` -> "melanoma AUC"; the JSON keeps the keys)."""
    if not rows:
        return pd.DataFrame()
    cols = list(rows[0])
    out = []
    for r in rows:
        row = {}
        for k in cols:
            if k.endswith(("_lo", "_hi")) or (k.endswith("_drop") and k != "balanced_accuracy_drop"):
                continue
            if f"{k}_lo" in r:
                row[k] = _ci({"value": r[k], "lo": r.get(f"{k}_lo"), "hi": r.get(f"{k}_hi")})
            elif k == "flagged" and flag and r[k]:  # metric keys joined by ";" -> their titles
                row[k] = ", ".join(metric_title(m, flag=flag) for m in str(r[k]).split(";") if m)
            else:  # an empty text cell (no flag, no note) stays empty; a missing number reads n/a
                row[k] = "" if r[k] is None and k in ("flagged", "note", "skipped") else _num(r[k])
        out.append(row)
    df = pd.DataFrame(out)
    return df.rename(columns={k: metric_title(k, flag=flag) for k in df.columns if k in TITLED or "MEL" in k
                              or k.startswith("delta_")}) if flag else df


def _status(doc: _Doc, section: dict[str, Any]) -> bool:
    """Says "not run" (and why) for a section the study did not produce; True when there is something to show."""
    if section.get("status") == NOT_RUN:
        doc.para(f"Not run: {section.get('reason', '')}")
        return False
    return True


def _gate_text(doc: _Doc, r: dict[str, Any]) -> None:
    """The gate's stages, in the order the screening pipeline applies them (the first that refuses names why)."""
    if not r.get("gate"):
        return
    doc.para("Every image passes the gate before any answer; the first stage that refuses names the reason, and a "
             "refused image gets no diagnosis:")
    doc.table(pd.DataFrame([{"stage": g["stage"], "check": g["name"], "refusal code": ", ".join(g["codes"]),
                             "on": "yes" if g["on"] else "no", "rule": g["rule"], "fitted on": g["fitted_on"] or "",
                             "threshold": _num(g["threshold"])} for g in r["gate"]]))


def _error_text(doc: _Doc, e: dict[str, Any] | None) -> None:
    """The error-targeting (likely_wrong) refusal: its rate, and the accuracy of accepted vs refused images."""
    if not e:
        return
    if e["status"] != REPORTED:
        doc.para(f"Error-targeting refusal ({e['code']}): off. {e['reason']}.")
        return
    v, t = e.get("validation") or {}, e.get("test") or {}
    acc = (t.get("accuracy") or {})
    doc.para(f"Error-targeting refusal ({e['code']}, trust.error_refusal_rate {e['configured_rate']:g}): "
             f"{e['rule']}." + (f" Signals: {', '.join(e['signals'])}." if e["signals"] else ""))
    doc.facts([("refusal code", e["code"]), ("configured refusal rate", e["configured_rate"]),
               ("threshold (estimated chance of a wrong answer)", e["threshold"]), ("fitted on", e["fitted_on"]),
               ("validation: refused", _pct(v.get("refusal_rate"))),
               ("validation: accuracy all / accepted / refused",
                " / ".join(_num(v.get(k)) for k in ("accuracy_all", "accuracy_accepted", "accuracy_refused"))
                if v else "not recorded"),
               ("test: refused as likely wrong", _pct(t.get("refusal_rate")) if t else "not measured"),
               ("test: accuracy all / accepted / refused",
                " / ".join(_num(acc.get(k)) for k in ("accuracy_all", "accuracy_accepted", "accuracy_refused"))
                if acc else (t.get("note") or "not measured"))])
    if e.get("note"):
        doc.para(f"Note: {e['note']}.")


def _render(card: ModelCard) -> _Doc:
    c = card
    doc = _Doc(c.title)
    doc.para(f"Made {c.created} by LesionLab {c.lesionlab_version} from the study folder; card schema "
             f"{c.schema_version}. Numbers are the study's own outputs; nothing here was re-estimated.")
    if c.licences.get("warning"):
        doc.warn(c.licences["warning"])

    doc.heading("Intended use and users")
    iu = c.intended_use
    doc.facts([("purpose", iu["purpose"]), ("users", iu["users"]), ("setting", iu["setting"]),
               ("output", iu["output"])])
    doc.para("Not for:")
    doc.bullets(iu["not_for"])

    doc.heading("Model")
    m = c.model
    flag = m.get("flag_name") or str(m["flag_class"])
    doc.facts([("model", m["name"]), ("kind", m["kind"]), ("label set", m["label_set"]),
               ("classes", ", ".join(m["classes"])), ("flag class", f"{m['flag_class']} ({flag})")])
    if m["members"]:
        doc.table(pd.DataFrame(m["members"]).fillna("n/a"))
    if m.get("bundle"):
        b = m["bundle"]
        thr = b.get("melanoma_threshold") or {}
        doc.facts([("bundle", b.get("path", "")), ("flag threshold", thr.get("value")),
                   ("threshold chosen by", thr.get("source")),
                   ("inference", json.dumps(b.get("inference"), sort_keys=True))])

    doc.heading("Data sources and licences")
    d = c.data
    if _status(doc, d):
        doc.table(pd.DataFrame([{"source": s["name"], "dataset": s["title"], "images": _num(s.get("images")),
                                 "licence": s["licence"], "commercial use": s["commercial_use"], "where": s["url"]}
                                for s in d["sources"]]))
        doc.para(f"{d['total_images']} images after validation." + (
            " The images are synthetic (made by the demo): the numbers say nothing about real lesions."
            if d["synthetic"] else ""))
        if d["per_class"]:
            doc.table(pd.DataFrame(d["per_class"]))
        if d["sites"]:
            doc.para("Images per acquisition site (the metadata's site column):")
            doc.table(pd.DataFrame(d["sites"]))
        doc.bullets([f"label-set caveat: {x}" for x in d["caveats"]]
                    + ([f"columns that give the label away, never fed to a model: {', '.join(d['leaky_columns'])}"]
                       if d["leaky_columns"] else []))
    doc.para(c.licences["note"])

    doc.heading("Split and leakage checks")
    s = c.split
    if _status(doc, s):
        doc.facts([("method", s["method"]), ("seed", s["seed"]),
                   *[(f"{k} images / lesions", f"{s['images'].get(k, 0)} / {s['lesions'].get(k, 0)}")
                     for k in ("train", "val", "test")],
                   ("lesions in more than one split", s["lesions_across_splits"]),
                   ("merged duplicate groups", s["duplicate_groups"]), ("checked", s["checked"])])
        if s["cross_source_duplicates"]:
            doc.table(pd.DataFrame(s["cross_source_duplicates"]))

    doc.heading("Training")
    t = c.training
    if _status(doc, t):
        doc.facts([(k.replace("_", " "), ", ".join(v) if isinstance(v, list) else v) for k, v in t.items()
                   if k != "status"])

    doc.heading("Performance on the test split")
    p = c.performance
    if _status(doc, p):
        doc.para(f"Model {p['model']}, {p['n_test']} test images; {int(100 * (p['ci_level'] or 0.95))}% CIs from "
                 f"{p['ci_resampling']} bootstrap.")
        doc.facts(list(p["summary"].items()))
        rows = []
        for r in p["per_class"]:
            row = {"class": r["class"], "support": r["support"]}
            for k in ("sensitivity", "specificity", "precision", "f1", "auc"):
                row[k] = _ci({"value": r.get(k), "lo": r.get(f"{k}_lo"), "hi": r.get(f"{k}_hi")})
            rows.append(row)
        doc.table(pd.DataFrame(rows))
        if p["operating_point"]:
            doc.para(f"Flag-class operating point: {p['operating_point']}")
        if len(p["models"]) > 1:
            doc.para("Every model of the study:")
            doc.table(pd.DataFrame([{"model": r["name"], "balanced accuracy": _ci(r["balanced_accuracy"]),
                                     "macro AUC": _ci(r["macro_auc"])} for r in p["models"]]))

    doc.heading("Calibration")
    cal = c.calibration
    if _status(doc, cal):
        doc.facts([("method", cal["method"]), ("temperature", cal["temperature"]),
                   ("ECE before", cal["ece_before"]), ("ECE after", cal["ece_after"]),
                   ("Brier after", cal["brier_after"]), ("NLL after", cal["nll_after"]), ("ECE bins", cal["ece_bins"])])

    doc.heading("Conformal differential")
    cf = c.conformal
    if _status(doc, cf):
        doc.facts([("method", cf["method"]), ("per-class thresholds (Mondrian)", cf["mondrian"]),
                   ("target coverage", cf["target_coverage"]), ("test coverage", cf["coverage"]),
                   ("mean set size", cf["mean_set_size"])])
        if cf["per_class_coverage"]:
            doc.table(pd.DataFrame([{"class": k, "coverage": _num(v)} for k, v in cf["per_class_coverage"].items()]))

    doc.heading("Refusals: the gate (quality, out-of-distribution, likely wrong)")
    r = c.refusal
    _gate_text(doc, r)
    if _status(doc, r):
        doc.facts([("test images", r["test_images"]), ("refused", _pct(r["test_refused"])),
                   ("by quality checks", _pct(r["test_refused_by_quality"])),
                   ("as out-of-distribution", _pct(r["test_refused_by_ood"])),
                   ("as likely wrong", _pct(r.get("test_refused_by_error"))),
                   ("validation refused (threshold fit)", _pct(r["validation_refused"])),
                   ("OOD threshold", r["threshold"])])
        if r["sets"]:
            doc.table(pd.DataFrame([{"set": x["set"], "images": x["images"], "refused": _pct(x["refused"]),
                                     "as likely wrong": _pct(x.get("refused_by_error")),
                                     "AUROC vs test": _num(x.get("auroc"))} for x in r["sets"]]))
    _error_text(doc, r.get("error_refusal"))
    if r.get("sites"):
        doc.para("The gate on each external site of the cross-site matrix (accuracy of all, accepted and refused "
                 "images):")
        doc.table(_compact(r["sites"]))

    doc.heading("Subgroups")
    sg = c.subgroups
    st = sg.get("skin_tone", {})
    if _status(doc, sg):
        doc.para(f"Model {sg['model']}; columns: {', '.join(sg['columns'])}; CIs in brackets.")
        doc.table(_compact(sg["rows"], flag))
    doc.para("Skin tone: " + (f"measured (column {st['column']}: "
                              + ", ".join(f"{k}: {v}" for k, v in st["groups"].items()) + ")"
                              if st.get("status") == REPORTED else f"not measured ({st.get('reason', 'no column')})"))

    doc.heading("Cross-site validation")
    cs = c.cross_site
    if _status(doc, cs):
        doc.para(f"From {cs['source']} (every column is in the JSON; CIs in brackets).")
        doc.table(_compact(cs["rows"], flag))
        if cs.get("refusal_rows"):
            doc.para("Refusals per target site and rule:")
            doc.table(_compact(cs["refusal_rows"], flag))

    doc.heading("External validation")
    ex = c.external
    if _status(doc, ex):
        doc.table(pd.DataFrame([{"set": e["name"], "model": e["model"], "images": e["n"],
                                 "balanced accuracy": _ci(e["balanced_accuracy"]), "macro AUC": _ci(e["macro_auc"])}
                                for e in ex["sets"]]))

    doc.heading("Known limitations")
    doc.bullets(c.limitations)

    doc.heading("How to reproduce")
    doc.code(c.reproduce)

    doc.heading("TRIPOD+AI items answered")
    doc.para("Items of the TRIPOD+AI checklist (Collins et al., BMJ 2024;385:e078378) a trained image classifier can "
             "answer from its study, and the section of this card that answers each; the others (title, abstract, "
             "ethics, funding, registration, patient involvement, dates of accrual) belong to the paper or protocol.")
    doc.table(pd.DataFrame(c.tripod_ai))
    return doc


def card_markdown(card: ModelCard) -> str:
    return _render(card).markdown()


def card_html(card: ModelCard) -> str:
    return _render(card).html_page()


def card_json(card: ModelCard) -> str:
    # allow_nan=False: NaN is not JSON; the facts builder turns undefined metrics into null
    return json.dumps(card.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"


def card_files(card: ModelCard) -> dict[str, bytes]:
    """The three renderings, file name -> bytes (`CARD_FILES`)."""
    return {"model_card.md": card_markdown(card).encode(), "model_card.html": card_html(card).encode(),
            "model_card.json": card_json(card).encode()}


def model_card_files(study_dir, bundle_manifest: dict[str, Any] | None = None, *,
                     cross_site_dir=None, bundle_path: str | None = None) -> dict[str, bytes]:
    """The model card of a study (and of the bundle made from it, given its manifest) as file name -> bytes: what
    `lesionlab model-card` writes and what every bundle carries."""
    from lesionlab.report.model_card_facts import build_card

    return card_files(build_card(study_dir, bundle_manifest, cross_site_dir=cross_site_dir, bundle_path=bundle_path))
