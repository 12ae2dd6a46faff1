"""Training: weighted cross-entropy, Adam, early stopping, atomic checkpoints, exact resume, DDP."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from lesionlab import models, runtime
from lesionlab.config import StudyConfig
from lesionlab.data.dataset import EpochSampler, make_dataset, seed_worker
from lesionlab.data.gpu_augment import on_device, training_transforms, use_gpu_augment
from lesionlab.data.transforms import spec_from_timm
from lesionlab.evaluation.metrics import balanced_accuracy
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write, atomic_write_csv
from lesionlab.labels import HAM7, get_label_set
from lesionlab.models.fusion import FusionModel, MetadataDataset, fusion_meta, split_inputs
from lesionlab.training.distributed import _rank_world
from lesionlab.training.early_stopping import EarlyStopping
from lesionlab.training.losses import class_weights
from lesionlab.training.provenance import RESUME_FILE, load_resume_record, resume_differences, resume_record

log = logging.getLogger(__name__)


MONITORS = ("val_loss", "val_accuracy", "val_balanced_accuracy")


HISTORY_FILE = "history.csv"


def train_one_epoch(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = True,
    max_steps: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> float:
    """One pass over `loader`; returns the mean training loss (sample-weighted)."""
    model.train()
    total, n = 0.0, 0
    steps = len(loader) if not max_steps else min(max_steps, len(loader))
    bar = tqdm(loader, total=steps, desc=desc, disable=not progress, leave=False)
    for step, (x, y) in enumerate(bar):
        if max_steps and step >= max_steps:
            break
        x, meta = split_inputs(x)  # metadata-fusion batches carry [images, metadata]
        x = runtime.to_device(x, device, channels_last=channels_last)
        y = y.to(device, non_blocking=True)
        with runtime.autocast(device, amp_dtype):
            out = model(x) if meta is None else model(x, meta.to(device))
            loss = criterion(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(n, 1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = True,
    progress: bool = False,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, softmax probabilities (N, K) and targets (N,) over `loader`."""
    model.eval()
    probs, targets, total = [], [], 0.0
    for x, y in tqdm(loader, desc="validate", disable=not progress, leave=False):
        x, meta = split_inputs(x)
        x = runtime.to_device(x, device, channels_last=channels_last)
        y = y.to(device)
        with runtime.autocast(device, amp_dtype):
            logits = (model(x) if meta is None else model(x, meta.to(device))).float()
        total += float(criterion(logits, y)) * len(y)
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        targets.append(y.cpu().numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, 0))
    t = np.concatenate(targets) if targets else np.zeros(0, int)
    return total / max(len(t), 1), p, t


def _make_loader(ds, *, batch_size: int, num_workers: int, sampler=None, device=None):
    num_workers = runtime.worker_count(num_workers)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        # The loader's own generator only draws the workers' base seed; a private one keeps that draw from
        # moving the global RNG (which a resumed run would otherwise see at a different epoch).
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=seed_worker,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=num_workers > 0,
        drop_last=False,
    )


def check_resume(path: str | Path, arch: str, cfg: StudyConfig, split_hash: str) -> None:
    """Raise a one-line UserError when `path` (a last.pt) cannot continue to a run of `arch` under `cfg` on this split.

    What may differ is decided in one place, shared with the study's train step: lesionlab.training.provenance.
    """
    path = Path(path)
    rec = load_resume_record(path)
    hint = "rerun without --resume (into another --out) or with the original config"
    if "config" not in rec:
        raise UserError(f"{path} records no config (written by an older LesionLab), so a resume cannot be checked; {hint}")
    if rec["arch"] != arch:
        raise UserError(f"arch {arch} != {rec['arch']} in {path}; {hint}")
    if rec["split_sha256"] != split_hash:
        raise UserError(f"split file sha256 {split_hash[:12] or '(none)'} != {rec['split_sha256'][:12] or '(none)'} "
                        f"in {path}; {hint}")
    diffs = resume_differences(rec, arch, cfg)
    if diffs:
        raise UserError(f"{', '.join(diffs.values())} in {path}; {hint}")


