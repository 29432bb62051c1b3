"""Drop-in nn.Modules that wrap mmkernels' ops."""
from mmkernels.nn.attention import CrossModalAttention
from mmkernels.nn.losses import ClipLoss, InfoNCELoss, SigLipLoss
from mmkernels.nn.region import MaskedRegionLoss, RegionMasker

__all__ = ["ClipLoss", "SigLipLoss", "InfoNCELoss", "CrossModalAttention", "RegionMasker", "MaskedRegionLoss"]
