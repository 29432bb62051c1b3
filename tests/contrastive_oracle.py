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


# --------------------------------------------------------------------------- group ids and extra negatives
# The semantics (issue 18): pairs with the same group id are positives of each other; extra text
# columns (CLIP's extra_text, InfoNCE's extra_keys) are negatives of every image row, in the row
# (image→text) direction only. Written here from the formulas, with explicit target matrices,
# independent of mmkernels' reference.py.

GROUP_NAMES = {
    "clip": ["loss", "d image_emb", "d text_emb", "d logit_scale", "d extra_text"],
    "info_nce": ["loss", "d query", "d keys", "d logit_scale", "d extra_keys"],
    "siglip": ["loss", "d image_emb", "d text_emb", "d logit_scale", "d logit_bias"],
}


def positives(group_ids, n: int, dtype, device) -> torch.Tensor:
    """P (n, n) in `dtype`: P_ij = [g_i == g_j]; the diagonal (today's pairs) for group_ids None."""
    if group_ids is None:
        return torch.eye(n, dtype=dtype, device=device)
    g = group_ids.to(device)
    return (g[:, None] == g[None, :]).to(dtype)


def clip_targets(group_ids, n: int, k: int, smoothing: float, dtype, device):
    """(T_row (n, n + k), T_col (n, n)): row i's target (1-eps)·P_ij/c_i (0 on the k extra columns)
    + eps/(n + k); column j's (1-eps)·P_ij/c_j + eps/n, c the group sizes (P's row sums)."""
    p = positives(group_ids, n, dtype, device)
    c = p.sum(1)
    t_row = torch.cat([p / c[:, None], torch.zeros(n, k, dtype=dtype, device=device)], 1)
    t_row = (1 - smoothing) * t_row + smoothing / (n + k)
    t_col = (1 - smoothing) * p / c[None, :] + smoothing / n
    return t_row, t_col


def _columns(text, extra):
    return text if extra is None else torch.cat([text, extra])


def _normalized(a, cols, normalize):
    if normalize:
        return F.normalize(a, dim=-1), F.normalize(cols, dim=-1)
    return a, cols


def oracle_clip_loss(image, text, scale, extra=None, *, group_ids=None, normalize=False, smoothing=0.0,
                     directions=2):
    """CLIP (directions=2) or InfoNCE (directions=1) with group ids and extra columns, in the inputs'
    dtype (run it in float64: the oracle), explicit targets and log_softmax:
    S = s·x @ cat(y, y_extra).T (N, N+K); rows = -Σ_j T_row·log_softmax(S, 1), mean over rows;
    cols = -Σ_i T_col·log_softmax(S[:, :N], 0), mean over columns; loss = (rows + cols)/2."""
    n, k = image.shape[0], 0 if extra is None else extra.shape[0]
    x, y = _normalized(image, _columns(text, extra), normalize)
    logits = scale.to(x.dtype) * (x @ y.T)
    t_row, t_col = clip_targets(group_ids, n, k, smoothing, x.dtype, x.device)
    rows = -(t_row * torch.log_softmax(logits, 1)).sum(1).mean()
    if directions == 1:
        return rows
    cols = -(t_col * torch.log_softmax(logits[:, :n], 0)).sum(0).mean()
    return (rows + cols) / 2


