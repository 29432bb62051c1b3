"""Multi-GPU contrastive losses over torch.distributed: the exact loss of the global batch, each rank
doing 1/world_size of the work.

The usage is in the package's docstring (mmkernels/distributed/__init__.py).

Rank r holds M_r pairs (M_r may differ between ranks). The global batch is their concatenation in
rank order: N = Σ_r M_r pairs, rank r's rows start at offset_r = Σ_{q<r} M_q, and pair i's positive is
column i of the global logit matrix S (N, N) (with group ids: every column of the same id). CLIP
takes extra text rows too (K_r per rank, K = Σ K_r): columns N .. N+K-1 of S, negatives of every
row, in the image→text direction only. Rank r computes only the block row
S[offset_r : offset_r + M_r, :] with the block-row kernels of `mmkernels.ops.contrastive` (their
internal entries: the arguments are checked once, here, on every rank); no rank
ever holds more of S than the kernels' workspace, and nothing of size N² is communicated.

Work per rank (matrix FLOPs, as the kernels state them): CLIP 8·M_r·(N + K)·D (2 for the row and
column statistics, 6 for the gradients), SigLIP 6·M_r·N·D, in either mode. Memory per rank in the
gather mode: the global text (N + K, D), the fp32 partial text gradient (N + K, D), O(W·N) column
statistics, and the kernels' workspace; with group ids, the N int64 ids and their N fp32 inverse
counts (both modes: the counts need the whole batch).

mode="ring" (see clip_loss and siglip_loss) replaces steps 2 to 4 below by point-to-point messages
around the ring of ranks (ring.py): rank r's image rows meet one rank's text block at a time
(W blocks M_r × (M_q + K_q)), the next block's exchange overlapping the current block's compute,
and what is computed for a block's columns travels home behind it around the same ring: SigLIP's
text gradients in its one pass; CLIP's column statistics (max and Σ exp, merged on the way) in a
first pass, then, after one all_gather of W loss shares, its text gradients in a second pass of
the blocks with their column log-sum-exps. Memory O(max_r (M_r + K_r) · D) plus a workspace sized
against max_r (M_r + K_r) columns.

Communication per rank and call, W ranks, M = max_r M_r (each an ordinary torch.distributed
collective, so gloo on CPU and NCCL on GPU both run it):
1. The check: one all_gather of 16 int64 per rank (sizes, dtype, device type, which gradients,
   options, workspace, mode, extra rows, group ids or not), before any heavy collective, so that
   mismatched ranks or a workspace too small for one rank's block raise a clear error on every
   rank instead of leaving one waiting. With group ids: one all_gather of the N int64 ids.
2. The text rows: one all_gather of (M, D) in the embeddings' dtype (rows past M_r are padding
   when the M_r differ; with extra rows, each rank's M_r + K_r rows). The image rows never travel:
   the column statistics CLIP needs are reductions over rows, so each rank reduces its own rows
   and sends O(N) numbers.
3. CLIP: one all_gather of 2N + 1 fp32 (the block's per-column max and sum of exponentials over
   the paired columns, and its rows' share of the loss, from
   mmkernels.ops.contrastive.clip_loss_from_stats); every rank merges them in rank order, so all
   ranks hold the same column log-sum-exps to the bit. SigLIP: one all_gather of the ranks' loss
   shares (one fp32 each). Float64 embeddings send these (and the gradients of steps 4 and 5) in
   float64: float64 in, float64-exact out, as the single-process losses.
4. When some rank needs the text gradient: one reduce-scatter of the (N + K, D) fp32 partial text
   gradients (padded to W·M rows when the blocks differ), each rank receiving its own rows' sum.
   (gloo implements reduce-scatter as an all-reduce, twice the bytes; NCCL as a reduce-scatter.)
5. Only for the open_clip variants that give every rank the whole dL/dlogit_scale (nn.ClipLoss
   with local_loss=False): one all_gather of the ranks' scalar shares (one fp32 each).

The gradients are finished inside the forward, when some input needs them; the backward only
multiplies them by the upstream gradient and runs no collective, so a rank that skips the backward
cannot stall the others. The forward makes one host sync (the sizes from the check decide the
buffer shapes).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from mmkernels.distributed import ring
from mmkernels.distributed.plan import (
    MODES,
    SCALINGS,
    Plan,
    Scaling,
    all_gather_rows,
    check,
    embedding_checks,
    process_group,
    reduce_scatter_rows,
    runs_gradient_pass,
)
from mmkernels.ops import contrastive
from mmkernels.ops._args import scalar_tensor

__all__ = ["clip_loss", "info_nce_loss", "siglip_loss"]

GRAD_SCALINGS = ("ddp", "none")

# --------------------------------------------------------------------------- communication


def _gather_rows(local: torch.Tensor, plan: Plan, sizes: tuple | None = None) -> torch.Tensor:
    """All ranks' (sizes[r], ...) rows concatenated in rank order (default sizes: the M_r)."""
    sizes = plan.sizes if sizes is None else sizes
    local, tail = local.contiguous(), tuple(local.shape[1:])
    if min(sizes) == max(sizes):
        out = local.new_empty((sum(sizes), *tail))
        all_gather_rows(out, local, plan.group)
        return out
    width = max(sizes)
    padded = local.new_zeros((width, *tail))
    padded[: local.shape[0]] = local
    out = local.new_empty((plan.world_size * width, *tail))
    all_gather_rows(out, padded, plan.group)
    out = out.view(plan.world_size, width, *tail)
    return torch.cat([out[r, :m] for r, m in enumerate(sizes)])


