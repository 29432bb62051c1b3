"""The contrastive ops registered with torch.library: each a custom_op with its fake (shapes for
torch.compile) and, for the losses, its autograd. The Python name of each op is its op name:
`registered.clip_block_stats` is torch.ops.mmkernels.clip_block_stats.

Every op takes checked arguments (the public functions in __init__.py check them) on the kernels'
path: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch

from mmkernels.ops.contrastive import launch, reference

__all__ = ["clip_block_grads", "clip_block_stats", "clip_loss_fwd", "info_nce_fwd", "info_nce_grads", "siglip_block"]


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)


def _or_empty(t, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


def _groups(row_ids, row_count, col_ids, col_count):
    """The launchers' groups: None, or the four int64 tensors."""
    return None if row_ids is None else (row_ids, row_count, col_ids, col_count)


def _square_groups(group_ids):
    """The groups of a batch against itself: (ids, counts, ids, counts), or None."""
    if group_ids is None:
        return None
    labels, counts = reference.group_labels(group_ids)
    return (labels, counts, labels, counts)


def _columns(text_emb, extra):
    """The columns of S: the paired texts, then the extra negatives (a copy only when there are any)."""
    return text_emb if extra is None or extra.shape[0] == 0 else torch.cat([text_emb, extra])


def _split_text_grad(d_columns, n: int, extra):
    """(d text (N, D), d extra (K, D) or None) from the gradient of the columns of S."""
    if extra is None:
        return d_columns, None
    if d_columns.shape[0] == n:  # K = 0
        return d_columns, torch.zeros_like(extra)
    return d_columns[:n], d_columns[n:].clone()  # an op's outputs may not alias each other


def _fake_grads(image_emb, text_emb, image_grad: bool, text_grad: bool, grad_dtype):
    d_image = image_emb.new_empty(image_emb.shape if image_grad else (0,), dtype=grad_dtype if image_grad else None)
    d_text = text_emb.new_empty(text_emb.shape if text_grad else (0,), dtype=grad_dtype if text_grad else None)
    return d_image, d_text


# --------------------------------------------------------------------------- CLIP


@torch.library.custom_op("mmkernels::clip_block_stats", mutates_args=())
def clip_block_stats(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, offset: int, normalize: bool,
    workspace_bytes: int, row_ids: torch.Tensor | None = None, row_count: torch.Tensor | None = None,
    col_ids: torch.Tensor | None = None, col_count: torch.Tensor | None = None, n_pair: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_lse (M,) float64, col_max (N,), col_sumexp (N,), diag (M,), row_sum (M,), extra_sum (M,) fp32
    (0 without extra columns)). offset >= N: no positives; row_ids..col_count: the positives by group
    id; n_pair (-1: N): the paired columns, the rest extra negatives. 2·M·N·D."""
    a, b, ra, rb = launch.operands(image_emb, text_emb, normalize)
    n = b.shape[0]
    stats = launch.clip_stats(a, b, ra, rb, logit_scale, offset, workspace_bytes,
                              groups=_groups(row_ids, row_count, col_ids, col_count),
                              n_pair=n if n_pair < 0 else n_pair)
    extra_sum = torch.zeros_like(stats.row_sum) if stats.extra_sum is None else stats.extra_sum
    return tuple(stats[:5]) + (extra_sum,)


@clip_block_stats.register_fake
def _(image_emb, text_emb, logit_scale, offset, normalize, workspace_bytes, row_ids=None, row_count=None,
      col_ids=None, col_count=None, n_pair=-1):
    m, n = image_emb.shape[0], text_emb.shape[0]
    return tuple(image_emb.new_empty((size,), dtype=dtype)
                 for size, dtype in zip((m, n, n, m, m, m), (torch.float64,) + (torch.float32,) * 5))


@torch.library.custom_op("mmkernels::clip_block_grads", mutates_args=())
def clip_block_grads(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, row_lse: torch.Tensor,
    col_lse: torch.Tensor, grad_output: torch.Tensor, offset: int, n_total: int, label_smoothing: float,
    normalize: bool, image_grad: bool, text_grad: bool, grad_dtype: torch.dtype, workspace_bytes: int,
    row_ids: torch.Tensor | None = None, row_count: torch.Tensor | None = None, col_ids: torch.Tensor | None = None,
    col_count: torch.Tensor | None = None, n_pair: int = -1, row_classes: int = -1, directions: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d image_emb (M, D), d text_emb (N, D), d logit_scale ()) of the block, × grad_output.

    offset, row_ids..col_count, n_pair: as in clip_block_stats; row_classes (-1: n_total): the rows'
    label-smoothing classes; directions 1: one-directional InfoNCE (col_lse not read).
    A side not asked is an empty tensor and costs no product: 2·M·N·D for the recompute of the
    logits plus 2·M·N·D per side asked.
    """
    a, b, ra, rb = launch.operands(image_emb, text_emb, normalize)
    # dL/dS_ij = grad_output · W_ij / (directions·n_total); W~ = coef·W·ra_i·rb_j, coef = grad_output·s/(d·n)
    coef = grad_output * logit_scale / (directions * n_total)
    result = launch.panel_pass(
        launch.MODE_CLIP if directions == 2 else launch.MODE_INFONCE, a, b, ra, rb, logit_scale, _zero(a), coef,
        row_lse, col_lse, offset=offset, n_total=n_total, label_smoothing=label_smoothing, normalize=normalize,
        scalars=True, image_grad=image_grad, text_grad=text_grad, grad_dtype=grad_dtype,
        workspace_bytes=workspace_bytes, groups=_groups(row_ids, row_count, col_ids, col_count),
        n_pair=None if n_pair < 0 else n_pair, row_classes=None if row_classes < 0 else row_classes,
    )
    d_scale = result.sums[2] * grad_output / (directions * n_total)  # Σ dL/dS_ij · U_ij
    return _or_empty(result.image_grad, a), _or_empty(result.text_grad, a), d_scale.to(logit_scale.dtype)


