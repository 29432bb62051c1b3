"""Contrastive losses without the N×N logit matrix: CLIP's symmetric InfoNCE, SigLIP's sigmoid loss
and the one-directional InfoNCE.

All are functions of the logits S = logit_scale · x @ y.T (+ logit_bias), x and y the embeddings
(L2-normalised inside the op with normalize=True). Everything here works on a block row of S:
image rows offset .. offset+M-1 of a batch of n_total pairs against all N text columns. The
single-GPU losses are the block with M = N, offset = 0; the multi-GPU losses (mmkernels.distributed)
are built from the same block functions, one block per process.

Work, counted in matrix FLOPs (the three products of the loss need 6·N²·D for forward + backward):
- CLIP, 8·N²·D: the forward computes every logit once (2·N²·D) for the row and column
  log-sum-exps; the backward computes every logit once more (2·N²·D) into W = 2N·dL/dS and runs
  the two products W·text and W.T·image (2·N²·D each), one per embedding that needs a gradient.
- InfoNCE (one direction, the rows of S), 8·N²·D: as CLIP with the rows' statistics alone; the
  backward's W = N·dL/dS = P^row - t.
- SigLIP, 6·N²·D: no normaliser, so one pass computes every logit once and yields the loss and W;
  when a gradient will be needed the products run in the same forward, and the backward only
  scales by the incoming gradient. Without gradients the forward is 2·N²·D.
Memory: O((N + M)·D) and a workspace of at most `workspace_bytes` (plan.py).

The package: kernels.py (the Triton kernels), plan.py (tiles, workspace, grids), launch.py (the
launchers), registered.py (the torch.library ops), reference.py (plain PyTorch). The public
functions here check their arguments once; the `*_unchecked` entries take arguments that are
already checked and normalised (a 0-dim fp32 scale tensor on the embeddings' device, bools, a
float label_smoothing, a resolved workspace_bytes), for callers that checked them
(mmkernels.distributed).

CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) take the kernels; other CPU tensors, bf16 on
the CPU and float64 take reference.py (the decision: mmkernels.ops._dispatch.uses_kernels). Under
torch.autocast every function here computes as without it (autocast off for its work, forward and
backward): the contract's fp32 accumulation and dtypes.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from mmkernels.ops._args import (
    check_bool,
    check_embedding_pair,
    check_float_tensor,
    check_same_device,
    scalar_tensor,
)
from mmkernels.ops._common import autocast_off, without_autocast
from mmkernels.ops._dispatch import uses_kernels
from mmkernels.ops.contrastive import plan, reference, registered  # noqa: F401  (registered: registers the ops)
from mmkernels.ops.contrastive.launch import clip_loss_from_stats  # noqa: F401  (for mmkernels.distributed)
from mmkernels.ops.contrastive.plan import (  # noqa: F401  (the workspace's default and variable, reachable here)
    DEFAULT_WORKSPACE_BYTES,
    WORKSPACE_ENV,
    resolve_workspace_bytes,
)

__all__ = [
    "clip_loss",
    "siglip_loss",
    "info_nce_loss",
    "ClipBlockStats",
    "ClipBlockGrads",
    "BlockGroups",
    "SiglipBlock",
    "clip_block_stats",
    "merge_column_stats",
    "clip_block_grads",
    "siglip_block",
]


# --------------------------------------------------------------------------- argument checks


def check_label_smoothing(label_smoothing) -> float:
    """label_smoothing as a float in [0, 1]; TypeError or ValueError naming it otherwise."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(
            f"expected label_smoothing to be a float in [0, 1], got {type(label_smoothing).__name__}"
        )
    value = float(label_smoothing)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"expected label_smoothing in [0, 1], got {label_smoothing}")
    return value


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"expected {name} to be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"expected {name} >= {minimum}, got {value}")


def _check_pairs(image_emb, text_emb, names=("image_emb", "text_emb"), what: str = "pairs N",
                 empty: str = "expected at least one pair, got N = 0") -> None:
    check_embedding_pair(image_emb, text_emb, names, same_rows=what)
    if image_emb.shape[0] == 0:
        raise ValueError(empty)


