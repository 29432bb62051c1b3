"""mmkernels: fused GPU kernels for training vision-language models.

    import mmkernels
    loss = mmkernels.clip_loss(image_emb, text_emb, logit_scale)
    handle = mmkernels.patch(model)   # a model you already have; handle.undo() restores it
"""
from mmkernels import integrations, nn
from mmkernels.integrations.patching import PatchHandle, patch, unpatch
from mmkernels.ops.attention import cross_attention
from mmkernels.ops.contrastive import clip_loss, info_nce_loss, siglip_loss
from mmkernels.ops.masks import AttnSpec
from mmkernels.ops.region import RegionMaskOutput, masked_region_loss, region_mask

__version__ = "0.1.0"

__all__ = [
    "clip_loss",
    "siglip_loss",
    "info_nce_loss",
    "cross_attention",
    "AttnSpec",
    "region_mask",
    "masked_region_loss",
    "RegionMaskOutput",
    "patch",
    "unpatch",
    "PatchHandle",
    "nn",
    "integrations",
    "__version__",
]
