"""Typed configuration: dataclasses loaded from YAML, overridden from the CLI, saved into every run folder."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write_text

CONFIG_DIR = Path(__file__).parent / "configs"

# Published HAM10000 protocol sizes (train/val/test images out of 10,015).
PAPER_SPLIT = (8123, 886, 1006)


@dataclass
class DataConfig:
    """How images are read and transformed."""

    image_size: int = 224  # model input side; 0 = the model's pretrained default
    crop_fraction: float = 2 / 3  # centre crop keeps this share of each side (600x450 -> 400x300)
    rotation: float = 180.0  # random rotation uniform in [-rotation, rotation] degrees (train only)
    hflip: bool = False  # extra augmentations, off in the paper protocol
    vflip: bool = False
    color_jitter: float = 0.0
    batch_size: int = 32
    num_workers: int = 2
    cache: bool = True  # decode + resize each image once, reuse across epochs and models
    cache_dir: str = ""  # default: <run or study dir>/cache
    max_image_pixels: int = 100_000_000  # refuse larger images (decompression bombs)
    # Colour constancy before every model (training and inference alike; recorded in the checkpoint sidecar):
    # none | shades_of_gray (Minkowski-norm illuminant estimate, lesionlab.data.color).
    color_constancy: str = "none"
    color_constancy_p: float = 6.0  # Minkowski p of shades_of_gray (6: the ISIC 2018/2019 winners; 1 = Gray World)
    # Training augmentation (rotation, crop, flips, normalisation) batched on the device, workers sending uint8
    # frames (lesionlab.data.gpu_augment): auto = on for CUDA, off on the CPU | on | off. Same tensors within 1/255.
    gpu_augment: str = "auto"
    # The label set (lesionlab.labels): ham7 (HAM10000's seven classes) | isic2019 (eight, SCC apart) | binary
    # (MALIGNANT vs BENIGN) | a YAML file mapping each source's diagnosis codes to classes.
    labels: str = "ham7"


@dataclass
class SplitConfig:
    """Lesion-grouped stratified split."""

    train: float = PAPER_SPLIT[0] / sum(PAPER_SPLIT)
    val: float = PAPER_SPLIT[1] / sum(PAPER_SPLIT)
    test: float = PAPER_SPLIT[2] / sum(PAPER_SPLIT)
    seed: int = 42
    # several sources: images of two sources whose perceptual hashes (pHash, 64 bits) differ in at most this many
    # bits are one image, kept in one split (lesionlab.data.multi); -1 = check file ids only
    phash_distance: int = 4
    # true: use the split the dataset was published with (its `published_split` column, e.g. Derm7pt's
    # meta/{train,valid,test}_indexes.csv) instead of making one; checked for rows without a split and lesions in two
    # parts (lesionlab.data.split.published_split); fractions and seed are then unused
    published: bool = False


@dataclass
class TrainConfig:
    """Optimisation and early stopping (Lightning's EarlyStopping field names)."""

    archs: list[str] = field(
        default_factory=lambda: ["resnet101", "resnext101_32x4d", "seresnet101", "seresnext101_32x4d"]
    )
    pretrained: str = "imagenet"  # imagenet | none
    weights: str = ""  # local .safetensors/.pth weights (offline machines)
    epochs: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.0
    class_weighting: bool = True  # inverse class frequency in the training split
    monitor: str = "val_loss"
    patience: int = 3
    min_delta: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    max_steps_per_epoch: int = 0  # 0 = whole epoch (a smaller number is for quick checks)
    # metadata fusion (models/fusion.py): table columns joined with the image features, e.g. [age, sex,
    # localization]; empty = image only. The encoding is fitted on the training split and kept in the sidecar.
    metadata: list[str] = field(default_factory=list)
    metadata_hidden: int = 32  # width of the metadata MLP


@dataclass
class EvalConfig:
    """Evaluation: confidence intervals and the melanoma operating point."""

    bootstrap: int = 1000
    ci: float = 0.95
    target_sensitivity: float = 0.90
    fixed_specificities: list[float] = field(default_factory=lambda: [0.80, 0.90, 0.95])
    fixed_sensitivities: list[float] = field(default_factory=lambda: [0.80, 0.90, 0.95])
    tta: bool = False
    error_class: str = "MEL"
    # subgroup performance (evaluation/subgroups.py): sex, age bands, localization, dx_type and
    # fitzpatrick_skin_type when the metadata has them, plus these columns; subgroups under the size are marked
    subgroup_columns: list[str] = field(default_factory=list)
    subgroup_min_images: int = 30


@dataclass
class ExplainConfig:
    """Grad-CAM gallery in the study report."""

    gallery: bool = True
    per_category: int = 2


@dataclass
class TrustConfig:
    """Calibrated probabilities and conformal prediction sets, both fitted on the validation split
    (lesionlab.evaluation.calibration / conformal); stored in the study's trust.json and copied into bundles."""

    calibration: bool = True  # temperature scaling per model and for the ensemble; off: T = 1
    ece_bins: int = 15  # equal-width bins of the top-1 confidence (Guo et al. 2017)
    coverage: float = 0.90  # conformal sets hold the true class with at least this probability
    method: str = "lac"  # lac | aps | raps (conformal score)
    mondrian: bool = True  # one threshold per class, so coverage holds for every class (melanoma included)
    raps_lambda: float = 0.01  # RAPS penalty per rank beyond raps_k_reg
    raps_k_reg: int = 1
    seed: int = 0  # APS/RAPS randomisation of the validation scores
    # per-class coverage targets other than `coverage` (needs mondrian), e.g. {MEL: 0.95}: a missed melanoma
    # costs more than a longer differential
    class_coverage: dict[str, float] = field(default_factory=dict)
    # bundles refuse this share of validation images as `likely_wrong`: a logistic score of the OOD score, calibrated
    # confidence and conformal set size fitted on validation to predict a wrong answer (lesionlab.clinic.trust;
    # docs/cross-site-ham10000.md: the OOD gate alone accepted less accurate images on another clinic's). 0: off
    error_refusal_rate: float = 0.10


@dataclass
class QualityConfig:
    """Image quality checks before any diagnosis (lesionlab.data.quality); copied into every bundle.

    Measured on a grey copy whose shorter side is `working_size` px; defaults chosen on the real HAM10000
    images (200x150) so that almost none is refused (docs/ood-ham10000.md).
    """

    min_side: int = 100  # shorter side in pixels; a 2/3 centre crop of less leaves < 67 px of lesion
    max_aspect: float = 3.0  # long side / short side (dermoscopy 4:3, phones 16:9)
    working_size: int = 128  # shorter side of the grey copy the measures below are taken on
    blur_sigma: float = 1.0  # Laplacian-of-Gaussian sigma in working pixels (hides JPEG/8-bit noise)
    min_sharpness: float = 0.0006  # Laplacian variance (see data/quality.py); 0.1% of HAM10000 lies below
    dark_level: float = 10 / 255  # a pixel this dark counts as nearly black
    bright_level: float = 245 / 255  # a pixel this bright counts as nearly white
    max_dark_fraction: float = 0.6  # more nearly black pixels: under-exposed (HAM10000 vignettes: <= 18%)
    max_bright_fraction: float = 0.6  # more nearly white pixels: over-exposed
    min_mean: float = 0.12  # mean grey level below this: under-exposed (HAM10000 >= 0.34)
    max_mean: float = 0.95  # mean grey level above this: over-exposed (HAM10000 <= 0.90)
    min_contrast: float = 4 / 255  # grey standard deviation below this: nearly uniform (HAM10000 >= 5.8/255)


@dataclass
class OODConfig:
    """Out-of-distribution refusal (lesionlab.evaluation.ood), fitted when a bundle is made; copied into it."""

    method: str = "mahalanobis"  # mahalanobis (penultimate features, training split) | none
    target_tpr: float = 0.95  # share of validation images that must pass the threshold
    fit_per_class: int = 300  # at most this many training images per class fit the class means and covariance
    seed: int = 0  # which training images are drawn when a class has more than fit_per_class


@dataclass
class RobustnessConfig:
    """Acquisition robustness and lesion consistency on the test split (`lesionlab robustness`, study step)."""

    enabled: bool = True  # the study's robustness step and report section
    # Perturbations (lesionlab.data.perturbations) at their graded severities; [] = all registered ones.
    perturbations: list[str] = field(default_factory=list)
    max_levels: int = 3  # at most this many severities per perturbation, spread over its range (0 = all)
    max_images: int = 300  # test images perturbed, a seeded random sample (0 = all); consistency uses all
    seed: int = 0  # image sample and the seeded perturbations (noise)
    tta: bool = False  # also average TTA views under every perturbation (5x the inference)


@dataclass
class CrossSiteConfig:
    """`cross_site.enabled`: the study's cross-site matrix when its data has several sources (HAM10000's `dataset`
    column, or `--data` given twice): train on each source (or all but one) and test on the others
    (lesionlab/workflows/cross_site.py; `lesionlab cross-site` runs the same on its own)."""

    enabled: bool = False
    scheme: str = "pairs"            # pairs | leave-one-out
    compare: list[str] = field(default_factory=list)   # color, tta: extra columns
    refusal_rate: float = 0.1        # each refusal score refuses this share of internal validation
    min_class_images: int = 10       # a class counts as shared when both sides have this many images
    # the models trained per training set; empty: the study's train.archs (one small model keeps the step cheap:
    # it trains once per source, or per left-out source)
    archs: list[str] = field(default_factory=list)
    epochs: int = 0                  # 0: the study's train.epochs


@dataclass
class ReaderStudyConfig:
    """`reader_study.simulate`: a simulated reader study on the test split (readers with set skill and a set
    tendency to follow the AI; lesionlab/workflows/reader_study/simulate.py), labelled SIMULATED in the report.
    Real reader studies are run with `lesionlab reader-study`."""

    simulate: bool = False
    cases: int = 60      # lesion-unique sample of the test split, stratified by class
    readers: int = 6     # residents, board-certified and experts in turn
    seed: int = 0


@dataclass
class ExternalSet:
    """An external test set in ISIC ground-truth format (e.g. the ISIC 2018 test set, PH2 mapped to NV/MEL)."""

    name: str = ""
    images: str = ""
    truth: str = ""


@dataclass
class SourceConfig:
    """One source of a several-source study: a data folder in any layout lesionlab.data.sources reads."""

    name: str = ""  # default: the folder's name
    data: str = ""
    metadata: str = ""  # default: found in `data`


@dataclass
class StudyConfig:
    """The whole protocol; `configs/paper.yaml` and `configs/demo.yaml` fill it."""

    name: str = "study"
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    ood: OODConfig = field(default_factory=OODConfig)
    synth_images: int = 0  # > 0: the demo makes a synthetic dataset of this many images
    synth_size: list[int] = field(default_factory=lambda: [600, 450])
    # > 1: the synthetic images come from this many clinics, each with its own colour cast (a `dataset` column, as
    # HAM10000's), so the study's multi-source checks and cross_site matrix have sources (at most 3)
    synth_sources: int = 1
    external: list[ExternalSet] = field(default_factory=list)
    reader_study: ReaderStudyConfig = field(default_factory=ReaderStudyConfig)
    cross_site: CrossSiteConfig = field(default_factory=CrossSiteConfig)
    # several sources in one study (or `--data` given more than once); empty: the one `--data`
    sources: list[SourceConfig] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the dataclass field type, with a clear error."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise UserError(f"config: {where} must be a mapping, got {value!r}")
        return _build(typ, value, where)
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list | tuple):
            raise UserError(f"config: {where} must be a list, got {value!r}")
        return [_coerce(v, item_type, where) for v in value]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in {"1", "true", "yes", "on"}:
                    return True
                if low in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise UserError(f"config: {where} expects {getattr(typ, '__name__', typ)}, got {value!r}") from None
    return value


def _build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"config: unknown key {where + '.' if where else ''}{unknown[0]}; valid keys: {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a shipped config (`paper`, `demo`)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
    raise UserError(f"config file {name_or_path} not found; give a YAML path or one of: {names}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Load a StudyConfig from YAML (or defaults) and apply `section.key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {p} must hold a mapping at top level")
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return _build(StudyConfig, values)


def config_from_dict(values: dict[str, Any]) -> StudyConfig:
    """Rebuild a StudyConfig from `to_dict()` output (e.g. a checkpoint sidecar)."""
    return _build(StudyConfig, values)


def save_config(cfg: StudyConfig, path: str | Path) -> None:
    """Write the effective config as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
