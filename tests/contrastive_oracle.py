"""The numerics rule for the contrastive losses, shared by tests/test_contrastive*.py.

`check_clip` / `check_siglip` take what a path computed (the loss and the gradients of its leaves)
and hold each output to DESIGN.md's rule against the float64 reference, with the eager formula in
the inputs' dtype as the baseline (tests/toolkit.py's eager_clip_loss / eager_siglip_loss).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmkernels.ops import reference
from toolkit import assert_within_rule, eager_clip_loss, eager_siglip_loss, value_and_grads

NAMES = ["loss", "d image_emb", "d text_emb", "d logit_scale", "d logit_bias"]


def random_leaves(n: int, d: int, dtype, device, with_bias: bool, scale_range=(0.5, 2.5)):
    """[image (n, d), text (n, d), logit_scale (), (logit_bias ())] from torch's current seed."""
    a = torch.randn(n, d, dtype=dtype, device=device)
    b = torch.randn(n, d, dtype=dtype, device=device)
    scale = torch.tensor(math.exp(torch.empty(()).uniform_(*scale_range).item()), device=device)
    leaves = [a, b, scale]
    if with_bias:
        leaves.append(torch.tensor(torch.empty(()).uniform_(-3, 0).item(), device=device))
    return leaves


def magnitudes(loss_name: str, leaves64, normalize: bool, smoothing: float = 0.0):
    """The size of each scalar output's summands, in float64; the rule's floor scales with it.

    d logit_scale = Σ_ij dL/dS_ij · S_ij / logit_scale and d logit_bias = Σ_ij dL/dS_ij are sums of
    N² terms that cancel, so their rounding errors scale with Σ|terms|, not with the result. The loss
    moves by Σ_ij |dL/dS_ij · S_ij| · u when each logit is rounded by a relative u.
    Returns {"loss", "d logit_scale", "d logit_bias"} magnitudes.
    """
    a, b, s = leaves64[:3]
    unscaled = reference.clip_logits(a, b, torch.ones_like(s), normalize).requires_grad_()
    logits = s * unscaled
    if loss_name == "clip":
        labels = torch.arange(a.shape[0])
        loss = (F.cross_entropy(logits, labels, label_smoothing=smoothing)
                + F.cross_entropy(logits.T, labels, label_smoothing=smoothing)) / 2
    else:
        signs = 2 * torch.eye(a.shape[0], dtype=torch.float64) - 1
        loss = -F.logsigmoid(signs * (logits + leaves64[3])).sum() / a.shape[0]
    (d_unscaled,) = torch.autograd.grad(loss, unscaled)
    d_logits = d_unscaled / s
    scale_terms = (d_logits * unscaled).abs().sum().item()
    return {"loss": max(abs(loss.item()), s.item() * scale_terms), "d logit_scale": scale_terms,
            "d logit_bias": d_logits.abs().sum().item()}


def _check(loss_name, got, leaves, dtype, what, normalize, smoothing, ours_names):
    if loss_name == "clip":
        eager = value_and_grads(lambda a, b, s: eager_clip_loss(a, b, s, normalize, smoothing), leaves)
        oracle = value_and_grads(lambda a, b, s: reference.clip_loss(a, b, s, normalize, smoothing),
                                 [t.detach().double() for t in leaves])
    else:
        eager = value_and_grads(lambda a, b, s, c: eager_siglip_loss(a, b, s, c, normalize), leaves)
        oracle = value_and_grads(lambda a, b, s, c: reference.siglip_loss(a, b, s, c, normalize),
                                 [t.detach().double() for t in leaves])
    sizes = magnitudes(loss_name, [t.detach().double() for t in leaves], normalize, smoothing)
    for name, g, e, r in zip(NAMES, got, eager, oracle):
        if name not in ours_names:
            continue
        assert_within_rule(f"{what}: {name}", g, e, r, dtype, size=sizes.get(name))


def check_clip(got, leaves, dtype, what, normalize=False, smoothing=0.0):
    """got = [loss, d image, d text, d logit_scale] (entries may be None: not checked)."""
    names = [n for n, g in zip(NAMES, got) if g is not None]
    _check("clip", [g if g is not None else torch.zeros(()) for g in got], leaves, dtype, what, normalize,
           smoothing, names)


def check_siglip(got, leaves, dtype, what, normalize=False):
    """got = [loss, d image, d text, d logit_scale, d logit_bias] (entries may be None: not checked)."""
    names = [n for n, g in zip(NAMES, got) if g is not None]
    _check("siglip", [g if g is not None else torch.zeros(()) for g in got], leaves, dtype, what, normalize, 0.0,
           names)
