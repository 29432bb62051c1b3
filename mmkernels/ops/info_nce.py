"""One-directional InfoNCE without the N×N logit matrix: mean_i CE(logit_scale · query_i @ keys.T, i).

The softmax cross-entropy over the rows of S = logit_scale · query @ keys.T only (CLIP's loss is this
in both directions, averaged): the loss BridgeTower's contrastive head takes three times, and the
one that retrieval and distillation set-ups use. Built on CLIP's kernels (contrastive_kernels.py)
with the row statistics alone and the panel kernel's InfoNCE mode.

Work, counted in matrix FLOPs (the loss's three products need 6·N²·D for forward + backward):
8·N²·D. The forward computes every logit once (2·N²·D) for the row log-sum-exps, the positives'
logits and, for label smoothing, the rows' sums; the backward computes every logit once more
(2·N²·D) into W = N·dL/dS = P^row - t for a panel of rows in the workspace and runs the two
products W·keys and W.T·query on cuBLAS (2·N²·D each), one per side that needs a gradient.
Memory: O(N·D) and a workspace of at most `workspace_bytes`.

CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) take the kernels; other CPU tensors, bf16 on
the CPU and float64 take reference.py. Under torch.autocast it computes as without it (autocast off
for its work, forward and backward).
"""
from __future__ import annotations

import torch

from mmkernels.ops import contrastive_kernels as kernels
from mmkernels.ops import reference
from mmkernels.ops._args import check_embedding_pair, scalar_tensor
from mmkernels.ops._common import autocast_off, without_autocast
from mmkernels.ops._dispatch import triton_enabled
from mmkernels.ops.contrastive import (
    _check_flag,
    _check_label_smoothing,
    _fake_grads,
    _grad_flags,
    _operands,
    _or_empty,
    _zero,
    resolve_workspace_bytes,
)

__all__ = ["info_nce_loss"]


def _check_inputs(query, keys) -> None:
    check_embedding_pair(query, keys, ("query", "keys"), same_rows="rows N (key i is query i's positive)")
    if query.shape[0] == 0:
        raise ValueError("expected at least one query, got N = 0")


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("mmkernels::info_nce_fwd", mutates_args=())
def info_nce_fwd(
    query: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor, normalize: bool, label_smoothing: float,
    workspace_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss () fp32, row_lse (N,) float64): one pass over S for its rows' statistics, 2·N²·D."""
    a, b, ra, rb = _operands(query, keys, normalize)
    n = a.shape[0]
    stats = kernels.clip_stats(a, b, ra, rb, logit_scale, 0, workspace_bytes, columns=False)
    eps = label_smoothing
    # CE_i with smoothing = lse_i - (1-eps)·S_ii - (eps/N)·Σ_j S_ij
    targets = (1 - eps) * stats.diag + eps / n * stats.row_sum
    return ((stats.row_lse - targets).sum() / n).float(), stats.row_lse


@info_nce_fwd.register_fake
def _(query, keys, logit_scale, normalize, label_smoothing, workspace_bytes):
    return query.new_empty((), dtype=torch.float32), query.new_empty((query.shape[0],), dtype=torch.float64)


