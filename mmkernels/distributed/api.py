"""Multi-GPU contrastive losses over torch.distributed: the exact loss of the global batch, each rank
doing 1/world_size of the work.

    import mmkernels.distributed as mmd
    loss = mmd.clip_loss(image_local, text_local, logit_scale)                  # same value on every rank
    loss = mmd.siglip_loss(image_local, text_local, logit_scale, logit_bias)
    loss = mmd.siglip_loss(image_local, text_local, logit_scale, logit_bias, mode="ring")  # O(M·D) memory
    loss = mmd.info_nce_loss(query_local, keys_local, logit_scale)          # one-directional
    loss.backward()     # DDP / FSDP then average the gradients: the single-process update

Rank r holds M_r pairs (M_r may differ between ranks). The global batch is their concatenation in
rank order: N = Σ_r M_r pairs, rank r's rows start at offset_r = Σ_{q<r} M_q, and pair i's positive is
column i of the global logit matrix S (N, N). Rank r computes only the block row
S[offset_r : offset_r + M_r, :] with the block-row kernels of `mmkernels.ops.contrastive` (their
internal entries: the arguments are checked once, here, on every rank); no rank
ever holds more of S than the kernels' workspace, and nothing of size N² is communicated.

Work per rank (matrix FLOPs, as the kernels state them): CLIP 8·M_r·N·D (2 for the row and column
statistics, 6 for the gradients), SigLIP 6·M_r·N·D. Memory per rank: the global text (N, D), the
fp32 partial text gradient (N, D), O(W·N) column statistics, and the kernels' workspace.

SigLIP's mode="ring" (see siglip_loss) replaces steps 2 and 4 below by point-to-point messages
around the ring of ranks (ring.py): rank r's image rows meet one rank's text rows at a time
(W blocks M_r × M_q, 6·M_r·N·D in all), the next block's exchange overlapping the current block's
compute, and the text gradients travel home around the same ring; memory O(max_r M_r · D) plus a
workspace sized against max_r M_r columns. CLIP has no ring mode, and clip_loss no `mode`
parameter: its gradients need the column log-sum-exps over every rank's rows, so a ring would pass
every text block around twice (statistics, then gradients), where the gather mode sends 2N fp32.

Communication per rank and call, W ranks, M = max_r M_r (each an ordinary torch.distributed
collective, so gloo on CPU and NCCL on GPU both run it):
1. The check: one all_gather of 14 int64 per rank (sizes, dtype, device type, which gradients,
   options, workspace, mode), before any heavy collective, so that mismatched ranks or a workspace
   too small for one rank's block raise a clear error on every rank instead of leaving one waiting.
2. The text rows: one all_gather of (M, D) in the embeddings' dtype (rows past M_r are padding
   when the M_r differ). The image rows never travel: the column statistics CLIP needs are
   reductions over rows, so each rank reduces its own rows and sends O(N) numbers.
3. CLIP: one all_gather of 2N + 1 fp32 (the block's per-column max and sum of exponentials, and its
   rows' share of the loss, from mmkernels.ops.contrastive.clip_loss_from_stats); every rank merges
   them in rank order, so all ranks hold the same column log-sum-exps to the bit. SigLIP: one all_gather of the ranks' loss shares (one fp32 each).
   Float64 embeddings send these (and the gradients of steps 4 and 5) in float64: float64 in,
   float64-exact out, as the single-process losses.
4. When some rank needs the text gradient: one reduce-scatter of the (N, D) fp32 partial text
   gradients (padded to W·M rows when the M_r differ), each rank receiving its own rows' sum.
   (gloo implements reduce-scatter as an all-reduce, twice the bytes; NCCL as a reduce-scatter.)
5. Only for the open_clip variants that give every rank the whole dL/dlogit_scale (nn.ClipLoss
   with local_loss=False): one all_gather of the ranks' scalar shares (one fp32 each).

The gradients are finished inside the forward, when some input needs them; the backward only
multiplies them by the upstream gradient and runs no collective, so a rank that skips the backward
cannot stall the others. The forward makes one host sync (the sizes from the check decide the
buffer shapes).
"""
from __future__ import annotations

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


