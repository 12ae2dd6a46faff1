"""The cross-site matrix as tables, figures and a Markdown section (from lesionlab.workflows.cross_site's result).

- `matrix_table` -> matrix.csv: one row per training set x test set (`internal` = the training set's own held-out
  test split) x variant, each metric with its CI and, for external sets, its drop from internal.
- `refusal_table` -> refusal.csv: one row per cell x refusal rule.
- `plot_heatmap`: training sets (rows) x test sets (columns, internal first) of one metric.
- `plot_risk_coverage`: per external cell, the risk-coverage curve of each refusal score and the gate's point.
- `cross_site_markdown`: the section the docs and the study report show.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lesionlab.io import atomic_write, atomic_write_csv, atomic_write_text  # noqa: E402
from lesionlab.labels import BUILTIN, LabelSet, get_label_set  # noqa: E402

METRICS = ("balanced_accuracy", "macro_auc", "MEL_auc", "ece", "coverage", "mean_set_size")
# a refusal rule's row (evaluation.selective.compare_refusals: the rule, selective_summary, AURC, the check)
REFUSAL_COLUMNS = ("rule", "n", "n_refused", "refusal_rate", "accuracy_all", "accuracy_accepted", "accuracy_refused",
                   "aurc", "accepted_at_least_all")
# where the matrix's titles differ from lesionlab.labels.metric_title (which names the flag metric `MEL_auc`)
TITLES = {"ece": "ECE (calibrated)", "coverage": "conformal coverage"}
RULES = {"gate": "gate (quality + OOD)", "ood": "OOD score only", "confidence": "confidence only",
         "set_size": "set size only", "combined": "combined (OOD + confidence + set size)"}


def result_label_set(result: dict[str, Any], labels: LabelSet | str | None = None) -> LabelSet:
    """The label set whose flag class names `MEL_auc`: `labels` when given, else cross_site.json's `label_set` (a
    recorded set, or a built-in's name); a YAML set known only by name keeps its name for the flag's ("<name>
    flag AUC") rather than borrow melanoma's."""
    if labels is not None:
        return get_label_set(labels)
    rec = result.get("label_set")
    if isinstance(rec, dict):
        return LabelSet.from_dict(rec)
    if rec is None or rec in BUILTIN:
        return get_label_set(rec)
    return LabelSet(name=str(rec), classes=("FLAG", "OTHER"), display={}, malignant=frozenset(), flag="FLAG",
                    flag_name=f"{rec} flag")


def title(metric: str, lset: LabelSet) -> str:
    """A matrix metric's title under the study's label set."""
    return TITLES.get(metric) or lset.metric_title(metric)


def _save(fig, path: Path) -> None:
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def matrix_table(result: dict[str, Any]) -> pd.DataFrame:
    """matrix.csv (see the module docstring); one internal row per training set, variant and class set."""
    rows: list[dict[str, Any]] = []
    seen = set()
    for cell in result["cells"]:
        if "skipped" in cell:
            continue
        internal = cell["sets"].get("internal", {}).get("metrics", {})
        classes = ",".join(cell["classes"])
        for tag, s in cell["sets"].items():
            key = (cell["train"], tag, cell["variant"], classes)
            if key in seen:
                continue
            seen.add(key)
            m = s["metrics"]
            row: dict[str, Any] = {"train": cell["train"], "test": tag, "variant": cell["variant"], "classes": classes,
                                   "images": m["n"], "lesions": m["lesions"]}
            for k in METRICS:
                row[k], row[f"{k}_lo"], row[f"{k}_hi"] = m[k]["value"], m[k]["lo"], m[k]["hi"]
                if tag != "internal":
                    a, b = internal.get(k, {}).get("value"), m[k]["value"]
                    row[f"{k}_drop"] = None if a is None or b is None else a - b
            rows.append(row)
    base = ["train", "test", "variant", "classes", "images", "lesions"]
    cols = base + [c for k in METRICS for c in (k, f"{k}_lo", f"{k}_hi", f"{k}_drop")]
    # the header even without rows (every cell skipped), so every reader of matrix.csv gets the columns
    return pd.DataFrame(rows, columns=list(dict.fromkeys([*cols, *(k for r in rows for k in r)])))


def refusal_table(result: dict[str, Any]) -> pd.DataFrame:
    """refusal.csv: one row per cell x set x refusal rule."""
    rows = [{"train": c["train"], "test": tag, "variant": c["variant"], **r}
            for c in result["cells"] if "skipped" not in c for tag, s in c["sets"].items() for r in s["refusal"]]
    head = ["train", "test", "variant", *REFUSAL_COLUMNS]
    return pd.DataFrame(rows, columns=list(dict.fromkeys([*head, *(k for r in rows for k in r)])))


def plot_heatmap(matrix: pd.DataFrame, path: str | Path, *, metric: str = "balanced_accuracy",
                 variant: str = "baseline", labels: LabelSet | str | None = None) -> Path:
    """Training sets x test sets of one metric (internal column first), the value and its CI in each cell; a flag
    metric is titled after `labels`' flag class (None: ham7)."""
    m = matrix[matrix["variant"] == variant]
    trains = list(dict.fromkeys(m["train"]))
    tests = ["internal", *sorted(t for t in set(m["test"]) if t != "internal")]
    grid = np.full((len(trains), len(tests)), np.nan)
    text = [["" for _ in tests] for _ in trains]
    for i, tr in enumerate(trains):
        for j, te in enumerate(tests):
            sel = m[(m["train"] == tr) & (m["test"] == te)]
            if len(sel) and pd.notna(sel[metric].iloc[0]):
                r = sel.iloc[0]
                grid[i, j] = r[metric]
                ci = (f"\n[{r[f'{metric}_lo']:.2f}, {r[f'{metric}_hi']:.2f}]"
                      if pd.notna(r[f"{metric}_lo"]) and pd.notna(r[f"{metric}_hi"]) else "")
                text[i][j] = f"{r[metric]:.2f}{ci}"
    fig, ax = plt.subplots(figsize=(1.7 + 1.6 * len(tests), 1.0 + 0.8 * len(trains)))
    cmap = "Blues_r" if metric == "ece" else "Blues"
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo - 0.05 * (hi - lo + 1e-9), vmax=hi, aspect="auto")
    ax.set_xticks(range(len(tests)), tests, rotation=30, ha="right")
    ax.set_yticks(range(len(trains)), trains)
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    for i in range(len(trains)):
        for j in range(len(tests)):
            if text[i][j]:
                v = grid[i, j]
                dark = (v - lo) / (hi - lo + 1e-9) > 0.6 if cmap == "Blues" else (v - lo) / (hi - lo + 1e-9) < 0.4
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(f"{title(metric, get_label_set(labels))} ({variant}; 95% lesion-bootstrap CI)", fontsize=10)
    _save(fig, Path(path))
    return Path(path)


