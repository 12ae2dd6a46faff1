"""Screening before diagnosis: run the ensemble members for logits and features, and fit the OOD refusal.

`fit_ood` draws a class-balanced sample of the training split, fits one Mahalanobis model per member on its
penultimate features (lesionlab.evaluation.ood), scales each member's score by its validation median so that
members weigh alike, averages them into the ensemble score, and picks the threshold on the validation split
that lets `target_tpr` of its images pass. `OODModel` holds all that and is stored in bundles (arrays in one
safetensors file, numbers in the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from lesionlab import runtime
from lesionlab.config import OODConfig, QualityConfig
from lesionlab.data.cache import pil_to_uint8_tensor
from lesionlab.data.dataset import LesionDataset
from lesionlab.data.quality import check_quality
from lesionlab.evaluation.ood import MahalanobisStats, fit_mahalanobis, mahalanobis_score, threshold_for_tpr
from lesionlab.exceptions import UserError
from lesionlab.inference.predictor import Predictor
from lesionlab.labels import CLASS_INDEX

OOD_FILE = "ood.safetensors"


def frame_outputs(pr: Predictor, df: pd.DataFrame, *, batch_size: int = 32, num_workers: int = 0,
                  progress: bool = True, desc: str = "") -> dict[str, np.ndarray]:
    """`probs`, `logits` and `features` of one member for every row of `df` (needs a `path` column)."""
    ds = LesionDataset(df, pr.transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=runtime.worker_count(num_workers))
    parts = [pr.outputs_batch(x) for x, _ in tqdm(loader, desc=desc or f"features {pr.name}", disable=not progress,
                                                  leave=False)]
    if not parts:
        raise UserError("no images to compute features on")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def image_outputs(pr: Predictor, images: list[Image.Image], *, tta: bool = False,
                  metadata: list[dict] | None = None) -> dict[str, np.ndarray]:
    """The same for decoded images (predict, the service); `metadata` (one mapping per image) for fused models."""
    x = torch.stack([pr.transform(pil_to_uint8_tensor(im)) for im in images])
    return pr.outputs_batch(x, tta=tta, meta=pr.encode_metadata(metadata, len(images))[0])


def balanced_sample(df: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """At most `per_class` rows of each label, drawn with a seeded generator (all rows of smaller classes)."""
    parts = [g.sample(n=min(per_class, len(g)), random_state=seed) if per_class > 0 else g
             for _, g in df.groupby("label", sort=True)]
    return pd.concat(parts).sort_index()


@dataclass
class OODModel:
    """Per-member Mahalanobis statistics, their ensemble and the refusal threshold."""

    members: dict[str, MahalanobisStats]
    threshold: float
    target_tpr: float = 0.95
    method: str = "mahalanobis"
    info: dict[str, Any] = field(default_factory=dict)

    def member_scores(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: mahalanobis_score(features[n], s) for n, s in self.members.items()}

    def score(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Ensemble OOD score: the mean of the members' validation-scaled squared Mahalanobis distances."""
        return np.mean(list(self.member_scores(features).values()), axis=0)

    def manifest_entry(self) -> dict[str, Any]:
        return {"method": self.method, "threshold": self.threshold, "target_tpr": self.target_tpr,
                "file": OOD_FILE, "members": {n: s.meta() for n, s in self.members.items()}, **self.info}

    def save(self, folder: Path) -> Path:
        from safetensors.numpy import save_file

        arrays = {f"{n}.{k}": np.ascontiguousarray(v) for n, s in self.members.items() for k, v in s.arrays().items()}
        path = Path(folder) / OOD_FILE
        tmp = path.with_suffix(".tmp")
        save_file(arrays, str(tmp))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: Path, entry: dict[str, Any]) -> OODModel:
        from safetensors.numpy import load_file

        arrays = load_file(str(Path(folder) / entry["file"]))
        members = {n: MahalanobisStats.from_parts({k: arrays[f"{n}.{k}"] for k in ("whiten", "means")}, meta)
                   for n, meta in entry["members"].items()}
        info = {k: v for k, v in entry.items() if k not in {"method", "threshold", "target_tpr", "file", "members"}}
        return cls(members=members, threshold=float(entry["threshold"]), target_tpr=float(entry["target_tpr"]),
                   method=entry["method"], info=info)