def oracle_siglip_loss(image, text, scale, bias, *, group_ids=None, normalize=False):
    """SigLIP with group ids: -Σ_ij log σ(label_ij · S_ij) / N, label +1 where g_i == g_j, else -1."""
    n = image.shape[0]
    x, y = _normalized(image, text, normalize)
    logits = scale.to(x.dtype) * (x @ y.T) + bias.to(x.dtype)
    labels = 2 * positives(group_ids, n, x.dtype, x.device) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def eager_grouped_clip_loss(image, text, scale, extra=None, *, group_ids=None, normalize=False, smoothing=0.0,
                            directions=2):
    """The baseline a user would write, in the inputs' dtype: F.cross_entropy with probability targets
    (P/c per row and per column, the extras' columns 0) and its own label smoothing (C = N + K classes
    for the rows, N for the columns)."""
    n, k = image.shape[0], 0 if extra is None else extra.shape[0]
    a, cols = _normalized(image, _columns(text, extra), normalize)
    logits = scale.to(a.dtype) * a @ cols.T
    p = positives(group_ids, n, a.dtype, a.device)
    row_targets = torch.cat([p / p.sum(1, keepdim=True), torch.zeros(n, k, dtype=a.dtype, device=a.device)], 1)
    rows = F.cross_entropy(logits, row_targets, label_smoothing=smoothing)
    if directions == 1:
        return rows
    col_targets = (p / p.sum(0, keepdim=True)).T
    return (rows + F.cross_entropy(logits[:, :n].T, col_targets, label_smoothing=smoothing)) / 2


def eager_grouped_siglip_loss(image, text, scale, bias, *, group_ids=None, normalize=False):
    """The baseline in the inputs' dtype: HF's SigLIP loss with labels 2·[g_i == g_j] - 1."""
    a, b = _normalized(image, text, normalize)
    logits = scale.to(a.dtype) * a @ b.T + bias.to(a.dtype)
    labels = 2 * positives(group_ids, a.shape[0], a.dtype, a.device) - 1
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


def grouped_magnitudes(loss_name: str, leaves64, group_ids, normalize: bool, smoothing: float = 0.0):
    """`magnitudes` for group ids and extra columns (leaves64: [image, text, scale, extra or bias]),
    float64: the size of the summands of each output whose terms cancel, and the effect of each
    logit's rounding through the loss's curvature (see `magnitudes`). The extras' gradient is sized
    as the text's, over its own rows."""
    a, b, s = leaves64[:3]
    extra = leaves64[3] if loss_name != "siglip" and len(leaves64) > 3 else None
    n, k = a.shape[0], 0 if extra is None else extra.shape[0]
    y_all = _columns(b, extra)
    ra = 1 / a.norm(dim=1).clamp_min(1e-12) if normalize else torch.ones(n, dtype=a.dtype)
    rb = 1 / y_all.norm(dim=1).clamp_min(1e-12) if normalize else torch.ones(n + k, dtype=a.dtype)
    x, y = (a * ra[:, None]).requires_grad_(), (y_all * rb[:, None]).requires_grad_()
    unscaled = x @ y.T
    logits = s * unscaled
    sizes = {}
    with torch.no_grad():
        p = positives(group_ids, n, a.dtype, a.device)
    if loss_name == "siglip":
        signs = 2 * p - 1
        loss = -F.logsigmoid(signs * (logits + leaves64[3])).sum() / n
    else:
        t_row, t_col = clip_targets(group_ids, n, k, smoothing, a.dtype, a.device)
        rows = -(t_row * torch.log_softmax(logits, 1)).sum(1)
        # each row's CE is lse_i - Σ_j t_ij S_ij: its terms' size (each S_ij rounds on its own)
        row_sizes = torch.logsumexp(logits, 1).abs() + (t_row * logits).abs().sum(1)
        if loss_name == "clip":
            sp = logits[:, :n]
            cols = -(t_col * torch.log_softmax(sp, 0)).sum(0)
            loss = (rows.mean() + cols.mean()) / 2
            col_sizes = torch.logsumexp(sp, 0).abs() + (t_col * sp).abs().sum(0)
            sizes["loss"] = ((row_sizes.mean() + col_sizes.mean()) / 2).item()
        else:
            loss = rows.mean()
            sizes["loss"] = row_sizes.mean().item()
    d_unscaled, d_x, d_y = torch.autograd.grad(loss, (unscaled, x, y))
    d_logits = d_unscaled / s
    scale_terms = (d_logits.abs() * (x.detach().abs() @ y.detach().abs().T)).sum().item()
    sizes["loss"] = max(sizes.get("loss", 0.0), abs(loss.item()), s.item() * scale_terms)
    sizes["d logit_scale"] = scale_terms
    sizes["d logit_bias"] = d_logits.abs().sum().item()
    with torch.no_grad():
        x, y = x.detach(), y.detach()
        if loss_name == "siglip":
            z = signs * (logits + leaves64[3])
            curvature = torch.sigmoid(z) * torch.sigmoid(-z)
        else:
            p_rows = torch.softmax(logits, 1)
            curvature = p_rows * (1 - p_rows)
            if loss_name == "clip":
                p_cols = torch.softmax(logits[:, :n], 0)
                curvature = curvature.clone()
                curvature[:, :n] = (curvature[:, :n] + p_cols * (1 - p_cols)) / 2
                curvature[:, n:] = curvature[:, n:] / 2
        rounding = curvature / n * (s * (x.abs() @ y.abs().T))
        x_sizes = (rounding.square() @ (s * y.abs()).square()).sqrt().norm().item()
        y_rows = (rounding.T.square() @ (s * x.abs()).square()).sqrt()
    sizes["d logit_bias"] = max(sizes["d logit_bias"], rounding.norm().item())
    sizes["d logit_scale"] = max(sizes["d logit_scale"], (rounding * unscaled.detach().abs()).norm().item())
    d_x = ra[:, None] * d_x if normalize else d_x
    d_y = rb[:, None] * d_y if normalize else d_y
    names = GROUP_NAMES[loss_name]
    sizes[names[1]] = max(d_x.norm().item(), x_sizes)
    sizes[names[2]] = max(d_y[:n].norm().item(), y_rows[:n].norm().item())
    if loss_name != "siglip":
        sizes[names[4]] = max(d_y[n:].norm().item(), y_rows[n:].norm().item())
    return sizes