def plot_risk_coverage(result: dict[str, Any], path: str | Path, *, variant: str = "baseline") -> Path | None:
    """One panel per external cell: risk (error rate of accepted images) against coverage, per refusal score."""
    cells = [(c, t) for c in result["cells"] if "skipped" not in c and c["variant"] == variant
             for t in c["sets"] if t != "internal"]
    if not cells:
        return None
    cols = min(3, len(cells))
    rows = int(np.ceil(len(cells) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    for ax, (c, t) in zip(axes.ravel(), cells, strict=False):
        s = c["sets"][t]
        for rule, curve in s["risk_coverage"].items():
            ax.plot(curve["coverage"], curve["risk"], label=RULES.get(rule, rule), lw=1.4)
        gate = next(r for r in s["refusal"] if r["rule"] == "gate")
        if gate["accuracy_accepted"] is not None:
            ax.plot([1 - gate["refusal_rate"]], [1 - gate["accuracy_accepted"]], "k*", ms=10, label=RULES["gate"])
        ax.set_xlim(0, 1.02)
        ax.set_xlabel("coverage (share accepted)")
        ax.set_ylabel("risk (error rate of accepted)")
        ax.set_title(f"{c['train']} -> {t}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(cells):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7, loc="upper left")
    _save(fig, Path(path))
    return Path(path)


def _v(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _ci(row: pd.Series, k: str) -> str:
    v, lo, hi = row.get(k), row.get(f"{k}_lo"), row.get(f"{k}_hi")
    if v is None or pd.isna(v):
        return "n/a"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if pd.notna(lo) and pd.notna(hi) else f"{v:.3f}"


def cross_site_markdown(result: dict[str, Any], matrix: pd.DataFrame, refusal: pd.DataFrame, *,
                        figures: Sequence[str] = (), labels: LabelSet | str | None = None) -> str:
    """The cross-site section: sources, the matrix with CIs and drops, variants, refusal rules per target site; the
    flag metric is titled after the label set (`result_label_set`)."""
    lset = result_label_set(result, labels)
    lines = ["## Cross-site validation", ""]
    lines.append(f"Sources (column `{result['source_column']}`), label set `{lset.name}`; models: "
                 f"{', '.join(result['archs'])}, {result['epochs']} epochs, {result['image_size']} px, pretrained "
                 f"{result['pretrained']}. Each cell uses the classes both sides share with at least "
                 f"{result['min_class_images']} images; temperature, conformal sets and refusal scores are fitted on "
                 "the training sources' internal validation split; `internal` is their held-out internal test split.")
    lines += ["", "| source | images | lesions | " + " | ".join(next(iter(result["sources"].values()))["classes"]) + " |",
              "|---|---:|---:|" + "---:|" * len(next(iter(result["sources"].values()))["classes"])]
    for s, r in result["sources"].items():
        lines.append(f"| {s} | {r['images']} | {r['lesions']} | " + " | ".join(str(v) for v in r["classes"].values()) + " |")
    if matrix.empty:
        lines += ["", "No cell was evaluated:", ""]
        lines += [f"- {c['train']} -> {c['test']} ({c['variant']}): {c['skipped']}" for c in result["cells"]
                  if "skipped" in c]
        return "\n".join(lines) + "\n"
    lines += ["", "### The matrix (95% lesion-bootstrap CIs)", "",
              f"| trained on | tested on | variant | images | classes | balanced accuracy | macro AUC | "
              f"{lset.metric_title('MEL_auc')} | ECE | coverage | set size | drop in bal. acc. | drop in macro AUC |",
              "|---|---|---|---:|---|---|---|---|---|---|---:|---:|---:|"]
    for _, r in matrix.iterrows():
        lines.append(f"| {r['train']} | {r['test']} | {r['variant']} | {r['images']} | {r['classes']} | "
                     f"{_ci(r, 'balanced_accuracy')} | {_ci(r, 'macro_auc')} | {_ci(r, 'MEL_auc')} | {_ci(r, 'ece')} | "
                     f"{_ci(r, 'coverage')} | {_v(r.get('mean_set_size'), 2)} | "
                     f"{_v(r.get('balanced_accuracy_drop'))} | {_v(r.get('macro_auc_drop'))} |")
    ext = matrix[matrix["test"] != "internal"]
    if ext["variant"].nunique() > 1:
        lines += ["", "### Does colour constancy or TTA shrink the drop?", "",
                  "| trained on | tested on | " + " | ".join(f"{v}: drop in bal. acc." for v in ext['variant'].unique())
                  + " | " + " | ".join(f"{v}: external bal. acc." for v in ext['variant'].unique()) + " |",
                  "|---|---|" + "---:|" * (2 * ext["variant"].nunique())]
        for (tr, te), g in ext.groupby(["train", "test"], sort=False):
            by = {r["variant"]: r for _, r in g.iterrows()}
            lines.append(f"| {tr} | {te} | " + " | ".join(_v(by[v]["balanced_accuracy_drop"]) if v in by else "n/a"
                                                      for v in ext["variant"].unique())
                         + " | " + " | ".join(_v(by[v]["balanced_accuracy"]) if v in by else "n/a"
                                              for v in ext["variant"].unique()) + " |")
    if not refusal.empty:
        lines += ["", f"### Refusal on each site (scores thresholded to refuse {result['refusal_rate']:.0%} of the "
                  "internal validation)", "",
                  "| trained on | tested on | variant | rule | refused | accuracy all | accepted | refused images "
                  "| accepted >= all | AURC |", "|---|---|---|---|---:|---:|---:|---:|---|---:|"]
        for _, r in refusal.iterrows():
            lines.append(f"| {r['train']} | {r['test']} | {r['variant']} | {RULES.get(r['rule'], r['rule'])} | "
                         f"{_v(r['refusal_rate'])} | {_v(r['accuracy_all'])} | {_v(r['accuracy_accepted'])} | "
                         f"{_v(r['accuracy_refused'])} | {'yes' if r['accepted_at_least_all'] else 'NO'} | "
                         f"{_v(r['aurc'])} |")
        lines += ["", which_signal(refusal)]
    skipped = [c for c in result["cells"] if "skipped" in c]
    for c in skipped:
        lines.append(f"- skipped {c['train']} -> {c['test']} ({c['variant']}): {c['skipped']}")
    for f in figures:
        lines += ["", f"![{Path(f).stem}]({f})"]
    return "\n".join(lines) + "\n"


def which_signal(refusal: pd.DataFrame) -> str:
    """One sentence: which rule keeps accepted images at least as accurate as all on every external site, and
    which has the lowest mean AURC there."""
    ext = refusal[(refusal["test"] != "internal") & (refusal["rule"] != "gate")]
    if ext.empty:
        return ""
    ok = ext.groupby("rule")["accepted_at_least_all"].all()
    aurc = ext.groupby("rule")["aurc"].mean().sort_values()
    gate = refusal[(refusal["test"] != "internal") & (refusal["rule"] == "gate")]
    gate_ok = bool(gate["accepted_at_least_all"].all()) if len(gate) else None
    good = [RULES.get(r, r) for r in ok.index if ok[r]]
    return (f"Accepted images at least as accurate as all images on every external site: "
            f"{', '.join(good) if good else 'no rule'}; the existing gate: "
            f"{'yes' if gate_ok else 'no' if gate_ok is not None else 'n/a'}. Lowest mean AURC (best ordering of "
            f"images by likely error): {RULES.get(aurc.index[0], aurc.index[0])} ({aurc.iloc[0]:.3f}).")


def write_cross_site_report(result: dict[str, Any], out: str | Path, *,
                            labels: LabelSet | str | None = None) -> dict[str, Path]:
    """matrix.csv, refusal.csv, the heat maps, the risk-coverage figure and cross_site.md, into `out`.

    Args:
        labels: the study's label set (default: `result_label_set(result)`), which names the flag metric.
    """
    out = Path(out)
    lset = result_label_set(result, labels)
    matrix, refusal = matrix_table(result), refusal_table(result)
    atomic_write_csv(out / "matrix.csv", matrix)
    atomic_write_csv(out / "refusal.csv", refusal)
    figs: dict[str, Path] = {}
    if not matrix.empty:
        for metric in ("balanced_accuracy", "macro_auc"):
            for variant in matrix["variant"].unique():
                figs[f"heatmap_{metric}_{variant}"] = plot_heatmap(
                    matrix, out / "figures" / f"heatmap_{metric}_{variant}.png", metric=metric, variant=variant,
                    labels=lset)
        rc = plot_risk_coverage(result, out / "figures" / "risk_coverage.png")
        if rc is not None:
            figs["risk_coverage"] = rc
    md = cross_site_markdown(result, matrix, refusal, figures=[str(p.relative_to(out)) for p in figs.values()],
                             labels=lset)
    atomic_write_text(out / "cross_site.md", md)
    return {"matrix": out / "matrix.csv", "refusal": out / "refusal.csv", "markdown": out / "cross_site.md", **figs}
