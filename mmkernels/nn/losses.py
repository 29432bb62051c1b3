"""Drop-in contrastive loss modules (open_clip's ClipLoss / SigLipLoss call signatures)."""
from __future__ import annotations

import torch
from torch import nn

from mmkernels.ops.contrastive import clip_loss, siglip_loss

__all__ = ["ClipLoss", "SigLipLoss"]


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE loss without the N×N logit matrix.

    forward(image_features (N, D), text_features (N, D), logit_scale) -> () fp32 loss, where
    logit_scale is already exponentiated (open_clip passes `model.logit_scale.exp()`).
    """

    def __init__(self, normalize: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        self.normalize = normalize
        self.label_smoothing = label_smoothing

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> torch.Tensor:
        return clip_loss(
            image_features, text_features, logit_scale,
            normalize=self.normalize, label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, label_smoothing={self.label_smoothing}"


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss without the N×N logit matrix.

    forward(image_features (N, D), text_features (N, D), logit_scale, logit_bias) -> () fp32 loss.
    """

    def __init__(self, normalize: bool = False):
        super().__init__()
        self.normalize = normalize

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias) -> torch.Tensor:
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"