def _check_block(image_emb, text_emb, offset, n_total=None, *, positives_optional: bool = False) -> None:
    check_embedding_pair(image_emb, text_emb, ("image_emb", "text_emb"), ("M", "N"))
    if text_emb.shape[0] == 0:
        raise ValueError("expected text_emb to hold at least one column, got N = 0")
    if offset is None and positives_optional:  # a block without positives: any M against any N
        if n_total is not None:
            _check_int("n_total", n_total, 1)
        return
    _check_int("offset", offset, 0)
    m, n = image_emb.shape[0], text_emb.shape[0]
    if offset + m > n:
        raise ValueError(
            f"expected offset + M <= N (row i's positive is column offset + i), got offset {offset}, "
            f"M {m}, N {n}"
        )
    if n_total is not None:
        _check_int("n_total", n_total, 1)


def check_group_ids(group_ids, n: int, like: torch.Tensor, name: str = "group_ids") -> torch.Tensor | None:
    """group_ids as an int64 (n,) tensor on like's device (None stays None); TypeError or ValueError naming it."""
    if group_ids is None:
        return None
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"expected {name} to be None or an integer torch.Tensor of shape ({n},), "
                        f"got {type(group_ids).__name__}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise TypeError(f"expected {name} to be an integer tensor (one id per pair), got dtype {group_ids.dtype}")
    if tuple(group_ids.shape) != (n,):
        raise ValueError(f"expected {name} of shape ({n},) (one id per pair), got {tuple(group_ids.shape)}")
    if group_ids.device != like.device:
        raise ValueError(f"expected {name} on the embeddings' device {like.device}, got {group_ids.device}")
    return group_ids.detach().to(torch.int64).contiguous()


def check_extra(name: str, extra, like: torch.Tensor, like_name: str) -> None:
    """extra (K, D): None, or a float tensor with like's D, dtype and device (K may be 0)."""
    if extra is None:
        return
    check_embedding_pair(like, extra, (like_name, name), ("N", "K"))


def group_labels(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (N,) int32, counts (N,) int32) of N integer ids: one label per distinct id and each
    id's group size (O(N log N), no N × N, no host sync). The kernels compare int32 labels (int64 ids
    work too, at more registers)."""
    return reference.group_labels(group_ids)


def group_counts(group_ids: torch.Tensor) -> torch.Tensor:
    """(N,) int64: the size of each id's group among the N ids (O(N log N), no N × N)."""
    return reference.group_counts(group_ids)


class BlockGroups(NamedTuple):
    """The positives of a block by group id: row i and paired column j are positives of each other
    when row_ids[i] == col_ids[j]; a row's (a column's) target spreads over its positives, 1/its
    group's size each. The counts are over the whole batch (group_counts of all its ids).

    row_ids (M,), row_count (M,), col_ids (n_pair,), col_count (n_pair,): integer tensors on the block's
    device; best the int32 labels and counts of group_labels over the whole batch.
    """

    row_ids: torch.Tensor
    row_count: torch.Tensor
    col_ids: torch.Tensor
    col_count: torch.Tensor

    @classmethod
    def square(cls, group_ids: torch.Tensor) -> "BlockGroups":
        """The groups of a batch against itself (N rows and N paired columns)."""
        labels, counts = group_labels(group_ids)
        return cls(labels, counts, labels, counts)


