"""The contrastive losses in plain PyTorch: the CPU path and the tests' oracle (run in float64).

Each function here computes in at least float32 (float64 stays float64) and relies on PyTorch's
autograd for its gradients. Inputs are assumed checked by the public function that calls them.

A logit that is not finite (an Inf or NaN among the inputs, or a product that overflows) makes
the loss undefined: it becomes NaN here, and in the kernels, before any loss term is formed.
Without this rule a SigLIP or CLIP loss can come out finite, or +Inf, from an Inf input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkernels.ops._common import reference_dtype


def clip_logits(image_emb, text_emb, logit_scale, normalize: bool = False, logit_bias=None) -> torch.Tensor:
    """S = logit_scale · image_emb @ text_emb.T (+ logit_bias), (M, N), in the compute dtype.

    Non-finite logits are NaN.
    """
    dtype = reference_dtype(image_emb)
    image_emb, text_emb = image_emb.to(dtype), text_emb.to(dtype)
    if normalize:
        image_emb = F.normalize(image_emb, dim=-1)
        text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.to(dtype) * (image_emb @ text_emb.T)
    if logit_bias is not None:
        logits = logits + logit_bias.to(dtype)
    return torch.where(torch.isfinite(logits), logits, torch.nan)


def group_labels(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (N,) int32, counts (N,) int32) of N integer ids: equal ids get one label (the position
    of their group in the sorted ids, < N) and their group's size. A sort and two binary searches,
    O(N log N), no N × N and no host sync."""
    ordered = torch.sort(group_ids).values
    first = torch.searchsorted(ordered, group_ids)
    counts = torch.searchsorted(ordered, group_ids, right=True) - first
    return first.to(torch.int32), counts.to(torch.int32)


def group_counts(group_ids: torch.Tensor) -> torch.Tensor:
    """(N,) int64: how many of the N ids equal each one (its group's size)."""
    return group_labels(group_ids)[1].to(torch.int64)


def _group_targets(group_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives (N, N) bool, rows' targets (N, N)): pair (i, j) is positive when g_i = g_j; row i's
    target spreads 1 uniformly over its positives. The columns' targets are the transpose."""
    positives = group_ids[:, None] == group_ids[None, :]
    return positives, positives.to(dtype) / group_counts(group_ids).to(dtype)[:, None]


def _distinct(group_ids) -> torch.Tensor:
    """0-dim bool: whether every id is its own group (the targets are then the diagonal's)."""
    return (group_counts(group_ids) == 1).all()


def _same_bits_when_distinct(group_ids, grouped: torch.Tensor, diagonal) -> torch.Tensor:
    """`grouped` (the loss with group targets), or the diagonal's loss when the ids are all distinct,
    so that they give the same bits as group_ids=None. `diagonal` is a function computing it. Eager
    code decides on the host; under torch.compile both are computed and torch.where picks (no
    data-dependent branch; the branch not taken adds exact zeros to the gradients)."""
    if torch.compiler.is_compiling():
        return torch.where(_distinct(group_ids), diagonal(), grouped)
    return diagonal() if bool(_distinct(group_ids)) else grouped


def _soft_cross_entropy(logits, group_ids, n_extra: int, label_smoothing: float) -> torch.Tensor:
    """F.cross_entropy of the rows of logits (N, N + n_extra) against the group targets of the first
    N columns (the n_extra last columns are negatives only), label smoothing over all N + n_extra."""
    n = logits.shape[0]
    labels = torch.arange(n, device=logits.device)
    if group_ids is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    _, targets = _group_targets(group_ids, logits.dtype)
    grouped = F.cross_entropy(logits, F.pad(targets, (0, n_extra)), label_smoothing=label_smoothing)
    return _same_bits_when_distinct(
        group_ids, grouped, lambda: F.cross_entropy(logits, labels, label_smoothing=label_smoothing))


def clip_loss(image_emb, text_emb, logit_scale, normalize: bool = False, label_smoothing: float = 0.0,
              group_ids=None, extra_text=None):
    """CLIP's symmetric InfoNCE: (CE(rows of S) + CE(columns of S)) / 2 with targets arange(N), or with
    group_ids (N,) the uniform targets over each row's (column's) positives, the pairs of its group.

    image_emb, text_emb: (N, D); logit_scale: 0-dim tensor (already exponentiated). extra_text (K, D):
    more columns of the rows' cross-entropy (image to text), negatives of every row. Returns a scalar.
    """
    if extra_text is None and group_ids is None:
        logits = clip_logits(image_emb, text_emb, logit_scale, normalize)
        labels = torch.arange(logits.shape[0], device=logits.device)
        rows = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        cols = F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)
        return (rows + cols) / 2
    n = image_emb.shape[0]
    columns = text_emb if extra_text is None else torch.cat([text_emb, extra_text])
    logits = clip_logits(image_emb, columns, logit_scale, normalize)
    rows = _soft_cross_entropy(logits, group_ids, columns.shape[0] - n, label_smoothing)
    cols = _soft_cross_entropy(logits[:, :n].T, group_ids, 0, label_smoothing)
    return (rows + cols) / 2