def _scatter_sum_rows(partial: torch.Tensor, plan: Plan, sizes: tuple | None = None) -> torch.Tensor:
    """Sum the ranks' (Σ sizes, D) partials and hand each rank its own (sizes[rank], D) rows."""
    sizes = plan.sizes if sizes is None else sizes
    if min(sizes) == max(sizes):
        out = partial.new_empty((sizes[plan.rank], partial.shape[1]))
        reduce_scatter_rows(out, partial.contiguous(), plan.group)
        return out
    width = max(sizes)
    padded = partial.new_zeros((plan.world_size, width, partial.shape[1]))
    start = 0
    for r, m in enumerate(sizes):
        padded[r, :m] = partial[start: start + m]
        start += m
    out = partial.new_empty((width, partial.shape[1]))
    reduce_scatter_rows(out, padded.view(-1, partial.shape[1]), plan.group)
    return out[: sizes[plan.rank]]


def _block_order(plan: Plan) -> torch.Tensor:
    """The rows of the ranks' text blocks (M_r texts then K_r extras, in rank order) that make the
    global columns' order: every rank's texts (N), then every rank's extras (K)."""
    starts = [sum(plan.block_sizes[:r]) for r in range(plan.world_size)]
    texts = [torch.arange(s, s + m) for s, m in zip(starts, plan.sizes)]
    extras = [torch.arange(s + m, s + m + k) for s, m, k in zip(starts, plan.sizes, plan.extra_sizes)]
    return torch.cat(texts + extras)


def _gather_columns(text: torch.Tensor, extra, plan: Plan) -> torch.Tensor:
    """The global columns (N + K, D): all ranks' text rows, then all ranks' extra rows, in rank
    order (one all_gather of the ranks' blocks)."""
    if not plan.n_extra:
        return _gather_rows(text, plan)
    block = text if extra is None else torch.cat([text, extra])
    return _gather_rows(block, plan, plan.block_sizes)[_block_order(plan).to(text.device)]


def _scatter_sum_columns(partial: torch.Tensor, plan: Plan) -> tuple:
    """(this rank's text gradient (M_r, D), its extra rows' gradient (K_r, D)) from every rank's
    (N + K, D) partials (one reduce-scatter of the ranks' blocks)."""
    if not plan.n_extra:
        return _scatter_sum_rows(partial, plan), None
    blocks = torch.empty_like(partial)
    blocks[_block_order(plan).to(partial.device)] = partial
    mine = _scatter_sum_rows(blocks, plan, plan.block_sizes)
    m = plan.sizes[plan.rank]
    return mine[:m], mine[m:]


def _group_ids(ids_local, plan: Plan):
    """(labels (N,), counts (N,)): the global batch's group labels and each pair's group size, int32
    (contrastive.group_labels; what the kernels compare), from one all_gather of the ranks' int64
    ids, O(N) on every rank (the counts need the whole batch)."""
    return contrastive.group_labels(_gather_rows(ids_local.to(torch.int64), plan))


def _block_groups(groups, plan: Plan, columns: int | None):
    """The BlockGroups of this rank's rows against rank `columns`' paired columns (None: all N
    columns), or None without group ids."""
    if groups is None:
        return None
    labels, counts = groups
    start = [0, *itertools.accumulate(plan.sizes)]
    rows = slice(start[plan.rank], start[plan.rank + 1])
    cols = slice(None) if columns is None else slice(start[columns], start[columns + 1])
    return contrastive.BlockGroups(row_ids=labels[rows], row_count=counts[rows], col_ids=labels[cols],
                                   col_count=counts[cols])


