"""Multi-GPU contrastive losses over torch.distributed: the exact loss of the global batch, each rank
doing 1/world_size of the work.

    import mmkernels.distributed as mmd
    loss = mmd.clip_loss(image_local, text_local, logit_scale)                  # same value on every rank
    loss = mmd.clip_loss(image_local, text_local, logit_scale, mode="ring")     # O(M·D) memory
    loss = mmd.siglip_loss(image_local, text_local, logit_scale, logit_bias)
    loss = mmd.siglip_loss(image_local, text_local, logit_scale, logit_bias, mode="ring")  # O(M·D) memory
    loss = mmd.info_nce_loss(query_local, keys_local, logit_scale)          # one-directional
    loss.backward()     # DDP / FSDP then average the gradients: the single-process update

api.py holds the losses (their communication and work: its docstring), plan.py what the ranks agree
on before any heavy collective (the check, the plan, the gradient scalings), ring.py the
point-to-point ring of mode="ring".
"""
from mmkernels.distributed.api import GRAD_SCALINGS, clip_loss, info_nce_loss, siglip_loss

__all__ = ["clip_loss", "info_nce_loss", "siglip_loss", "GRAD_SCALINGS"]