def _siglip_labels(m: int, n: int, offset: int | None, like: torch.Tensor, groups=None) -> torch.Tensor:
    """(m, n): +1 at (i, offset + i), -1 elsewhere (everywhere when offset is None: no positives);
    with groups (BlockGroups), +1 where the row's and the column's ids are equal."""
    if groups is not None:
        return torch.where(_block_positives(m, n, offset, groups, n, like.device), 1.0, -1.0).to(like.dtype)
    labels = torch.full((m, n), -1.0, dtype=like.dtype, device=like.device)
    if offset is not None:
        rows = torch.arange(m, device=like.device)
        labels[rows, offset + rows] = 1.0
    return labels


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias, normalize: bool = False, group_ids=None):
    """SigLIP's sigmoid loss: -Σ_ij log σ(label_ij · S_ij) / N, label +1 on the diagonal (with
    group_ids (N,): wherever g_i = g_j), -1 elsewhere.

    S = logit_scale · image_emb @ text_emb.T + logit_bias; image_emb, text_emb: (N, D). Returns a scalar.
    """
    logits = clip_logits(image_emb, text_emb, logit_scale, normalize, logit_bias)
    n = logits.shape[0]
    diagonal = lambda: -F.logsigmoid(_siglip_labels(n, n, 0, logits) * logits).sum() / n  # noqa: E731
    if group_ids is None:
        return diagonal()
    labels = torch.where(_group_targets(group_ids, logits.dtype)[0], 1.0, -1.0).to(logits.dtype)
    return _same_bits_when_distinct(group_ids, -F.logsigmoid(labels * logits).sum() / n, diagonal)


def info_nce_loss(query, keys, logit_scale, normalize: bool = False, label_smoothing: float = 0.0,
                  group_ids=None, extra_keys=None):
    """One-directional InfoNCE: mean_i CE(logit_scale · query_i @ keys.T, target i), F.cross_entropy's
    value (label smoothing included); with group_ids (N,) row i's target spreads uniformly over the
    keys of its group; extra_keys (K, D): more columns, negatives of every query.
    query, keys: (N, D); logit_scale: 0-dim tensor. Returns a scalar.
    """
    columns = keys if extra_keys is None else torch.cat([keys, extra_keys])
    logits = clip_logits(query, columns, logit_scale, normalize)
    return _soft_cross_entropy(logits, group_ids, columns.shape[0] - query.shape[0], label_smoothing)


# The block-row functions: rows offset .. offset+M-1 of the global batch (image_emb (M, D)) against
# all columns (text_emb (N, D)); the positive of row i sits at column offset + i. The CPU path of
# the block API (mmkernels.ops.contrastive) and the tests' oracle for its kernels. No autograd graph
# is returned: gradients come out explicitly, as the kernels give them.


