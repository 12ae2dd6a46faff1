"""Metadata fusion: a timm image backbone joined with patient metadata (age, sex, body site) before the head.

    image -> backbone.forward_features -> pooled features (D) --+
                                                                 +-> concat -> Linear -> 7 logits
    metadata (encoded, `data.metadata.MetadataEncoding`) -> MLP -+

The head is one linear layer over the concatenation, so the gradient of a logit with respect to the image
features does not depend on the metadata: Grad-CAM on the backbone (`cam_layer` = `backbone.<layer>`) shows
the image branch's evidence, whatever metadata was given. Called without metadata (`meta=None`, as Grad-CAM
and plain image pipelines do), the model uses the "everything missing" encoding, which it saw in training for
the rows with missing values.

The class keeps timm's `forward_features` / `forward_head` interface, so the inference engines (fp32, CPU bf16
TorchScript body) run it unchanged and only pass `meta` to the head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lesionlab.data.metadata import MetadataEncoding


class FusionModel(nn.Module):
    """Image backbone + metadata MLP + linear head over both.

    Args:
        backbone: a timm model; its classifier is removed (`reset_classifier(0)`).
        encoding: the fitted metadata encoding (defines the metadata input size).
        hidden: width of the metadata MLP.
    """

    def __init__(self, backbone: nn.Module, encoding: MetadataEncoding, *, num_classes: int, hidden: int = 32,
                 dropout: float = 0.1):
        super().__init__()
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.encoding = encoding
        self.hidden = hidden
        self.meta_mlp = nn.Sequential(
            nn.Linear(encoding.dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(backbone.num_features + hidden, num_classes)
        missing, _ = encoding.encode(None, n=1)
        self.register_buffer("missing_meta", torch.from_numpy(missing[0]), persistent=False)
        # timm attributes the rest of LesionLab reads (preprocessing config, feature stages)
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})
        self.default_cfg = self.pretrained_cfg
        self.num_features = backbone.num_features + hidden
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False, meta: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.backbone.forward_head(feats, pre_logits=True)
        if meta is None:
            meta = self.missing_meta.expand(pooled.shape[0], -1)
        m = self.meta_mlp(meta.to(device=pooled.device, dtype=pooled.dtype))
        z = torch.cat([pooled, m], dim=1)
        return z if pre_logits else self.head(z)

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), meta=meta)


def fusion_meta(model: FusionModel) -> dict[str, Any]:
    """What the checkpoint sidecar records to rebuild the model: the encoding and the MLP width."""
    return {"metadata": model.encoding.to_dict(), "metadata_hidden": model.hidden}


def fusion_free(metadata: Any) -> tuple[str, ...]:
    """Config keys that do not count while fusion is off (`train.metadata` empty), so image-only runs, resume
    records and study fingerprints made before these fields existed still match."""
    return () if metadata else ("train.metadata", "train.metadata_hidden")


def is_fused(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint sidecar describes a fused model."""
    return bool(meta.get("metadata"))


def build_from_meta(meta: dict[str, Any]) -> FusionModel:
    """An untrained FusionModel shaped as the sidecar says (weights are loaded by the caller)."""
    import timm

    backbone = timm.create_model(meta["timm_id"], pretrained=False, num_classes=0)
    return FusionModel(backbone, MetadataEncoding.from_dict(meta["metadata"]), num_classes=len(meta["classes"]),
                       hidden=int(meta.get("metadata_hidden", 32)))



class MetadataDataset(torch.utils.data.Dataset):
    """An image dataset whose items also carry each row's encoded metadata: `((image, metadata), target)`.

    Indexes pass through unchanged (an int or the `(index, seed)` pairs of `data.dataset.EpochSampler`).
    """

    def __init__(self, images: torch.utils.data.Dataset, metadata: Any):
        self.images = images
        self.metadata = torch.as_tensor(metadata, dtype=torch.float32)
        if len(self.metadata) != len(images):  # type: ignore[arg-type]
            raise ValueError(f"{len(self.metadata)} metadata rows for {len(images)} images")  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.metadata)

    def __getitem__(self, index):
        x, y = self.images[index]
        i = index[0] if isinstance(index, tuple) else index
        return (x, self.metadata[i]), y


def split_inputs(x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A loader batch's inputs as (images, metadata or None): `MetadataDataset` batches are [images, metadata]."""
    if isinstance(x, list | tuple):
        return x[0], x[1]
    return x, None
