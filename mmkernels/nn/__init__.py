"""Drop-in nn.Modules that wrap mmkernels' ops."""
from mmkernels.nn.losses import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
