"""Analyse a reader study: per-reader and pooled accuracy, readers against the model's ROC, aided vs unaided by
Obuchowski-Rockette MRMC analysis, results by experience level, what the AI changed, time per case.

Two inputs: the full reads table (schema.READ_COLUMNS, what `lesionlab reader-study export` and the simulator
write) or the long MRMC format (schema.MRMC_COLUMNS: reader, modality, case, truth 0/1, rating) that MRMC
software reads, so published reader data (any modality names) can be re-analysed. The computations live in
lesionlab.evaluation (mrmc, readers); the report in lesionlab.report.reader_study.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.evaluation.metrics import rank_auc
from lesionlab.evaluation.mrmc import crossed, or_rrrc
from lesionlab.evaluation.readers import (
    TASK_MODEL_SCORE,
    changed_answers,
    model_roc,
    model_vs_readers,
    paired_reads,
    pooled_metrics,
    positive_classes,
    reader_metrics,
    time_per_case,
)
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_csv, atomic_write_json
from lesionlab.report.document import Report
from lesionlab.report.reader_study import (
    add_reader_study_section,
    plot_changed_answers,
    plot_paired_auc,
    plot_readers_on_roc,
)
from lesionlab.workflows.reader_study.schema import (
    CASE_COLUMNS,
    MANAGEMENT,
    MODALITIES,
    MRMC_COLUMNS,
    READ_COLUMNS,
    TASKS,
)

METHODS = ("Methods: sensitivity and specificity from the reader's diagnosis (says melanoma / says a malignant "
           "class: MEL, BCC, AKIEC) and from the management decision (excise); AUC from the malignancy confidence "
           "rating (the one rating a reader gives, used for both tasks), empirical (trapezoidal); pooled values are "
           "means over readers. Aided vs unaided: Obuchowski-Rockette analysis of the reader AUCs with readers and "
           "cases random and Hillis denominator degrees of freedom; covariances by the jackknife over cases (as "
           "RJafroc, MRMCaov and OR-DBM MRMC compute them; lesionlab's implementation reproduces their published "
           "Van Dyke analysis). The model's ROC uses its calibrated probability on the same cases.")
METHODS_MRMC = ("Methods: empirical (trapezoidal) AUC of each reader's ratings per modality; Obuchowski-Rockette "
                "analysis with readers and cases random and Hillis denominator degrees of freedom, covariances by the "
                "jackknife over cases (as RJafroc, MRMCaov and OR-DBM MRMC compute them).")
BOOL_TEXT = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": False, "nan": False}


# ----------------------------------------------------------------------------- reading a reads file


def _row(idx: Any) -> int:
    return int(idx) + 2  # CSV line: header is line 1


def _numeric(df: pd.DataFrame, col: str, path: Path, *, required: bool) -> pd.Series:
    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce")
    blank = raw.isna() | (raw.astype(str).str.strip() == "")
    bad = (num.isna() & ~blank) | (~np.isfinite(num.fillna(0))) | (blank if required else False)
    if bad.any():
        i = bad.idxmax()
        raise UserError(f"{path}, row {_row(i)}: column {col!r} must be a number (got {raw[i]!r})")
    return num


def _text(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    s = df[col].fillna("").astype(str).str.strip()
    if (s == "").any():
        raise UserError(f"{path}, row {_row((s == '').idxmax())}: column {col!r} is empty")
    return s


def _no_duplicates(df: pd.DataFrame, path: Path) -> None:
    dup = df.duplicated(["reader", "modality", "case"])
    if dup.any():
        i = dup.idxmax()
        raise UserError(f"{path}, row {_row(i)}: reader {df.at[i, 'reader']!r} read case {df.at[i, 'case']!r} in "
                        f"modality {df.at[i, 'modality']!r} a second time; keep one row per reader, modality and case")


def _one_truth(df: pd.DataFrame, path: Path) -> None:
    n = df.groupby("case")["truth"].nunique()
    if (n > 1).any():
        case = n[n > 1].index[0]
        i = df.index[df["case"] == case][-1]
        raise UserError(f"{path}, row {_row(i)}: case {case!r} has a different truth than in an earlier row")


def _read_full(df: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = df[list(READ_COLUMNS)].copy()
    for col in ("reader", "modality", "case", "truth", "diagnosis"):
        out[col] = _text(out, col, path)
    bad = ~out["modality"].isin(MODALITIES)
    if bad.any():
        i = bad.idxmax()
        raise UserError(f"{path}, row {_row(i)}: modality {out.at[i, 'modality']!r} must be one of "
                        f"{', '.join(MODALITIES)} (use the long format reader,modality,case,truth,rating for others)")
    out["management"] = out["management"].fillna("").astype(str).str.strip()
    bad = ~out["management"].isin((*MANAGEMENT, ""))
    if bad.any():
        i = bad.idxmax()
        raise UserError(f"{path}, row {_row(i)}: management {out.at[i, 'management']!r} must be one of "
                        f"{', '.join(MANAGEMENT)}")
    out["rating"] = _numeric(out, "rating", path, required=True)
    for col in ("reader_years", "seconds", "phase", "ai_mel_prob", "ai_malignant_prob"):
        out[col] = _numeric(out, col, path, required=False)
    out["reader_level"] = out["reader_level"].fillna("").astype(str).str.strip()
    out["ai_top"] = out["ai_top"].fillna("").astype(str).str.strip()
    flag = out["ai_melanoma_flag"].astype(str).str.strip().str.lower()
    bad = ~flag.isin(BOOL_TEXT)
    if bad.any():
        i = bad.idxmax()
        raise UserError(f"{path}, row {_row(i)}: ai_melanoma_flag {out.at[i, 'ai_melanoma_flag']!r} must be true or "
                        "false")
    out["ai_melanoma_flag"] = flag.map(BOOL_TEXT).astype(bool)
    _no_duplicates(out, path)
    _one_truth(out, path)
    return out.reset_index(drop=True), cases_from_reads(out)


def _read_long(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    out = df[list(MRMC_COLUMNS)].copy()
    for col in ("reader", "modality", "case"):
        out[col] = _text(out, col, path)
    truth = _numeric(out, "truth", path, required=True)
    bad = ~truth.isin((0, 1))
    if bad.any():
        i = bad.idxmax()
        raise UserError(f"{path}, row {_row(i)}: truth must be 0 or 1 (got {out.at[i, 'truth']!r})")
    out["truth"] = truth.astype(int)
    out["rating"] = _numeric(out, "rating", path, required=True)
    _no_duplicates(out, path)
    _one_truth(out, path)
    return out.reset_index(drop=True)


def cases_from_reads(reads: pd.DataFrame) -> pd.DataFrame:
    """The cases table (CASE_COLUMNS) implied by a full reads table (each read repeats its case's AI answer)."""
    c = reads.drop_duplicates("case").copy()
    c["image_id"] = c["case"]
    return c[list(CASE_COLUMNS)].reset_index(drop=True)


def read_reads_file(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read a reads CSV: the full reads table (returns reads and the cases it implies) or the long MRMC format
    `reader,modality,case,truth,rating` with truth 0/1 and any modality names (returns it and None).

    Raises:
        UserError: a missing or unreadable file, missing columns, or a bad value (naming the row and column).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reads file {path} not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise UserError(f"{path} has no rows")
    if set(READ_COLUMNS) <= set(df.columns):
        return _read_full(df, path)
    if set(MRMC_COLUMNS) <= set(df.columns):
        return _read_long(df, path), None
    missing_long = [c for c in MRMC_COLUMNS if c not in df.columns]
    missing_full = [c for c in READ_COLUMNS if c not in df.columns]
    raise UserError(f"{path} lacks column(s) {', '.join(missing_long)} of the long MRMC format (or "
                    f"{', '.join(missing_full)} of the full reads table)")


# ----------------------------------------------------------------------------- analysis


def _clean(o: Any) -> Any:
    """JSON-able: NaN and infinities become None, numpy scalars Python ones."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return _clean(df.astype(object).where(df.notna(), None).to_dict("records"))


def mrmc_analysis(long: pd.DataFrame, modalities: list[str]) -> dict[str, Any]:
    """OR RRRC analysis of a long table (fully crossed part), or {"skipped": reason}."""
    if len(modalities) < 2:
        return {"skipped": f"only one modality ({', '.join(modalities) or 'none'}) has reads"}
    try:
        c = crossed(long, modalities=modalities)
        r = or_rrrc(c.truth, c.ratings, modalities=c.modalities, readers=c.readers)
    except ValueError as e:
        return {"skipped": str(e)}
    return _clean({**r.to_dict(), "dropped_readers": c.dropped_readers, "dropped_cases": c.dropped_cases})


def _overview(reads: pd.DataFrame, simulated: bool) -> str:
    levels = reads.drop_duplicates("reader")["reader_level"].replace("", "unknown level").value_counts()
    lv = ", ".join(f"{n} {name}" for name, n in levels.items())
    mods = ", ".join(f"{m} {int(n)} reads" for m, n in reads["modality"].value_counts().reindex(MODALITIES).dropna().items())
    return (f"{'Simulated readers' if simulated else 'Readers'}: {reads['reader'].nunique()} ({lv}); cases: "
            f"{reads['case'].nunique()}; {mods}.")


def _analyse_full(reads: pd.DataFrame, cases: pd.DataFrame | None, simulated: bool) -> tuple[dict, dict]:
    if cases is None or cases.empty:
        cases = cases_from_reads(reads)
    else:  # the model on the cases that were read (a study in progress has unread cases)
        cases = cases[cases["case"].astype(str).isin(set(reads["case"].astype(str)))]
    present = [m for m in MODALITIES if (reads["modality"] == m).any()]
    order = [m for m in ("aided", "unaided") if m in present]  # differences read aided - unaided
    tasks: dict[str, Any] = {}
    by_level, roc_panels, auc_panels, per_reader_all = [], {}, {}, []
    for task in TASKS:
        pos = positive_classes(task)
        per = reader_metrics(reads, task)
        per_reader_all.append(per)
        pooled = pooled_metrics(per)
        lv = pooled_metrics(per, by=("reader_level", "modality"))
        lv.insert(0, "task", task)
        by_level.append(lv)
        score_col = TASK_MODEL_SCORE[task]
        c_truth = cases["truth"].isin(pos).to_numpy()
        c_score = pd.to_numeric(cases[score_col], errors="coerce").to_numpy(float)
        roc = model_roc(c_truth, c_score)
        comparison = {}
        for m in present:
            row = pooled[pooled["modality"] == m].iloc[0]
            comparison[m] = model_vs_readers(c_truth, c_score, _clean(float(row["sensitivity"])),
                                             _clean(float(row["specificity"])))
        long = reads[["reader", "modality", "case", "rating"]].assign(truth=reads["truth"].isin(pos).astype(int))
        tasks[task] = {
            "definition": "positive = " + " or ".join(sorted(pos)), "model_score": score_col,
            "per_reader": _records(per), "pooled": _records(pooled),
            "model": {k: v for k, v in roc.items() if k not in ("fpr", "tpr")},
            "comparison": _clean(comparison), "mrmc": mrmc_analysis(long, order),
        }
        roc_panels[task] = {"roc": roc, "readers": per, "comparison": comparison.get("unaided")}
        auc_panels[task] = per[["reader", "reader_level", "modality", "auc"]]
    pairs = paired_reads(reads)
    changed = {}
    if not pairs.empty:
        changed = {"diagnosis": _records(changed_answers(pairs, kind="dx_kind")),
                   "management": _records(changed_answers(pairs, kind="mg_kind", ai="ai_kind_right"))}
    summary = {
        "format": "reads", "overview": _overview(reads, simulated), "notes": {"methods": METHODS},
        "readers": int(reads["reader"].nunique()), "cases": int(reads["case"].nunique()), "reads": len(reads),
        "tasks": tasks, "by_level": _records(pd.concat(by_level, ignore_index=True)),
        "changed_answers": changed, "time_per_case": _records(time_per_case(reads)),
        "time_by_level": _records(time_per_case(reads, by=("reader_level", "modality"))),
    }
    for task, t in tasks.items():  # headline numbers (the CLI prints top-level scalars)
        mr = t["mrmc"]
        if "skipped" in mr:
            continue
        for m, v in mr["modality_auc"].items():
            summary[f"{task}_auc_{m}"] = v
        d = mr["differences"][0]
        summary[f"{task}_auc_difference_aided_minus_unaided"] = d["estimate"]
        summary[f"{task}_difference_ci"] = f"{d['ci_lower']:.4f} to {d['ci_upper']:.4f}"
        summary[f"{task}_p_value"] = d["p_value"]
    plots = {"roc": roc_panels, "paired_auc": auc_panels, "modalities": present,
             "changed": {k: pd.DataFrame(v) for k, v in changed.items()}}
    return summary, plots


def _analyse_long(reads: pd.DataFrame, simulated: bool) -> tuple[dict, dict]:
    modalities = list(dict.fromkeys(reads["modality"]))
    if set(modalities) == set(MODALITIES):
        modalities = ["aided", "unaided"]  # differences read aided - unaided, as for the full reads table
    rows = []
    for (reader, modality), g in reads.groupby(["reader", "modality"], sort=False):
        t = g["truth"].to_numpy(bool)
        rows.append({"reader": reader, "reader_level": "", "modality": modality, "n": len(g),
                     "n_positive": int(t.sum()), "auc": _clean(rank_auc(t, g["rating"].to_numpy(float)))})
    per = pd.DataFrame(rows)
    mr = mrmc_analysis(reads, modalities)
    summary: dict[str, Any] = {
        "format": "mrmc", "notes": {"methods": METHODS_MRMC},
        "overview": (f"{'Simulated readers' if simulated else 'Readers'}: {reads['reader'].nunique()}; cases: "
                     f"{reads['case'].nunique()} ({int(reads.drop_duplicates('case')['truth'].sum())} positive); "
                     f"modalities: {', '.join(modalities)}."),
        "readers": int(reads["reader"].nunique()), "cases": int(reads["case"].nunique()), "reads": len(reads),
        "modalities": modalities, "per_reader": _records(per), "mrmc": mr,
    }
    if "skipped" not in mr:
        for m, v in mr["modality_auc"].items():
            summary[f"auc_{m}"] = v
        if len(mr["differences"]) == 1:
            d = mr["differences"][0]
            summary[f"difference_{d['first']}_minus_{d['second']}"] = d["estimate"]
            summary["difference_ci"] = f"{d['ci_lower']:.4f} to {d['ci_upper']:.4f}"
        summary["F"], summary["ddf"], summary["p_value"] = mr["f"], mr["ddf"], mr["p_value"]
    plots = {"paired_auc": {"AUC": per.assign(reader_level="")}, "modalities": modalities}
    return summary, plots


FIGURES = {"roc": "reader_study_roc.png", "paired_auc": "reader_study_auc_pairs.png",
           "changed": "reader_study_changed_answers.png"}


def write_figures(plots: dict[str, Any], out_dir: Path, *, simulated: bool) -> dict[str, Path]:
    """The report's PNG figures from `plots` (what `_analyse_*` prepared); returns key -> path."""
    tag = "SIMULATED readers" if simulated else ""
    figs: dict[str, Path] = {}
    if plots.get("roc"):
        figs["roc"] = plot_readers_on_roc(plots["roc"], out_dir / FIGURES["roc"], title=tag)
    if plots.get("paired_auc") and len(plots["modalities"]) >= 2:
        figs["paired_auc"] = plot_paired_auc(plots["paired_auc"], out_dir / FIGURES["paired_auc"],
                                             modalities=plots["modalities"], title=tag)
    if plots.get("changed"):
        figs["changed"] = plot_changed_answers(plots["changed"], out_dir / FIGURES["changed"], title=tag)
    return figs


def run_analysis(reads: pd.DataFrame, cases: pd.DataFrame | None, out_dir: Path, *, simulated: bool = False) -> dict:
    """Analyse reads and write the report into `out_dir`: reader_study.md, reader_study.html, summary.json,
    per_reader.csv, changed_answers.csv (full reads) and PNG figures, each written atomically.

    Args:
        reads: the full reads table (READ_COLUMNS) or the long MRMC table (MRMC_COLUMNS, truth 0/1).
        cases: the cases table (CASE_COLUMNS) for the model's ROC; None derives it from the reads.
        out_dir: the report folder (created).
        simulated: the reads come from the simulator: the report says SIMULATED throughout.

    Returns:
        The JSON-able summary (as written to summary.json), with headline numbers at the top level.

    Raises:
        UserError: reads without the columns of either format, or no reads.
    """
    out_dir = Path(out_dir)
    if reads is None or reads.empty:
        raise UserError("there are no reads to analyse")
    if set(READ_COLUMNS) <= set(reads.columns):
        summary, plots = _analyse_full(reads, cases, simulated)
    elif set(MRMC_COLUMNS) <= set(reads.columns):
        summary, plots = _analyse_long(reads, simulated)
    else:
        raise UserError(f"the reads lack the columns of the reads table ({', '.join(READ_COLUMNS)}) and of the long "
                        f"MRMC format ({', '.join(MRMC_COLUMNS)})")
    summary = {"simulated": bool(simulated), **summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = write_figures(plots, out_dir, simulated=simulated)
    title = "Reader-study analysis" + (" - SIMULATED readers" if simulated else "")
    rep = Report(title)
    add_reader_study_section(rep, summary, figs, level=2)
    files = {"markdown": out_dir / "reader_study.md", "html": out_dir / "reader_study.html",
             "summary": out_dir / "summary.json", **{f"figure_{k}": p for k, p in figs.items()}}
    if summary["format"] == "reads":
        per = pd.concat([pd.DataFrame(t["per_reader"]) for t in summary["tasks"].values()], ignore_index=True)
        files["per_reader"] = out_dir / "per_reader.csv"
        atomic_write_csv(files["per_reader"], per)
        if summary["changed_answers"]:
            ch = pd.concat([pd.DataFrame(v).assign(answer=k) for k, v in summary["changed_answers"].items()],
                           ignore_index=True)
            files["changed_answers"] = out_dir / "changed_answers.csv"
            atomic_write_csv(files["changed_answers"], ch)
    else:
        files["per_reader"] = out_dir / "per_reader.csv"
        atomic_write_csv(files["per_reader"], pd.DataFrame(summary["per_reader"]))
    summary["report"] = str(files["markdown"])
    summary["files"] = {k: str(v) for k, v in files.items()}
    rep.write(files["html"], files["markdown"])
    atomic_write_json(files["summary"], summary)
    return summary
