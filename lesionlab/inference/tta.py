"""Test-time augmentation: the views whose probabilities are averaged."""

from __future__ import annotations

import torch


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Test-time augmentation views of a normalised batch: identity, flips and 90-degree rotations."""
    return [
        x,
        torch.flip(x, dims=[-1]),
        torch.flip(x, dims=[-2]),
        torch.rot90(x, 1, dims=[-2, -1]),
        torch.rot90(x, 3, dims=[-2, -1]),
    ]