def _gather_scalars(values: torch.Tensor, plan: Plan) -> torch.Tensor:
    """(W, k): every rank's (k,) values, in rank order."""
    out = values.new_empty((plan.world_size * values.numel(),))
    all_gather_rows(out, values.reshape(-1).contiguous(), plan.group)
    return out.view(plan.world_size, -1)


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """What the statistics, loss shares and gradient sums travel and merge in: fp32, float64 for
    float64 embeddings (float64 in, float64-exact out, as the single-process losses)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scalar_grads(shares: list, needed: tuple, plan: Plan, scaling: Scaling, factor: float, dtype) -> list:
    """The scalars' gradients on this rank: its own shares × factor, or (scalar_total) the sum of
    every rank's shares, which every rank then sends, needed or not (one all_gather of k values in
    the accumulation `dtype`)."""
    if scaling.scalar_total:
        if not plan.scalar_grad:  # no rank needs them; every rank skips the all_gather alike
            return [None for _ in shares]
        local = torch.stack([s.to(dtype).reshape(()) for s in shares])
        total = _gather_scalars(local, plan).double().sum(0).to(dtype)
        shares = list(total.unbind())
        factor = 1.0
    return [s * factor if need else None for s, need in zip(shares, needed)]


def _public_scaling(grad_scaling):
    """The public functions take "ddp" and "none" (the open_clip variants are the modules')."""
    def check(_group):
        if grad_scaling not in GRAD_SCALINGS:
            raise ValueError(f"expected grad_scaling to be one of {GRAD_SCALINGS}, got {grad_scaling!r}")
    return check


def _check_scaling_and_mode(scaling, mode) -> None:
    """ValueError unless `scaling` is one of SCALINGS and `mode` one of MODES."""
    if scaling not in SCALINGS:
        raise ValueError(f"expected scaling to be one of {tuple(SCALINGS)}, got {scaling!r}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"expected mode to be one of {MODES}, got {mode!r}")


def _needs_grad(t) -> bool:
    return torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad


@dataclass(frozen=True)
class _Options:
    normalize: bool
    label_smoothing: float
    workspace_bytes: int  # resolved once, in the check
    scaling: Scaling
    image_grad: bool      # this rank's image rows need their gradient
    scalar_grads: tuple   # which scalars (logit_scale[, logit_bias]) need a gradient on this rank
    mode: str = "gather"  # how the text rows travel (SigLIP: "gather" or "ring")

    def runs_gradient_pass(self, plan: Plan) -> bool:
        return runs_gradient_pass(self.image_grad, any(self.scalar_grads), plan, self.scaling)


class _FinishedGradients(torch.autograd.Function):
    """Base of the two losses: forward computes the value and, when needed, every gradient (scaled
    as Scaling says) of its first len(ctx.dtypes) inputs, the differentiable ones (saved in that
    order); backward multiplies them by the upstream gradient (no collective)."""

    @staticmethod
    def backward(ctx, grad_value):
        grads = [None if g is None else (g * grad_value).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, *[None] * ctx.fixed_inputs)


# --------------------------------------------------------------------------- CLIP


class _ClipLoss(_FinishedGradients):
    @staticmethod
    def forward(ctx, image, text, extra, scale, ids, plan: Plan, opts: _Options):
        acc = _accumulation_dtype(image)
        groups = None if ids is None else _group_ids(ids, plan)
        run = _clip_ring if opts.mode == "ring" else _clip_gather
        value, (g_image, g_text, g_extra, g_scale) = run(image, text, extra, scale, groups, plan, opts)
        grads = (None, None, None, None)
        if opts.runs_gradient_pass(plan):
            factor = opts.scaling.factor(plan)
            (g_scale,) = _scalar_grads([g_scale], opts.scalar_grads, plan, opts.scaling, factor, acc)
            grads = (None if g_image is None else g_image * factor, g_text, None if extra is None else g_extra,
                     g_scale)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (image.dtype, text.dtype, None if extra is None else extra.dtype, scale.dtype)
        ctx.fixed_inputs = 3
        return value.to(acc)


def _clip_flags(plan: Plan) -> dict:
    """The block functions' keywords for the extra columns (row smoothing over N + K classes)."""
    if not plan.n_extra:
        return {}
    return dict(row_classes=plan.n_total + plan.n_extra)


def _clip_gather(image, text, extra, scale, groups, plan: Plan, opts: _Options):
    """The gather mode: one all_gather of the text blocks, the block row against all N + K columns,
    one all_gather of the column statistics and loss shares, one reduce-scatter of the text
    gradients. Returns (value, (this rank's image gradient (unscaled), text and extra gradients
    (scaled: summed over the ranks' contributions × their factor), scale share (unscaled))); the
    gradients are None when no gradient pass runs."""
    n, off, m = plan.n_total, plan.offset, image.shape[0]
    eps, acc, flags = opts.label_smoothing, _accumulation_dtype(image), _clip_flags(plan)
    columns = _gather_columns(text, extra, plan)
    block = dict(groups=_block_groups(groups, plan, None), n_pair=n if plan.n_extra else None)
    stats = contrastive.clip_block_stats_unchecked(image, columns, scale, off, opts.normalize, opts.workspace_bytes,
                                                   **block)
    # The loss is linear in the statistics: this rank's rows' share, and the columns' share from
    # every rank's column statistics (the paired columns'), merged in rank order (row_lse, col_lse:
    # float64).
    row_share = contrastive.clip_loss_from_stats(n, eps, rows=stats, **flags)
    packed = torch.cat([stats.col_max[:n].to(acc), stats.col_sumexp[:n].to(acc), row_share.to(acc).reshape(1)])
    gathered = _gather_scalars(packed, plan)
    col_lse = contrastive.merge_column_stats(gathered[:, :n], gathered[:, n: 2 * n])
    if opts.scaling.local_value:
        # open_clip's local loss (local_loss=True): the mean cross-entropy of this rank's M rows and
        # of its M columns (ε = 0: nn.ClipLoss refuses label smoothing there).
        value = contrastive.clip_loss_from_stats(m, 0.0, rows=stats, col_lse=col_lse[off: off + m])
    else:
        value = gathered[:, 2 * n].double().sum() + contrastive.clip_loss_from_stats(n, eps, col_lse=col_lse,
                                                                                     **flags)
    if not opts.runs_gradient_pass(plan):
        return value, (None, None, None, None)
    g_image, g_columns, g_scale = contrastive.clip_block_grads_unchecked(
        image, columns, scale, stats.row_lse, col_lse, off, n, eps, opts.normalize, opts.image_grad,
        plan.text_grad, torch.ones((), dtype=torch.float32, device=image.device), opts.workspace_bytes,
        **block, **flags,
    )
    del columns
    g_text = g_extra = None
    if g_columns is not None:
        g_text, g_extra = _scatter_sum_columns(g_columns * opts.scaling.factor(plan), plan)
    return value, (g_image, g_text, g_extra, g_scale)


def _merge_column_partials(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Fold two (2, n) [column max; Σ exp(S - max)] partials into `total`, in place (a column that
    is -inf in both stays (-inf, 0); NaN and +inf give NaN, as merge_column_stats)."""
    top = torch.maximum(total[0], part[0])
    safe = torch.where(top == float("-inf"), 0.0, top)
    total[1] = total[1] * torch.exp(total[0] - safe) + part[1] * torch.exp(part[0] - safe)
    total[0] = top
    return total


class _RowStats:
    """This rank's rows' statistics, folded over the ring's blocks: row_lse by log-add-exp
    (float64), diag, row_sum and extra_sum summed (what clip_loss_from_stats reads)."""

    def __init__(self):
        self.row_lse = self.diag = self.row_sum = self.extra_sum = None

    def add(self, stats) -> None:
        if self.row_lse is None:
            self.row_lse, self.diag, self.row_sum = stats.row_lse.double(), stats.diag.clone(), stats.row_sum.clone()
            self.extra_sum = None if stats.extra_sum is None else stats.extra_sum.clone()
            return
        self.row_lse = torch.logaddexp(self.row_lse, stats.row_lse.double())
        self.diag.add_(stats.diag)
        self.row_sum.add_(stats.row_sum)
        if stats.extra_sum is not None:
            self.extra_sum = stats.extra_sum.clone() if self.extra_sum is None else self.extra_sum.add_(stats.extra_sum)


def _clip_ring(image, text, extra, scale, groups, plan: Plan, opts: _Options):
    """The ring mode (ring.py, twice): this rank's image rows against one rank's text block
    (its M_q texts and K_q extras) at a time.

    Pass 1, the statistics: every block passes around the ring; each rank folds its rows'
    statistics over the blocks and sends the block's partial column statistics (max, Σ exp) on
    behind it, merged on the way, so that each block's owner ends with its columns' statistics
    over every rank's rows. Then one all_gather of the ranks' loss shares (their rows' and their
    columns' terms). Pass 2, the gradients: every block passes around again with its column
    log-sum-exps, each rank computes its rows' gradients against it, and the block's text
    gradient contributions travel home summed (as in siglip_loss's ring)."""
    n, rank, m = plan.n_total, plan.rank, image.shape[0]
    eps, acc, flags = opts.label_smoothing, _accumulation_dtype(image), _clip_flags(plan)
    sizes = plan.block_sizes
    block = text if not plan.n_extra or extra is None else torch.cat([text, extra])

    def keywords(q):
        return dict(groups=_block_groups(groups, plan, q), n_pair=plan.sizes[q] if plan.n_extra else None)

    rows = _RowStats()

    def statistics(q, columns):
        stats = contrastive.clip_block_stats_unchecked(image, columns, scale, 0 if q == rank else None,
                                                       opts.normalize, opts.workspace_bytes, **keywords(q))
        rows.add(stats)
        return torch.stack([stats.col_max.double(), stats.col_sumexp.double()])

    # The partial column statistics travel and merge in float64 (2 per column, a small part of a
    # block's bytes), so that W merges on the way cost no more than the gather mode's one.
    partials = ring.ring_pass(block, sizes, plan.group, statistics, gradients=True,
                              carry_shape=lambda q: (2, sizes[q]), carry_dtype=torch.float64,
                              merge=_merge_column_partials)
    own = slice(0, plan.sizes[rank])
    col_lse = contrastive.merge_column_stats(partials[0:1, own], partials[1:2, own])
    # Every rank computes on at least one block (the check: some rank holds a pair), so rows holds them.
    row_stats = contrastive.ClipBlockStats(rows.row_lse, None, None, rows.diag, rows.row_sum, rows.extra_sum)
    if opts.scaling.local_value:
        value = contrastive.clip_loss_from_stats(m, 0.0, rows=row_stats, col_lse=col_lse)
    else:
        share = (contrastive.clip_loss_from_stats(n, eps, rows=row_stats, **flags)
                 + contrastive.clip_loss_from_stats(n, eps, col_lse=col_lse, **flags))
        value = _gather_scalars(share.to(acc).reshape(1), plan).double().sum()
    if not opts.runs_gradient_pass(plan):
        return value, (None, None, None, None)

    factor = opts.scaling.factor(plan)
    grad_output = torch.ones((), dtype=torch.float32, device=image.device)
    image_grad, scale_shares = {}, []

    def gradients(q, travelling):
        columns, col_lse_q = travelling
        part = contrastive.clip_block_grads_unchecked(
            image, columns, scale, row_stats.row_lse, col_lse_q, 0 if q == rank else None, n, eps, opts.normalize,
            opts.image_grad, plan.text_grad, grad_output, opts.workspace_bytes, **keywords(q), **flags,
        )
        scale_shares.append(part.scale_grad)
        if part.image_grad is not None:
            image_grad["sum"] = image_grad["sum"].add_(part.image_grad) if image_grad else part.image_grad
        return None if part.text_grad is None else part.text_grad.mul_(factor)  # a fresh buffer: scaled in place

    d = block.shape[1]
    g_block = ring.ring_pass((block, col_lse), sizes, plan.group, gradients, gradients=plan.text_grad,
                             shapes=lambda q: ((sizes[q], d), (plan.sizes[q],)))
    g_scale = torch.stack([s.double() for s in scale_shares]).sum().to(scale.dtype)
    g_text = g_extra = None
    if g_block is not None:
        g_text, g_extra = g_block[: plan.sizes[rank]], g_block[plan.sizes[rank]:]
    return value, (image_grad.get("sum"), g_text, g_extra, g_scale)


def clip_loss_scaled(image_local, text_local, logit_scale, *, group, normalize, label_smoothing,
                     workspace_bytes, scaling: str, mode: str = "gather", group_ids_local=None,
                     extra_text_local=None, caller: str = "mmkernels.distributed.clip_loss", extra_checks=None):
    """`clip_loss` with any of SCALINGS by name (mmkernels.nn.ClipLoss uses the open_clip ones).
    `extra_checks(group)` runs with this rank's input checks: what it raises is raised on this rank,
    and every other rank raises too."""
    group = process_group(group, caller)
    scale = []

    def local_checks():
        if extra_checks is not None:
            extra_checks(group)
        embedding_checks(image_local, text_local)
        contrastive.check_extra("extra_text_local", extra_text_local, text_local, "text_local")
        contrastive.check_group_ids(group_ids_local, image_local.shape[0], image_local, "group_ids_local")
        scale.append(scalar_tensor("logit_scale", logit_scale, image_local))
        contrastive.check_label_smoothing(label_smoothing)
        _check_scaling_and_mode(scaling, mode)

    image_grad, text_grad, extra_grad, scale_grad = (
        _needs_grad(t) for t in (image_local, text_local, extra_text_local, logit_scale))
    plan = check(caller, "clip_loss", group, image_local, text_local, local_checks, image_grad=image_grad,
                 text_grad=text_grad or extra_grad, scalar_grad=scale_grad, normalize=normalize,
                 label_smoothing=label_smoothing, grad_scaling=scaling, workspace_bytes=workspace_bytes, mode=mode,
                 extra=extra_text_local, group_ids=group_ids_local)
    if SCALINGS[scaling].local_value and not plan.equal_sizes:
        # open_clip's local loss weights rank r's rows and columns by 1/M_r; with unequal M_r that
        # is not a per-block-row weighting, and open_clip itself needs equal local batches.
        raise ValueError(
            f"{caller}: open_clip's local loss (local_loss=True) needs the same local batch size on every "
            f"rank, got M = {list(plan.sizes)}; mmkernels.distributed.clip_loss takes unequal ones"
        )
    if SCALINGS[scaling].local_value and (plan.groups or plan.n_extra):
        # Its columns' targets are this rank's diagonal: group ids and extra columns have no local form.
        raise ValueError(
            f"{caller}: open_clip's local loss (local_loss=True) is defined for the diagonal targets of the "
            f"local pairs, got {'group ids' if plan.groups else f'{plan.n_extra} extra text rows'}; use "
            "local_loss=False (the global loss) with them"
        )
    opts = _Options(bool(normalize), float(label_smoothing), plan.workspace_bytes, SCALINGS[scaling], image_grad,
                    (scale_grad,), mode)
    return _ClipLoss.apply(image_local, text_local, extra_text_local, scale[0], group_ids_local, plan, opts)


def clip_loss(image_local, text_local, logit_scale, *, group=None, normalize: bool = False,
              label_smoothing: float = 0.0, grad_scaling: str = "ddp", workspace_bytes: int | None = None,
              mode: str = "gather", group_ids_local=None, extra_text_local=None):
    """CLIP's symmetric InfoNCE loss of the global batch, from each rank's local pairs.

    Args:
        image_local: (M_r, D) this rank's image embeddings; M_r may differ between ranks, D, dtype
            and device type may not. The global batch is the ranks' rows concatenated in rank order
            (N = Σ M_r); pair i is the positive of global row i and column i.
        text_local: (M_r, D) this rank's text embeddings, same dtype and device.
        logit_scale: the multiplier, already exponentiated (`model.logit_scale.exp()`): a Python
            float or a 0-dim tensor on the embeddings' device.
        group: the torch.distributed process group (default: the world group). Every rank of it
            must call this function with the same options.
        normalize: L2-normalise the embeddings inside the kernels.
        label_smoothing: as in `F.cross_entropy`, in [0, 1], over the N global classes (N + K for
            the image→text direction with extra text rows).
        grad_scaling: "ddp" (default) or "none", see below.
        workspace_bytes: the block-row kernels' workspace bound (default: theirs).
        mode: how the text rows travel; the same value and gradients either way (every rank must
            pass the same mode).
            - "gather" (default): one all_gather of the text rows ((N + K, D) on every rank), one
              all_gather of the 2N column statistics, one reduce-scatter of the (N + K, D) fp32
              partial text gradients (module docstring).
            - "ring": point-to-point, two passes of the text blocks around the ring of ranks (rank
              r receives from r-1, sends to r+1; ring.py). Pass 1: each rank's image rows meet
              one rank's block at a time (its own with their positives, the others' as negatives
              only, unless group ids say otherwise), fold their row statistics, and send the
              block's partial column statistics (max and Σ exp, 2 float64 per column) on behind it,
              merged on the way, so that each block comes home with its columns' statistics over
              every rank's rows; then one all_gather of W loss shares. Pass 2: the blocks go round
              again with their column log-sum-exps (float64), each rank computes its rows'
              gradients against them, and the text-gradient contributions travel home summed. Every
              hop is posted before a block's compute and waited for after it. Memory per rank,
              M = max_r (M_r + K_r): two text blocks and a few fp32 blocks of ≤ M rows, O(M·D), instead
              of the (N + K, D) gathered text and its (N + K, D) fp32 partial gradient; the
              kernels' workspace is sized against M columns. Work: the same 8·M_r·(N + K)·D in W
              blocks. Communication: 2(W-1) sends of a text block (twice the gather's bytes), W-1
              of its column statistics, and W-1 fp32 gradient blocks when a text gradient is
              needed (NCCL's reduce-scatter's bytes). For large global batches (the (N, D) buffers
              matter) or slow links; "gather" is faster for small local batches on fast links.
        group_ids_local: None, or (M_r,) integer ids of this rank's pairs, globally meaningful
            (equal ids on different ranks are one group): pairs with the same id are positives of
            each other, and each row's (column's) target spreads uniformly over its positives
            (1/c, c its id's count over the global batch). Every rank passes ids or none does.
            The counts need every id: one all_gather of the N ids (int64, O(N) per rank, in
            either mode).
        extra_text_local: None, or (K_r, D) extra text rows of this rank (hard negatives; K_r may
            differ between ranks, be 0, or be None on some ranks): every rank's extra rows are
            negatives of every rank's image rows, in the image→text direction only (the rows'
            softmax runs over N + K columns, K = Σ K_r; the columns' over the N paired ones). The
            loss is that of one process with extra_text = every rank's extra rows concatenated in
            rank order. Gather mode: they are gathered with the text rows; ring mode: they travel
            in their owner's text block. They get gradients as text_local does.

    Returns:
        () float32 (float64 for float64 inputs), the same value on every rank: the loss one process
        computes on the concatenated batch, (CE(rows of S) + CE(columns of S)) / 2 with
        S = logit_scale · image @ text.T (N × N; N × (N + K) for the rows with extra text rows),
        with group ids' targets where given.

    Gradients (what `loss.backward()` leaves on rank r; L is that single-process loss):
        - "ddp": image_local, text_local and extra_text_local get W · dL/d(their rows), logit_scale gets
          W · (rank r's share of dL/dlogit_scale), where W is the group's size and rank r's share is
          the part of dL/dlogit_scale that comes from its block row S[offset_r : offset_r + M_r, :]
          (the shares of all ranks sum to dL/dlogit_scale). DDP and FSDP average gradients over
          ranks, so their averaging of these gives exactly the single-process gradient of every
          parameter: the update of one process training on the global batch. (This is also what
          open_clip's gather_with_grad=True, local_loss=True yields with equal M_r.)
        - "none": the unscaled shares: dL/d(rows) for the embeddings, rank r's share for
          logit_scale; summing over ranks (not averaging) gives the single-process gradient.
        Each rank's gradients are multiplied by its own upstream gradient (1 for loss.backward()).
        They are computed in the forward when some input requires grad (so the backward runs no
        collective); a frozen tower costs no product on its side.

    Raises the same error on every rank when a rank's inputs are invalid or the ranks disagree
    (D, dtype, device type, options, mode, group ids given or not); RuntimeError when no process
    group is initialised.
    """
    return clip_loss_scaled(image_local, text_local, logit_scale, group=group, normalize=normalize,
                            label_smoothing=label_smoothing, workspace_bytes=workspace_bytes, scaling=grad_scaling,
                            mode=mode, group_ids_local=group_ids_local, extra_text_local=extra_text_local,
                            extra_checks=_public_scaling(grad_scaling))


# --------------------------------------------------------------------------- InfoNCE


class _InfoNceLoss(_FinishedGradients):
    @staticmethod
    def forward(ctx, query, keys, extra, scale, ids, plan: Plan, opts: _Options):
        n, off = plan.n_total, plan.offset
        eps = opts.label_smoothing
        acc = _accumulation_dtype(query)
        keys_all = _gather_columns(keys, extra, plan)
        groups = None if ids is None else _group_ids(ids, plan)
        block = dict(groups=_block_groups(groups, plan, None), n_pair=n if plan.n_extra else None)
        # The rows' statistics only: InfoNCE's softmax runs over each row of S, and a block row holds
        # whole rows, so this rank's share of the loss is complete without any other rank's numbers.
        stats = contrastive.clip_block_stats_unchecked(query, keys_all, scale, off, opts.normalize,
                                                        opts.workspace_bytes, columns=False, **block)
        share = contrastive.clip_loss_from_stats(n, eps, rows=stats, directions=1, **_clip_flags(plan))
        value = _gather_scalars(share.to(acc).reshape(1), plan).double().sum()
        grads = (None, None, None, None)
        if opts.runs_gradient_pass(plan):
            g_query, g_keys, g_scale = contrastive.clip_block_grads_unchecked(
                query, keys_all, scale, stats.row_lse, None, off, n, eps, opts.normalize, opts.image_grad,
                plan.text_grad, torch.ones((), dtype=torch.float32, device=query.device), opts.workspace_bytes,
                directions=1, **block, **_clip_flags(plan),
            )
            factor = opts.scaling.factor(plan)
            del keys_all
            g_extra = None
            if g_keys is not None:
                g_keys, g_extra = _scatter_sum_columns(g_keys * factor, plan)
            (g_scale,) = _scalar_grads([g_scale], opts.scalar_grads, plan, opts.scaling, factor, acc)
            grads = (None if g_query is None else g_query * factor, g_keys, None if extra is None else g_extra,
                     g_scale)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (query.dtype, keys.dtype, None if extra is None else extra.dtype, scale.dtype)
        ctx.fixed_inputs = 3
        return value.to(acc)


def info_nce_loss(query_local, keys_local, logit_scale, *, group=None, normalize: bool = False,
                  label_smoothing: float = 0.0, grad_scaling: str = "ddp", workspace_bytes: int | None = None,
                  group_ids_local=None, extra_keys_local=None):
    """One-directional InfoNCE of the global batch, from each rank's local (query, key) pairs.

    Args:
        query_local: (M_r, D) this rank's queries (the rows of S); M_r may differ between ranks, D,
            dtype and device type may not. The global batch is the ranks' rows concatenated in rank
            order (N = Σ M_r); key i is the positive of global query i, every other key a negative.
        keys_local: (M_r, D) this rank's keys, same dtype and device.
        logit_scale: the multiplier, already exponentiated: a Python float or a 0-dim tensor on the
            embeddings' device.
        group, normalize, grad_scaling, workspace_bytes: as for `clip_loss`.
        label_smoothing: as in `F.cross_entropy`, in [0, 1], over the N global classes (N + K with
            extra keys).
        group_ids_local: None, or (M_r,) integer ids of this rank's pairs, globally meaningful, as
            for `clip_loss`: the keys with a query's id are its positives, its target spread over
            them (one all_gather of the N int64 ids).
        extra_keys_local: None, or (K_r, D) extra keys of this rank, as clip_loss's
            extra_text_local: every rank's are negatives of every rank's queries (gathered with
            the keys); K_r may differ between ranks, be 0, or be None on some ranks.

    Returns:
        () float32 (float64 for float64 inputs), the same value on every rank: what one process
        computes on the concatenated batch, `mmkernels.info_nce_loss(query, keys, logit_scale,
        group_ids=, extra_keys=)` with every rank's ids and extra keys in rank order,
        mean_i CE(S_i, i) with S = logit_scale · query @ keys.T (N × N; N × (N + K) with extra keys).

    Gradients, as for `clip_loss` ("ddp": W · dL/d(rows) for query_local, keys_local and extra_keys_local, W · rank
    r's share (from its block row of S) for logit_scale; "none": the unscaled shares), finished in
    the forward (the backward runs no collective).

    Each rank gathers every rank's keys (one all_gather of (max M_r, D); of M_r + K_r rows with extra
    keys) and computes its block row of S, rows only: 8·M_r·(N + K)·D matrix FLOPs with gradients
    (2·M_r·(N + K)·D for the row statistics, 6 for the gradients; 2·M_r·(N + K)·D less per frozen
    side), no logit block in autograd. Communication beyond the check and the keys: one all_gather
    of the ranks' loss shares (one fp32 each) and, when some rank needs the keys' gradient, one
    reduce-scatter of the (N + K, D) fp32 partial key gradients.
    """
    caller = "mmkernels.distributed.info_nce_loss"
    names = ("query_local", "keys_local")
    group = process_group(group, caller)
    scale = []

    def local_checks():
        _public_scaling(grad_scaling)(group)
        embedding_checks(query_local, keys_local, names)
        contrastive.check_extra("extra_keys_local", extra_keys_local, keys_local, "keys_local")
        contrastive.check_group_ids(group_ids_local, query_local.shape[0], query_local, "group_ids_local")
        scale.append(scalar_tensor("logit_scale", logit_scale, query_local))
        contrastive.check_label_smoothing(label_smoothing)

    query_grad, keys_grad, extra_grad, scale_grad = (
        _needs_grad(t) for t in (query_local, keys_local, extra_keys_local, logit_scale))
    plan = check(caller, "info_nce_loss", group, query_local, keys_local, local_checks, image_grad=query_grad,
                 text_grad=keys_grad or extra_grad, scalar_grad=scale_grad, normalize=normalize,
                 label_smoothing=label_smoothing, grad_scaling=grad_scaling, workspace_bytes=workspace_bytes,
                 names=names, extra=extra_keys_local, group_ids=group_ids_local)
    opts = _Options(bool(normalize), float(label_smoothing), plan.workspace_bytes, SCALINGS[grad_scaling], query_grad,
                    (scale_grad,))
    return _InfoNceLoss.apply(query_local, keys_local, extra_keys_local, scale[0], group_ids_local, plan, opts)


# --------------------------------------------------------------------------- SigLIP


class _SiglipLoss(_FinishedGradients):
    @staticmethod
    def forward(ctx, image, text, scale, bias, ids, plan: Plan, opts: _Options):
        passes = opts.runs_gradient_pass(plan)
        groups = None if ids is None else _group_ids(ids, plan)
        flags = dict(
            n_total=plan.n_total, normalize=opts.normalize, image_grad=passes and opts.image_grad,
            text_grad=passes and plan.text_grad, workspace_bytes=opts.workspace_bytes,
            scalar_grads=any(opts.scalar_grads) or (opts.scaling.scalar_total and plan.scalar_grad),
        )
        factor = opts.scaling.factor(plan)
        acc = _accumulation_dtype(image)
        if opts.mode == "ring":
            block, g_text = _siglip_ring(image, text, scale, bias, groups, plan, flags, factor)
        else:
            text_all = _gather_rows(text, plan)
            block = contrastive.siglip_block_unchecked(image, text_all, scale, bias, offset=plan.offset,
                                                       **_siglip_groups(groups, plan, None), **flags)
            del text_all
            g_text = None if block.text_grad is None else _scatter_sum_rows(block.text_grad * factor, plan)
        shares = _gather_scalars(block.loss.to(acc).reshape(1), plan)
        value = block.loss.double() * factor if opts.scaling.local_value else shares.double().sum()
        # Finite inputs give a finite loss; an Inf among them leaves it undefined: NaN, as for CLIP.
        value = torch.where(torch.isinf(value), torch.nan, value)
        grads = (None, None, None, None)
        if passes:
            g_scale, g_bias = _scalar_grads([block.scale_grad, block.bias_grad], opts.scalar_grads, plan,
                                            opts.scaling, factor, acc)
            grads = (None if block.image_grad is None else block.image_grad * factor, g_text, g_scale, g_bias)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (image.dtype, text.dtype, scale.dtype, bias.dtype)
        ctx.fixed_inputs = 3
        return value.to(acc)


def _siglip_groups(groups, plan: Plan, columns: int | None) -> dict:
    """siglip_block's `groups` keyword for this rank's rows against rank `columns`' (None: all)."""
    return {} if groups is None else dict(groups=_block_groups(groups, plan, columns))


def _siglip_ring(image, text, scale, bias, groups, plan: Plan, flags: dict, factor: float):
    """This rank's image rows against every rank's text rows as they pass around the ring
    (ring.py): its own texts with their positives (offset 0), the others' as negatives
    only (offset None), one siglip_block each, 2·M_r·M_q·D per product. Returns the block row's
    SiglipBlock (loss and scalar shares summed over the blocks, image gradient complete, text_grad
    None) and this rank's text gradient (the contributions of every rank's rows, each × its
    rank's factor, summed around the ring), or None when no rank needs it."""
    shares = []  # (loss, scale share, bias share) of each block: O(W) scalars
    image_grad = {}  # one (M_r, D) fp32 buffer, accumulated in place

    def compute(q: int, text_q: torch.Tensor):
        part = contrastive.siglip_block_unchecked(image, text_q, scale, bias, offset=0 if q == plan.rank else None,
                                                  **_siglip_groups(groups, plan, q), **flags)
        shares.append((part.loss, part.scale_grad, part.bias_grad))
        if part.image_grad is not None:
            image_grad["sum"] = image_grad["sum"].add_(part.image_grad) if image_grad else part.image_grad
        return None if part.text_grad is None else part.text_grad.mul_(factor)  # a fresh buffer: scaled in place

    # compute runs at least once: some rank holds a pair (the check), and every nonempty block comes by
    g_text = ring.ring_pass(text, plan.sizes, plan.group, compute, gradients=flags["text_grad"])

    def total(k: int, dtype):
        if shares[0][k] is None:
            return None
        return torch.stack([s[k].double() for s in shares]).sum().to(dtype)

    block = contrastive.SiglipBlock(total(0, _accumulation_dtype(image)), image_grad.get("sum"), None,
                                total(1, scale.dtype), total(2, bias.dtype))
    return block, g_text


def siglip_loss_scaled(image_local, text_local, logit_scale, logit_bias, *, group, normalize, workspace_bytes,
                       scaling: str, mode: str = "gather", group_ids_local=None,
                       caller: str = "mmkernels.distributed.siglip_loss", extra_checks=None):
    """`siglip_loss` with any of SCALINGS by name (mmkernels.nn.SigLipLoss uses "open_clip_siglip");
    `extra_checks` as for `clip_loss_scaled`."""
    group = process_group(group, caller)
    scalars = []

    def local_checks():
        if extra_checks is not None:
            extra_checks(group)
        embedding_checks(image_local, text_local)
        contrastive.check_group_ids(group_ids_local, image_local.shape[0], image_local, "group_ids_local")
        scalars.append(scalar_tensor("logit_scale", logit_scale, image_local))
        scalars.append(scalar_tensor("logit_bias", logit_bias, image_local))
        _check_scaling_and_mode(scaling, mode)

    image_grad, text_grad, scale_grad, bias_grad = (
        _needs_grad(t) for t in (image_local, text_local, logit_scale, logit_bias))
    plan = check(caller, "siglip_loss", group, image_local, text_local, local_checks, image_grad=image_grad,
                  text_grad=text_grad, scalar_grad=scale_grad or bias_grad, normalize=normalize, label_smoothing=0.0,
                  grad_scaling=scaling, workspace_bytes=workspace_bytes, mode=mode, group_ids=group_ids_local)
    if SCALINGS[scaling].block == "rows" and 0 in plan.sizes:
        raise ValueError(
            f"{caller}: open_clip's SigLIP loss divides each rank's loss by its local batch size, got M = "
            f"{list(plan.sizes)}; mmkernels.distributed.siglip_loss takes empty ranks"
        )
    opts = _Options(bool(normalize), 0.0, plan.workspace_bytes, SCALINGS[scaling], image_grad,
                    (scale_grad, bias_grad), mode)
    return _SiglipLoss.apply(image_local, text_local, scalars[0], scalars[1], group_ids_local, plan, opts)


def siglip_loss(image_local, text_local, logit_scale, logit_bias, *, group=None, normalize: bool = False,
                grad_scaling: str = "ddp", workspace_bytes: int | None = None, mode: str = "gather",
                group_ids_local=None):
    """SigLIP's pairwise sigmoid loss of the global batch, from each rank's local pairs.

    Args:
        image_local, text_local: (M_r, D) this rank's embeddings, as for `clip_loss`.
        logit_scale: the multiplier, already exponentiated; a Python float or a 0-dim tensor.
        logit_bias: the additive bias; a Python float or a 0-dim tensor.
        group, normalize, grad_scaling, workspace_bytes: as for `clip_loss`.
        mode: how the text rows travel; the same value and gradients either way (every rank must
            pass the same mode).
            - "gather" (default): one all_gather of the text rows, (N, D) on every rank, and one
              reduce-scatter of the (N, D) fp32 partial text gradients (module docstring).
            - "ring": point-to-point, the text blocks pass around the ring of ranks (rank r
              receives from r-1, sends to r+1), each rank's image rows meet one rank's texts at a
              time while the next block travels (siglip-kernel's and open_clip's "shift" scheme),
              and the text-gradient contributions follow the same ring home, summed on the way.
              Memory per rank, M = max_r M_r: two text blocks (the current and the next one) and
              at most five fp32 blocks of ≤ M rows (the text-gradient sums kept, sent, received
              and freshly computed; the image gradient's sum and one block's share of it), O(M·D),
              instead of the (N, D) gathered text and the (N, D) fp32 partial text gradient; the
              kernels' workspace is sized against M columns instead of N. Communication per rank:
              W-1 sends of a text block (≤ (W-1)·M·D elements, the all_gather's bytes) and, when
              some rank needs the text gradient, W-1 sends of an fp32 gradient block (≤ (W-1)·M·D
              fp32, NCCL's reduce-scatter's bytes, half of gloo's), each overlapped with the
              compute of one block except the last gradient hop. The gradients go home around the
              ring rather than by one reduce-scatter at the end because that needs every rank's
              (N, D) fp32 partial at once (the memory the ring saves) and can start only after
              the last block, while the ring sends the same bytes in steps hidden behind compute.
              Use it when the (N, D) text buffers matter (large global batches) or the network is
              slow next to one block's compute (6·M_r·M_q·D FLOPs with gradients; across nodes);
              "gather" is the better choice for small local batches on fast links, where the ring's
              W-1 steps in sequence (one launch and one message latency each) dominate.
        group_ids_local: None, or (M_r,) integer ids of this rank's pairs, globally meaningful:
            label +1 for every pair of the global batch with the same id (as for clip_loss: every
            rank passes ids or none does; one all_gather of the N int64 ids).

    Returns:
        () float32 (float64 for float64 inputs), the same value on every rank:
        -Σ_ij log σ(label_ij · S_ij) / N over the global N × N logits
        S = logit_scale · image @ text.T + logit_bias (label +1 on the diagonal, or for same-id
        pairs, -1 elsewhere), as one process computes it on the concatenated batch. NaN if an input
        is NaN or infinite.

    Gradients, as for `clip_loss` ("ddp": W · dL/d(rows) for the embeddings, W · rank r's share
    (from its block row of S) for logit_scale and logit_bias; "none": the unscaled shares).
    """
    return siglip_loss_scaled(image_local, text_local, logit_scale, logit_bias, group=group, normalize=normalize,
                              workspace_bytes=workspace_bytes, scaling=grad_scaling, mode=mode,
                              group_ids_local=group_ids_local, extra_checks=_public_scaling(grad_scaling))