@clip_block_grads.register_fake
def _(image_emb, text_emb, logit_scale, row_lse, col_lse, grad_output, offset, n_total, label_smoothing, normalize,
      image_grad, text_grad, grad_dtype, workspace_bytes, row_ids=None, row_count=None, col_ids=None, col_count=None,
      n_pair=-1, row_classes=-1, directions=2):
    return _fake_grads(image_emb, text_emb, image_grad, text_grad, grad_dtype) + (logit_scale.new_empty(()),)


@torch.library.custom_op("mmkernels::clip_loss_fwd", mutates_args=())
def clip_loss_fwd(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, normalize: bool,
    label_smoothing: float, workspace_bytes: int, group_ids: torch.Tensor | None = None,
    extra_text: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss () fp32, row_lse (N,), col_lse (N,) float64): the single-GPU CLIP loss, the block M = N, offset 0,
    with group_ids (N,) int64 the group targets, with extra_text (K, D) K more columns of the rows."""
    n = image_emb.shape[0]
    a, b, ra, rb = launch.operands(image_emb, _columns(text_emb, extra_text), normalize)
    stats = launch.clip_stats(a, b, ra, rb, logit_scale, 0, workspace_bytes, groups=_square_groups(group_ids), n_pair=n)
    col_lse = reference.merge_column_stats(stats.col_max[None, :n], stats.col_sumexp[None, :n])
    loss = launch.clip_loss_from_stats(n, label_smoothing, rows=stats, col_lse=col_lse, row_classes=b.shape[0])
    return loss.float(), stats.row_lse, col_lse


@clip_loss_fwd.register_fake
def _(image_emb, text_emb, logit_scale, normalize, label_smoothing, workspace_bytes, group_ids=None, extra_text=None):
    n = image_emb.shape[0]
    return (image_emb.new_empty((), dtype=torch.float32), image_emb.new_empty((n,), dtype=torch.float64),
            image_emb.new_empty((n,), dtype=torch.float64))


def _clip_setup_context(ctx, inputs, output):
    image_emb, text_emb, logit_scale, normalize, label_smoothing, workspace_bytes, group_ids, extra_text = inputs
    _, row_lse, col_lse = output
    ctx.mark_non_differentiable(row_lse, col_lse)
    ctx.save_for_backward(image_emb, text_emb, logit_scale, row_lse, col_lse, group_ids, extra_text)
    ctx.normalize, ctx.label_smoothing, ctx.workspace_bytes = normalize, label_smoothing, workspace_bytes


def _clip_backward(ctx, grad_loss, _grad_row_lse, _grad_col_lse):
    image_emb, text_emb, logit_scale, row_lse, col_lse, group_ids, extra_text = ctx.saved_tensors
    image_grad, text_grad = ctx.needs_input_grad[:2]
    extra_grad = extra_text is not None and ctx.needs_input_grad[7]
    n = image_emb.shape[0]
    columns = _columns(text_emb, extra_text)
    groups = _square_groups(group_ids)
    d_image, d_columns, d_scale = torch.ops.mmkernels.clip_block_grads(
        image_emb, columns, logit_scale, row_lse, col_lse, grad_loss, 0, n, ctx.label_smoothing,
        ctx.normalize, image_grad, text_grad or extra_grad, image_emb.dtype, ctx.workspace_bytes,
        *(groups or (None,) * 4), n_pair=n, row_classes=columns.shape[0],
    )
    d_text, d_extra = _split_text_grad(d_columns, n, extra_text) if text_grad or extra_grad else (None, None)
    return (d_image if image_grad else None, d_text if text_grad else None, d_scale, None, None, None, None,
            d_extra if extra_grad else None)


clip_loss_fwd.register_autograd(_clip_backward, setup_context=_clip_setup_context)


# --------------------------------------------------------------------------- SigLIP


@torch.library.custom_op("mmkernels::siglip_block", mutates_args=())
def siglip_block(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
    offset: int, n_total: int, normalize: bool, image_grad: bool, text_grad: bool, scalar_grads: bool,
    grad_dtype: torch.dtype, workspace_bytes: int, row_ids: torch.Tensor | None = None,
    row_count: torch.Tensor | None = None, col_ids: torch.Tensor | None = None, col_count: torch.Tensor | None = None,
    n_pair: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (), d image_emb (M, D), d text_emb (N, D), d logit_scale (), d logit_bias ()): the block's
    share of the global SigLIP loss and of its gradients, all from one pass over its logits.

    Row i's positive is column offset + i where that column exists: offset >= N (siglip_block passes
    offset = N for offset=None) gives a block without positives, every label -1, at the same cost;
    row_ids..col_count: +1 for the pairs with equal ids instead (the counts are not read).

    A side not asked is an empty tensor and costs no product (2·M·N·D each); without scalar_grads
    the scalars' gradients are 0. Differentiable: the backward scales the gradients computed here,
    so the flags must cover every input that requires grad.
    """
    a, b, ra, rb = launch.operands(image_emb, text_emb, normalize)
    # dL/dS_ij = W_ij / n_total; W~ = coef·W·ra_i·rb_j with coef = s / n_total
    result = launch.panel_pass(
        launch.MODE_SIGLIP, a, b, ra, rb, logit_scale, logit_bias, logit_scale / n_total, a, a, offset=offset,
        n_total=n_total, label_smoothing=0.0, normalize=normalize, scalars=scalar_grads, image_grad=image_grad,
        text_grad=text_grad, grad_dtype=grad_dtype, workspace_bytes=workspace_bytes,
        groups=_groups(row_ids, row_count, col_ids, col_count), n_pair=None if n_pair < 0 else n_pair,
    )
    loss, d_bias, d_scale = (total / n_total for total in result.sums.unbind())  # separate tensors, no views
    return (loss, _or_empty(result.image_grad, a), _or_empty(result.text_grad, a),
            d_scale.to(logit_scale.dtype), d_bias.to(logit_bias.dtype))


