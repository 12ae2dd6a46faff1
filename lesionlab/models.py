"""Model registry (user name -> timm id, pretrained tag, Grad-CAM layer), creation, weights and checkpoints."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lesionlab import __version__
from lesionlab.errors import UserError, WeightsUnavailable
from lesionlab.io import atomic_write, atomic_write_json
from lesionlab.labels import CLASSES

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    timm_id: str  # architecture.pretrained_tag
    cam_layer: str  # dotted module path of the Grad-CAM target layer
    title: str


# timm's plain `seresnet101` has no pretrained weights; the `legacy_` SENet ports carry the original ones.
REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("resnet101", "resnet101.tv_in1k", "layer4", "ResNet-101"),
        ModelSpec("resnext101_32x4d", "resnext101_32x4d.gluon_in1k", "layer4", "ResNeXt-101 32x4d"),
        ModelSpec("seresnet101", "legacy_seresnet101.in1k", "layer4", "SE-ResNet-101"),
        ModelSpec("seresnext101_32x4d", "legacy_seresnext101_32x4d.in1k", "layer4", "SE-ResNeXt-101 32x4d"),
    )
}
PAPER_ARCHS = tuple(REGISTRY)


def valid_names() -> str:
    return ", ".join([*REGISTRY, "timm:<any timm model name>"])


def resolve(name: str) -> ModelSpec:
    """Registry entry for a user-facing name, or an ad-hoc entry for `timm:<name>`.

    Raises:
        UserError: unknown name (the message lists the valid ones).
    """
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        import timm

        timm_id = name[len(TIMM_PREFIX) :]
        arch = timm_id.split(".")[0]
        if not timm.is_model(arch):
            raise UserError(f"timm has no model named {arch!r} (see timm.list_models())")
        return ModelSpec(name, timm_id, "", timm_id)
    raise UserError(f"unknown architecture {name!r}; valid names: {valid_names()}")


def expand_archs(names: list[str] | str) -> list[str]:
    """`all` -> the four paper models; otherwise the names, each checked."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        out.extend(PAPER_ARCHS if n == "all" else [resolve(n).name])
    return out


def file_stem(name: str) -> str:
    """A model (or set) name as a file/folder name: `timm:resnet10t` -> `timm_resnet10t`."""
    return name.replace(":", "_").replace("/", "_")


def cam_layer_name(model: torch.nn.Module, spec: ModelSpec) -> str:
    """The Grad-CAM target layer: the registry's, else the last feature stage timm reports."""
    if spec.cam_layer:
        return spec.cam_layer
    info = getattr(model, "feature_info", None)
    if info:
        return info[-1]["module"]
    raise UserError(f"{spec.name}: cannot tell which layer Grad-CAM should use (no timm feature_info)")


def get_module(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return model.get_submodule(dotted)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def create_model(
    name: str,
    *,
    num_classes: int = len(CLASSES),
    pretrained: str = "imagenet",
    weights: str | Path | None = None,
) -> tuple[torch.nn.Module, ModelSpec]:
    """Build a registry model with a `num_classes`-way head.

    Args:
        name: registry name or `timm:<name>`.
        pretrained: `imagenet` (timm hub or local cache) or `none` (random init).
        weights: a local .safetensors/.pth file with ImageNet (or any) weights; overrides `pretrained`.

    Raises:
        WeightsUnavailable: ImageNet weights requested but neither the hub nor a local cache has them.
    """
    import timm

    spec = resolve(name)
    if pretrained not in ("imagenet", "none"):
        raise UserError(f"--pretrained must be imagenet or none, got {pretrained!r}")
    if weights:
        model = timm.create_model(spec.timm_id, pretrained=False, num_classes=num_classes)
        load_weights_file(model, weights)
        return model, spec
    if pretrained == "none":
        return timm.create_model(spec.timm_id, pretrained=False, num_classes=num_classes), spec
    return _create_pretrained(spec, num_classes), spec


def _create_pretrained(spec: ModelSpec, num_classes: int) -> torch.nn.Module:
    import huggingface_hub.constants as hf_constants
    import timm

    offline_before = hf_constants.HF_HUB_OFFLINE
    if not _hub_reachable():
        # No network: look in the local cache only, instead of minutes of retries.
        hf_constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(spec.timm_id, pretrained=True, num_classes=num_classes)
    except Exception as e:  # hub, cache and file errors all mean the same thing to the user
        log.debug("pretrained load failed", exc_info=True)
        raise WeightsUnavailable(
            f"cannot load ImageNet weights for {spec.name} ({spec.timm_id}): not downloadable here and not in "
            f"the local cache ({type(e).__name__}). Use --weights FILE with a local .safetensors/.pth file, "
            "or --pretrained none to start from random weights."
        ) from None
    finally:
        hf_constants.HF_HUB_OFFLINE = offline_before


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


# ----------------------------------------------------------------------------- checkpoints


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
    model = timm.create_model(meta["timm_id"], pretrained=False, num_classes=len(meta["classes"]))
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:
        raise UserError(f"{weights}: weights do not match {meta['timm_id']} ({str(e).splitlines()[0]})") from None
    model.eval().to(device)
    return model, meta
