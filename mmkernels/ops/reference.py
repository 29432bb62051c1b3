"""Plain-PyTorch definition of every op: the CPU path and the tests' oracle (run in float64).

Each function here computes in at least float32 (float64 stays float64) and relies on PyTorch's
autograd for its gradients. Inputs are assumed checked by the public function that calls them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- contrastive losses


def clip_logits(image_emb, text_emb, logit_scale, normalize: bool = False) -> torch.Tensor:
    """S = logit_scale · image_emb @ text_emb.T, (N, N), in the compute dtype."""
    dtype = _compute_dtype(image_emb)
    image_emb, text_emb = image_emb.to(dtype), text_emb.to(dtype)
    if normalize:
        image_emb = F.normalize(image_emb, dim=-1)
        text_emb = F.normalize(text_emb, dim=-1)
    return logit_scale.to(dtype) * (image_emb @ text_emb.T)


def clip_loss(image_emb, text_emb, logit_scale, normalize: bool = False, label_smoothing: float = 0.0):
    """CLIP's symmetric InfoNCE: (CE(rows of S) + CE(columns of S)) / 2 with targets arange(N).

    image_emb, text_emb: (N, D); logit_scale: 0-dim tensor (already exponentiated). Returns a scalar.
    """
    logits = clip_logits(image_emb, text_emb, logit_scale, normalize)
    labels = torch.arange(logits.shape[0], device=logits.device)
    rows = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    cols = F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)
    return (rows + cols) / 2


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias, normalize: bool = False):
    """SigLIP's sigmoid loss: -Σ_ij log σ(label_ij · S_ij) / N, label +1 on the diagonal, -1 elsewhere.

    S = logit_scale · image_emb @ text_emb.T + logit_bias; image_emb, text_emb: (N, D). Returns a scalar.
    """
    logits = clip_logits(image_emb, text_emb, logit_scale, normalize) + logit_bias.to(
        _compute_dtype(image_emb)
    )
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / n


# --------------------------------------------------------------------------- attention


# --------------------------------------------------------------------------- region masking
