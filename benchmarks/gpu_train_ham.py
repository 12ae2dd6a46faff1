"""The four paper models trained from random weights on real HAM10000 within a time cap each; test metrics as JSON.

    python benchmarks/gpu_train_ham.py --data HAM_DIR --split splits.csv --seconds-per-model 55 --max-epochs 8 \
        --json out.json

Used by benchmarks/gpu_check.sh on a lent GPU (which plans --max-epochs and --seconds-per-model from the
section's time and the measured throughput). It reuses LesionLab's training pieces (uint8 cache, paper
augmentation, on the GPU where `data.gpu_augment` would put it (`--gpu-augment auto`), weighted cross-entropy,
Adam, train_one_epoch / evaluate, early stopping on validation loss) but adds a wall-clock cap per model, which
`fit` does not have: a new epoch starts only if the last one's duration still fits. The best epoch (lowest
validation loss) is evaluated on the test split (headline and per-class metrics); the ensemble is the mean of the
members' probabilities. The JSON is rewritten (atomically) after every model, so a killed run keeps the models
that finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from gpu_common import frames

from lesionlab import models, runtime
from lesionlab.data.dataset import make_dataset
from lesionlab.data.gpu_augment import on_device, training_transforms, use_gpu_augment
from lesionlab.data.transforms import spec_from_timm
from lesionlab.evaluation.metrics import summarize
from lesionlab.io import atomic_write_text
from lesionlab.labels import CLASS_INDEX
from lesionlab.training.early_stopping import EarlyStopping
from lesionlab.training.fit import evaluate, train_one_epoch
from lesionlab.training.losses import class_weights


def headline(m: dict) -> dict:
    """The numbers docs/results-ham10000-cpu.md reports per model."""
    mel = m["per_class"]["MEL"]
    return {"balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"], "macro_auc": m["macro"]["auc"],
            "macro_f1": m["macro"]["f1"], "mel_sensitivity": mel["sensitivity"], "mel_specificity": mel["specificity"],
            "mel_auc": mel["auc"]}


def per_class(m: dict) -> dict:
    """Test metrics of every class (ISIC order), rounded."""
    keys = ("sensitivity", "specificity", "precision", "f1", "auc", "support")
    return {c: {k: (None if v[k] is None else round(float(v[k]), 4)) for k in keys} for c, v in m["per_class"].items()}


def loader(ds, *, batch: int, workers: int, shuffle: bool, spec, device: torch.device, on_gpu: bool):
    """A DataLoader over `ds`; with the GPU path its batches come out augmented on `device`."""
    workers = runtime.worker_count(workers)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=workers,
                                     pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    return on_device(dl, spec=spec, device=device, enabled=on_gpu)


def train_capped(arch: str, fr: dict, a: argparse.Namespace, device: torch.device) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    model, _ = models.create_model(arch, pretrained="none")
    spec = spec_from_timm(model, input_size=a.size)
    model = runtime.prepare_model(model, device, channels_last=True)
    on_gpu = use_gpu_augment(a.gpu_augment, device)
    train_tf, eval_tf = training_transforms(spec=spec, rotation=180.0, hflip=False, vflip=False, color_jitter=0.0,
                                            device_side=on_gpu)
    mk = {"input_size": spec.input_size, "crop_fraction": spec.crop_fraction, "cache_dir": a.cache_dir, "progress": False}
    train_ds = make_dataset(fr["train"], train_tf, **mk)
    val_ds = make_dataset(fr["val"], eval_tf, **mk)
    test_ds = make_dataset(fr["test"], eval_tf, **mk)
    lk = {"workers": a.workers, "spec": spec, "device": device, "on_gpu": on_gpu}
    y = np.array([CLASS_INDEX[c] for c in fr["train"]["label"]])
    w = torch.tensor(class_weights(y), dtype=torch.float32, device=device)
    crit = torch.nn.CrossEntropyLoss(weight=w)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    tl = loader(train_ds, batch=a.batch, shuffle=True, **lk)
    vl = loader(val_ds, batch=a.batch * 2, shuffle=False, **lk)
    stopper = EarlyStopping(monitor="val_loss", patience=a.patience)
    best_state, history, last = None, [], 0.0
    while len(history) < a.max_epochs and not stopper.should_stop:
        if history and time.perf_counter() - t0 + last > a.seconds_per_model:
            break
        te = time.perf_counter()
        tr = train_one_epoch(model, crit, opt, tl, device, amp_dtype=torch.bfloat16, max_steps=a.max_steps,
                             progress=False)
        vloss, p, t = evaluate(model, crit, vl, device, amp_dtype=torch.bfloat16)
        last = time.perf_counter() - te
        steps = min(a.max_steps, len(tl)) if a.max_steps else len(tl)
        history.append({"epoch": len(history) + 1, "train_loss": round(tr, 4), "val_loss": round(vloss, 4),
                        "seconds": round(last, 1),
                        "images_per_s": round((min(steps * a.batch, len(train_ds)) + len(val_ds)) / last, 1)})
        print(f"{arch} epoch {len(history)}: train {tr:.4f} val {vloss:.4f} ({last:.1f}s)", flush=True)
        if stopper.step(vloss, len(history) - 1):
            best_state = copy.deepcopy(models.unwrap(model).state_dict())
    model.load_state_dict(best_state)
    _, probs, truth = evaluate(model, crit, loader(test_ds, batch=a.batch * 2, shuffle=False, **lk),
                               device, amp_dtype=torch.bfloat16)
    if a.preds:  # validation + test probabilities of the best epoch, for calibration / conformal checks on CPU
        _, vprobs, _ = evaluate(model, crit, vl, device, amp_dtype=torch.bfloat16)
        write_preds(a.preds, arch, {"val": (fr["val"], vprobs), "test": (fr["test"], probs)})
    m = summarize(truth, probs)
    res = {"arch": arch, "gpu_augment": on_gpu, "epochs": len(history), "best_epoch": stopper.best_epoch + 1,
           "best_val_loss": round(stopper.best, 4), "seconds": round(time.perf_counter() - t0, 1),
           "history": history, "test": headline(m), "test_per_class": per_class(m)}
    return res, probs, truth


def write_preds(path: str, arch: str, parts: dict) -> None:
    """Append one model's probabilities (rows: split, model, image, lesion_id, label, 7 classes) to a CSV."""
    import pandas as pd

    from lesionlab.labels import CLASSES

    rows = []
    for split, (df, p) in parts.items():
        f = pd.DataFrame(np.asarray(p, float), columns=list(CLASSES))
        f.insert(0, "label", df["label"].to_numpy())
        f.insert(0, "lesion_id", df["lesion_id"].to_numpy() if "lesion_id" in df else df["image_id"].to_numpy())
        f.insert(0, "image", df["image_id"].to_numpy())
        f.insert(0, "model", arch)
        f.insert(0, "split", split)
        rows.append(f)
    new = pd.concat(rows)
    old = pd.read_csv(path) if Path(path).exists() else None
    (new if old is None else pd.concat([old, new])).to_csv(path, index=False, float_format="%.8g")