def _check_stat(name: str, t, length: int, like: torch.Tensor) -> torch.Tensor:
    check_float_tensor(name, t, 1, f"({length},)")
    if t.shape[0] != length:
        raise ValueError(f"expected {name} of shape ({length},), got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"expected {name} on the inputs' device {like.device}, got {t.device}")
    return t.detach()


def _grad_flags(*tensors) -> list[bool]:
    """Which of these tensors a backward will need a gradient for (grad mode on and requires_grad)."""
    enabled = torch.is_grad_enabled()
    return [enabled and t.requires_grad for t in tensors]


# --------------------------------------------------------------------------- the block-row API


class ClipBlockStats(NamedTuple):
    """What one block row of S contributes to CLIP's softmax statistics (fp32 and row_lse float64;
    all float64 for float64 inputs). With S the block's logits (M, N):

    - row_lse (M,): log Σ_j exp(S_ij), complete (a block row holds whole rows). float64: its low
      bits set exp(S_ij - row_lse_i) where S_ij dominates its row, as exactly as a softmax does.
    - col_max (N,): max_i S_ij over the block's rows (-inf when M = 0).
    - col_sumexp (N,): Σ_i exp(S_ij - col_max_j) over the block's rows.
    - diag (M,): S[i, offset + i], the positives' logits (with groups, Σ over row i's positives of
      S_ij / its group's size: the row's target logit; 0 for a block without positives).
    - row_sum (M,): Σ_j S_ij over the paired columns, for label smoothing.
    - extra_sum (M,): Σ_j S_ij over the extra columns (j >= n_pair), or None without them.

    The global loss with smoothing eps: col_lse = merge_column_stats(stacked col_max, stacked
    col_sumexp) over all blocks, targets_i = (1 - eps)·diag_i + eps/n_total·row_sum_i, and
    loss = (Σ_i row_lse_i + Σ_j col_lse_j - 2·Σ_i targets_i) / (2·n_total), sums over all rows.
    """

    row_lse: torch.Tensor
    col_max: torch.Tensor
    col_sumexp: torch.Tensor
    diag: torch.Tensor
    row_sum: torch.Tensor
    extra_sum: torch.Tensor | None = None


class ClipBlockGrads(NamedTuple):
    """One block's contribution to the gradients of the global CLIP loss (fp32; float64 for float64).

    - image_grad (M, D): d loss / d image_emb for the block's rows, complete; None when not asked.
    - text_grad (N, D): the share of d loss / d text_emb that comes through the block's rows; the
      gradient is the sum of every block's share. None when not asked.
    - scale_grad (): the block's share of d loss / d logit_scale (a sum over blocks).
    """

    image_grad: torch.Tensor | None
    text_grad: torch.Tensor | None
    scale_grad: torch.Tensor


class SiglipBlock(NamedTuple):
    """One block's share of the global SigLIP loss and, when asked, of its gradients (fp32; float64
    for float64 inputs).

    - loss (): Σ over the block's rows i and all columns j of softplus(-label_ij · S_ij), / n_total.
    - image_grad (M, D): complete for the block's rows; None when not asked.
    - text_grad (N, D): the block's share (sum over blocks); None when not asked.
    - scale_grad, bias_grad (): the block's shares (sums over blocks); None when not asked.
    """

    loss: torch.Tensor
    image_grad: torch.Tensor | None
    text_grad: torch.Tensor | None
    scale_grad: torch.Tensor | None
    bias_grad: torch.Tensor | None


# The internal entries: the block functions on checked, normalised arguments (image_emb (M, D) and
# text_emb (N, D) checked as the public function checks them, logit_scale and logit_bias 0-dim
# tensors from scalar_tensor, bools, a float label_smoothing, an int workspace_bytes). No autograd.


def _kernel_block_args(groups, n_pair, n: int, like: torch.Tensor) -> dict:
    """The registered ops' optional group and extra-column arguments."""
    if groups is None:
        return dict(n_pair=n if n_pair is None else n_pair)
    return dict(row_ids=groups.row_ids, row_count=groups.row_count, col_ids=groups.col_ids,
                col_count=groups.col_count, n_pair=n if n_pair is None else n_pair)


def clip_block_stats_unchecked(image_emb, text_emb, scale, offset: int | None, normalize: bool,
                               workspace_bytes: int, *, groups: BlockGroups | None = None,
                               n_pair: int | None = None, columns: bool = True) -> ClipBlockStats:
    """clip_block_stats on checked arguments. offset None: the block holds no positives (another
    rank's columns); groups: the positives by group id (offset is then not read); n_pair: columns
    n_pair.. are extra negatives (extra_sum); columns=False: no column statistics (col_max and
    col_sumexp are None; one-directional InfoNCE)."""
    with autocast_off(image_emb):
        a, b, scale = image_emb.detach(), text_emb.detach(), scale.detach()
        n = b.shape[0]
        if not uses_kernels("clip_block_stats", a):
            stats = ClipBlockStats(*reference.clip_block_stats(a, b, scale, offset, normalize, groups, n_pair))
        else:
            plan.stats_workspace(a.shape[0], n, a.shape[1], a.dtype, a.device, workspace_bytes)
            out = torch.ops.mmkernels.clip_block_stats(
                a, b, scale, n if offset is None else offset, normalize, workspace_bytes,
                **_kernel_block_args(groups, n_pair, n, a))
            stats = ClipBlockStats(*out[:5], out[5] if n_pair not in (None, n) else None)
        if not columns:
            stats = stats._replace(col_max=None, col_sumexp=None)
        return stats


def clip_block_grads_unchecked(image_emb, text_emb, scale, row_lse, col_lse, offset: int | None, n_total: int,
                               label_smoothing: float, normalize: bool, image_grad: bool, text_grad: bool,
                               grad_output, workspace_bytes: int, *, groups: BlockGroups | None = None,
                               n_pair: int | None = None, row_classes: int | None = None,
                               directions: int = 2) -> ClipBlockGrads:
    """clip_block_grads on checked arguments (row_lse (M,), col_lse (n_pair,) and grad_output, a 0-dim
    tensor, on the embeddings' device). offset, groups, n_pair: as in clip_block_stats_unchecked;
    row_classes: the classes of the rows' label smoothing (default n_total; N + K with K extra
    columns); directions=1: the one-directional InfoNCE (rows only; col_lse is not read)."""
    with autocast_off(image_emb):
        a, b, scale, grad = image_emb.detach(), text_emb.detach(), scale.detach(), grad_output.detach()
        n = b.shape[0]
        row_lse = row_lse.detach()
        col_lse = row_lse if col_lse is None or directions == 1 else col_lse.detach()
        if not uses_kernels("clip_block_grads", a):
            return ClipBlockGrads(*reference.clip_block_grads(
                a, b, scale, row_lse, col_lse, offset, n_total, label_smoothing, normalize, image_grad, text_grad,
                grad, groups, n_pair, row_classes, directions))
        m, d = a.shape
        plan.panel_workspace(m, n, d, a.dtype, a.device, image_grad, text_grad, torch.float32,
                             workspace_bytes)
        d_image, d_text, d_scale = torch.ops.mmkernels.clip_block_grads(
            a, b, scale, row_lse.double().contiguous(), col_lse.double().contiguous(), grad,
            n if offset is None else offset, n_total, label_smoothing, normalize, image_grad, text_grad,
            torch.float32, workspace_bytes, row_classes=n_total if row_classes is None else row_classes,
            directions=directions, **_kernel_block_args(groups, n_pair, n, a),
        )
        return ClipBlockGrads(d_image if image_grad else None, d_text if text_grad else None, d_scale)


def siglip_block_unchecked(image_emb, text_emb, scale, bias, offset: int | None, n_total: int, normalize: bool,
                           image_grad: bool, text_grad: bool, scalar_grads: bool,
                           workspace_bytes: int, *, groups: BlockGroups | None = None) -> SiglipBlock:
    """siglip_block on checked arguments; groups: the positives by group id (offset is then not read)."""
    with autocast_off(image_emb):
        a, b, scale, bias = image_emb.detach(), text_emb.detach(), scale.detach(), bias.detach()
        if not uses_kernels("siglip_block", a):
            return SiglipBlock(*reference.siglip_block(
                a, b, scale, bias, offset, n_total, normalize, image_grad, text_grad, scalar_grads, groups))
        m, d = a.shape
        plan.panel_workspace(m, b.shape[0], d, a.dtype, a.device, image_grad, text_grad, torch.float32,
                             workspace_bytes)
        loss, d_image, d_text, d_scale, d_bias = torch.ops.mmkernels.siglip_block(
            a, b, scale, bias, b.shape[0] if offset is None else offset, n_total, normalize, image_grad, text_grad,
            scalar_grads, torch.float32, workspace_bytes, **_kernel_block_args(groups, None, b.shape[0], a),
        )
        return SiglipBlock(loss, d_image if image_grad else None, d_text if text_grad else None,
                           d_scale if scalar_grads else None, d_bias if scalar_grads else None)


def clip_block_stats(image_emb, text_emb, logit_scale, *, offset: int, normalize: bool,
                     workspace_bytes: int | None = None) -> ClipBlockStats:
    """CLIP's softmax statistics of one block row of S (see ClipBlockStats); no gradient.

    Args:
        image_emb: (M, D) the block's image embeddings (rows offset .. offset+M-1 of the batch; M may be 0).
        text_emb: (N, D) the text embeddings of all columns; same dtype and device. N >= offset + M.
        logit_scale: the multiplier (already exponentiated), a Python float or a 0-dim tensor.
        offset: the column of row 0's positive.
        normalize: L2-normalise both embeddings first.
        workspace_bytes: the kernels' workspace (see clip_loss).

    Work: 2·M·N·D (each logit computed once).
    """
    _check_block(image_emb, text_emb, offset)
    normalize = check_bool("normalize", normalize)
    scale = scalar_tensor("logit_scale", logit_scale, image_emb)
    return clip_block_stats_unchecked(image_emb, text_emb, scale, offset, normalize,
                                      resolve_workspace_bytes(workspace_bytes))


def merge_column_stats(col_max: torch.Tensor, col_sumexp: torch.Tensor) -> torch.Tensor:
    """Column log-sum-exps (N,) of the whole S from P blocks' partial statistics.

    Args:
        col_max, col_sumexp: (P, N), block p's ClipBlockStats.col_max and .col_sumexp in row p.

    Returns log Σ_p col_sumexp_p · exp(col_max_p), computed stably, in float64 (as row_lse).
    Deterministic (one fixed reduction order, no atomics); blocks with col_max = -inf add nothing
    (all of them: -inf); a NaN or +inf statistic gives NaN.
    """
    check_float_tensor("col_max", col_max, 2, "(P, N)")
    check_float_tensor("col_sumexp", col_sumexp, 2, "(P, N)")
    check_same_device([("col_max", col_max), ("col_sumexp", col_sumexp)])
    if col_max.shape != col_sumexp.shape:
        raise ValueError(
            f"expected col_max and col_sumexp of one shape (P, N), got {tuple(col_max.shape)} and "
            f"{tuple(col_sumexp.shape)}"
        )
    return reference.merge_column_stats(col_max, col_sumexp)


def clip_block_grads(image_emb, text_emb, logit_scale, row_lse, col_lse, *, offset: int, n_total: int,
                     label_smoothing: float, normalize: bool, image_grad: bool, text_grad: bool,
                     grad_output=None, workspace_bytes: int | None = None) -> ClipBlockGrads:
    """One block's contribution to the gradients of the global CLIP loss (see ClipBlockGrads).

    The global loss is the one a single process computes over all n_total pairs
    (`clip_loss(all_images, all_texts, logit_scale, ...)`); its gradients are the sums of every
    block's contributions (image rows: each block gives its own rows, complete).

    Args:
        image_emb (M, D), text_emb (N, D), logit_scale, offset, normalize: as in clip_block_stats.
        row_lse: (M,) the block's row log-sum-exps (ClipBlockStats.row_lse).
        col_lse: (N,) the global column log-sum-exps (merge_column_stats over all blocks).
            Both are read as float64; rounded to fp32 they cost the gradients u·|lse| relative
            error (see ClipBlockStats.row_lse).
        n_total: the number of pairs in the global batch (the loss is a mean over 2·n_total terms).
        label_smoothing: eps in [0, 1], as in clip_loss.
        image_grad, text_grad: which embedding gradients to compute; a side not asked costs no
            matrix product and comes back as None.
        grad_output: the gradient of the global loss, a 0-dim tensor or float (default 1); every
            result is scaled by it.
        workspace_bytes: the kernels' workspace (see clip_loss).

    Work: 2·M·N·D to compute the block's logits once more, plus 2·M·N·D per side asked.
    """
    _check_block(image_emb, text_emb, offset, n_total)
    eps = check_label_smoothing(label_smoothing)
    normalize = check_bool("normalize", normalize)
    image_grad, text_grad = check_bool("image_grad", image_grad), check_bool("text_grad", text_grad)
    row_lse = _check_stat("row_lse", row_lse, image_emb.shape[0], image_emb)
    col_lse = _check_stat("col_lse", col_lse, text_emb.shape[0], image_emb)
    scale = scalar_tensor("logit_scale", logit_scale, image_emb)
    grad = scalar_tensor("grad_output", 1.0 if grad_output is None else grad_output, image_emb)
    return clip_block_grads_unchecked(image_emb, text_emb, scale, row_lse, col_lse, offset, n_total, eps, normalize,
                                      image_grad, text_grad, grad, resolve_workspace_bytes(workspace_bytes))


def siglip_block(image_emb, text_emb, logit_scale, logit_bias, *, offset: int | None, n_total: int,
                 normalize: bool, image_grad: bool, text_grad: bool, scalar_grads: bool = True,
                 workspace_bytes: int | None = None) -> SiglipBlock:
    """One block's share of the global SigLIP loss and of its gradients (see SiglipBlock); no autograd.

    The global loss is siglip_loss over all n_total pairs: the sum of every block's loss; its
    gradients are the sums of every block's shares (image rows: complete per block).

    A block may also be a sub-block of columns: rows against some other rows' texts (the ring
    modes of mmkernels.distributed pass each rank's texts to every rank). Such a
    block holds no positive: offset=None gives it, every label -1, loss Σ_ij softplus(S_ij) / n_total
    (= Σ_ij -log σ(-S_ij) / n_total), at the same cost as a block with positives.

    Args:
        image_emb (M, D), text_emb (N, D), logit_scale, normalize: as in clip_block_stats.
        offset: the column of row 0's positive (offset + M <= N), or None: the block has no
            positives (then any M >= 0 against any N >= 1).
        logit_bias: the additive bias, a Python float or a 0-dim tensor.
        n_total: the number of pairs in the global batch (the loss is divided by it).
        image_grad, text_grad: which embedding gradients to compute; a side not asked costs no
            matrix product and comes back as None.
        scalar_grads: also compute the shares of d logit_scale and d logit_bias (no extra
            product: they come out of the same pass); None when False.
        workspace_bytes: the kernels' workspace (see clip_loss).

    Work: 2·M·N·D for the loss (each logit computed once), plus 2·M·N·D per side asked.
    """
    _check_block(image_emb, text_emb, offset, n_total, positives_optional=True)
    normalize = check_bool("normalize", normalize)
    image_grad, text_grad = check_bool("image_grad", image_grad), check_bool("text_grad", text_grad)
    scalar_grads = check_bool("scalar_grads", scalar_grads)
    scale = scalar_tensor("logit_scale", logit_scale, image_emb)
    bias = scalar_tensor("logit_bias", logit_bias, image_emb)
    return siglip_block_unchecked(image_emb, text_emb, scale, bias, offset, n_total, normalize, image_grad,
                                  text_grad, scalar_grads, resolve_workspace_bytes(workspace_bytes))


# --------------------------------------------------------------------------- the losses
# The internal entries: checked, normalised arguments as for the block functions; autograd flows
# to the embeddings and to the scale (and bias) tensors.


def _cross_entropy_kernels(rows, cols, scale, normalize: bool, label_smoothing: float, workspace_bytes: int,
                           group_ids, extra, *, columns: bool) -> torch.Tensor:
    """The kernels' CLIP loss (columns=True, torch.ops.mmkernels.clip_loss_fwd) or one-directional
    InfoNCE (columns=False, info_nce_fwd) of rows (N, D) against cols (N, D) and extra (K, D) or None,
    after checking that the workspace holds every pass the call runs."""
    with autocast_off(rows):
        n, d = rows.shape
        k = 0 if extra is None else extra.shape[0]
        row_grad, col_grad, scale_grad = _grad_flags(rows, cols, scale)
        extra_grad = extra is not None and _grad_flags(extra)[0]
        grads = row_grad or col_grad or scale_grad or (k > 0 and extra_grad)
        col_grad = col_grad or extra_grad  # the extras' gradient comes out of the columns' pass
        plan.check_call_workspace(n, n + k, d, rows.dtype, rows.device, workspace_bytes, stats=True, columns=columns,
                                  panel=(row_grad, col_grad, rows.dtype) if grads else None)
        op = torch.ops.mmkernels.clip_loss_fwd if columns else torch.ops.mmkernels.info_nce_fwd
        return op(rows, cols, scale, normalize, label_smoothing, workspace_bytes, group_ids, extra)[0]


def clip_loss_unchecked(image_emb, text_emb, scale, normalize: bool, label_smoothing: float,
                        workspace_bytes: int, group_ids=None, extra_text=None) -> torch.Tensor:
    """clip_loss on checked arguments (group_ids: None or int64 (N,); extra_text: None or (K, D))."""
    if not uses_kernels("clip_loss", image_emb):
        return without_autocast(reference.clip_loss, image_emb, text_emb, scale, normalize, label_smoothing,
                                group_ids, extra_text)
    return _cross_entropy_kernels(image_emb, text_emb, scale, normalize, label_smoothing, workspace_bytes,
                                  group_ids, extra_text, columns=True)


def siglip_loss_unchecked(image_emb, text_emb, scale, bias, normalize: bool, workspace_bytes: int,
                          group_ids=None) -> torch.Tensor:
    """siglip_loss on checked arguments (group_ids: None or int64 (N,))."""
    if not uses_kernels("siglip_loss", image_emb):
        return without_autocast(reference.siglip_loss, image_emb, text_emb, scale, bias, normalize, group_ids)
    with autocast_off(image_emb):
        n, d = image_emb.shape
        image_grad, text_grad, scale_grad, bias_grad = _grad_flags(image_emb, text_emb, scale, bias)
        plan.check_call_workspace(n, n, d, image_emb.dtype, image_emb.device, workspace_bytes,
                                  panel=(image_grad, text_grad, image_emb.dtype))
        groups = {} if group_ids is None else _kernel_block_args(BlockGroups.square(group_ids), None, n, image_emb)
        return torch.ops.mmkernels.siglip_block(
            image_emb, text_emb, scale, bias, 0, n, normalize, image_grad, text_grad, scale_grad or bias_grad,
            image_emb.dtype, workspace_bytes, **groups,
        )[0]


def info_nce_loss_unchecked(query, keys, scale, normalize: bool, label_smoothing: float,
                            workspace_bytes: int, group_ids=None, extra_keys=None) -> torch.Tensor:
    """info_nce_loss on checked arguments (group_ids: None or int64 (N,); extra_keys: None or (K, D))."""
    if not uses_kernels("info_nce_loss", query):
        return without_autocast(reference.info_nce_loss, query, keys, scale, normalize, label_smoothing,
                                group_ids, extra_keys)
    return _cross_entropy_kernels(query, keys, scale, normalize, label_smoothing, workspace_bytes, group_ids,
                                  extra_keys, columns=False)


def clip_loss(image_emb, text_emb, logit_scale, *, normalize: bool = False, label_smoothing: float = 0.0,
              workspace_bytes: int | None = None, group_ids=None, extra_text=None):
    """CLIP's symmetric InfoNCE loss, as Hugging Face `clip_loss` and open_clip `ClipLoss` compute it.

    Args:
        image_emb: (N, D) image embeddings; pair i is the positive of row i and of column i.
        text_emb: (N, D) text embeddings, same dtype and device.
        logit_scale: the multiplier, already exponentiated (`model.logit_scale.exp()`): a Python
            float or a 0-dim tensor. A tensor that requires grad gets its gradient.
        normalize: L2-normalise both inputs inside the op (forward and backward).
        label_smoothing: as in `F.cross_entropy`, a float in [0, 1].
        workspace_bytes: the most bytes the kernels allocate beyond O(N·D) buffers (default
            $MMKERNELS_WORKSPACE_BYTES, else 256 MiB); S is processed in row panels that fit it.
            Too small for one block of rows raises a ValueError naming the minimum for every pass
            the call runs (forward and backward).
        group_ids: None, or (N,) integer ids: pairs with the same id are positives of each other (a
            repeated caption, several captions of one image). Row i's target spreads uniformly over
            the columns of its group (1/|group| each), and each column's over the rows of its group.
            None: pair i alone (the diagonal).
        extra_text: None, or (K, D) more text columns (hard negatives, NegCLIP's loss): negatives of
            every image row, in the image-to-text cross-entropy only (softmax over N + K columns,
            label smoothing over N + K classes); the text-to-image direction keeps its N columns.
            Same dtype and device; gradients reach it.

    Returns:
        () float32 tensor: (CE(rows of S) + CE(columns of S)) / 2 with S = logit_scale · image_emb @ text_emb.T.
        An Inf or NaN among the inputs gives NaN. On CUDA (or under TRITON_INTERPRET=1) S is never
        materialised; forward + backward compute 8·N²·D matrix FLOPs (6·N²·D with one tower frozen),
        the same with group_ids (the kernels compare the ids per tile), and 8·N·(N + K)·D with extra_text.
    """
    _check_pairs(image_emb, text_emb)
    label_smoothing = check_label_smoothing(label_smoothing)
    normalize = check_bool("normalize", normalize)
    scale = scalar_tensor("logit_scale", logit_scale, image_emb)
    group_ids = check_group_ids(group_ids, image_emb.shape[0], image_emb)
    check_extra("extra_text", extra_text, image_emb, "image_emb")
    return clip_loss_unchecked(image_emb, text_emb, scale, normalize, label_smoothing,
                               resolve_workspace_bytes(workspace_bytes), group_ids, extra_text)


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias, *, normalize: bool = False,
                workspace_bytes: int | None = None, group_ids=None):
    """SigLIP's pairwise sigmoid loss, as Hugging Face `SiglipModel` computes it.

    Args:
        image_emb: (N, D) image embeddings; pair i is the positive of row i and of column i.
        text_emb: (N, D) text embeddings, same dtype and device.
        logit_scale: the multiplier, already exponentiated; a Python float or a 0-dim tensor.
        logit_bias: the additive bias; a Python float or a 0-dim tensor.
        normalize: L2-normalise both inputs inside the op (forward and backward).
        workspace_bytes: as in clip_loss.
        group_ids: None, or (N,) integer ids: label +1 for every pair (i, j) with the same id
            (multiple positives per row), -1 elsewhere. None: +1 on the diagonal only.

    Returns:
        () float32 tensor: -Σ_ij log σ(label_ij · S_ij) / N with S = logit_scale · image_emb @ text_emb.T
        + logit_bias, label +1 on the diagonal (or within a group) and -1 elsewhere. Gradients reach both embeddings,
        logit_scale and logit_bias. An Inf or NaN among the inputs gives NaN. When grad mode is on
        and an input requires grad, the gradients are computed in this forward pass (the backward
        only scales them): 6·N²·D matrix FLOPs in all, 2·N²·D without gradients.
    """
    _check_pairs(image_emb, text_emb)
    normalize = check_bool("normalize", normalize)
    scale = scalar_tensor("logit_scale", logit_scale, image_emb)
    bias = scalar_tensor("logit_bias", logit_bias, image_emb)
    group_ids = check_group_ids(group_ids, image_emb.shape[0], image_emb)
    return siglip_loss_unchecked(image_emb, text_emb, scale, bias, normalize, resolve_workspace_bytes(workspace_bytes),
                                 group_ids)


