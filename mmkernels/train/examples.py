"""What one training example is, whatever data set it comes from."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Regions(NamedTuple):
    """An image's detected regions (the fusion task's visual input).

    features: (R, D) float32 region features.
    boxes: (R, 4) float32 (x1, y1, x2, y2), normalised to [0, 1].
    class_probs: (R, K) float32 class distribution per region, or None when the data has none.
    """

    features: torch.Tensor
    boxes: torch.Tensor
    class_probs: Optional[torch.Tensor]


class Example(NamedTuple):
    """One image-caption pair: caption text, image (3, H, W) uint8 (clip task) and/or regions (fusion)."""

    caption: str
    image: Optional[torch.Tensor]
    regions: Optional[Regions]