def _gather_rows(local: torch.Tensor, plan: Plan) -> torch.Tensor:
    """All ranks' (M_r, D) rows concatenated in rank order: (N, D)."""
    local = local.contiguous()
    if plan.equal_sizes:
        out = local.new_empty((plan.n_total, local.shape[1]))
        all_gather_rows(out, local, plan.group)
        return out
    padded = local.new_zeros((plan.max_size, local.shape[1]))
    padded[: local.shape[0]] = local
    out = local.new_empty((plan.world_size * plan.max_size, local.shape[1]))
    all_gather_rows(out, padded, plan.group)
    out = out.view(plan.world_size, plan.max_size, -1)
    return torch.cat([out[r, :m] for r, m in enumerate(plan.sizes)])


def _scatter_sum_rows(partial: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Sum the ranks' (N, D) partials and hand each rank its own (M_r, D) rows."""
    if plan.equal_sizes:
        out = partial.new_empty((plan.sizes[plan.rank], partial.shape[1]))
        reduce_scatter_rows(out, partial.contiguous(), plan.group)
        return out
    padded = partial.new_zeros((plan.world_size, plan.max_size, partial.shape[1]))
    start = 0
    for r, m in enumerate(plan.sizes):
        padded[r, :m] = partial[start: start + m]
        start += m
    out = partial.new_empty((plan.max_size, partial.shape[1]))
    reduce_scatter_rows(out, padded.view(-1, partial.shape[1]), plan.group)
    return out[: plan.sizes[plan.rank]]


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
    as Scaling says); backward multiplies them by the upstream gradient (no collective)."""

    @staticmethod
    def backward(ctx, grad_value):
        grads = [None if g is None else (g * grad_value).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None)


# --------------------------------------------------------------------------- CLIP


class _ClipLoss(_FinishedGradients):
    @staticmethod
    def forward(ctx, image, text, scale, plan: Plan, opts: _Options):
        n, off, m = plan.n_total, plan.offset, image.shape[0]
        eps = opts.label_smoothing
        acc = _accumulation_dtype(image)
        text_all = _gather_rows(text, plan)
        stats = contrastive.clip_block_stats_unchecked(image, text_all, scale, off, opts.normalize,
                                                        opts.workspace_bytes)
        # The loss is linear in the statistics: this rank's rows' share, and the columns' share from
        # every rank's column statistics, merged in rank order (row_lse, col_lse: float64).
        row_share = contrastive.clip_loss_from_stats(n, eps, rows=stats)
        packed = torch.cat([stats.col_max.to(acc), stats.col_sumexp.to(acc), row_share.to(acc).reshape(1)])
        gathered = _gather_scalars(packed, plan)
        col_lse = contrastive.merge_column_stats(gathered[:, :n], gathered[:, n: 2 * n])
        if opts.scaling.local_value:
            # open_clip's local loss (local_loss=True): the mean cross-entropy of this rank's M rows and
            # of its M columns (ε = 0: nn.ClipLoss refuses label smoothing there).
            value = contrastive.clip_loss_from_stats(m, 0.0, rows=stats, col_lse=col_lse[off: off + m])
        else:
            value = gathered[:, 2 * n].double().sum() + contrastive.clip_loss_from_stats(n, eps, col_lse=col_lse)

        grads = (None, None, None)
        if opts.runs_gradient_pass(plan):
            g_image, g_text, g_scale = contrastive.clip_block_grads_unchecked(
                image, text_all, scale, stats.row_lse, col_lse, off, n, eps, opts.normalize, opts.image_grad,
                plan.text_grad, torch.ones((), dtype=torch.float32, device=image.device), opts.workspace_bytes,
            )
            factor = opts.scaling.factor(plan)
            del text_all
            g_text = None if g_text is None else _scatter_sum_rows(g_text * factor, plan)
            (g_scale,) = _scalar_grads([g_scale], opts.scalar_grads, plan, opts.scaling, factor, acc)
            grads = (None if g_image is None else g_image * factor, g_text, g_scale)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (image.dtype, text.dtype, scale.dtype)
        return value.to(acc)


def clip_loss_scaled(image_local, text_local, logit_scale, *, group, normalize, label_smoothing,
                     workspace_bytes, scaling: str, caller: str = "mmkernels.distributed.clip_loss",
                     extra_checks=None):
    """`clip_loss` with any of SCALINGS by name (mmkernels.nn.ClipLoss uses the open_clip ones).
    `extra_checks(group)` runs with this rank's input checks: what it raises is raised on this rank,
    and every other rank raises too."""
    group = process_group(group, caller)
    scale = []

    def local_checks():
        if extra_checks is not None:
            extra_checks(group)
        embedding_checks(image_local, text_local)
        scale.append(scalar_tensor("logit_scale", logit_scale, image_local))
        contrastive.check_label_smoothing(label_smoothing)
        if scaling not in SCALINGS:
            raise ValueError(f"expected scaling to be one of {tuple(SCALINGS)}, got {scaling!r}")

    image_grad, text_grad, scale_grad = (_needs_grad(t) for t in (image_local, text_local, logit_scale))
    plan = check(caller, "clip_loss", group, image_local, text_local, local_checks, image_grad=image_grad,
                  text_grad=text_grad, scalar_grad=scale_grad, normalize=normalize, label_smoothing=label_smoothing,
                  grad_scaling=scaling, workspace_bytes=workspace_bytes)
    if SCALINGS[scaling].local_value and not plan.equal_sizes:
        # open_clip's local loss weights rank r's rows and columns by 1/M_r; with unequal M_r that
        # is not a per-block-row weighting, and open_clip itself needs equal local batches.
        raise ValueError(
            f"{caller}: open_clip's local loss (local_loss=True) needs the same local batch size on every "
            f"rank, got M = {list(plan.sizes)}; mmkernels.distributed.clip_loss takes unequal ones"
        )
    opts = _Options(bool(normalize), float(label_smoothing), plan.workspace_bytes, SCALINGS[scaling], image_grad,
                    (scale_grad,))
    return _ClipLoss.apply(image_local, text_local, scale[0], plan, opts)


def clip_loss(image_local, text_local, logit_scale, *, group=None, normalize: bool = False,
              label_smoothing: float = 0.0, grad_scaling: str = "ddp", workspace_bytes: int | None = None):
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
        label_smoothing: as in `F.cross_entropy`, in [0, 1], over the N global classes.
        grad_scaling: "ddp" (default) or "none", see below.
        workspace_bytes: the block-row kernels' workspace bound (default: theirs).

    Returns:
        () float32 (float64 for float64 inputs), the same value on every rank: the loss one process
        computes on the concatenated batch, (CE(rows of S) + CE(columns of S)) / 2 with
        S = logit_scale · image @ text.T (N × N).

    Gradients (what `loss.backward()` leaves on rank r; L is that single-process loss):
        - "ddp": image_local and text_local get W · dL/d(their rows), logit_scale gets
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
    (D, dtype, device type, options); RuntimeError when no process group is initialised.

    No `mode`: unlike siglip_loss, CLIP has no ring mode (its gradients need every rank's rows'
    column statistics first; module docstring), so `mode=` is a TypeError, raised before any
    collective.
    """
    return clip_loss_scaled(image_local, text_local, logit_scale, group=group, normalize=normalize,
                            label_smoothing=label_smoothing, workspace_bytes=workspace_bytes, scaling=grad_scaling,
                            extra_checks=_public_scaling(grad_scaling))