def _lse_float64(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """The log-sum-exp of `logits` along `dim` (which is not empty), in float64: max + log Σ exp(S - max)
    with the max exact, so that exp(S - lse) (see _minus_lse) is as exact as a softmax."""
    top = logits.amax(dim, keepdim=True)
    top = torch.where(top == float("-inf"), 0.0, top)
    return (top.double() + torch.log(torch.exp(logits - top).sum(dim, keepdim=True)).double()).squeeze(dim)


def _minus_lse(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """logits - lse in logits' dtype, for a float64 lse (broadcast against logits) split as hi + lo: exact
    where a logit is near its lse (P ≈ 1), where an fp32 lse would lose u·|lse| in every P."""
    hi = lse.to(logits.dtype)
    lo = torch.where(hi.isinf(), 0.0, (lse.double() - hi.double()).to(logits.dtype))
    return (logits - hi) - lo


def _block_positives(m: int, n: int, offset: int | None, groups, n_pair: int, device) -> torch.Tensor:
    """(m, n) bool: the block's positive pairs. With groups (BlockGroups): row i and paired column
    j < n_pair with equal ids; else (i, offset + i), none for offset None."""
    positives = torch.zeros((m, n), dtype=torch.bool, device=device)
    if groups is not None:
        positives[:, :n_pair] = groups.row_ids[:, None] == groups.col_ids[None, :]
    elif offset is not None:
        rows = torch.arange(m, device=device)
        positives[rows, offset + rows] = True
    return positives


def clip_block_stats(image_emb, text_emb, logit_scale, offset: int | None, normalize: bool, groups=None,
                     n_pair: int | None = None):
    """(row_lse (M,), col_max (N,), col_sumexp (N,), diag (M,), row_sum (M,), extra_sum (M,) or None) of
    the block's logits, row_lse in float64 (see _minus_lse), the others in the compute dtype.

    col_sumexp_j = Σ_i exp(S_ij - col_max_j); an empty block (M = 0) gives col_max = -inf, col_sumexp = 0.
    diag_i = S[i, offset + i] (0 for offset None), or with groups Σ over row i's positives of S_ij / its
    group's size; row_sum_i = Σ_{j < n_pair} S_ij; extra_sum_i = Σ_{j >= n_pair} S_ij when n_pair < N.
    """
    with torch.no_grad():
        logits = clip_logits(image_emb, text_emb, logit_scale, normalize)
        m, n = logits.shape
        n_pair = n if n_pair is None else n_pair
        row_lse = _lse_float64(logits, 1)
        if m == 0:
            col_max = torch.full((n,), float("-inf"), dtype=logits.dtype, device=logits.device)
            col_sumexp = torch.zeros(n, dtype=logits.dtype, device=logits.device)
        else:
            col_max = logits.max(dim=0).values
            col_sumexp = torch.exp(logits - col_max).sum(dim=0)
        rows = torch.arange(m, device=logits.device)
        if groups is not None:
            positives = _block_positives(m, n, offset, groups, n_pair, logits.device)
            diag = torch.where(positives, logits, 0.0).sum(dim=1) / groups.row_count.to(logits.dtype)
        elif offset is None:
            diag = logits.new_zeros(m)
        else:
            diag = logits[rows, offset + rows]
        if n_pair == n:
            return row_lse, col_max, col_sumexp, diag, logits.sum(dim=1), None
        return (row_lse, col_max, col_sumexp, diag, logits[:, :n_pair].sum(dim=1),
                logits[:, n_pair:].sum(dim=1))


def merge_column_stats(col_max, col_sumexp):
    """Column log-sum-exps (N,) float64 from P blocks' partial statistics col_max, col_sumexp (P, N).

    Blocks whose columns are all -inf (or P = 0) add nothing; all of them so gives -inf; a NaN or
    +inf statistic gives NaN. One fixed reduction order: the same inputs give the same bits.
    """
    col_max, col_sumexp = col_max.double(), col_sumexp.double()
    if col_max.shape[0] == 0:
        return torch.full(col_max.shape[1:], float("-inf"), dtype=col_max.dtype, device=col_max.device)
    top = col_max.max(dim=0).values
    top = torch.where(top == float("-inf"), 0.0, top)
    return top + torch.log((col_sumexp * torch.exp(col_max - top)).sum(dim=0))


def _leaves(*tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def clip_block_grads(image_emb, text_emb, logit_scale, row_lse, col_lse, offset: int | None, n_total: int,
                     label_smoothing: float, normalize: bool, image_grad: bool, text_grad: bool,
                     grad_output=None, groups=None, n_pair: int | None = None, row_classes: int | None = None,
                     directions: int = 2):
    """This block's share of the gradients of the global CLIP loss over n_total pairs (directions=1:
    the one-directional InfoNCE's, the rows' cross-entropy only).

    dL/dS_ij = ((P^row_ij - t^row_ij) + (P^col_ij - t^col_ij)) / (2·n_total), with P^row_ij = exp(S_ij - row_lse_i),
    P^col_ij = exp(S_ij - col_lse_j), t^row_ij = (1-eps)·[j = offset+i] + eps/row_classes, t^col_ij =
    (1-eps)·[j = offset+i] + eps/n_total, times grad_output (default 1); with groups the positive's 1 is
    spread over the row's (column's) positives, 1/group size each. Columns j >= n_pair (extra negatives)
    have no column term. Each direction's target comes off its own softmax, in that order, as the eager
    cross-entropy's backward does it (P^row + P^col ≈ 2 at a dominant positive would round first).
    Returns (d image_emb (M, D) or None, d text_emb (N, D) or None, d logit_scale ()).
    """
    dtype = reference_dtype(image_emb)
    a, b, scale = _leaves(image_emb, text_emb, logit_scale, dtype=dtype)
    with torch.enable_grad():
        logits = clip_logits(a, b, scale, normalize)
        m, n = logits.shape
        rows = torch.arange(m, device=logits.device)
        with torch.no_grad():
            if groups is None and n_pair in (None, n) and row_classes in (None, n_total) and directions == 2:
                targets = torch.full_like(logits, label_smoothing / n_total)
                if offset is not None:
                    targets[rows, offset + rows] += 1 - label_smoothing
                w = ((torch.exp(_minus_lse(logits, row_lse[:, None])) - targets)
                     + (torch.exp(_minus_lse(logits, col_lse[None, :])) - targets))
            else:
                n_pair = n if n_pair is None else n_pair
                row_classes = n_total if row_classes is None else row_classes
                positives = _block_positives(m, n, offset, groups, n_pair, logits.device).to(logits.dtype)
                row_share = positives if groups is None else positives / groups.row_count.to(dtype)[:, None]
                w = torch.exp(_minus_lse(logits, row_lse[:, None])) - (
                    (1 - label_smoothing) * row_share + label_smoothing / row_classes)
                if directions == 2:
                    col_share = positives[:, :n_pair]
                    if groups is not None:
                        col_share = col_share / groups.col_count.to(dtype)[None, :]
                    w[:, :n_pair] += torch.exp(_minus_lse(logits[:, :n_pair], col_lse[None, :n_pair])) - (
                        (1 - label_smoothing) * col_share + label_smoothing / n_total)
            d_logits = w / (directions * n_total)
            if grad_output is not None:
                d_logits = d_logits * grad_output.to(dtype)
        d_image, d_text, d_scale = torch.autograd.grad(logits, (a, b, scale), d_logits, allow_unused=True)
    d_image = d_image if d_image is not None else torch.zeros_like(a)
    d_text = d_text if d_text is not None else torch.zeros_like(b)
    return (d_image if image_grad else None), (d_text if text_grad else None), d_scale


def siglip_block(image_emb, text_emb, logit_scale, logit_bias, offset: int | None, n_total: int,
                 normalize: bool, image_grad: bool, text_grad: bool, scalar_grads: bool, groups=None):
    """This block's share of the global SigLIP loss, -Σ_ij log σ(label_ij · S_ij) / n_total over its
    rows, and, when asked, of its gradients; offset None: a block without positives (every label
    -1, the rows against another rank's columns); with groups (BlockGroups), +1 where the ids are equal.
    Returns (loss (), d image_emb (M, D) or None,
    d text_emb (N, D) or None, d logit_scale () or None, d logit_bias () or None)."""
    dtype = reference_dtype(image_emb)
    a, b, scale, bias = _leaves(image_emb, text_emb, logit_scale, logit_bias, dtype=dtype)
    with torch.enable_grad():
        logits = clip_logits(a, b, scale, normalize, bias)
        m, n = logits.shape
        loss = -F.logsigmoid(_siglip_labels(m, n, offset, logits, groups) * logits).sum() / n_total
        if image_grad or text_grad or scalar_grads:
            grads = torch.autograd.grad(loss, (a, b, scale, bias), allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for t, g in zip((a, b, scale, bias), grads)]
        else:
            grads = [None] * 4
    wanted = (image_grad, text_grad, scalar_grads, scalar_grads)
    return (loss.detach(),) + tuple(g if want else None for g, want in zip(grads, wanted))
