"""The body as ONNX: export (fp32, dynamic batch), static int8 quantisation, and which files a checkpoint offers.

The body is exported once with torch.onnx; a bundle may carry it next to the safetensors (`model.onnx`, hashed like
the rest), otherwise it is exported into the cache folder (LESIONLAB_CACHE, default ~/.cache/lesionlab) keyed by
the weights' SHA-256. A bundle member may also carry an int8 body (`model.int8.onnx` with its record `int8.json`),
shipped only when it agrees with the validated path on real images, on top-1 and on the melanoma flag at the
bundle's threshold, at `INT8_MIN_AGREEMENT` (lesionlab.clinic.bundle.build.int8_members).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from lesionlab.io import atomic_write, sha256_file
from lesionlab.models.checkpoints import WEIGHTS_FILE

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INT8_RECORD = "int8.json"  # how the int8 body was calibrated and how often it agreed with the validated path
INT8_MIN_AGREEMENT = 0.99  # int8 ships only at >= 99% agreement (top-1 and melanoma flag) on real images
ONNX_OPSET = 17


def cache_root() -> Path:
    """Where exported bodies and `auto`'s measured choices are kept (LESIONLAB_CACHE, default ~/.cache/lesionlab)."""
    return Path(os.environ.get("LESIONLAB_CACHE") or Path.home() / ".cache" / "lesionlab")


class Body(torch.nn.Module):
    """A timm model's body (`forward_features`) as a module of its own, so it can be exported, fused, cast and
    traced without the head (what the engines and the Predictor's CPU bf16 path run)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def export_body_onnx(model: torch.nn.Module, input_size: int, path: str | Path) -> Path:
    """Write the fp32 body of `model` as ONNX (input `image` N x 3 x S x S, output `features`; batch dynamic)."""
    path = Path(path)
    body = Body(copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format)).eval()
    example = torch.randn(1, 3, input_size, input_size)

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter: exact for these CNNs and much faster than the dynamo one.
            torch.onnx.export(body, (example,), str(tmp), input_names=["image"], output_names=["features"],
                              dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
                              opset_version=ONNX_OPSET, dynamo=False)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def _folder(checkpoint: str | Path) -> Path:
    ck = Path(checkpoint)
    return ck if ck.is_dir() else ck.parent


def _offered(folder: Path, name: str, listed_files: Collection[str] | None) -> bool:
    """Whether `name` in the checkpoint folder may be used: it exists and, for a bundle member, its manifest lists
    it (a file left in the folder but not listed, say a stale export, was never verified against the weights)."""
    return (folder / name).exists() and (listed_files is None or name in listed_files)


def onnx_for(checkpoint: str | Path, model: torch.nn.Module, input_size: int, *,
             listed_files: Collection[str] | None = None) -> Path:
    """The exported body of a checkpoint: `model.onnx` beside it (bundles), else one in the cache (made once).

    Args:
        checkpoint: the checkpoint folder (or a file in it).
        model: the loaded fp32 model, exported when no usable `model.onnx` is beside the checkpoint.
        input_size: the square input side the export is traced at (the batch stays dynamic).
        listed_files: the files a bundle's manifest lists for this member; a `model.onnx` not among them is
            ignored. None (a run folder): whatever is in the folder.
    """
    ck_dir = _folder(checkpoint)
    if _offered(ck_dir, ONNX_FILE, listed_files):
        return ck_dir / ONNX_FILE
    weights = ck_dir / WEIGHTS_FILE
    key = sha256_file(weights)[:20] if weights.exists() else hashlib.sha256(str(ck_dir.resolve()).encode()).hexdigest()[:20]
    path = cache_root() / "onnx" / f"{key}-{input_size}.onnx"
    if not path.exists():
        log.info("exporting %s to ONNX (%s), once per model", ck_dir, path)
        export_body_onnx(model, input_size, path)
    return path


def int8_for(checkpoint: str | Path, *, listed_files: Collection[str] | None = None) -> Path | None:
    """The accepted int8 body beside a (bundle member) checkpoint, else None.

    Args:
        checkpoint: the checkpoint folder (or a file in it).
        listed_files: the files a bundle's manifest lists for this member; the int8 body counts only when both
            `model.int8.onnx` and its record `int8.json` are listed. None: whatever is in the folder.
    """
    ck_dir = _folder(checkpoint)
    if not (_offered(ck_dir, INT8_FILE, listed_files) and _offered(ck_dir, INT8_RECORD, listed_files)):
        return None
    try:
        return ck_dir / INT8_FILE if json.loads((ck_dir / INT8_RECORD).read_text()).get("accepted") else None
    except (OSError, json.JSONDecodeError):
        return None


def quantize_int8(onnx_fp32: str | Path, calibration: np.ndarray, out: str | Path, *, batch: int = 16) -> Path:
    """Static post-training int8 quantisation of an exported body with ONNX Runtime's quantiser.

    QDQ format, per-channel signed int8 weights, unsigned int8 activations whose ranges come from `calibration`
    (preprocessed images, N x 3 x S x S float32; LesionLab uses validation images). The graph is first run through
    ONNX Runtime's `quant_pre_process` (shape inference, fusions), as its documentation recommends. Whether the
    result may be used is decided by the bundle (top-1 and melanoma-flag agreement), not here.
    """
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([np.ascontiguousarray(calibration[i:i + batch], dtype=np.float32)
                                  for i in range(0, len(calibration), batch)])

        def get_next(self):
            x = next(self._batches, None)
            return None if x is None else {"image": x}

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(onnx_fp32), str(pre), skip_symbolic_shape=True)

        def write(dest: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(str(pre), str(dest), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

        atomic_write(out, write)
    return out


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Share of rows whose arg-max class is the same in two probability (or logit) arrays."""
    return float((np.asarray(reference).argmax(1) == np.asarray(other).argmax(1)).mean())