def fit_ood(predictors: list[Predictor], train_df: pd.DataFrame, val_df: pd.DataFrame, cfg: OODConfig, *,
            batch_size: int = 32, num_workers: int = 0, progress: bool = True,
            return_val: bool = False) -> OODModel | tuple[OODModel, dict[str, np.ndarray]]:
    """Fit the members' Mahalanobis models on a class-balanced training sample; threshold on validation.

    With `return_val`, also the validation outputs (`{name: frame_outputs(...)}`), e.g. for a benchmark.
    """
    if cfg.method != "mahalanobis":
        raise UserError(f"ood.method {cfg.method!r} cannot be fitted; valid: mahalanobis (or none to switch it off)")
    if len(train_df) == 0 or len(val_df) == 0:
        raise UserError("the OOD refusal needs training and validation images; set ood.method=none to skip it")
    fit_df = balanced_sample(train_df, cfg.fit_per_class, cfg.seed)
    y = fit_df["label"].map(CLASS_INDEX).to_numpy()
    members: dict[str, MahalanobisStats] = {}
    val_out: dict[str, dict[str, np.ndarray]] = {}
    for pr in predictors:
        feats = frame_outputs(pr, fit_df, batch_size=batch_size, num_workers=num_workers, progress=progress,
                              desc=f"OOD fit {pr.name}")["features"]
        stats = fit_mahalanobis(feats, y)
        val_out[pr.name] = frame_outputs(pr, val_df, batch_size=batch_size, num_workers=num_workers,
                                         progress=progress, desc=f"OOD validation {pr.name}")
        stats.scale = float(np.median(mahalanobis_score(val_out[pr.name]["features"], stats))) or 1.0
        members[pr.name] = stats
    model = OODModel(members=members, threshold=0.0, target_tpr=cfg.target_tpr)
    val_scores = model.score({n: o["features"] for n, o in val_out.items()})
    model.threshold = threshold_for_tpr(val_scores, cfg.target_tpr)
    model.info = {"fit_images": len(fit_df), "validation_images": len(val_df),
                  "validation_refused": float(np.mean(val_scores > model.threshold)),
                  "fit_per_class": cfg.fit_per_class, "seed": cfg.seed}
    return (model, val_out) if return_val else model


def screen_images(predictors: list[Predictor], ood: OODModel | None, images: list[Image.Image],
                  quality: QualityConfig) -> pd.DataFrame:
    """Quality codes, ensemble OOD score and the refusal of each image, as predict and the service decide it."""
    rows = []
    feats = {pr.name: image_outputs(pr, images)["features"] for pr in predictors} if ood is not None else {}
    scores = ood.score(feats) if ood is not None else np.full(len(images), np.nan)
    for k, im in enumerate(images):
        codes = [i.code for i in check_quality(im, quality)]
        ood_refused = bool(ood is not None and not codes and scores[k] > ood.threshold)
        rows.append({"quality": ";".join(codes), "ood_score": float(scores[k]), "ood_refused": ood_refused,
                     "refused": bool(codes) or ood_refused})
    return pd.DataFrame(rows)


def screen_frame(predictors: list[Predictor], ood: OODModel | None, df: pd.DataFrame, quality: QualityConfig, *,
                 batch_size: int = 64, progress: bool = True) -> pd.DataFrame:
    """`screen_images` over the rows of a table (needs `image_id` and `path`), batch by batch."""
    from lesionlab.data.images import load_image

    parts = []
    for start in tqdm(range(0, len(df), batch_size), desc="screening", disable=not progress, leave=False):
        rows = df.iloc[start:start + batch_size]
        part = screen_images(predictors, ood, [load_image(p) for p in rows["path"]], quality)
        part.insert(0, "image_id", rows["image_id"].to_numpy())
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------- images the models should refuse