def grouped_loss_fns(loss_name: str, group_ids, normalize: bool, smoothing: float = 0.0):
    """(eager, oracle): functions of the leaves ([image, text, scale] (+ [extra]) for CLIP and
    InfoNCE, [image, text, scale, bias] for SigLIP) for the rule's baseline and its float64 oracle."""
    if loss_name == "siglip":
        return (lambda a, b, s, c: eager_grouped_siglip_loss(a, b, s, c, group_ids=group_ids, normalize=normalize),
                lambda a, b, s, c: oracle_siglip_loss(a, b, s, c, group_ids=group_ids, normalize=normalize))
    directions = 2 if loss_name == "clip" else 1
    kw = dict(group_ids=group_ids, normalize=normalize, smoothing=smoothing, directions=directions)
    return (lambda a, b, s, *e: eager_grouped_clip_loss(a, b, s, *e, **kw),
            lambda a, b, s, *e: oracle_clip_loss(a, b, s, *e, **kw))


def check_grouped(loss_name: str, got, leaves, dtype, what: str, group_ids=None, normalize: bool = False,
                  smoothing: float = 0.0):
    """The numerics rule (docs/design.md) for a loss with group ids (and, for CLIP and InfoNCE, extra
    columns) against the float64 oracle written from the formulas, the eager formula with
    probability targets in `dtype` as the baseline.

    leaves: [image, text, scale] + [extra] (CLIP, InfoNCE; extra (K, D), K may be 0) or [image,
    text, scale, bias] (SigLIP). got: [loss, d image, d text, d scale, d extra or d bias] in that
    order (fewer entries, or None entries: not checked)."""
    eager_fn, oracle_fn = grouped_loss_fns(loss_name, group_ids, normalize, smoothing)
    leaves64 = [t.detach().double() for t in leaves]
    eager = value_and_grads(eager_fn, leaves)
    oracle = value_and_grads(oracle_fn, leaves64)
    sizes = grouped_magnitudes(loss_name, [t.cpu() for t in leaves64], None if group_ids is None else group_ids.cpu(),
                               normalize, smoothing)
    for name, g, e, r in zip(GROUP_NAMES[loss_name], got, eager, oracle):
        if g is None:
            continue
        size = sizes.get(name)
        if size is not None and name.startswith("d ") and name not in ("d logit_scale", "d logit_bias"):
            size = max(size, r.double().norm().item())
        assert_within_rule(f"{what}: {name}", g, e, r, dtype, size=size)