def info_nce_loss(query, keys, logit_scale, *, normalize: bool = False, label_smoothing: float = 0.0,
                  workspace_bytes: int | None = None, group_ids=None, extra_keys=None):
    """One-directional InfoNCE: `F.cross_entropy(logit_scale · query @ keys.T, arange(N))`, without S.

    Args:
        query: (N, D) the rows of S; key i is the positive of query i, every other key a negative.
        keys: (N, D), same dtype and device.
        logit_scale: the multiplier, already exponentiated (`model.logit_scale.exp()`): a Python
            float or a 0-dim tensor. A tensor that requires grad gets its gradient.
        normalize: L2-normalise both inputs inside the op (forward and backward).
        label_smoothing: as in `F.cross_entropy`, a float in [0, 1].
        workspace_bytes: as in `mmkernels.clip_loss` (default $MMKERNELS_WORKSPACE_BYTES, else 256 MiB).
        group_ids: None, or (N,) integer ids: query i's target spreads uniformly over the keys with
            its id (false negatives become positives).
        extra_keys: None, or (K, D) more keys (hard negatives): negatives of every query (softmax
            over N + K keys, label smoothing over N + K classes); gradients reach them.

    Returns:
        () float32 tensor: mean_i CE(S_i, i) with S = logit_scale · query @ keys.T (CLIP's loss is the
        mean of this and its transpose: `(info_nce_loss(a, b, s) + info_nce_loss(b, a, s)) / 2`).
        An Inf or NaN among the inputs gives NaN. On CUDA (or under TRITON_INTERPRET=1) S is never
        materialised; forward + backward compute 8·N²·D matrix FLOPs (6·N²·D with one side frozen),
        the same with group_ids, and 8·N·(N + K)·D with extra_keys.
    """
    _check_pairs(query, keys, ("query", "keys"), "rows N (key i is query i's positive)",
                 "expected at least one query, got N = 0")
    label_smoothing = check_label_smoothing(label_smoothing)
    normalize = check_bool("normalize", normalize)
    scale = scalar_tensor("logit_scale", logit_scale, query)
    group_ids = check_group_ids(group_ids, query.shape[0], query)
    check_extra("extra_keys", extra_keys, query, "query")
    return info_nce_loss_unchecked(query, keys, scale, normalize, label_smoothing,
                                   resolve_workspace_bytes(workspace_bytes), group_ids, extra_keys)