@siglip_block.register_fake
def _(image_emb, text_emb, logit_scale, logit_bias, offset, n_total, normalize, image_grad, text_grad, scalar_grads,
      grad_dtype, workspace_bytes, row_ids=None, row_count=None, col_ids=None, col_count=None, n_pair=-1):
    return ((image_emb.new_empty((), dtype=torch.float32),)
            + _fake_grads(image_emb, text_emb, image_grad, text_grad, grad_dtype)
            + (logit_scale.new_empty(()), logit_bias.new_empty(())))


def _siglip_setup_context(ctx, inputs, output):
    ctx.flags = inputs[7:10]  # image_grad, text_grad, scalar_grads
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _siglip_backward(ctx, grad_loss, *_unused):
    image_grad, text_grad, scalar_grads = ctx.flags
    computed = (image_grad, text_grad, scalar_grads, scalar_grads)
    grads = []
    for name, needed, done, g in zip(("image_emb", "text_emb", "logit_scale", "logit_bias"), ctx.needs_input_grad,
                                     computed, ctx.saved_tensors):
        if needed and not done:
            raise RuntimeError(f"siglip_block was called without the gradient of {name}, which requires grad")
        grads.append(grad_loss * g if needed else None)
    return (*grads,) + (None,) * 13


siglip_block.register_autograd(_siglip_backward, setup_context=_siglip_setup_context)


# --------------------------------------------------------------------------- one-directional InfoNCE


