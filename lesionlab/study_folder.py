"""The study folder contract: one object owns a study folder's layout, its readers and its writers.

A study folder is what `lesionlab study` writes and what bundles, reports, benchmarks and tests read. Its layout::

    config.yaml                 the typed config the study ran with
    steps.json, .lock           step records (lesionlab.workflows.steps), the lock of a running study
    dataset.json                where the images came from (its `source`: the metadata CSV or image folder)
    splits.csv                  the lesion-grouped split every model and the ensemble read
    runs/<model>/               checkpoints (model.safetensors + model.json sidecar, history.csv)
    predictions/                truth_<split>.csv, <model>_<split>.csv (ISIC format), <model>_inference.json
    trust.json                  temperatures and conformal thresholds fitted on validation
    eval/<model>/metrics.json   test metrics (and figures) per model and for the ensemble
    ood/ood.json                the refusal summary

Like Hugging Face's `save_pretrained` / `from_pretrained` pair owns a model folder, `StudyFolder` is the only
code that knows these names: every other module asks it for a path or a parsed file. A model's files are keyed
by its file stem (`timm:resnet18` -> `timm_resnet18`, lesionlab.models.file_stem).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionlab.config import StudyConfig, load_config, save_config
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_json, read_json
from lesionlab.models import META_FILE, WEIGHTS_FILE, file_stem

SPLITS = ("train", "val", "test")


class StudyFolder:
    """Paths, readers and writers of one study folder (see the module docstring for the layout)."""

    CONFIG = "config.yaml"
    STEPS = "steps.json"
    LOCK = ".lock"
    DATASET = "dataset.json"
    SPLIT = "splits.csv"
    SPLIT_SUMMARY = "split_summary.csv"
    VALIDATION_PROBLEMS = "validation_problems.csv"
    TRUST = "trust.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"StudyFolder({str(self.root)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def config_file(self) -> Path:
        return self.root / self.CONFIG

    @property
    def steps_file(self) -> Path:
        return self.root / self.STEPS

    @property
    def lock_file(self) -> Path:
        return self.root / self.LOCK

    @property
    def dataset_file(self) -> Path:
        return self.root / self.DATASET

    @property
    def split_file(self) -> Path:
        return self.root / self.SPLIT

    @property
    def split_summary_file(self) -> Path:
        return self.root / self.SPLIT_SUMMARY

    @property
    def validation_problems_file(self) -> Path:
        return self.root / self.VALIDATION_PROBLEMS

    @property
    def trust_file(self) -> Path:
        return self.root / self.TRUST

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    def folder(self, name: str) -> Path:
        """An output folder of a step: eval, errors, gallery, external, subgroups, robustness, consistency, ood,
        figures."""
        return self.root / name

    def run_dir(self, model: str) -> Path:
        return self.runs_dir / file_stem(model)

    def prediction_file(self, model: str, split: str) -> Path:
        return self.predictions_dir / f"{file_stem(model)}_{split}.csv"

    def truth_file(self, split: str) -> Path:
        return self.predictions_dir / f"truth_{split}.csv"

    def inference_record_file(self, model: str) -> Path:
        return self.predictions_dir / f"{file_stem(model)}_inference.json"

    def eval_dir(self, model: str) -> Path:
        return self.root / "eval" / file_stem(model)

    def metrics_file(self, model: str) -> Path:
        return self.eval_dir(model) / "metrics.json"

    @property
    def ood_summary_file(self) -> Path:
        return self.root / "ood" / "ood.json"

    # ------------------------------------------------------------------ what kind of folder
    def is_study(self) -> bool:
        """Written by `lesionlab study` (it always has steps.json and predictions/)."""
        return self.steps_file.exists() and self.predictions_dir.is_dir()

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> StudyFolder | None:
        """The study a checkpoint folder was trained in (`<study>/runs/<model>/`), if any."""
        for parent in list(Path(checkpoint).resolve().parents)[:3]:
            sf = cls(parent)
            if sf.is_study():
                return sf
        return None

    # ------------------------------------------------------------------ readers
    def _json(self, path: Path, what: str) -> Any:
        return read_json(path, missing=what)

    def config(self) -> StudyConfig:
        """The saved config, or the defaults for a folder without one (its quality / ood / trust sections)."""
        return load_config(self.config_file) if self.config_file.exists() else StudyConfig()

    def label_set(self):
        """The study's label set (config `data.labels`; ham7 for a folder without a config)."""
        from lesionlab.labels import get_label_set

        return get_label_set(self.config().data.labels)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.label_set().classes

    def has_config(self) -> bool:
        return self.config_file.exists()

    def steps(self) -> dict[str, Any]:
        return json.loads(self.steps_file.read_text()) if self.steps_file.exists() else {}

    def dataset(self) -> dict[str, Any]:
        return self._json(self.dataset_file, "the study records no dataset; pass --data")

    def split(self) -> pd.DataFrame:
        from lesionlab.data.split import read_split

        if not self.split_file.exists():
            raise UserError(f"{self.split_file} not found: {self.root} is not a study folder with a split")
        return read_split(self.split_file)

    def lesion_of(self) -> dict[str, str]:
        """image id -> lesion (group) id, from the split."""
        sp = self.split()
        return dict(zip(sp["image_id"], sp["group_id"], strict=True))

    def frames(self, data: str | Path | None = None, splits: tuple[str, ...] = SPLITS) -> dict[str, pd.DataFrame]:
        """Rows (image_id, label, path, metadata) of each split, from splits.csv and the images the study read
        (dataset.json's source, or `data`)."""
        from lesionlab.data.subsets import subset_frame
        from lesionlab.data.tables import read_table

        metadata = None
        if data is None:
            if not self.dataset_file.exists():
                raise UserError(f"{self.root}: no {self.DATASET} to find the images; pass --data")
            metadata = Path(self.dataset()["source"])
            data = metadata.parent
        if not Path(data).is_dir():
            raise UserError(f"the study's images are not at {data}; pass --data DATA")
        table = read_table(data, metadata if metadata is not None and metadata.is_file() else None,
                           labels=self.config().data.labels)
        sp = self.split()
        return {s: subset_frame(table, sp, s) for s in splits}

    def truth(self, split: str) -> pd.DataFrame:
        from lesionlab.data.isic_csv import read_isic_csv

        f = self.truth_file(split)
        if not f.exists():
            raise UserError(f"{f} not found: the study has no {split} predictions; run `lesionlab study` to make them")
        return read_isic_csv(f, kind="truth", classes=self.classes)

    def has_probabilities(self, models: list[str], split: str) -> bool:
        return self.truth_file(split).exists() and all(self.prediction_file(m, split).exists() for m in models)

    def probabilities(self, models: list[str], split: str) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
        """(labels, {model: (N, 7) probabilities}, image ids) of a split, rows in the truth file's order."""
        from lesionlab.data.isic_csv import align, read_isic_csv

        truth = self.truth(split)
        classes = self.classes
        out: dict[str, np.ndarray] = {}
        y, ids = None, None
        for m in models:
            f = self.prediction_file(m, split)
            if not f.exists():
                raise UserError(f"{f} not found: the study has no {split} predictions of {m}; run `lesionlab study`")
            y, out[m], ids = align(truth, read_isic_csv(f, kind="prediction", classes=classes), truth_name=str(self.truth_file(split)),
                                   pred_name=str(f))
        if y is None:
            raise UserError("no models given to read probabilities of")
        return y, out, list(ids)

    def inference_record(self, model: str) -> dict[str, Any] | None:
        """What the study's infer step recorded for a model: precision, device, TTA, engine, weights SHA-256."""
        f = self.inference_record_file(model)
        if not f.exists():
            return None
        rec = self._json(f, "re-run the study's infer steps")
        if not isinstance(rec, dict) or "precision" not in rec:
            raise UserError(f"{f}: unreadable inference record (no precision); re-run the study's infer steps")
        return rec

    def metrics(self, model: str) -> dict[str, Any] | None:
        f = self.metrics_file(model)
        return self._json(f, "re-run the study's metrics step") if f.exists() else None

    def metrics_summary(self, model: str) -> dict[str, Any] | None:
        """The headline test metrics a bundle carries: macro averages, balanced accuracy, melanoma's row."""
        m = self.metrics(model)
        if m is None:
            return None
        flag = self.label_set().flag  # melanoma, or the label set's flag class (MALIGNANT for binary)
        return {"macro": m["macro"], "balanced_accuracy": m["balanced_accuracy"], flag: m["per_class"][flag]}

    def trust(self) -> dict[str, Any] | None:
        from lesionlab.evaluation.trust import read_trust

        return read_trust(self.trust_file) if self.trust_file.exists() else None

    def ood_summary(self) -> dict[str, Any] | None:
        f = self.ood_summary_file
        return self._json(f, "re-run the study's ood step") if f.exists() else None

    def model_meta(self, model: str) -> dict[str, Any] | None:
        f = self.run_dir(model) / META_FILE
        return self._json(f, "re-train the model") if f.exists() else None

    def history(self, model: str) -> pd.DataFrame | None:
        f = self.run_dir(model) / "history.csv"
        return pd.read_csv(f) if f.exists() else None

    def trained_models(self) -> list[str]:
        """Architectures with a checkpoint sidecar under runs/ (their registry names, as model.json records)."""
        out = []
        for meta in sorted(self.runs_dir.glob(f"*/{META_FILE}")):
            out.append(json.loads(meta.read_text()).get("arch", meta.parent.name))
        return out

    def weights_file(self, model: str) -> Path:
        return self.run_dir(model) / WEIGHTS_FILE

    # ------------------------------------------------------------------ writers
    def write_config(self, cfg: StudyConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_file)

    def write_dataset(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.dataset_file, record)

    def write_truth(self, split: str, frame: pd.DataFrame) -> Path:
        """`truth_<split>.csv` from rows with image_id and label."""
        from lesionlab.data.isic_csv import truth_frame, write_isic_csv

        f = self.truth_file(split)
        write_isic_csv(f, truth_frame(frame, self.classes))
        return f

    def write_probabilities(self, model: str, split: str, image_ids, probs: np.ndarray) -> Path:
        from lesionlab.data.isic_csv import probs_frame, write_isic_csv

        f = self.prediction_file(model, split)
        write_isic_csv(f, probs_frame(image_ids, probs, self.classes))
        return f

    def write_inference_record(self, model: str, record: dict[str, Any]) -> Path:
        f = self.inference_record_file(model)
        atomic_write_json(f, record)
        return f

    def write_trust(self, trust: dict[str, Any]) -> Path:
        from lesionlab.evaluation.trust import write_trust

        write_trust(self.trust_file, trust)
        return self.trust_file
