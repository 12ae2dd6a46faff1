"""Reader-study metrics over the reads table (lesionlab.workflows.reader_study.schema.READ_COLUMNS): pure functions.

Per reader and modality: sensitivity and specificity of the reader's diagnosis (says melanoma / says a malignant
class) and of the management decision (excise), AUC of the malignancy confidence rating, top-1 diagnostic
accuracy; the model's ROC on the same cases and its specificity at the readers' mean sensitivity (the comparison
of Haenssle et al. 2018); the "AI changed the answer" transitions of Tschandl et al. (2020); time per case.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from lesionlab.evaluation.metrics import _f, rank_auc
from lesionlab.evaluation.operating_points import sensitivity_at_specificity, specificity_at_sensitivity
from lesionlab.labels import MALIGNANT

TASK_MODEL_SCORE = {"melanoma": "ai_mel_prob", "malignancy": "ai_malignant_prob"}
EXCISE = "excise"
# Tschandl et al. 2020, Fig. 4: what the AI did to an answer, given the answer without it.
CHANGE_KINDS: tuple[str, ...] = ("right kept", "wrong to right", "right to wrong", "wrong kept", "wrong to other wrong")


def positive_classes(task: str, *, malignant: Collection[str] = MALIGNANT, flag: str = "MEL") -> frozenset[str]:
    """The classes that count as positive for a task: the flag class (melanoma) or any malignant class."""
    if task == "melanoma":
        return frozenset({flag})
    if task == "malignancy":
        return frozenset(malignant)
    raise ValueError(f"unknown task {task!r}; expected melanoma or malignancy")


def _rate(hit: np.ndarray, among: np.ndarray) -> float | None:
    n = int(among.sum())
    return float((hit & among).sum() / n) if n else None


def binary_metrics(truth: np.ndarray, says: np.ndarray) -> dict[str, float | None]:
    """Sensitivity and specificity of a yes/no call against a yes/no truth (None when a class is absent)."""
    truth = np.asarray(truth, bool)
    says = np.asarray(says, bool)
    return {"sensitivity": _rate(says, truth), "specificity": _rate(~says, ~truth)}


def reader_metrics(reads: pd.DataFrame, task: str, *, positive: Collection[str] | None = None) -> pd.DataFrame:
    """One row per reader x modality: cases read, diagnosis and management sensitivity/specificity, rating AUC,
    top-1 accuracy, median seconds per case; with the reader's level and years.

    Args:
        reads: the reads table (READ_COLUMNS).
        task: `melanoma` or `malignancy`.
        positive: the positive classes (default: `positive_classes(task)`).
    """
    pos = frozenset(positive) if positive is not None else positive_classes(task)
    rows = []
    for (reader, modality), g in reads.groupby(["reader", "modality"], sort=False):
        truth = g["truth"].isin(pos).to_numpy()
        dx = binary_metrics(truth, g["diagnosis"].isin(pos).to_numpy())
        mg = binary_metrics(truth, (g["management"] == EXCISE).to_numpy())
        rating = g["rating"].to_numpy(float)
        ok = np.isfinite(rating)
        rows.append({
            "reader": reader, "reader_level": g["reader_level"].iloc[0], "reader_years": g["reader_years"].iloc[0],
            "modality": modality, "task": task, "n": len(g), "n_positive": int(truth.sum()),
            "sensitivity": dx["sensitivity"], "specificity": dx["specificity"],
            "excise_sensitivity": mg["sensitivity"], "excise_specificity": mg["specificity"],
            "auc": _f(rank_auc(truth[ok], rating[ok])) if ok.any() else None,
            "accuracy": float((g["diagnosis"] == g["truth"]).mean()),
            "median_seconds": float(g["seconds"].median()) if g["seconds"].notna().any() else None,
        })
    return pd.DataFrame(rows)


METRIC_COLUMNS = ("sensitivity", "specificity", "excise_sensitivity", "excise_specificity", "auc", "accuracy")


def pooled_metrics(per_reader: pd.DataFrame, *, by: Sequence[str] = ("modality",)) -> pd.DataFrame:
    """Mean over readers (each reader weighs the same, as in Haenssle et al.) of every metric, per group."""
    if per_reader.empty:
        return per_reader
    df = per_reader.copy()
    for c in METRIC_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    agg = df.groupby(list(by), sort=False).agg(
        readers=("reader", "nunique"), **{c: (c, "mean") for c in METRIC_COLUMNS}).reset_index()
    return agg


def model_roc(truth: np.ndarray, score: np.ndarray) -> dict:
    """The model's ROC curve and AUC on cases with a score (refused cases, score NaN, are left out and counted)."""
    truth = np.asarray(truth, bool)
    score = np.asarray(score, float)
    ok = np.isfinite(score)
    t, s = truth[ok], score[ok]
    if t.all() or not t.any():
        return {"auc": None, "fpr": [], "tpr": [], "n": int(ok.sum()), "n_refused": int((~ok).sum())}
    fpr, tpr, _ = roc_curve(t, s)
    return {"auc": _f(rank_auc(t, s)), "fpr": fpr.tolist(), "tpr": tpr.tolist(), "n": int(ok.sum()),
            "n_refused": int((~ok).sum())}


