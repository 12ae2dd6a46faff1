"""The bundle's refusal with and without the `likely_wrong` gate, on the real HAM10000 cross-site cells.

For each cell that benchmarks/cross_site_realdata.py trained (its models and splits.csv under --runs), this builds
what `lesionlab bundle` would seal for those models and screens through the same pipeline predict and the service
run (lesionlab.clinic.screening.Screener):
- the OOD model (lesionlab.clinic.ood_model.fit_ood, on the training and validation split of the training sources),
- calibration and conformal sets (lesionlab.evaluation.trust.fit_trust) and the error score
  (lesionlab.clinic.trust.fit_error_score, the function bundles use) on the validation split,
then screens the internal test split and every image of the target site, research mode on (so the would-be answer of
each refused image is known), and reports per set the refusal rate and the accuracy of all / accepted / refused
images for the gate as it was (quality, then OOD) and with the error gate after it.

Unlike docs/cross-site-ham10000.md's tables, which restrict every cell to the classes both sites share, this scores
the answers as a bundle gives them: top-1 over the models' seven classes, on every image.

    .venv/bin/python benchmarks/bench_error_refusal.py --runs ~/lesionlab-runs/cross-site/ham-r18-64

Prints a Markdown table and writes it with the numbers as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000-200x150"


def screen_set(screener, df, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image: answer correct (the would-be answer for refused images), refused by quality or OOD, refused by
    the error gate, refused at all."""
    from lesionlab.clinic.screening import ERROR_CODE
    from lesionlab.data.images import load_image

    correct, gate, error, refused = [], [], [], []
    paths, labels = list(df["path"]), list(df["label"])
    for i in range(0, len(paths), batch):
        for a, lab in zip(screener.screen([load_image(p) for p in paths[i:i + batch]], research=True),
                          labels[i:i + batch], strict=True):
            shown = a if a["status"] == "ok" else a.get("research")
            correct.append(shown is not None and shown["top"] == lab)  # no forward pass (quality): not right
            codes = a.get("reason_codes", [])
            error.append(codes == [ERROR_CODE])
            gate.append(bool(codes) and codes != [ERROR_CODE])
            refused.append(a["status"] != "ok")
    return tuple(np.array(v, bool) for v in (correct, gate, error, refused))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True, help="an --out folder of benchmarks/cross_site_realdata.py")
    ap.add_argument("--data", type=Path, default=HAM)
    ap.add_argument("--variant", default="baseline")
    ap.add_argument("--rate", type=float, default=None, help="trust.error_refusal_rate (default: the config's)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the table (.md) and numbers (.json) here")
    args = ap.parse_args()

    import torch

    from lesionlab.clinic.ood_model import fit_ood
    from lesionlab.clinic.screening import Screener
    from lesionlab.clinic.trust import fit_error_score
    from lesionlab.config import load_config
    from lesionlab.data.split import read_split
    from lesionlab.data.subsets import subset_frame
    from lesionlab.data.tables import read_table
    from lesionlab.evaluation.ensemble import ENSEMBLE, mean_probabilities
    from lesionlab.evaluation.selective import selective_summary
    from lesionlab.evaluation.trust import fit_trust
    from lesionlab.inference.predictor import find_checkpoints, load_predictors

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = load_config(None)
    rate = cfg.trust.error_refusal_rate if args.rate is None else args.rate
    cells = json.loads((args.runs / "cross_site.json").read_text())["cells"]
    table = read_table(args.data)
    df = table.df
    results, lines = [], ["| train | test set | images | gate refused | with error gate refused | accuracy all | "
                          "accepted (gate) | accepted (gate + error) | refused by error gate |",
                          "|---|---|---|---|---|---|---|---|---|"]
    for train in dict.fromkeys(c["train"] for c in cells if c["variant"] == args.variant):
        test = next(c["test"] for c in cells if c["train"] == train and c["variant"] == args.variant)
        folder = args.runs / train
        sp = read_split(folder / "splits.csv")
        tr, va, te = (subset_frame(table, sp, s) for s in ("train", "val", "test"))
        preds = load_predictors(find_checkpoints([folder / args.variant / "runs"]), device="cpu", precision="fp32")
        ood, val_out = fit_ood(preds, tr, va, cfg.ood, batch_size=args.batch, progress=False, return_val=True)
        classes = preds[0].label_set.classes
        yv = va["label"].map({c: k for k, c in enumerate(classes)}).to_numpy()
        raw = mean_probabilities([o["probs"] for o in val_out.values()])
        trust = fit_trust(yv, {ENSEMBLE: raw}, cfg.trust)
        screener = Screener(preds, cfg.quality, ood, trust=trust)
        cal = screener.calibrated({n: o["probs"] for n, o in val_out.items()})[0]
        error = fit_error_score(yv, cal, trust, ood.score({n: o["features"] for n, o in val_out.items()}), rate)
        screener = Screener(preds, cfg.quality, ood, trust=trust, error=error)
        target = df[df["dataset"] == test].reset_index(drop=True)
        for name, frame in (("internal test", te), (test, target)):
            correct, gate, err, refused = screen_set(screener, frame, args.batch)
            g, b = selective_summary(correct, gate), selective_summary(correct, refused)
            row = {"train": train, "test": name, "variant": args.variant, "gate": g, "gate_and_error": b,
                   "refused_by_error": float(err.mean()), "error_score": error.to_dict()}
            results.append(row)
            lines.append(f"| {train} | {name} | {g['n']} | {g['refusal_rate']:.1%} | {b['refusal_rate']:.1%} | "
                         f"{g['accuracy_all']:.3f} | {g['accuracy_accepted']:.3f} | {b['accuracy_accepted']:.3f} | "
                         f"{err.mean():.1%} |")
            print(lines[-1], flush=True)
    info = {"command": "benchmarks/bench_error_refusal.py --runs " + str(args.runs), "rate": rate,
            "seconds": round(time.perf_counter() - t0), "cpus": os.cpu_count(), "torch_threads": args.threads}
    print("\n".join(lines))
    print(json.dumps({k: info[k] for k in ("rate", "seconds", "cpus")}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "error_refusal.md").write_text("\n".join(lines) + "\n")
        (args.out / "error_refusal.json").write_text(json.dumps({"info": info, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