# --------------------------------------------------------------------------- InfoNCE


class _InfoNceLoss(_FinishedGradients):
    @staticmethod
    def forward(ctx, query, keys, scale, plan: Plan, opts: _Options):
        n, off = plan.n_total, plan.offset
        eps = opts.label_smoothing
        acc = _accumulation_dtype(query)
        keys_all = _gather_rows(keys, plan)
        # The rows' statistics only: InfoNCE's softmax runs over each row of S, and a block row holds
        # whole rows, so this rank's share of the loss is complete without any other rank's numbers.
        stats = contrastive.clip_block_stats_unchecked(query, keys_all, scale, off, opts.normalize,
                                                        opts.workspace_bytes, columns=False)
        share = contrastive.clip_loss_from_stats(n, eps, rows=stats, directions=1)
        value = _gather_scalars(share.to(acc).reshape(1), plan).double().sum()
        grads = (None, None, None)
        if opts.runs_gradient_pass(plan):
            g_query, g_keys, g_scale = contrastive.clip_block_grads_unchecked(
                query, keys_all, scale, stats.row_lse, None, off, n, eps, opts.normalize, opts.image_grad,
                plan.text_grad, torch.ones((), dtype=torch.float32, device=query.device), opts.workspace_bytes,
                directions=1,
            )
            factor = opts.scaling.factor(plan)
            del keys_all
            g_keys = None if g_keys is None else _scatter_sum_rows(g_keys * factor, plan)
            (g_scale,) = _scalar_grads([g_scale], opts.scalar_grads, plan, opts.scaling, factor, acc)
            grads = (None if g_query is None else g_query * factor, g_keys, g_scale)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (query.dtype, keys.dtype, scale.dtype)
        return value.to(acc)


