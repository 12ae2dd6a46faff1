"""Markdown tables from benchmarks/mitigations.sh's four robustness folders (colour constancy x TTA).

    python benchmarks/mitigations_summary.py OUT_DIR [--command "the command that made OUT_DIR"] [--plot PNG] > mitigations.md

Reads OUT_DIR/robustness-{none,shades_of_gray}[-tta]/ (lesion_metrics.csv, lesion_consistency.csv,
robustness_summary.csv, robustness.json) and OUT_DIR/runs/*/<model>/history.csv. Pure pandas; no torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

ARMS = [("none", "", "no colour constancy, no TTA"), ("none", "-tta", "no colour constancy, TTA"),
        ("shades_of_gray", "", "Shades of Gray, no TTA"), ("shades_of_gray", "-tta", "Shades of Gray, TTA")]
ENSEMBLE = "ensemble"
METRICS = [("balanced_accuracy", "balanced acc."), ("mel_sensitivity", "MEL sens."), ("macro_auc", "macro AUC"),
           ("mel_auc", "MEL AUC")]


def ci(value: float, lo: float, hi: float) -> str:
    return f"{value:.3f} ({lo:.3f}-{hi:.3f})"


def arm_folders(out: Path) -> list[tuple[str, Path]]:
    found = [(label, out / f"robustness-{cc}{tta}") for cc, tta, label in ARMS]
    missing = [str(p) for _, p in found if not (p / "lesion_metrics.csv").is_file()]
    if missing:
        raise SystemExit(f"mitigations_summary: no results in {', '.join(missing)}; run benchmarks/mitigations.sh first")
    return found


def clean_table(folders: list[tuple[str, Path]], model: str) -> pd.DataFrame:
    rows = []
    for label, d in folders:
        lm = pd.read_csv(d / "lesion_metrics.csv")
        lc = pd.read_csv(d / "lesion_consistency.csv")
        summ = pd.read_csv(d / "robustness_summary.csv")
        row: dict[str, object] = {"arm": label}
        for level in ("image", "lesion"):
            sub = lm[(lm["model"] == model) & (lm["level"] == level)].set_index("metric")
            for key, name in METRICS:
                if key in sub.index:
                    r = sub.loc[key]
                    row[f"{name} per {level} (n={int(r['n'])})"] = ci(r["value"], r["lo"], r["hi"])
        c = lc[lc["model"] == model].iloc[0]
        row[f"lesion consistency ({int(c['lesions'])} lesions)"] = ci(c["consistent_share"], c["consistent_lo"],
                                                                       c["consistent_hi"])
        row["all images correct"] = ci(c["all_correct_share"], c["all_correct_lo"], c["all_correct_hi"])
        row["flip rate, mean over the perturbations"] = f"{summ[summ['model'] == model]['mean_flip_rate'].mean():.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def flip_table(folders: list[tuple[str, Path]], model: str) -> pd.DataFrame:
    cols = {}
    for label, d in folders:
        summ = pd.read_csv(d / "robustness_summary.csv")
        cols[label] = summ[summ["model"] == model].set_index("perturbation")["mean_flip_rate"]
    return pd.DataFrame(cols).round(3).rename_axis("perturbation (mean flip rate over severities)")


def seed_table(folders: list[tuple[str, Path]]) -> pd.DataFrame:
    """Each seed's clean balanced accuracy and MEL AUC per image, so the spread between seeds is visible."""
    rows = []
    for label, d in folders:
        lm = pd.read_csv(d / "lesion_metrics.csv")
        sub = lm[(lm["level"] == "image") & (lm["model"] != ENSEMBLE)]
        piv = sub.pivot(index="model", columns="metric", values="value")
        rows.append({"arm": label, **{f"balanced acc. {m}": f"{v:.3f}" for m, v in piv["balanced_accuracy"].items()},
                     **{f"MEL AUC {m}": f"{v:.3f}" for m, v in piv["mel_auc"].items()}})
    return pd.DataFrame(rows)


def training_table(out: Path) -> pd.DataFrame:
    """Per run: epochs run, the epoch kept (lowest validation loss, what early stopping monitors) and its scores."""
    rows = []
    for hist in sorted(out.glob("runs/*/*/history.csv")):
        h = pd.read_csv(hist)
        kept = h.loc[h["val_loss"].idxmin()]
        rows.append({"run": hist.parent.parent.name, "epochs run": len(h), "kept epoch": int(kept["epoch"]),
                     "val loss (kept)": round(float(kept["val_loss"]), 3),
                     "val balanced acc. (kept)": round(float(kept["val_balanced_accuracy"]), 3)})
    return pd.DataFrame(rows)


def plot_flip_rates(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars: the ensemble's mean flip rate per perturbation, one bar per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(table.index))
    width = 0.8 / len(table.columns)
    for i, col in enumerate(table.columns):
        ax.bar(x + (i - (len(table.columns) - 1) / 2) * width, table[col], width, label=col)
    ax.set_xticks(x, [str(i).replace("_", " ") for i in table.index], rotation=30, ha="right")
    ax.set_ylabel("flip rate (mean over severities)")
    ax.set_title("Ensemble of 3 seeds: share of test images whose diagnosis changes under each perturbation")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--command", default="")
    ap.add_argument("--plot", type=Path, help="also draw the ensemble's flip rates per perturbation and arm here")
    a = ap.parse_args()
    folders = arm_folders(a.out)
    info = json.loads((folders[0][1] / "robustness.json").read_text())
    print("## Mitigations on real data: colour constancy x TTA, one budget\n")
    if a.command:
        print(f"Command: `{a.command}`\n")
    print(f"Test images: {info['images']} ({info['perturbed_images']} perturbed under {info['conditions']} conditions); "
          f"lesions with >= 2 images: {info['multi_image_lesions']}. CIs: percentile bootstrap over lesions.\n")
    print("### Ensemble of the seeds (mean probability), clean test images\n")
    print(clean_table(folders, ENSEMBLE).set_index("arm").T.to_markdown() + "\n")
    print("### Ensemble flip rate per perturbation\n")
    flips = flip_table(folders, ENSEMBLE)
    print(flips.to_markdown() + "\n")
    if a.plot:
        plot_flip_rates(flips, a.plot)
    print("### Single models (per seed), clean test images\n")
    print(seed_table(folders).set_index("arm").T.to_markdown() + "\n")
    tr = training_table(a.out)
    if not tr.empty:
        print("### Training\n")
        print(tr.to_markdown(index=False) + "\n")


if __name__ == "__main__":
    main()