def train_all(archs: list[str], train_one, out: dict, json_path: str | Path) -> dict:
    """Train each architecture with `train_one(arch) -> (result, test probabilities, truth)`, rewriting `json_path`
    after every model (a failure is recorded and the next model runs; a kill keeps the models that finished)."""
    probs = []
    for arch in archs:
        try:
            res, p, truth = train_one(arch)
        except Exception as e:  # one model failing must not lose the others' results
            res, p = {"arch": arch, "error": f"{type(e).__name__}: {e}"}, None
            print(f"{arch}: FAILED {res['error']}", flush=True)
        out["models"].append(res)
        if p is not None:
            probs.append(p)
            m = summarize(truth, np.mean(probs, axis=0))
            out["ensemble"] = {"members": len(probs), "test": headline(m), "test_per_class": per_class(m)}
        atomic_write_text(Path(json_path), json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--split")
    ap.add_argument("--archs", default="all")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0 = whole epoch; dry runs use 1-2)")
    ap.add_argument("--seconds-per-model", type=float, default=40.0)
    ap.add_argument("--limit", type=int, default=0, help="at most this many images per split (dry runs)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--gpu-augment", default="auto", help="auto (on for CUDA) | on | off: data.gpu_augment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="/tmp/lesionlab-train-cache")
    ap.add_argument("--json", required=True)
    ap.add_argument("--preds", default="", help="also write validation + test probabilities per model to this CSV")
    a = ap.parse_args()
    device = runtime.pick_device("auto")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fr = frames(a.data, a.split, limit=a.limit)
    out = {"size": a.size, "batch": a.batch, "lr": a.lr, "seconds_per_model": a.seconds_per_model,
           "max_epochs": a.max_epochs, "device": str(device), "gpu_augment": use_gpu_augment(a.gpu_augment, device),
           "split_sizes": {k: len(v) for k, v in fr.items()}, "models": [], "ensemble": None}
    atomic_write_text(Path(a.json), json.dumps(out, indent=1))
    train_all(models.expand_archs(a.archs), lambda arch: train_capped(arch, fr, a, device), out, a.json)


if __name__ == "__main__":
    main()