def synthetic_ood_images(n: int = 20, seed: int = 0, size: tuple[int, int] = (200, 150)) -> dict[str, list[Image.Image]]:
    """Blank / solid-colour images and noise images (uniform and Gaussian), seeded."""
    rng = np.random.default_rng(seed)
    w, h = size
    solid = [Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(n - 2)]
    solid += [Image.new("RGB", size, (255, 255, 255)), Image.new("RGB", size, (0, 0, 0))]
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n // 2)]
    noise += [Image.fromarray(np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (h, w, 3)), 0, 255)
                              .astype(np.uint8)) for _ in range(n - n // 2)]
    return {"synthetic solid/blank": solid, "synthetic noise": noise}


def degraded_lesions(images: list[Image.Image]) -> dict[str, list[Image.Image]]:
    """Lesion images made unevaluable: heavy blur, over-exposure, a tiny central crop, a 16x12 thumbnail."""
    from PIL import ImageEnhance, ImageFilter

    def crop(im: Image.Image) -> Image.Image:
        w, h = im.size
        return im.crop((w * 2 // 5, h * 2 // 5, w * 3 // 5, h * 3 // 5))

    return {
        "lesion heavy blur": [im.filter(ImageFilter.GaussianBlur(max(2.0, min(im.size) / 25))) for im in images],
        "lesion over-exposed": [ImageEnhance.Brightness(im).enhance(2.5) for im in images],
        "lesion tiny crop": [crop(im) for im in images],
        "lesion thumbnail": [im.resize((16, 12), Image.BILINEAR) for im in images],
    }


def plot_ood_scores(scores: dict[str, np.ndarray], threshold: float, path: Path, *, first: str) -> Path:
    """Histograms of the ensemble OOD score per set (log scale), the in-distribution set `first` filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    allv = np.concatenate([np.asarray(v, float) for v in scores.values()])
    lo = max(float(allv[allv > 0].min()) if (allv > 0).any() else 1e-3, 1e-3)
    bins = np.logspace(np.log10(lo), np.log10(max(float(allv.max()), lo * 10)), 50)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for k, v in scores.items():
        ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, density=True, label=f"{k} ({len(v)})", linewidth=1.4,
                histtype="stepfilled" if k == first else "step", alpha=0.45 if k == first else 0.9)
    ax.axvline(threshold, color="k", linestyle="--", label="refusal threshold (95% of validation pass)")
    ax.set_xscale("log")
    ax.set_xlabel("ensemble OOD score (Mahalanobis distance / validation median)")
    ax.set_ylabel("density")
    ax.set_title(f"Out-of-distribution score: {first} vs. images the models should refuse")
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ood_report(predictors: list[Predictor], ood: OODModel, test_df: pd.DataFrame, quality: QualityConfig,
               out_dir: Path, *, n_degraded: int = 100, seed: int = 0, batch_size: int = 64,
               progress: bool = True) -> dict[str, Any]:
    """Refusals on the test split and on synthetic / degraded images; `ood.json` and `ood_scores.png` in out_dir.

    For the study report's Trust section (and benchmarks/bench_ood.py, which adds non-medical photos).
    """
    from lesionlab.data.images import load_image
    from lesionlab.evaluation.ood import ood_metrics
    from lesionlab.io import atomic_write_json

    out_dir = Path(out_dir)
    test = screen_frame(predictors, ood, test_df, quality, batch_size=batch_size, progress=progress)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(test_df), size=min(n_degraded, len(test_df)), replace=False)
    groups = {**synthetic_ood_images(seed=seed),
              **degraded_lesions([load_image(test_df["path"].iloc[i]) for i in pick])}
    scores = {"test split": test["ood_score"].to_numpy()}
    sets = []
    for g, ims in groups.items():
        scr = pd.concat([screen_images(predictors, ood, ims[i:i + batch_size], quality)
                         for i in range(0, len(ims), batch_size)], ignore_index=True)
        scores[g] = scr["ood_score"].to_numpy()
        m = ood_metrics(scores["test split"], scores[g])
        sets.append({"set": g, "images": len(ims), "refused": float(scr["refused"].mean()),
                     "refused_by_quality": float((scr["quality"] != "").mean()),
                     "refused_by_ood": float(scr["ood_refused"].mean()), "auroc": m["auroc"],
                     "fpr_at_95_tpr": m["fpr_at_tpr"]})
    summary = {"threshold": ood.threshold, "test_images": len(test), "test_refused": float(test["refused"].mean()),
               "test_refused_by_quality": float((test["quality"] != "").mean()),
               "test_refused_by_ood": float(test["ood_refused"].mean()),
               "validation_refused": ood.info.get("validation_refused"), "sets": sets}
    plot_ood_scores(scores, ood.threshold, out_dir / "ood_scores.png", first="test split")
    atomic_write_json(out_dir / "ood.json", summary)
    return summary