def info_nce_loss(query_local, keys_local, logit_scale, *, group=None, normalize: bool = False,
                  label_smoothing: float = 0.0, grad_scaling: str = "ddp", workspace_bytes: int | None = None):
    """One-directional InfoNCE of the global batch, from each rank's local (query, key) pairs.

    Args:
        query_local: (M_r, D) this rank's queries (the rows of S); M_r may differ between ranks, D,
            dtype and device type may not. The global batch is the ranks' rows concatenated in rank
            order (N = Σ M_r); key i is the positive of global query i, every other key a negative.
        keys_local: (M_r, D) this rank's keys, same dtype and device.
        logit_scale: the multiplier, already exponentiated: a Python float or a 0-dim tensor on the
            embeddings' device.
        group, normalize, grad_scaling, workspace_bytes: as for `clip_loss`.
        label_smoothing: as in `F.cross_entropy`, in [0, 1], over the N global classes.

    Returns:
        () float32 (float64 for float64 inputs), the same value on every rank: what one process
        computes on the concatenated batch, `mmkernels.info_nce_loss(query, keys, logit_scale)`,
        mean_i CE(S_i, i) with S = logit_scale · query @ keys.T (N × N).

    Gradients, as for `clip_loss` ("ddp": W · dL/d(rows) for query_local and keys_local, W · rank
    r's share (from its block row of S) for logit_scale; "none": the unscaled shares), finished in
    the forward (the backward runs no collective).

    Each rank gathers every rank's keys (one all_gather of (max M_r, D)) and computes its block row of
    S, rows only: 8·M_r·N·D matrix FLOPs with gradients (2·M_r·N·D for the row statistics, 6 for the
    gradients; 2·M_r·N·D less per frozen side), no logit block in autograd. Communication beyond the
    check and the keys: one all_gather of the ranks' loss shares (one fp32 each) and, when some rank
    needs the keys' gradient, one reduce-scatter of the (N, D) fp32 partial key gradients.
    """
    caller = "mmkernels.distributed.info_nce_loss"
    names = ("query_local", "keys_local")
    group = process_group(group, caller)
    scale = []

    def local_checks():
        _public_scaling(grad_scaling)(group)
        embedding_checks(query_local, keys_local, names)
        scale.append(scalar_tensor("logit_scale", logit_scale, query_local))
        contrastive.check_label_smoothing(label_smoothing)

    query_grad, keys_grad, scale_grad = (_needs_grad(t) for t in (query_local, keys_local, logit_scale))
    plan = check(caller, "info_nce_loss", group, query_local, keys_local, local_checks, image_grad=query_grad,
                 text_grad=keys_grad, scalar_grad=scale_grad, normalize=normalize, label_smoothing=label_smoothing,
                 grad_scaling=grad_scaling, workspace_bytes=workspace_bytes, names=names)
    opts = _Options(bool(normalize), float(label_smoothing), plan.workspace_bytes, SCALINGS[grad_scaling], query_grad,
                    (scale_grad,))
    return _InfoNceLoss.apply(query_local, keys_local, scale[0], plan, opts)


