"""Masked region modeling modules: RegionMasker (mask the regions) and MaskedRegionLoss (score them)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmkernels.ops.region import RegionMaskOutput, masked_region_loss, region_mask

__all__ = ["RegionMasker", "MaskedRegionLoss"]


class RegionMasker(nn.Module):
    """Selects and hides image regions for masked region modeling (mmkernels.region_mask).

    Args:
        feat_dim: D, the region feature size.
        prob: the probability that an existing region is selected.
        mode: "zero" (selected rows become the mask embedding, or zeros) or "bert" (80% mask
            embedding / zeros, 10% another random region's features, 10% unchanged).
        learned_mask_embedding: learn a (D,) row `mask_embedding` that replaces masked regions
            (initialised N(0, 0.02²)); when False they become zeros and the module has no parameter.
        min_masked: each sample with n >= 1 regions gets at least min(min_masked, n) selected.
        backend: "auto", "triton", "cuda" or "torch" (see mmkernels.region_mask).

    The module masks in training and in evaluation alike: masked region modeling is evaluated on
    masked inputs too.
    """

    def __init__(
        self,
        feat_dim: int,
        prob: float = 0.15,
        mode: str = "zero",
        learned_mask_embedding: bool = True,
        min_masked: int = 1,
        backend: str = "auto",
    ):
        super().__init__()
        self.feat_dim = feat_dim
        self.prob = prob
        self.mode = mode
        self.min_masked = min_masked
        self.backend = backend
        if learned_mask_embedding:
            self.mask_embedding = nn.Parameter(torch.empty(feat_dim))
            nn.init.normal_(self.mask_embedding, std=0.02)
        else:
            self.register_parameter("mask_embedding", None)

    def forward(
        self,
        feats: torch.Tensor,
        region_lens: Optional[torch.Tensor] = None,
        valid_mask: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> RegionMaskOutput:
        """feats: (B, R, D); region_lens: (B,) int or valid_mask: (B, R) bool.

        Returns RegionMaskOutput(features (B, R, D), mask (B, R) bool).
        """
        return region_mask(
            feats, region_lens, valid_mask, prob=self.prob, mode=self.mode,
            mask_embedding=self.mask_embedding, min_masked=self.min_masked, generator=generator,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"feat_dim={self.feat_dim}, prob={self.prob}, mode={self.mode!r}, "
            f"learned_mask_embedding={self.mask_embedding is not None}, min_masked={self.min_masked}"
        )


class MaskedRegionLoss(nn.Module):
    """mmkernels.masked_region_loss as a module: kind "mse", "smooth_l1" or "kl"; reduction "mean",
    "sum" or "none"; beta for smooth_l1.

    forward(pred (B, R, K), target (B, R, K), mask (B, R) bool) -> the float32 loss.
    """

    def __init__(self, kind: str = "mse", reduction: str = "mean", beta: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.kind = kind
        self.reduction = reduction
        self.beta = beta
        self.backend = backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_region_loss(
            pred, target, mask, self.kind, self.reduction, beta=self.beta, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}, beta={self.beta}"
