"""Subgroup performance: metrics with lesion-bootstrap CIs per value of each metadata column (sex, body site, ...).

Pure numpy/pandas (no torch), so `lesionlab subgroups` runs on prediction CSVs alone.

For every categorical column (and age, cut into bands) each subgroup gets balanced accuracy, melanoma
sensitivity / specificity / AUC, macro AUC and accuracy, each with a percentile-bootstrap CI that resamples the
subgroup's lesions (`bootstrap.bootstrap_ci`). A subgroup is *flagged* on a metric when its whole CI lies below
the overall value of that metric; a subgroup with fewer than `min_images` images or without melanoma cases is
*marked small* (its CIs are wide or its melanoma metrics undefined; also with fewer than `min_melanomas`
melanomas), never dropped. Missing values (empty,
NaN, "unknown") form their own subgroup `unknown`, so every image is counted in every column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.data.metadata import MISSING, clean_values
from lesionlab.evaluation.bootstrap import bootstrap_ci
from lesionlab.evaluation.metrics import rank_auc
from lesionlab.exceptions import UserError
from lesionlab.labels import CLASS_INDEX, LabelSet, get_label_set, metric_title

# The metrics reported per subgroup, in display order.
METRICS: tuple[str, ...] = ("balanced_accuracy", "MEL_sensitivity", "MEL_specificity", "MEL_auc", "macro_auc", "accuracy")


def metric_titles(labels: LabelSet | str | None = None) -> dict[str, str]:
    """Each of `METRICS` -> the title people read under a label set (`MEL_*` keys are about its flag class:
    "melanoma AUC", "malignant AUC" under binary); the names come from `lesionlab.labels.metric_title`."""
    return {m: metric_title(m, labels) for m in METRICS}


# ham7's titles (kept for callers that predate label sets; a report should call metric_titles(its label set))
METRIC_TITLES = metric_titles()

# Age bands (lower bound inclusive); HAM10000 ages are multiples of 5 from 0 to 85.
AGE_BANDS: tuple[tuple[float, str], ...] = ((0, "<30"), (30, "30-44"), (45, "45-59"), (60, "60-74"), (75, "75+"))

# Columns used when present (age becomes `age_band`); any other column can be named explicitly.
# Skin tone where a set carries it (lesionlab.data.sources): HAM-style fitzpatrick_skin_type, Fitzpatrick17k's
# fitzpatrick_scale, PAD-UFES-20's fitspatrick (sic), DDI's skin_tone (12 / 34 / 56): numbers, but categories.
SKIN_TONE: tuple[str, ...] = ("fitzpatrick_skin_type", "fitzpatrick_scale", "fitspatrick", "fitzpatrick", "skin_tone",
                              "skin_type")
DEFAULT_COLUMNS: tuple[str, ...] = ("sex", "age_band", "localization", "dx_type", *SKIN_TONE, "image_type", "source")

OVERALL = "all"


def age_band(age: Any) -> str:
    """The band of one age in years (`MISSING` for an empty or non-numeric value)."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return MISSING
    if not np.isfinite(a) or a < 0:
        return MISSING
    label = AGE_BANDS[0][1]
    for lo, name in AGE_BANDS:
        if a >= lo:
            label = name
    return label


