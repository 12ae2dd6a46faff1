"""Image-only vs metadata-fused models on one test set: metrics with lesion-bootstrap CIs and paired differences.

Input: prediction folders written by `lesionlab infer --run IMAGE_RUN --run FUSED_RUN --out DIR` (one per seed:
`timm_resnet18.csv` = image-only, `timm_resnet18-2.csv` = fused, `truth.csv`). Prints Markdown tables
(docs/fusion-ham10000.md). Pure numpy: no torch.

    python benchmarks/fusion_compare.py --preds RUN/preds/s0-test RUN/preds/s1-test RUN/preds/s2-test \
        --lesions splits.csv [--image timm_resnet18.csv --fused timm_resnet18-2.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lesionlab.data.isic_csv import align, read_isic_csv
from lesionlab.evaluation.bootstrap import bootstrap_ci
from lesionlab.evaluation.subgroups import subgroup_stat
from lesionlab.workflows.evaluate import lesion_groups

METRICS = ("balanced_accuracy", "MEL_auc", "MEL_sensitivity", "MEL_specificity", "macro_auc", "accuracy")


def _fmt(r: dict) -> str:
    if r["value"] is None:
        return "n/a"
    ci = f" ({r['lo']:.3f}-{r['hi']:.3f})" if r["lo"] is not None else ""
    return f"{r['value']:.3f}{ci}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preds", type=Path, nargs="+", required=True, help="one infer output folder per seed")
    ap.add_argument("--lesions", type=Path, required=True, help="CSV with image_id and lesion_id (the split file)")
    ap.add_argument("--image", default="timm_resnet18.csv")
    ap.add_argument("--fused", default="timm_resnet18-2.csv")
    ap.add_argument("--bootstrap", type=int, default=1000)
    a = ap.parse_args()

    probs: dict[str, list[np.ndarray]] = {"image": [], "fused": []}
    y = ids = None
    for d in a.preds:
        truth = read_isic_csv(d / "truth.csv", kind="truth")
        for v, f in (("image", a.image), ("fused", a.fused)):
            yy, p, ii = align(truth, read_isic_csv(d / f, kind="prediction"))
            if y is not None and (ii != ids):
                raise SystemExit(f"{d}: other test images than {a.preds[0]}")
            y, ids = yy, ii
            probs[v].append(p)
    groups = lesion_groups(a.lesions, ids)
    n = len(probs["image"])
    rows = [(f"seed {i}", probs["image"][i], probs["fused"][i]) for i in range(n)]
    rows.append((f"mean of {n} seeds' probabilities", np.mean(probs["image"], 0), np.mean(probs["fused"], 0)))
    print(f"{len(y)} test images, {len(set(groups))} lesions, {int((y == 0).sum())} melanomas; "
          f"95% CIs: percentile bootstrap over lesions, {a.bootstrap} resamples\n")
    print("| model | variant | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    diffs = []
    for name, pi, pf in rows:
        for v, p in (("image only", pi), ("fused (age, sex, site)", pf)):
            ci = bootstrap_ci(y, p, groups=groups, n_boot=a.bootstrap, stat=subgroup_stat)
            print(f"| {name} | {v} | " + " | ".join(_fmt(ci[m]) for m in METRICS) + " |")

        # paired: the same lesions resampled for both variants
        def diff(yy, pp):
            si, sf = subgroup_stat(yy, pp[:, :7]), subgroup_stat(yy, pp[:, 7:])
            return {m: sf[m] - si[m] for m in METRICS}

        diffs.append((name, bootstrap_ci(y, np.hstack([pi, pf]), groups=groups, n_boot=a.bootstrap, stat=diff)))
    print("\nPaired difference fused - image only (same lesion resamples for both):\n")
    print("| model | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, d in diffs:
        print(f"| {name} | " + " | ".join(
            f"{d[m]['value']:+.3f} ({d[m]['lo']:+.3f} to {d[m]['hi']:+.3f})" if d[m]["lo"] is not None else "n/a"
            for m in METRICS) + " |")


if __name__ == "__main__":
    main()