# --------------------------------------------------------------------------- SigLIP


class _SiglipLoss(_FinishedGradients):
    @staticmethod
    def forward(ctx, image, text, scale, bias, plan: Plan, opts: _Options):
        passes = opts.runs_gradient_pass(plan)
        flags = dict(
            n_total=plan.n_total, normalize=opts.normalize, image_grad=passes and opts.image_grad,
            text_grad=passes and plan.text_grad, workspace_bytes=opts.workspace_bytes,
            scalar_grads=any(opts.scalar_grads) or (opts.scaling.scalar_total and plan.scalar_grad),
        )
        factor = opts.scaling.factor(plan)
        acc = _accumulation_dtype(image)
        if opts.mode == "ring":
            block, g_text = _siglip_ring(image, text, scale, bias, plan, flags, factor)
        else:
            text_all = _gather_rows(text, plan)
            block = contrastive.siglip_block_unchecked(image, text_all, scale, bias, offset=plan.offset, **flags)
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
        return value.to(acc)


def _siglip_ring(image, text, scale, bias, plan: Plan, flags: dict, factor: float):
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
                                                  **flags)
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
                       scaling: str, mode: str = "gather", caller: str = "mmkernels.distributed.siglip_loss",
                       extra_checks=None):
    """`siglip_loss` with any of SCALINGS by name (mmkernels.nn.SigLipLoss uses "open_clip_siglip");
    `extra_checks` as for `clip_loss_scaled`."""
    group = process_group(group, caller)
    scalars = []

    def local_checks():
        if extra_checks is not None:
            extra_checks(group)
        embedding_checks(image_local, text_local)
        scalars.append(scalar_tensor("logit_scale", logit_scale, image_local))
        scalars.append(scalar_tensor("logit_bias", logit_bias, image_local))
        if scaling not in SCALINGS:
            raise ValueError(f"expected scaling to be one of {tuple(SCALINGS)}, got {scaling!r}")
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"expected mode to be one of {MODES}, got {mode!r}")

    image_grad, text_grad, scale_grad, bias_grad = (
        _needs_grad(t) for t in (image_local, text_local, logit_scale, logit_bias))
    plan = check(caller, "siglip_loss", group, image_local, text_local, local_checks, image_grad=image_grad,
                  text_grad=text_grad, scalar_grad=scale_grad or bias_grad, normalize=normalize, label_smoothing=0.0,
                  grad_scaling=scaling, workspace_bytes=workspace_bytes, mode=mode)
    if SCALINGS[scaling].block == "rows" and 0 in plan.sizes:
        raise ValueError(
            f"{caller}: open_clip's SigLIP loss divides each rank's loss by its local batch size, got M = "
            f"{list(plan.sizes)}; mmkernels.distributed.siglip_loss takes empty ranks"
        )
    opts = _Options(bool(normalize), 0.0, plan.workspace_bytes, SCALINGS[scaling], image_grad,
                    (scale_grad, bias_grad), mode)
    return _SiglipLoss.apply(image_local, text_local, scalars[0], scalars[1], plan, opts)


def siglip_loss(image_local, text_local, logit_scale, logit_bias, *, group=None, normalize: bool = False,
                grad_scaling: str = "ddp", workspace_bytes: int | None = None, mode: str = "gather"):
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

    Returns:
        () float32 (float64 for float64 inputs), the same value on every rank:
        -Σ_ij log σ(label_ij · S_ij) / N over the global N × N logits
        S = logit_scale · image @ text.T + logit_bias (label +1 on the diagonal, -1 elsewhere), as
        one process computes it on the concatenated batch. NaN if an input is NaN or infinite.

    Gradients, as for `clip_loss` ("ddp": W · dL/d(rows) for the embeddings, W · rank r's share
    (from its block row of S) for logit_scale and logit_bias; "none": the unscaled shares).
    """
    return siglip_loss_scaled(image_local, text_local, logit_scale, logit_bias, group=group, normalize=normalize,
                              workspace_bytes=workspace_bytes, scaling=grad_scaling, mode=mode,
                              extra_checks=_public_scaling(grad_scaling))
