"""The numerics rule for the contrastive losses, shared by tests/ops/test_contrastive*.py and test_info_nce.py.

`check_clip` / `check_siglip` / `check_info_nce` take what a path computed (the loss and the gradients
of its leaves) and hold each output to the numerics rule (docs/design.md) against the float64 reference, with the eager
formula in the inputs' dtype as the baseline (tests/toolkit.py's eager_clip_loss / eager_siglip_loss /
eager_info_nce_loss).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmkernels.ops.contrastive import reference
from toolkit import assert_within_rule, eager_clip_loss, eager_info_nce_loss, eager_siglip_loss, value_and_grads

NAMES = ["loss", "d image_emb", "d text_emb", "d logit_scale", "d logit_bias"]


# The loss tests' shapes: (N, D, normalize, label_smoothing); N = 1 and D = 1, sizes off every block.
LOSS_CASES = [
    # (N, D, normalize, label_smoothing)
    (1, 16, False, 0.0),
    (7, 1, False, 0.0),
    (7, 80, True, 0.1),
    (129, 16, False, 0.0),
    (129, 200, True, 0.0),
    (300, 80, False, 0.2),
    (300, 200, True, 0.0),
]


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
    """The size of the summands of each output that is a sum that cancels, in float64; the rule's
    floor scales with it (outputs not named here use the oracle's own size).

    - d logit_scale = Σ_ij dL/dS_ij · S_ij / logit_scale and d logit_bias = Σ_ij dL/dS_ij: sums of
      N² terms; their rounding errors scale with Σ|terms|, not with the result (and each S_ij with
      the sum of its dot product's |terms|).
    - The loss moves by Σ_ij |dL/dS_ij · S_ij| · u when each logit is rounded by a relative u; CLIP's
      row terms lse_i - target_i cancel (to 0 exactly for N = 1), so its size is at least their mean |·|;
      so do InfoNCE's (its rows only).
    - With normalize, d emb_i = r_i · (g_i - x_i (x_i · g_i)) for g = dL/dx: the projection cancels
      (to 0 exactly for D = 1), so the embeddings' gradients have at least the size of r·g.
    """
    a, b, s = leaves64[:3]
    ra = 1 / a.norm(dim=1).clamp_min(1e-12) if normalize else torch.ones(a.shape[0], dtype=a.dtype)
    rb = 1 / b.norm(dim=1).clamp_min(1e-12) if normalize else torch.ones(b.shape[0], dtype=b.dtype)
    x, y = (a * ra[:, None]).requires_grad_(), (b * rb[:, None]).requires_grad_()
    unscaled = x @ y.T
    logits = s * unscaled
    sizes = {}
    if loss_name == "clip":
        labels = torch.arange(a.shape[0])
        rows = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
        cols = F.cross_entropy(logits.T, labels, label_smoothing=smoothing, reduction="none")
        loss = (rows.mean() + cols.mean()) / 2
        lse = torch.logsumexp(logits, 1).abs() + torch.logsumexp(logits, 0).abs()
        targets = (1 - smoothing) * logits.diagonal() + smoothing * logits.mean(1)
        sizes["loss"] = ((lse + 2 * targets.abs()) / 2).mean().item()
    elif loss_name == "info_nce":
        labels = torch.arange(a.shape[0])
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        targets = (1 - smoothing) * logits.diagonal() + smoothing * logits.mean(1)
        sizes["loss"] = (torch.logsumexp(logits, 1).abs() + targets.abs()).mean().item()
    else:
        signs = 2 * torch.eye(a.shape[0], dtype=torch.float64) - 1
        loss = -F.logsigmoid(signs * (logits + leaves64[3])).sum() / a.shape[0]
    d_unscaled, d_x, d_y = torch.autograd.grad(loss, (unscaled, x, y))
    d_logits = d_unscaled / s
    # a logit x_i · y_j rounds by u · Σ_k |x_ik y_jk|, which is larger than u · |x_i · y_j| where the
    # dot product cancels (SigLIP, N = 1, D = 16: d logit_scale 11x off its own size)
    scale_terms = (d_logits.abs() * (x.detach().abs() @ y.detach().abs().T)).sum().item()
    sizes["loss"] = max(sizes.get("loss", 0.0), abs(loss.item()), s.item() * scale_terms)
    sizes["d logit_scale"] = scale_terms
    sizes["d logit_bias"] = d_logits.abs().sum().item()
    # d x_i = Σ_j dL/dS_ij · s · y_j moves with each logit's rounding through the loss's curvature
    # c_ij = ∂²L/∂S_ij² (σ(z)σ(-z)/N for SigLIP, p(1 - p)/N per softmax direction): by c_ij · δS_ij ·
    # s|y_j| with δS_ij = s·Σ_k|x_ik y_jk| · u, large against the gradient where the logit's dot
    # product cancels (SigLIP with N = 1, say).
    with torch.no_grad():
        if loss_name == "siglip":
            z = signs * (logits + leaves64[3])
            curvature = torch.sigmoid(z) * torch.sigmoid(-z)
        else:
            p_rows = torch.softmax(logits, 1)
            curvature = p_rows * (1 - p_rows)
            if loss_name == "clip":
                p_cols = torch.softmax(logits, 0)
                curvature = (curvature + p_cols * (1 - p_cols)) / 2
        # The logits round independently: their effects add as a root sum of squares.
        rounding = curvature / a.shape[0] * (s * (x.abs() @ y.abs().T))
        x_sizes = (rounding.square() @ (s * y.abs()).square()).sqrt().norm().item()
        y_sizes = (rounding.T.square() @ (s * x.abs()).square()).sqrt().norm().item()
    # ... and so do the scalars' gradients, sums of dL/dS_ij (· S_ij / s).
    sizes["d logit_bias"] = max(sizes["d logit_bias"], rounding.norm().item())
    sizes["d logit_scale"] = max(sizes["d logit_scale"], (rounding * unscaled.detach().abs()).norm().item())
    sizes["d image_emb"] = max((ra[:, None] * d_x).norm().item() if normalize else d_x.norm().item(), x_sizes)
    sizes["d text_emb"] = max((rb[:, None] * d_y).norm().item() if normalize else d_y.norm().item(), y_sizes)
    return sizes


def _check(loss_name, got, leaves, dtype, what, normalize, smoothing, ours_names):
    if loss_name == "clip":
        eager = value_and_grads(lambda a, b, s: eager_clip_loss(a, b, s, normalize, smoothing), leaves)
        oracle = value_and_grads(lambda a, b, s: reference.clip_loss(a, b, s, normalize, smoothing),
                                 [t.detach().double() for t in leaves])
    elif loss_name == "info_nce":
        eager = value_and_grads(lambda a, b, s: eager_info_nce_loss(a, b, s, normalize, smoothing), leaves)
        oracle = value_and_grads(lambda a, b, s: reference.info_nce_loss(a, b, s, normalize, smoothing),
                                 [t.detach().double() for t in leaves])
    else:
        eager = value_and_grads(lambda a, b, s, c: eager_siglip_loss(a, b, s, c, normalize), leaves)
        oracle = value_and_grads(lambda a, b, s, c: reference.siglip_loss(a, b, s, c, normalize),
                                 [t.detach().double() for t in leaves])
    sizes = magnitudes(loss_name, [t.detach().double() for t in leaves], normalize, smoothing)
    for name, g, e, r in zip(NAMES, got, eager, oracle):
        if name not in ours_names:
            continue
        size = sizes.get(name)
        if size is not None and name.startswith("d ") and name.endswith("_emb"):
            size = max(size, r.double().norm().item())
        assert_within_rule(f"{what}: {name}", g, e, r, dtype, size=size)


def check_clip(got, leaves, dtype, what, normalize=False, smoothing=0.0):
    """got = [loss, d image, d text, d logit_scale] (entries may be None: not checked)."""
    names = [n for n, g in zip(NAMES, got) if g is not None]
    _check("clip", [g if g is not None else torch.zeros(()) for g in got], leaves, dtype, what, normalize,
           smoothing, names)


def check_info_nce(got, leaves, dtype, what, normalize=False, smoothing=0.0):
    """got = [loss, d query, d keys, d logit_scale] (entries may be None: not checked)."""
    names = [n for n, g in zip(NAMES, got) if g is not None]
    _check("info_nce", [g if g is not None else torch.zeros(()) for g in got], leaves, dtype, what, normalize,
           smoothing, names)


def check_siglip(got, leaves, dtype, what, normalize=False):
    """got = [loss, d image, d text, d logit_scale, d logit_bias] (entries may be None: not checked)."""
    names = [n for n, g in zip(NAMES, got) if g is not None]
    _check("siglip", [g if g is not None else torch.zeros(()) for g in got], leaves, dtype, what, normalize, 0.0,
           names)