def model_vs_readers(truth: np.ndarray, score: np.ndarray, mean_sensitivity: float | None,
                     mean_specificity: float | None) -> dict:
    """The Haenssle comparison: the model's specificity at the readers' mean sensitivity (and its sensitivity at
    their mean specificity), on the cases the model scored."""
    truth = np.asarray(truth, bool)
    score = np.asarray(score, float)
    ok = np.isfinite(score)
    out: dict = {"readers_mean_sensitivity": mean_sensitivity, "readers_mean_specificity": mean_specificity}
    if mean_sensitivity is not None and not np.isnan(mean_sensitivity):
        r = specificity_at_sensitivity(truth[ok], score[ok], mean_sensitivity)
        out.update(model_specificity_at_readers_sensitivity=r["specificity"],
                   model_sensitivity_there=r["sensitivity"], threshold_there=r["threshold"])
    if mean_specificity is not None and not np.isnan(mean_specificity):
        r = sensitivity_at_specificity(truth[ok], score[ok], mean_specificity)
        out.update(model_sensitivity_at_readers_specificity=r["sensitivity"])
    return out


def _kind(before: np.ndarray, after: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Change kind per pair (before right?, after right?, same answer?) as CHANGE_KINDS labels."""
    return np.select(
        [before & after, ~before & after, before & ~after, ~before & ~after & same],
        list(CHANGE_KINDS[:4]), default=CHANGE_KINDS[4])


def paired_reads(reads: pd.DataFrame, *, malignant: Collection[str] = MALIGNANT) -> pd.DataFrame:
    """Unaided and aided reads of the same reader and case side by side, with rightness of diagnosis, of
    management (excise a malignant lesion, do not excise a benign one) and of the AI's shown class.

    Columns: reader, reader_level, case, truth, ai_top, ai_right (the shown class is the true one; None when the
    AI refused), ai_kind_right (the shown class is malignant exactly when the truth is: what management is
    judged against), dx_before, dx_after, dx_kind, mg_before, mg_after, mg_kind.
    """
    key = ["reader", "case"]
    un = reads[reads["modality"] == "unaided"].drop_duplicates(key)
    ai = reads[reads["modality"] == "aided"].drop_duplicates(key)
    both = un.merge(ai[[*key, "diagnosis", "management"]], on=key, suffixes=("_before", "_after"))
    if both.empty:
        return pd.DataFrame(columns=["reader", "reader_level", "case", "truth", "ai_top", "ai_right", "ai_kind_right",
                                     "dx_before", "dx_after", "dx_kind", "mg_before", "mg_after", "mg_kind"])
    truth = both["truth"].to_numpy()
    dx_b, dx_a = both["diagnosis_before"].to_numpy(), both["diagnosis_after"].to_numpy()
    mal = both["truth"].isin(list(malignant)).to_numpy()
    mg_b, mg_a = both["management_before"].to_numpy(), both["management_after"].to_numpy()
    mg_ok_b = (mg_b == EXCISE) == mal
    mg_ok_a = (mg_a == EXCISE) == mal
    ai_top = both["ai_top"].fillna("").astype(str).to_numpy()
    ai_right = np.array([None if a == "" else bool(a == t) for a, t in zip(ai_top, truth, strict=True)], dtype=object)
    malignant = set(malignant)
    ai_kind_right = np.array([None if a == "" else bool((a in malignant) == (t in malignant))
                              for a, t in zip(ai_top, truth, strict=True)], dtype=object)
    return pd.DataFrame({
        "reader": both["reader"], "reader_level": both["reader_level"], "case": both["case"], "truth": truth,
        "ai_top": ai_top, "ai_right": ai_right, "ai_kind_right": ai_kind_right, "dx_before": dx_b, "dx_after": dx_a,
        "dx_kind": _kind(dx_b == truth, dx_a == truth, dx_b == dx_a), "mg_before": mg_b, "mg_after": mg_a,
        "mg_kind": _kind(mg_ok_b, mg_ok_a, mg_b == mg_a),
    })


def changed_answers(pairs: pd.DataFrame, *, kind: str = "dx_kind", ai: str = "ai_right",
                    by_reader: bool = True) -> pd.DataFrame:
    """Counts of each change kind (CHANGE_KINDS) per reader and for all readers, split by whether the AI was right
    ("AI right" / "AI wrong" / "AI refused") by the column `ai` (`ai_right` for diagnoses, `ai_kind_right` for
    management).

    Columns: reader ("all" for the pooled rows), ai, the five kinds, n, and net (wrong-to-right minus
    right-to-wrong).
    """
    df = pairs.copy()
    df["ai"] = ["AI refused" if v is None or v != v else ("AI right" if v else "AI wrong") for v in df[ai]]
    groups = [("all", df)]
    if by_reader:
        groups += [(str(r), g) for r, g in df.groupby("reader", sort=False)]
    rows = []
    for name, g in groups:
        for shown in ("AI right", "AI wrong", "AI refused"):
            sub = g[g["ai"] == shown]
            if sub.empty and shown == "AI refused":
                continue
            counts = sub[kind].value_counts()
            row = {"reader": name, "ai": shown, **{k: int(counts.get(k, 0)) for k in CHANGE_KINDS}, "n": len(sub)}
            row["net"] = row["wrong to right"] - row["right to wrong"]
            rows.append(row)
    return pd.DataFrame(rows, columns=["reader", "ai", *CHANGE_KINDS, "n", "net"])


def time_per_case(reads: pd.DataFrame, *, by: Sequence[str] = ("modality",)) -> pd.DataFrame:
    """Seconds per case by group: reads, median, quartiles, mean."""
    rows = []
    for key, g in reads.groupby(list(by), sort=False):
        s = pd.to_numeric(g["seconds"], errors="coerce").dropna()
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key, strict=True)), "reads": len(g),
                     "median_s": float(s.median()) if len(s) else None,
                     "q1_s": float(s.quantile(0.25)) if len(s) else None,
                     "q3_s": float(s.quantile(0.75)) if len(s) else None,
                     "mean_s": float(s.mean()) if len(s) else None})
    return pd.DataFrame(rows)
