"""Checkpoints: safetensors weights + JSON sidecar, written atomically, read without unpickling."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lesionlab import __version__
from lesionlab.exceptions import UserError
from lesionlab.io import atomic_write, atomic_write_json
from lesionlab.labels import CLASSES

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


META_FILE = "model.json"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pth/.pt/.bin file loaded with weights_only=True (no unpickling)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a valid safetensors file ({e})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot be read as a weights-only PyTorch file ({str(e).splitlines()[0]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights_file(model: torch.nn.Module, path: str | Path) -> None:
    """Load weights from a local file; a classifier whose shape differs (e.g. ImageNet's 1000 classes) is skipped."""
    sd = read_state_dict(path)
    own = model.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in sd if k in own and own[k].shape != sd[k].shape)
    missing = sorted(set(own) - set(usable))
    if not usable:
        raise UserError(f"{path}: none of its tensors fit this architecture; is it the right model?")
    # Only the (new) classifier may be left at its initial values.
    head = {k for k in own if k.startswith(_classifier_prefixes(model))}
    if set(missing) - head:
        raise UserError(
            f"{path}: {len(set(missing) - head)} tensors missing for this architecture "
            f"(first: {sorted(set(missing) - head)[0]}); is it the right model?"
        )
    model.load_state_dict(usable, strict=False)
    if skipped:
        log.info("weights %s: new %d-way head (skipped %s)", path, len(CLASSES), ", ".join(skipped))


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    name = getattr(model, "default_cfg", {}).get("classifier", "fc")
    names = name if isinstance(name, list | tuple) else [name]
    return tuple(f"{n}." for n in names)


def save_checkpoint(model: torch.nn.Module, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `model.safetensors` and its `model.json` sidecar atomically; return the weights path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    meta = {**meta, "package_version": __version__, "classes": list(meta.get("classes", CLASSES))}
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    atomic_write_json(out / META_FILE, meta)
    return out / WEIGHTS_FILE


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The sidecar of a checkpoint (folder, .safetensors or .json path)."""
    path = Path(path)
    meta_path = path / META_FILE if path.is_dir() else path.with_suffix(".json")
    if not meta_path.exists():
        raise UserError(f"checkpoint {path}: no {META_FILE} sidecar found")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: invalid JSON ({e})") from None


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a LesionLab checkpoint (folder or model.safetensors) ready for inference: (model in eval mode, metadata).

    Never unpickles: weights are read with safetensors.
    """
    import timm
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.exists():
        raise UserError(f"checkpoint {weights} does not exist; train one with `lesionlab train`")
    meta = read_meta(path)
    for key in ("timm_id", "classes"):
        if key not in meta:
            raise UserError(f"{path}: sidecar lacks {key!r}; not a LesionLab checkpoint")
    if meta.get("metadata"):  # a metadata-fusion model (models/fusion.py)
        from lesionlab.models.fusion import build_from_meta

        model = build_from_meta(meta)
    else:
        model = timm.create_model(meta["timm_id"], pretrained=False, num_classes=len(meta["classes"]))
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:
        raise UserError(f"{weights}: weights do not match {meta['timm_id']} ({str(e).splitlines()[0]})") from None
    model.eval().to(device)
    return model, meta

