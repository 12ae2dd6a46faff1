"""Model registry: user-facing name -> timm id, pretrained tag, Grad-CAM layer; model creation and weights."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from lesionlab.exceptions import UserError, WeightsUnavailable
from lesionlab.labels import CLASSES
from lesionlab.models.checkpoints import load_weights_file

log = logging.getLogger(__name__)


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

