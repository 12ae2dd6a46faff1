"""What a training run reads: the one definition behind the study's train step and `lesionlab train --resume`.

A trained model is a function of its architecture, the split file, the code that trains it (`TRAINING_CODE`) and
the `data` and `train` config values (`training_reads`), with two kinds of exception:

- `FREE` keys cannot change a trained model, so they never count: the data loader's workers and the image cache
  (an item is the same with or without them, by construction: data.dataset.EpochSampler, data.cache), the
  *other* architectures (`train.archs`), and the fusion keys while fusion is off (models.fusion.fusion_free).
- `train.epochs` may grow. No schedule depends on the count and last.pt carries early stopping's state, so a run
  continued from k epochs to E equals a run started with E (a finished run's last.pt is the one a run killed after
  epoch k leaves, and the exact-resume tests in tests/test_train.py show that such a resume is bit for bit the
  uninterrupted run). A run folder that has run k epochs therefore serves any `train.epochs >= k`, by continuing
  (a run early stopping ended stays as it is). It cannot serve fewer: its best checkpoint and history may come
  from epochs past the new count.

Why this one rule for both callers (before, `train --resume` freed `train.epochs` altogether and the study
retrained from scratch on any change of it): someone who raises `train.epochs` in a study expects models trained to
the new count, and continuing gives exactly those for the cost of the extra epochs only; someone who lowers it
expects models trained for fewer epochs, which neither a resume (silently a no-op before) nor a reused folder can
give, so the study starts that model over and `train --resume` refuses in one line.

Records compared against this definition: the resume record in `last.pt` (`resume_record`, written every epoch)
and the `model.json` sidecar beside the weights (its `config`, saved with the best epoch).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lesionlab.config import StudyConfig
from lesionlab.models import META_FILE
from lesionlab.models.fusion import fusion_free

RESUME_FILE = "last.pt"

# Config keys that cannot change a trained model (see the module docstring).
FREE = frozenset({"data.num_workers", "data.cache", "data.cache_dir", "train.archs"})

# The one key that may differ by growing: a run continues to the new count.
EPOCHS = "train.epochs"

# The code a training run executes, by package or module (hashed into the study's train step fingerprint, so a fix
# here retrains and a fix elsewhere does not). Only the data modules that turn rows into tensors: the split,
# validation, perturbation and synthetic-data code feed training through their own steps' outputs.
# evaluation.metrics: the validation balanced accuracy in history.csv, which `train.monitor` may stop on.
TRAINING_CODE = (
    "lesionlab.training", "lesionlab.models", "lesionlab.runtime", "lesionlab.labels",
    "lesionlab.data.dataset", "lesionlab.data.cache", "lesionlab.data.images", "lesionlab.data.color",
    "lesionlab.data.transforms", "lesionlab.data.gpu_augment", "lesionlab.data.metadata", "lesionlab.data.subsets",
    "lesionlab.data.tables",
    "lesionlab.evaluation.metrics",
)

_ABSENT = "<absent>"


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))  # tuples -> lists, as every record stores them


def _reads(arch: Any, flat: Mapping[str, Any]) -> dict[str, Any]:
    """`flat` ("data.x"/"train.y" keys) restricted to what training reads, given the record's own fusion setting."""
    free = FREE | set(fusion_free(flat.get("train.metadata")))
    # records made before label sets existed trained the ham7 classes (lesionlab.labels)
    flat = {"data.labels": "ham7", **flat}
    return {"arch": arch, **{k: _plain(v) for k, v in flat.items() if k.startswith(("data.", "train.")) and k not in free}}


def _flat_sections(config: Mapping[str, Any]) -> dict[str, Any]:
    """{'data': {...}, 'train': {...}, ...} (a saved config) -> {'data.x': ..., 'train.y': ...}."""
    return {f"{sec}.{k}": v for sec in ("data", "train") for k, v in (config.get(sec) or {}).items()}


def training_reads(arch: str, cfg: StudyConfig) -> dict[str, Any]:
    """The config values a run of `arch` reads, flat: {'arch': ..., 'data.image_size': ..., 'train.lr': ...}."""
    return _reads(arch, _flat_sections(dataclasses.asdict(cfg)))


def differences(recorded: Mapping[str, Any], now: Mapping[str, Any], *, epochs_run: int | None = None) -> dict[str, str]:
    """The keys of two `training_reads`-shaped mappings that disagree, each with a one-phrase explanation.

    Args:
        epochs_run: epochs the recorded run has finished; given, `train.epochs` disagrees only when it is smaller
            (the run continues to a larger count); not given (no last.pt to continue from), it must be equal.
    """
    out = {}
    for k in sorted(set(recorded) | set(now)):
        a, b = now.get(k, _ABSENT), recorded.get(k, _ABSENT)
        if k == EPOCHS and epochs_run is not None:
            if a == _ABSENT or a < epochs_run:
                out[k] = f"{k} {a!r} < {epochs_run} epochs already run"
        elif a != b:
            out[k] = f"{k} {a!r} != {b!r}"
    return out


def resume_record(arch: str, cfg: StudyConfig, split_hash: str) -> dict[str, Any]:
    """What `last.pt` records beside the training state: arch, split hash and the data/train config (flat)."""
    flat = {k: v for k, v in _flat_sections(dataclasses.asdict(cfg)).items() if k not in fusion_free(cfg.train.metadata)}
    return {"arch": arch, "split_sha256": split_hash, "config": _plain(flat)}


def load_resume_record(path: str | Path) -> dict[str, Any]:
    """The record in a last.pt without reading its tensors (memory-mapped): arch, split_sha256, config, epoch."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: state[k] for k in ("arch", "split_sha256", "config", "epoch") if k in state}


def resume_differences(record: Mapping[str, Any], arch: str, cfg: StudyConfig) -> dict[str, str]:
    """How a last.pt record (`load_resume_record`) disagrees with a run of `arch` under `cfg` (split aside)."""
    return differences(_reads(record.get("arch"), record.get("config", {})), training_reads(arch, cfg),
                       epochs_run=int(record["epoch"]) + 1)


def run_folder_mismatch(run_dir: str | Path, arch: str, cfg: StudyConfig, split_hash: str) -> str | None:
    """Why `run_dir` does not hold (or cannot continue to) the run `cfg` describes for `arch` on this split, or None.

    Both records in the folder must agree: last.pt (what a resume continues) and the model.json sidecar (what the
    weights were saved with; its `train.epochs` may be smaller than the run's when later epochs did not improve).
    """
    run_dir = Path(run_dir)
    now = training_reads(arch, cfg)
    found: dict[str, str] = {}
    epochs_run = None
    if (run_dir / RESUME_FILE).exists():
        rec = load_resume_record(run_dir / RESUME_FILE)
        if "config" not in rec:
            return "run folder's last.pt records no config (written by an older LesionLab)"
        if rec["split_sha256"] != split_hash:
            return "run folder trained on another split (split SHA-256 differs)"
        epochs_run = int(rec["epoch"]) + 1
        found.update(resume_differences(rec, arch, cfg))
    if (run_dir / META_FILE).exists():
        meta = json.loads((run_dir / META_FILE).read_text())
        if meta.get("split_sha256") != split_hash:
            return "run folder trained on another split (split SHA-256 differs)"
        found.update(differences(_reads(meta.get("arch"), _flat_sections(meta.get("config", {}))), now,
                                 epochs_run=epochs_run))
    if found:
        keys = sorted(found)
        return "run folder trained with another config: " + ", ".join(keys[:4]) + (
            f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return None