@torch.library.custom_op("mmkernels::info_nce_grads", mutates_args=())
def _info_nce_grads_op(
    query: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor, row_lse: torch.Tensor,
    grad_output: torch.Tensor, label_smoothing: float, normalize: bool, query_grad: bool, keys_grad: bool,
    grad_dtype: torch.dtype, workspace_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d query (N, D), d keys (N, D), d logit_scale ()), × grad_output. A side not asked is an empty
    tensor and costs no product: 2·N²·D for the recompute of the logits plus 2·N²·D per side asked."""
    a, b, ra, rb = _operands(query, keys, normalize)
    n = a.shape[0]
    # dL/dS_ij = grad_output · W_ij / N; W~ = coef·W·ra_i·rb_j with coef = grad_output·s/N
    result = kernels.panel_pass(
        kernels.MODE_INFONCE, a, b, ra, rb, logit_scale, _zero(a), grad_output * logit_scale / n, row_lse, row_lse,
        offset=0, n_total=n, label_smoothing=label_smoothing, normalize=normalize, scalars=True,
        image_grad=query_grad, text_grad=keys_grad, grad_dtype=grad_dtype, workspace_bytes=workspace_bytes,
    )
    d_scale = result.sums[2] * grad_output / n  # Σ dL/dS_ij · U_ij
    return _or_empty(result.image_grad, a), _or_empty(result.text_grad, a), d_scale.to(logit_scale.dtype)


@_info_nce_grads_op.register_fake
def _(query, keys, logit_scale, row_lse, grad_output, label_smoothing, normalize, query_grad, keys_grad, grad_dtype,
      workspace_bytes):
    return _fake_grads(query, keys, query_grad, keys_grad, grad_dtype) + (logit_scale.new_empty(()),)


def _setup_context(ctx, inputs, output):
    query, keys, logit_scale, normalize, label_smoothing, workspace_bytes = inputs
    row_lse = output[1]
    ctx.mark_non_differentiable(row_lse)
    ctx.save_for_backward(query, keys, logit_scale, row_lse)
    ctx.normalize, ctx.label_smoothing, ctx.workspace_bytes = normalize, label_smoothing, workspace_bytes


def _backward(ctx, grad_loss, _grad_row_lse):
    query, keys, logit_scale, row_lse = ctx.saved_tensors
    query_grad, keys_grad = ctx.needs_input_grad[:2]
    d_query, d_keys, d_scale = torch.ops.mmkernels.info_nce_grads(
        query, keys, logit_scale, row_lse, grad_loss, ctx.label_smoothing, ctx.normalize, query_grad, keys_grad,
        query.dtype, ctx.workspace_bytes,
    )
    return d_query if query_grad else None, d_keys if keys_grad else None, d_scale, None, None, None


info_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def info_nce_loss(query, keys, logit_scale, *, normalize: bool = False, label_smoothing: float = 0.0,
                  workspace_bytes: int | None = None):
    """One-directional InfoNCE: `F.cross_entropy(logit_scale · query @ keys.T, arange(N))`, without S.

    Args:
        query: (N, D) the rows of S; key i is the positive of query i, every other key a negative.
        keys: (N, D), same dtype and device.
        logit_scale: the multiplier, already exponentiated (`model.logit_scale.exp()`): a Python
            float or a 0-dim tensor. A tensor that requires grad gets its gradient.
        normalize: L2-normalise both inputs inside the op (forward and backward).
        label_smoothing: as in `F.cross_entropy`, a float in [0, 1].
        workspace_bytes: as in `mmkernels.clip_loss` (default $MMKERNELS_WORKSPACE_BYTES, else 256 MiB).

    Returns:
        () float32 tensor: mean_i CE(S_i, i) with S = logit_scale · query @ keys.T (CLIP's loss is the
        mean of this and its transpose: `(info_nce_loss(a, b, s) + info_nce_loss(b, a, s)) / 2`).
        An Inf or NaN among the inputs gives NaN. On CUDA (or under TRITON_INTERPRET=1) S is never
        materialised; forward + backward compute 8·N²·D matrix FLOPs (6·N²·D with one side frozen).
    """
    _check_inputs(query, keys)
    label_smoothing = _check_label_smoothing(label_smoothing)
    normalize = _check_flag("normalize", normalize)
    scale = scalar_tensor("logit_scale", logit_scale, query)
    workspace_bytes = resolve_workspace_bytes(workspace_bytes)
    if not triton_enabled(query):
        return without_autocast(reference.info_nce_loss, query, keys, scale, normalize, label_smoothing)
    with autocast_off(query):
        n, d = query.shape
        query_grad, keys_grad, scale_grad = _grad_flags(query, keys, scale)
        grads = query_grad or keys_grad or scale_grad
        kernels.check_call_workspace(n, n, d, query.dtype, query.device, workspace_bytes, stats=True, columns=False,
                                     panel=(query_grad, keys_grad, query.dtype) if grads else None)
        return torch.ops.mmkernels.info_nce_fwd(query, keys, scale, normalize, label_smoothing, workspace_bytes)[0]