def fit(
    arch: str,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    cfg: StudyConfig,
    out_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    split_hash: str = "",
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Train one architecture; the best epoch (lowest val loss) is kept as `out_dir/model.safetensors`.

    Args:
        stop_after_epochs: stop (as if killed) after this many epochs of this call; for resume tests.

    Returns:
        Summary: best epoch, best val loss, epochs run, seconds.
    """
    out = Path(out_dir)
    rank, world = _rank_world()
    tc, dc = cfg.train, cfg.data
    if tc.monitor not in MONITORS:
        raise UserError(f"train.monitor {tc.monitor!r} must be one of {', '.join(MONITORS)}")
    device = runtime.pick_device(tc.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    amp = None if tc.deterministic else runtime.pick_precision(tc.precision, device)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
    torch.manual_seed(tc.seed)
    lset = get_label_set(dc.labels)  # the run's classes: head width, class weights, sidecar (lesionlab.labels)
    model, spec = models.create_model(arch, num_classes=lset.num_classes, pretrained=tc.pretrained,
                                      weights=tc.weights or None)
    dspec = spec_from_timm(model, input_size=dc.image_size, crop_fraction=dc.crop_fraction,
                           color_constancy=dc.color_constancy, color_constancy_p=dc.color_constancy_p)
    cam_layer = models.cam_layer_name(model, spec)
    encoding = None
    if tc.metadata:  # metadata fusion: encoding fitted on the training rows, kept in the sidecar
        from lesionlab.data.metadata import MetadataEncoding

        encoding = MetadataEncoding.fit(train_df, tc.metadata)
        model = FusionModel(model, encoding, num_classes=lset.num_classes, hidden=tc.metadata_hidden)
        cam_layer = f"backbone.{cam_layer}"  # explanations use the image branch
    model = runtime.prepare_model(model, device, channels_last=tc.channels_last)

    # data.gpu_augment (auto: on CUDA): workers send uint8 frames, the device rotates/crops/normalises each batch.
    on_gpu = use_gpu_augment(dc.gpu_augment, device, color_jitter=dc.color_jitter)
    train_tf, eval_tf = training_transforms(spec=dspec, rotation=dc.rotation, hflip=dc.hflip, vflip=dc.vflip,
                                            color_jitter=dc.color_jitter, device_side=on_gpu)
    cache = cache_dir if dc.cache else None
    train_ds = make_dataset(train_df, train_tf, input_size=dspec.input_size, crop_fraction=dspec.crop_fraction,
                            cache_dir=cache, max_pixels=dc.max_image_pixels, progress=progress and rank == 0,
                            classes=lset.classes)
    val_ds = make_dataset(val_df, eval_tf, input_size=dspec.input_size, crop_fraction=dspec.crop_fraction,
                          cache_dir=cache, max_pixels=dc.max_image_pixels, progress=progress and rank == 0,
                          classes=lset.classes)
    if encoding is not None:
        train_ds = MetadataDataset(train_ds, encoding.encode(train_df)[0])
        val_ds = MetadataDataset(val_ds, encoding.encode(val_df)[0])
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UserError(f"{arch}: the split has {len(train_ds)} training and {len(val_ds)} validation images; need both")
    unknown = sorted(set(train_df["label"]) - set(lset.classes))
    if unknown:
        raise UserError(f"{arch}: training rows are labelled {unknown[0]!r}, not a class of label set {lset.name!r} "
                        f"({', '.join(lset.classes)}); read the data with data.labels={lset.name}")
    y_train = np.array([lset.index[c] for c in train_df["label"]])
    w = class_weights(y_train, lset.num_classes) if tc.class_weighting else np.ones(lset.num_classes)
    criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32, device=device))
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    # Shuffling and every sample's augmentation are a pure function of (seed, epoch, index), carried with the
    # index to the workers: exact resume for any num_workers, persistent workers included.
    base = None
    if world > 1:
        base = torch.utils.data.distributed.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed)
    sampler = EpochSampler(len(train_ds), seed=tc.seed, base=base)
    train_loader, val_loader = (on_device(dl, spec=dspec, device=device, enabled=on_gpu, channels_last=tc.channels_last) for dl in (
        _make_loader(train_ds, batch_size=dc.batch_size, num_workers=dc.num_workers, sampler=sampler, device=device),
        _make_loader(val_ds, batch_size=dc.batch_size, num_workers=dc.num_workers, device=device)))
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        train_model = torch.compile(train_model)

    stopper = EarlyStopping(monitor=tc.monitor, patience=tc.patience, min_delta=tc.min_delta)
    history: list[dict[str, float]] = []
    start_epoch = 0
    resume_path = out / RESUME_FILE
    if resume and resume_path.exists():
        check_resume(resume_path, arch, cfg, split_hash)
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        models.unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stopper.load_state_dict(state["early_stopping"])
        history = state["history"]
        start_epoch = int(state["epoch"]) + 1
        torch.set_rng_state(state["rng"])
        if rank == 0:
            log.info("%s: resuming after epoch %d", arch, start_epoch)
    elif resume_path.exists() and not resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    writer = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_epoch)
    meta_base = {
        "arch": spec.name, "timm_id": spec.timm_id, "title": spec.title, "classes": list(lset.classes),
        "input_size": dspec.input_size, "mean": list(dspec.mean), "std": list(dspec.std),
        "crop_fraction": dspec.crop_fraction, "cam_layer": cam_layer,
        "color_constancy": dspec.color_constancy, "color_constancy_p": dspec.color_constancy_p,
        "pretrained": "file:" + Path(tc.weights).name if tc.weights else tc.pretrained,
        "split_sha256": split_hash, "config": cfg.to_dict(), "class_weights": [float(v) for v in w],
        # ham7 runs record no label set: their sidecar stays as before (lesionlab.labels.label_set_of reads ham7)
        **({"label_set": lset.to_dict()} if lset.to_dict() != HAM7.to_dict() else {}),
        **(fusion_meta(models.unwrap(model)) if encoding is not None else {}),
    }
    t0 = time.perf_counter()
    epochs_run = 0
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tc.epochs):
        if stopper.should_stop:
            break
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            return {"arch": arch, "interrupted_after_epoch": epoch - 1}
        # Per-epoch seeding makes an epoch (shuffling, augmentation, dropout) independent of earlier interruptions.
        torch.manual_seed(tc.seed * 1000 + epoch)
        sampler.set_epoch(epoch)
        te = time.perf_counter()
        train_loss = train_one_epoch(train_model, criterion, optimizer, train_loader, device, amp_dtype=amp,
                                     channels_last=tc.channels_last, max_steps=tc.max_steps_per_epoch,
                                     progress=progress and rank == 0, desc=f"{arch} epoch {epoch + 1}/{tc.epochs}")
        val_loss, p, t = evaluate(model, criterion, val_loader, device, amp_dtype=amp, channels_last=tc.channels_last)
        pred = p.argmax(1)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
               "val_accuracy": float((pred == t).mean()), "val_balanced_accuracy": balanced_accuracy(t, pred),
               "seconds": time.perf_counter() - te}
        history.append(row)
        improved = stopper.step(val_loss if tc.monitor == "val_loss" else -row[tc.monitor], epoch)  # higher is better
        epochs_run += 1
        if rank == 0:
            for k, v in row.items():
                if k != "epoch":
                    writer.add_scalar(k, v, epoch + 1)
            if improved:
                models.save_checkpoint(model, {**meta_base, "epoch": epoch + 1, "val": row}, out)
            atomic_write_csv(out / HISTORY_FILE, pd.DataFrame(history))
            state = {"model": models.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "early_stopping": stopper.state_dict(), "history": history, "epoch": epoch,
                     "rng": torch.get_rng_state(), **resume_record(arch, cfg, split_hash)}
            atomic_write(resume_path, lambda p, s=state: torch.save(s, p))
            msg = f"{arch} epoch {epoch + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, val bacc {row['val_balanced_accuracy']:.3f}"
            log.info(msg + (" (best)" if improved else f" (no improvement {stopper.wait}/{stopper.patience})"))
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
    return {"arch": arch, "best_epoch": stopper.best_epoch + 1, "best_val_loss": stopper.best,
            "epochs": len(history), "seconds": time.perf_counter() - t0, "dir": str(out)}


def check_resumes(archs: list[str], cfg: StudyConfig, out_dir: str | Path, split_hash: str) -> None:
    """`check_resume` for every architecture's `last.pt` under `out_dir` (those that exist)."""
    for arch in archs:
        path = Path(out_dir) / models.file_stem(arch) / RESUME_FILE
        if path.exists():
            check_resume(path, arch, cfg, split_hash)


def train_models(
    archs: list[str],
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    cfg: StudyConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    split_hash: str = "",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train each architecture in turn on the same split, into `out_dir/<arch>/`; images cached once for all."""
    out = Path(out_dir)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
    if resume:  # refuse before training anything, not after the first architecture
        check_resumes(archs, cfg, out, split_hash)
    results = []
    for arch in archs:
        results.append(fit(arch, train_df, val_df, cfg, out / models.file_stem(arch), cache_dir=cache,
                           resume=resume, split_hash=split_hash, progress=progress))
    return results

