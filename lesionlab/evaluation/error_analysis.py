"""Error analysis across models: which errors the models share, which one model rescues, frequent confusions."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.evaluation.metrics import agreement
from lesionlab.labels import names_for


def analyse_errors(
    image_ids: list[str],
    y_true: np.ndarray,
    member_probs: dict[str, np.ndarray],
    *,
    best: str,
    cls: str = "MEL",
    top_confusions: int = 8,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Errors of the best model on class `cls`, and how the other models fare on the same images.

    Returns:
        images: one row per misclassified `cls` image (best model's prediction, each model's prediction and
            whether it was right); summary: counts and shares of errors made by all models vs rescued by at
            least one other; confusions: most frequent (true -> predicted) pairs of the best model;
            agreement: pairwise agreement and Cohen's kappa between models.
    """
    y_true = np.asarray(y_true)
    preds = {name: p.argmax(1) for name, p in member_probs.items()}
    names = names_for(next(iter(member_probs.values())).shape[1], classes)
    if cls not in names:  # e.g. eval.error_class MEL under the binary label set: its flag class (column 0)
        cls = names[0]
    k = names.index(cls)
    wrong = np.flatnonzero((y_true == k) & (preds[best] != k))
    others = [n for n in preds if n != best]
    rows = []
    for i in wrong:
        row: dict[str, Any] = {"image": image_ids[i], "true": cls, f"{best} (best)": names[preds[best][i]]}
        for n in others:
            row[n] = names[preds[n][i]]
        row["rescued_by"] = ";".join(n for n in others if preds[n][i] == k)
        row[f"p_{cls}_{best}"] = float(member_probs[best][i, k])
        rows.append(row)
    # fixed columns, so that a table with no rows (no errors; one model, no pairs) still reads back as a table
    images = pd.DataFrame(rows, columns=["image", "true", f"{best} (best)", *others, "rescued_by", f"p_{cls}_{best}"])
    n_err = len(wrong)
    all_wrong = int(sum(1 for r in rows if not r["rescued_by"]))
    summary = {
        "class": cls, "best_model": best, "models": len(preds), "positives": int((y_true == k).sum()), "errors_of_best": n_err,
        "errors_made_by_all": all_wrong, "rescued_by_at_least_one": n_err - all_wrong,
        "share_made_by_all": (all_wrong / n_err) if n_err else None,
        "share_rescued": ((n_err - all_wrong) / n_err) if n_err else None,
    }
    for n in others:
        summary[f"rescued_by_{n}"] = int(sum(1 for r in rows if n in r["rescued_by"].split(";")))
    pb = preds[best]
    off = pb != y_true
    pairs = pd.Series([f"{names[t]}->{names[p]}" for t, p in zip(y_true[off], pb[off], strict=True)], dtype=str)
    confusions = pairs.value_counts().head(top_confusions).rename_axis("confusion").reset_index(name="count")
    confusions = confusions.astype({"confusion": str, "count": int})
    agree_rows = []
    for a, b in combinations(preds, 2):
        ag = agreement(preds[a], preds[b])
        both_wrong = float(np.mean((preds[a] != y_true) & (preds[b] != y_true)))
        agree_rows.append({"model_a": a, "model_b": b, **ag, "both_wrong": both_wrong})
    agree = pd.DataFrame(agree_rows, columns=["model_a", "model_b", "agreement", "kappa", "both_wrong"])
    return {"images": images, "summary": summary, "confusions": confusions, "agreement": agree}


def write_errors(res: dict[str, Any], out_dir: str | Path) -> None:
    """The `analyse_errors` result as misclassified.csv, confusions.csv, agreement.csv and summary.json."""
    from lesionlab.io import atomic_write_csv, atomic_write_json

    d = Path(out_dir)
    atomic_write_csv(d / "misclassified.csv", res["images"])
    atomic_write_csv(d / "confusions.csv", res["confusions"])
    atomic_write_csv(d / "agreement.csv", res["agreement"])
    atomic_write_json(d / "summary.json", res["summary"])