@torch.library.custom_op("mmkernels::info_nce_fwd", mutates_args=())
def info_nce_fwd(
    query: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor, normalize: bool, label_smoothing: float,
    workspace_bytes: int, group_ids: torch.Tensor | None = None, extra_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss () fp32, row_lse (N,) float64): one pass over S for its rows' statistics, 2·N·(N + K)·D."""
    n = query.shape[0]
    a, b, ra, rb = launch.operands(query, _columns(keys, extra_keys), normalize)
    stats = launch.clip_stats(a, b, ra, rb, logit_scale, 0, workspace_bytes, columns=False,
                              groups=_square_groups(group_ids), n_pair=n)
    loss = launch.clip_loss_from_stats(n, label_smoothing, rows=stats, directions=1, row_classes=b.shape[0])
    return loss.float(), stats.row_lse


@info_nce_fwd.register_fake
def _(query, keys, logit_scale, normalize, label_smoothing, workspace_bytes, group_ids=None, extra_keys=None):
    return query.new_empty((), dtype=torch.float32), query.new_empty((query.shape[0],), dtype=torch.float64)


@torch.library.custom_op("mmkernels::info_nce_grads", mutates_args=())
def info_nce_grads(
    query: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor, row_lse: torch.Tensor,
    grad_output: torch.Tensor, label_smoothing: float, normalize: bool, query_grad: bool, keys_grad: bool,
    grad_dtype: torch.dtype, workspace_bytes: int, group_ids: torch.Tensor | None = None,
    extra_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d query (N, D), d keys (N, D), d extra_keys (K, D), d logit_scale ()), × grad_output. A side not
    asked is an empty tensor and costs no product (keys_grad covers keys and extra_keys): 2·N·(N + K)·D
    for the recompute of the logits plus 2·N·(N + K)·D per side asked."""
    n = query.shape[0]
    a, b, ra, rb = launch.operands(query, _columns(keys, extra_keys), normalize)
    # dL/dS_ij = grad_output · W_ij / N; W~ = coef·W·ra_i·rb_j with coef = grad_output·s/N
    result = launch.panel_pass(
        launch.MODE_INFONCE, a, b, ra, rb, logit_scale, _zero(a), grad_output * logit_scale / n, row_lse, row_lse,
        offset=0, n_total=n, label_smoothing=label_smoothing, normalize=normalize, scalars=True,
        image_grad=query_grad, text_grad=keys_grad, grad_dtype=grad_dtype, workspace_bytes=workspace_bytes,
        groups=_square_groups(group_ids), n_pair=n, row_classes=b.shape[0],
    )
    d_scale = result.sums[2] * grad_output / n  # Σ dL/dS_ij · U_ij
    d_keys, d_extra = (_split_text_grad(result.text_grad, n, extra_keys) if keys_grad else (None, None))
    return (_or_empty(result.image_grad, a), _or_empty(d_keys, a), _or_empty(d_extra, a),
            d_scale.to(logit_scale.dtype))


@info_nce_grads.register_fake
def _(query, keys, logit_scale, row_lse, grad_output, label_smoothing, normalize, query_grad, keys_grad, grad_dtype,
      workspace_bytes, group_ids=None, extra_keys=None):
    d_query, d_keys = _fake_grads(query, keys, query_grad, keys_grad, grad_dtype)
    with_extra = keys_grad and extra_keys is not None
    d_extra = query.new_empty(extra_keys.shape if with_extra else (0,), dtype=grad_dtype if with_extra else None)
    return d_query, d_keys, d_extra, logit_scale.new_empty(())


def _info_nce_setup_context(ctx, inputs, output):
    query, keys, logit_scale, normalize, label_smoothing, workspace_bytes, group_ids, extra_keys = inputs
    row_lse = output[1]
    ctx.mark_non_differentiable(row_lse)
    ctx.save_for_backward(query, keys, logit_scale, row_lse, group_ids, extra_keys)
    ctx.normalize, ctx.label_smoothing, ctx.workspace_bytes = normalize, label_smoothing, workspace_bytes


def _info_nce_backward(ctx, grad_loss, _grad_row_lse):
    query, keys, logit_scale, row_lse, group_ids, extra_keys = ctx.saved_tensors
    query_grad, keys_grad = ctx.needs_input_grad[:2]
    extra_grad = extra_keys is not None and ctx.needs_input_grad[7]
    d_query, d_keys, d_extra, d_scale = torch.ops.mmkernels.info_nce_grads(
        query, keys, logit_scale, row_lse, grad_loss, ctx.label_smoothing, ctx.normalize, query_grad,
        keys_grad or extra_grad, query.dtype, ctx.workspace_bytes, group_ids, extra_keys,
    )
    return (d_query if query_grad else None, d_keys if keys_grad else None, d_scale, None, None, None, None,
            d_extra if extra_grad else None)


info_nce_fwd.register_autograd(_info_nce_backward, setup_context=_info_nce_setup_context)
