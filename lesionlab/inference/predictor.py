"""Probabilities for images: checkpoint loading, batching, TTA, device / precision / engine choice."""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from lesionlab import models, runtime
from lesionlab.data.cache import pil_to_uint8_tensor
from lesionlab.data.dataset import LesionDataset
from lesionlab.data.transforms import DataSpec, build_eval_transform
from lesionlab.exceptions import UserError
from lesionlab.inference import engines
from lesionlab.inference.tta import tta_views
from lesionlab.labels import label_set_of
from lesionlab.models.fusion import MetadataDataset, split_inputs

log = logging.getLogger(__name__)


def find_checkpoints(paths: Iterable[str | Path]) -> list[Path]:
    """Checkpoint folders (holding model.json) given run folders, architecture folders or model files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".safetensors":
            out.append(p.parent)
        elif (p / models.META_FILE).exists():
            out.append(p)
        elif p.is_dir():
            found = sorted(d.parent for d in p.glob(f"*/{models.META_FILE}"))
            if not found:
                raise UserError(f"{p}: no trained model found (expected {models.META_FILE} in it or its sub-folders)")
            out.extend(found)
        else:
            raise UserError(f"run {p} does not exist")
    return out


class Predictor:
    """One trained model kept warm for inference, with its own preprocessing (from the checkpoint sidecar).

    Args:
        checkpoint: the checkpoint folder (model.safetensors + model.json).
        device: `auto`, `cpu`, `cuda` or `cuda:N`.
        precision: `auto` (bf16 on CUDA and on CPUs with bf16 units, else fp32), `fp32` or `bf16`.
        channels_last: run the torch path in channels_last memory format.
        engine: the CPU engine of the body (`inference.engines`): `torch` (this class's own path), `onnxruntime`,
            `openvino`, `onnxruntime-int8`, or `auto` (the fastest verified on this machine, measured once and
            cached; plain fp32 eager is among its candidates, so its torch path never loses to it).
        listed_files: the files a bundle's manifest lists for this member: an exported or int8 body in the folder
            that is not listed is ignored (the body is then exported into the cache). None (a run folder): any.
    """

    def __init__(self, checkpoint: str | Path, *, device: str = "auto", precision: str = "auto", channels_last: bool = True,
                 engine: str = "torch", listed_files: Collection[str] | None = None):
        self.engine_requested = engines.check_engine(engine)
        self.device = runtime.pick_device(device)
        model, self.meta = models.load_checkpoint(checkpoint)
        self.channels_last = channels_last
        self.model = runtime.prepare_model(model, self.device, channels_last=channels_last).eval()
        self.amp = runtime.pick_precision(precision, self.device)
        self.spec = DataSpec(
            input_size=int(self.meta["input_size"]), mean=tuple(self.meta["mean"]), std=tuple(self.meta["std"]),
            crop_fraction=float(self.meta["crop_fraction"]),
            # sidecars written before colour constancy existed had none
            color_constancy=self.meta.get("color_constancy", "none"),
            color_constancy_p=float(self.meta.get("color_constancy_p", 6.0)),
        )
        self.transform = build_eval_transform(spec=self.spec)
        self.name = self.meta.get("arch", Path(checkpoint).name)
        # metadata fusion (models/fusion.py): the head also takes the encoded age / sex / site
        self.encoding = None
        if self.meta.get("metadata"):
            from lesionlab.data.metadata import MetadataEncoding

            self.encoding = MetadataEncoding.from_dict(self.meta["metadata"])
        # the classes the model was trained for (lesionlab.labels); ham7 for sidecars made before label sets
        self.label_set = label_set_of(self.meta)
        self.classes: tuple[str, ...] = tuple(self.meta["classes"])
        if self.classes != self.label_set.classes:
            raise UserError(f"{checkpoint}: class order {list(self.classes)} differs from its label set "
                            f"{self.label_set.name!r} ({list(self.label_set.classes)})")
        # CPU bf16: a frozen TorchScript copy with bf16 weights (see `_cpu_bf16_model`); `self.model` stays fp32
        # for fp32 inference and for explanations, which need gradients and the original module tree.
        self.cpu_bf16 = self.device.type == "cpu" and self.amp is torch.bfloat16
        self._fast: torch.nn.Module | None = None
        self._fast_lock = threading.Lock()
        # CPU inference engine for the body (inference/engines); None = this class's own torch path.
        self.engine = "torch"
        self.engine_trials: list[dict] = []
        self._auto_choice: str | None = None
        self._body_engine = None
        if engine != "torch":
            self._setup_engine(checkpoint, engine, listed_files)

    def _setup_engine(self, checkpoint: str | Path, engine: str, listed_files: Collection[str] | None) -> None:
        """Load the requested engine, or for `auto` the fastest one verified on this machine (cached)."""
        if self.device.type != "cpu":
            if engine != "auto":
                raise UserError(f"--engine {engine} runs on the CPU only; use --device cpu or --engine torch")
            return
        if engine != "auto":
            engines.require(engine)
        int8 = engines.int8_for(checkpoint, listed_files=listed_files) if engines.available(engines.INT8) else None
        if engine == engines.INT8 and int8 is None:
            raise UserError(f"--engine {engines.INT8}: {checkpoint} has no accepted int8 model; make the bundle with "
                            "--int8 (it ships one only at >= 99% agreement on top-1 and the melanoma flag) or use another engine")
        exported = [e for e in engines.EXPORTED if engines.available(e)] if engine == "auto" else [engine]
        if engine == "auto" and int8 is not None:
            exported.append(engines.INT8)
        onnx = engines.onnx_for(checkpoint, self.model, self.spec.input_size, listed_files=listed_files) if exported else None
        path_of = {name: int8 if name == engines.INT8 else onnx for name in exported}
        if engine != "auto":
            self._body_engine = engines.load_body(engine, path_of[engine])
            self.engine = engine
            return
        with_eager = self._torch_path() != "fp32"  # plain eager is a candidate of its own only where it differs
        if not (exported or with_eager):  # nothing to choose between
            return
        loaded = {}  # engines loaded for the trials, kept for the one chosen
        plain: torch.nn.Module | None = None

        def run_trials() -> list[engines.Trial]:
            nonlocal plain
            bodies = {"torch": self._torch_body}
            if with_eager:
                plain = self._plain_model()
                bodies[engines.EAGER] = lambda x: plain.forward_features(x.contiguous())
            for name in exported:
                try:
                    loaded[name] = engines.load_body(name, path_of[name])
                except Exception as e:  # noqa: BLE001 - an engine that cannot load is not chosen
                    log.info("%s: engine %s unavailable (%s)", self.name, name, e)
                    continue
                bodies[name] = lambda x, run=loaded[name]: torch.from_numpy(run(x.float().contiguous().numpy()))
            # fp32 engines are held to the tolerance; int8 (accepted on real images) and bf16 torch to the top-1
            exact = (set(exported) - {engines.INT8}) | {engines.EAGER}
            return engines.trial_engines(self._fp32_body, bodies, exact, self._head, self.spec.input_size)

        folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        files = [f for f in (onnx, int8) if f is not None] or [folder / models.WEIGHTS_FILE]
        variant = f"torch={self._torch_path()}" + (f"|{engines.EAGER}" if with_eager else "")
        choice, self.engine_trials = engines.choose_cached(files, run_trials, variant=variant)
        self._auto_choice = choice
        if choice == engines.EAGER:  # the torch path lost to plain fp32 eager on this CPU: become plain eager
            self._become_plain_eager(plain if plain is not None else self._plain_model())
            choice = "torch"
        elif choice != "torch":
            self._body_engine = loaded.get(choice) or engines.load_body(choice, path_of[choice])
        self.engine = choice
        log.info("%s: inference engine %s (auto: %s)", self.name, choice, self._auto_choice)

    def _torch_path(self) -> str:
        """What this class's own path runs: `bf16-torchscript` (CPU bf16), `fp32-channels_last`, `fp32`, or on
        CUDA the autocast precision."""
        if self.cpu_bf16:
            return "bf16-torchscript"
        if self.device.type == "cuda" and self.amp is not None:
            return "bf16" if self.amp is torch.bfloat16 else "fp16"
        return "fp32-channels_last" if self.channels_last else "fp32"

    def _plain_model(self) -> torch.nn.Module:
        """A contiguous fp32 copy of the model: plain eager, the baseline `auto` holds the torch path to."""
        return copy.deepcopy(self.model).to(memory_format=torch.contiguous_format).eval()

    def _become_plain_eager(self, plain: torch.nn.Module) -> None:
        """Make the torch path plain fp32 eager in contiguous format (where the fast path measured slower)."""
        self.model, self.channels_last, self.cpu_bf16, self.amp = plain, False, False, None
        with self._fast_lock:
            self._fast = None

    def engine_info(self) -> dict[str, Any]:
        """What this Predictor actually runs, for bundles, health checks and audit records.

        Returns:
            `engine` (torch, onnxruntime, openvino, onnxruntime-int8), `requested` (the engine asked for),
            `precision` of the body (fp32, bf16, fp16; int8 for the int8 engine), `device`, `channels_last`
            (the torch path's memory format), `auto_choice` (the candidate `auto` picked, e.g. `torch-eager` when
            the torch path fell back to plain eager; None without auto) and `trial_ms` (each verified candidate's
            median one-image latency in ms as `auto` measured it; empty without auto).
        """
        if self.engine == engines.INT8:
            precision = "int8"
        elif self.engine != "torch":
            precision = "fp32"
        else:
            precision = runtime.precision_name(self.amp)
        return {
            "engine": self.engine, "requested": self.engine_requested, "precision": precision,
            "device": str(self.device), "channels_last": self.engine == "torch" and (self.cpu_bf16 or self.channels_last),
            "auto_choice": self._auto_choice,
            "trial_ms": {t["engine"]: t["ms_one"] for t in self.engine_trials if t["verified"]},
        }

    def _fp32_body(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x.to(self.device))

    def _head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(feats.float())

    def _torch_body(self, x: torch.Tensor) -> torch.Tensor:
        """This class's own CPU path for the body (bf16 TorchScript where the CPU has bf16 units, else fp32)."""
        if self.cpu_bf16:
            return self._cpu_bf16_model()(x.contiguous(memory_format=torch.channels_last).to(torch.bfloat16)).float()
        return self._fp32_body(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)

    def _cpu_bf16_model(self) -> torch.nn.Module:
        """The network body (`forward_features`) for fast CPU inference; the classifier head stays fp32.

        BatchNorm is folded into the convolutions in fp32 (torch.fx), then the weights are cast to bf16 once
        (autocast would re-cast every weight on every call) and the body is traced and frozen with TorchScript,
        which also fuses the ReLUs. Folding after the cast (TorchScript's own folding) measurably changed
        predictions (SE-ResNet-101: 98.8% top-1 agreement with fp32 on 2,000 real images, against >= 99.5%
        this way). Speed: docs/benchmarks.md.
        """
        import torch.fx.experimental.optimization as fx_opt

        with self._fast_lock:
            if self._fast is None:
                body = engines.Body(copy.deepcopy(self.model)).eval()
                try:
                    body = fx_opt.fuse(body)
                except Exception:  # not FX-traceable: BatchNorm stays unfolded
                    log.info("%s: torch.fx could not fold BatchNorm; continuing without", self.name, exc_info=True)
                body = body.to(torch.bfloat16)
                example = torch.zeros(2, 3, self.spec.input_size, self.spec.input_size, dtype=torch.bfloat16)
                try:
                    with torch.inference_mode(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        self._fast = torch.jit.freeze(torch.jit.trace(body, example.contiguous(memory_format=torch.channels_last)))
                except Exception:  # any body TorchScript cannot trace still runs, in eager bf16
                    log.info("%s: TorchScript tracing failed; using eager bf16", self.name, exc_info=True)
                    self._fast = body
            return self._fast

    @torch.inference_mode()
    def predict_batch(self, x: torch.Tensor, *, tta: bool = False, meta: torch.Tensor | None = None) -> np.ndarray:
        """Softmax probabilities (N, 7) of a normalised batch; TTA averages flips and 90-degree rotations.

        `meta`: encoded metadata (N, dim) for a fused model (None: all missing); image-only models ignore it.
        """
        return self.outputs_batch(x, tta=tta, features=False, meta=meta)["probs"]

    @torch.inference_mode()
    def outputs_batch(self, x: torch.Tensor, *, tta: bool = False, features: bool = True,
                      meta: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """`probs` (N, 7; averaged over the TTA views), and of the untransformed view `logits` (N, 7) and, with
        `features`, the pooled penultimate `features` (N, D) that out-of-distribution scores look at."""
        # only the torch path wants channels_last; an exported body takes a contiguous array
        channels_last = self.channels_last and self._body_engine is None
        x = runtime.to_device(x, self.device, channels_last=channels_last)
        views = tta_views(x) if tta else [x]
        acc = None
        out: dict[str, np.ndarray] = {}
        head_kw = {"meta": meta.to(self.device)} if self.encoding is not None and meta is not None else {}
        for i, v in enumerate(views):
            v = v.contiguous(memory_format=torch.channels_last) if channels_last else v
            if self._body_engine is not None:
                feats = torch.from_numpy(self._body_engine(v.float().contiguous().cpu().numpy()))
            elif self.cpu_bf16:
                feats = self._cpu_bf16_model()(v.to(torch.bfloat16)).float()
            else:
                with runtime.autocast(self.device, self.amp):
                    feats = self.model.forward_features(v)
            # The head runs in fp32 on both paths (as before: the bf16 path kept the classifier head fp32).
            feats = feats.float()
            logits = self.model.forward_head(feats, **head_kw).float()
            if i == 0:
                out["logits"] = logits.cpu().numpy()
                if features:  # a fused model's are its image branch's: OOD scores judge the image, whatever metadata came
                    head = self.model.backbone if self.encoding is not None else self.model
                    out["features"] = head.forward_head(feats, pre_logits=True).float().cpu().numpy()
            p = torch.softmax(logits, dim=1)
            acc = p if acc is None else acc + p
        out["probs"] = (acc / len(views)).cpu().numpy()
        return out

    def predict_frame(self, df: pd.DataFrame, *, batch_size: int = 32, num_workers: int = 0, tta: bool = False,
                      progress: bool = True) -> np.ndarray:
        """Probabilities for every row (needs a `path` column)."""
        ds = LesionDataset(df, self.transform)
        if self.encoding is not None:  # a fused model reads the frame's metadata columns (absent ones: missing)
            ds = MetadataDataset(ds, self.encoding.encode(df)[0])
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=runtime.worker_count(num_workers))
        out = []
        for x, _ in tqdm(loader, desc=f"predict {self.name}", disable=not progress, leave=False):
            x, meta = split_inputs(x)
            out.append(self.predict_batch(x, tta=tta, meta=meta))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def prepare(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(pil_to_uint8_tensor(im)) for im in images])

    def encode_metadata(self, metadata: list[dict] | None, n: int) -> tuple[torch.Tensor | None, list[list[str]]]:
        """Encoded metadata for `n` images and the fields missing per image; (None, []) for an image-only model."""
        if self.encoding is None:
            return None, [[] for _ in range(n)]
        x, missing = self.encoding.encode(metadata, n=n)
        return torch.from_numpy(x), missing

    def predict_images(self, images: list[Image.Image], *, tta: bool = False, metadata: list[dict] | None = None) -> np.ndarray:
        """Probabilities for PIL images; `metadata`: one mapping per image (age, sex, site ...) for a fused model."""
        if not images:
            return np.zeros((0, len(self.classes)))
        return self.predict_batch(self.prepare(images), tta=tta, meta=self.encode_metadata(metadata, len(images))[0])


def infer_table(
    checkpoints: list[Path],
    df: pd.DataFrame,
    *,
    device: str = "auto",
    precision: str = "auto",
    tta: bool = False,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    engine: str = "torch",
) -> dict[str, np.ndarray]:
    """Probabilities of every checkpoint for the rows of `df`: {arch name: (N, 7)}."""
    out: dict[str, Any] = {}
    for pr in load_predictors(checkpoints, device=device, precision=precision, engine=engine):
        out[pr.name] = pr.predict_frame(df, batch_size=batch_size, num_workers=num_workers, tta=tta, progress=progress)
    return out


def load_predictors(checkpoints: Iterable[str | Path], *, device: str = "auto", precision: str = "auto",
                    engine: str = "torch", listed_files: Sequence[Collection[str] | None] | None = None
                    ) -> list[Predictor]:
    """A Predictor per checkpoint; names made unique (two runs of one architecture: `arch`, `arch-2`).

    Args:
        checkpoints: checkpoint folders.
        device: see `Predictor`.
        precision: see `Predictor`.
        engine: the CPU inference engine of each member (inference/engines); `auto` picks per member.
        listed_files: per checkpoint, in order, the files its bundle manifest lists (see `Predictor`); None: any.
    """
    engines.check_engine(engine)
    checkpoints = list(checkpoints)
    listed = [None] * len(checkpoints) if listed_files is None else listed_files
    preds = [Predictor(ck, device=device, precision=precision, engine=engine, listed_files=files)
             for ck, files in zip(checkpoints, listed, strict=True)]
    for pr, name in zip(preds, unique_names([p.name for p in preds]), strict=True):
        pr.name = name
    sets = {(p.label_set.name, p.classes) for p in preds}
    if len(sets) > 1:  # an ensemble averages probability columns: they must mean the same classes
        raise UserError("the models were trained for different label sets ("
                        + "; ".join(f"{n}: {', '.join(c)}" for n, c in sorted(sets)) + "); ensemble models of one")
    return preds


def unique_names(names: Iterable[str]) -> list[str]:
    """Member names made unique in order: a second `arch` becomes `arch-2`, a third `arch-3`.

    The study names its prediction files this way and the bundle looks them up the same way.
    """
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out