def subgroup_stat(y_true: np.ndarray, probs: np.ndarray, *, mel_threshold: float | None = None) -> dict[str, float]:
    """The `METRICS` for one set of predictions, with the definitions of `evaluation.metrics.summarize`.

    Args:
        mel_threshold: melanoma sensitivity/specificity at `P(MEL) >= mel_threshold` instead of at the argmax.
    """
    y = np.asarray(y_true, int)
    p = np.asarray(probs, float)
    k = p.shape[1]
    pred = p.argmax(axis=1)
    present = np.bincount(y, minlength=k) > 0
    sens = np.array([np.mean(pred[y == c] == c) if present[c] else np.nan for c in range(k)])
    aucs = np.array([rank_auc(y == c, p[:, c]) if present[c] else np.nan for c in range(k)])
    mel = CLASS_INDEX["MEL"]
    is_mel = y == mel
    called = p[:, mel] >= mel_threshold if mel_threshold is not None else pred == mel
    with np.errstate(invalid="ignore"):
        return {
            "balanced_accuracy": float(np.nanmean(sens)) if present.any() else float("nan"),
            "MEL_sensitivity": float(called[is_mel].mean()) if is_mel.any() else float("nan"),
            "MEL_specificity": float((~called[~is_mel]).mean()) if (~is_mel).any() else float("nan"),
            "MEL_auc": float(aucs[mel]),
            "macro_auc": float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan"),
            "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        }


# Never subgroups: identifiers, file names, and the diagnosis itself (or columns derived from it).
NOT_SUBGROUPS = frozenset({"image_id", "image", "lesion_id", "group_id", "patient_id", "path", "file", "filename",
                           "excluded", "group_by", "published_split", "row", "case", "md5hash", "url",
                           "url_alphanum", "img_id", "ddi_file", "ddi_id", "clinic", "derm",
                           "dx", "target", "benign_malignant", "mel", "split", "age", "age_approx"})
LABEL_WORDS = ("diagnos", "label", "partition", "histopath")  # diagnosis, diagnostic, three_partition_label, ...
MAX_LEVELS = 20  # more distinct values than this is a free-text or identifier column, not a category


def _is_number_column(values: np.ndarray) -> bool:
    """Every non-missing value parses as a number (metadata is read as text, so dtypes do not say)."""
    present = values[values != MISSING]
    return len(present) > 0 and bool(pd.to_numeric(pd.Series(present), errors="coerce").notna().all())


def categorical_columns(meta: pd.DataFrame, max_levels: int = MAX_LEVELS) -> list[str]:
    """Every other categorical column of a metadata table: text (or boolean) values with 2..max_levels distinct
    non-missing values, e.g. an acquisition site, a scanner or a `dataset` column; not identifiers or labels."""
    out = []
    for c in meta.columns:
        name = str(c).lower()
        if name in NOT_SUBGROUPS or c in DEFAULT_COLUMNS or name.endswith("_id") or any(w in name for w in LABEL_WORDS):
            continue
        values = clean_values(meta[c].tolist())
        if _is_number_column(values):
            continue  # numbers are measurements (name a numeric category with --columns)
        if 2 <= len(set(values) - {MISSING}) <= max_levels:
            out.append(str(c))
    return out


def subgroup_columns(meta: pd.DataFrame, columns: Sequence[str] | None = None) -> list[str]:
    """The columns to split by: `columns` if given (each must exist; `age_band` needs `age`), else the defaults
    present (sex, age bands, site, dx_type, Fitzpatrick type) followed by every other categorical column."""
    have = set(meta.columns) | ({"age_band"} if "age" in meta.columns else set())
    if columns:
        missing = [c for c in columns if c not in have]
        if missing:
            raise UserError(f"metadata has no column {missing[0]!r}; columns: {', '.join(sorted(have))}")
        return list(dict.fromkeys(columns))
    def informative(c: str) -> bool:
        # image_type and source are written by every reader (lesionlab.data.tables): a subgroup only when they vary,
        # and source not when it repeats HAM10000's own `dataset` column
        if c not in ("image_type", "source"):
            return True
        vals = set(clean_values(meta[c].tolist())) - {MISSING}
        same = c == "source" and "dataset" in meta.columns and meta["dataset"].astype(str).equals(meta[c].astype(str))
        return len(vals) >= 2 and not same

    defaults = [c for c in DEFAULT_COLUMNS if c in have and informative(c)]
    return defaults + [c for c in categorical_columns(meta) if c not in defaults]


def metadata_values(meta: pd.DataFrame, image_ids: Sequence[str], column: str) -> np.ndarray:
    """One cleaned category per image (`MISSING` for images without a metadata row or value)."""
    if column == "age_band" and "age_band" not in meta.columns:
        lookup = dict(zip(meta["image_id"], (age_band(a) for a in meta["age"]), strict=True))
    else:
        lookup = dict(zip(meta["image_id"], clean_values(meta[column].tolist()), strict=True))
    return np.array([lookup.get(i, MISSING) for i in image_ids], dtype=object)


def _order(values: np.ndarray, column: str) -> list[str]:
    """Subgroups in a readable order: age bands by age, others largest first; `unknown` last."""
    names, counts = np.unique(values.astype(str), return_counts=True)
    if column == "age_band":
        rank = {name: i for i, (_, name) in enumerate(AGE_BANDS)}
        ordered = sorted(names, key=lambda n: rank.get(n, len(rank)))
    else:
        ordered = [n for _, n in sorted(zip(-counts, names, strict=True))]
    return [n for n in ordered if n != MISSING] + ([MISSING] if MISSING in names else [])


def _row(y, p, groups, *, column, value, n_boot, ci, seed, mel_threshold) -> dict[str, Any]:
    def stat(a, b):
        return subgroup_stat(a, b, mel_threshold=mel_threshold)

    res = bootstrap_ci(y, p, groups=groups, n_boot=n_boot, ci=ci, seed=seed, stat=stat)
    row: dict[str, Any] = {
        "column": column, "subgroup": value, "n_images": int(len(y)), "n_lesions": int(len(np.unique(groups))),
        "n_MEL": int((y == CLASS_INDEX["MEL"]).sum()),
    }
    for m in METRICS:
        row[m] = res[m]["value"]
        row[f"{m}_lo"] = res[m]["lo"]
        row[f"{m}_hi"] = res[m]["hi"]
    return row


def subgroup_table(
    y_true: np.ndarray,
    probs: np.ndarray,
    image_ids: Sequence[str],
    meta: pd.DataFrame,
    *,
    columns: Sequence[str] | None = None,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    min_images: int = 30,
    min_melanomas: int = 5,
    mel_threshold: float | None = None,
    labels: LabelSet | str | None = None,
) -> pd.DataFrame:
    """One row for the whole set (`column == subgroup == "all"`) and one per subgroup of each column.

    Args:
        meta: one row per image with `image_id` and the metadata columns (e.g. HAM10000_metadata.csv).
        groups: lesion id per image; the bootstrap resamples lesions within each subgroup (default: images).
        min_images: subgroups with fewer images are marked `small`.
        min_melanomas: subgroups with melanomas, but fewer than this, are marked `small` too (their melanoma CIs
            rest on one or a few lesions).
        labels: the label set whose flag class (column 0) the `MEL_*` metrics are about; names it in the notes
            (None: ham7, "melanoma").

    Returns:
        Columns: column, subgroup, n_images, n_lesions, n_MEL, then per metric `<m>`, `<m>_lo`, `<m>_hi`,
        `<m>_below` (CI wholly below the overall value), and `small`, `flagged` (metrics below), `note`.
    """
    y = np.asarray(y_true, int)
    p = np.asarray(probs, float)
    ids = [str(i) for i in image_ids]
    if "image_id" not in meta.columns:
        raise UserError("the metadata table needs an image_id column")
    if len(y) != len(ids) or p.ndim != 2 or p.shape[0] != len(ids):
        raise ValueError(f"{len(y)} labels, {p.shape} probabilities and {len(ids)} image ids do not match")
    g = np.asarray(groups if groups is not None else ids, dtype=object)
    cols = subgroup_columns(meta, columns)
    kw = dict(n_boot=n_boot, ci=ci, seed=seed, mel_threshold=mel_threshold)
    rows = [_row(y, p, g, column=OVERALL, value=OVERALL, **kw)]
    overall = rows[0]
    for col in cols:
        values = metadata_values(meta, ids, col)
        for v in _order(values, col):
            idx = np.flatnonzero(values == v)
            rows.append(_row(y[idx], p[idx], g[idx], column=col, value=v, **kw))
    lset = get_label_set(labels)
    flag = lset.flag_title
    for r in rows:
        below = []
        for m in METRICS:
            hi, ref = r[f"{m}_hi"], overall[m]
            r[f"{m}_below"] = bool(r["column"] != OVERALL and hi is not None and ref is not None and hi < ref)
            if r[f"{m}_below"]:
                below.append(m)
        notes = []
        if r["n_images"] < min_images:
            notes.append(f"small: {r['n_images']} images (< {min_images})")
        if r["n_MEL"] == 0:
            notes.append(f"no {flag} image: {metric_title('MEL_sensitivity', lset)} and AUC undefined")
        elif r["n_MEL"] < min_melanomas:
            notes.append(f"only {r['n_MEL']} {flag} image(s): {flag} metrics unreliable")
        r["small"] = bool(notes)
        r["flagged"] = ";".join(below)
        r["note"] = "; ".join(notes)
    return pd.DataFrame(rows)


