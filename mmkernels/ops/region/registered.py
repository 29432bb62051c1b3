"""The registered ops of region_mask and masked_region_loss (torch.library custom ops, with their
fake implementations and autograd), each under its op name: `region_mask_fwd` is
torch.ops.mmkernels.region_mask_fwd, with `region_mask_bwd` as its backward;
`masked_region_loss_fwd` is torch.ops.mmkernels.masked_region_loss_fwd, with
`masked_region_loss_bwd` as its backward.

The ops take checked arguments (mmkernels.ops.region's public functions check them) and a backend,
"triton" or "cuda", that launch.py's tables map to a launcher. They allocate the outputs (through
new_output, poisoned under test) and the workspaces, and launch on the inputs' device.
"""
from __future__ import annotations

from typing import Optional

import torch

from mmkernels.ops._common import last_dim_contiguous, new_output
from mmkernels.ops._extension import launch_device
from mmkernels.ops.region.launch import _LOSS_BWD, _LOSS_FWD, _REGION_MASK_BWD, _REGION_MASK_FWD
from mmkernels.ops.region.reference import existing_regions

# --------------------------------------------------------------------------- region_mask


@torch.library.custom_op("mmkernels::region_mask_fwd", mutates_args=())
def region_mask_fwd(
    feats: torch.Tensor, region_lens: Optional[torch.Tensor], valid_mask: Optional[torch.Tensor],
    mask_embedding: Optional[torch.Tensor], seed: torch.Tensor, select_below: int, min_masked: int,
    bert: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (features (B, R, D), mask (B, R) bool, source (B, R) int32; see reference.region_mask_plan).

    region_lens: (B,) int64, or valid_mask: (B, R) bool, on feats' device; mask_embedding: (D,)
    in feats' dtype; seed: (2,) int64 on the CPU; backend: "triton" or "cuda".
    """
    feats = last_dim_contiguous(feats)
    n_samples, n_regions, dim = feats.shape
    # the kernels index region_lens and mask_embedding with unit stride
    if region_lens is not None:
        region_lens = region_lens.long().contiguous()
    if mask_embedding is not None:
        mask_embedding = mask_embedding.contiguous()
    valid_u8 = valid_mask.view(torch.uint8) if valid_mask is not None else None
    flat_cum = None
    if bert:
        existing = existing_regions(region_lens, valid_mask, n_regions)
        flat_cum = existing.flatten().cumsum(0, dtype=torch.int32)
    out = new_output(feats.shape, feats.dtype, feats.device)
    mask = new_output((n_samples, n_regions), torch.bool, feats.device)
    source = new_output((n_samples, n_regions), torch.int32, feats.device)
    with launch_device(feats):
        _REGION_MASK_FWD[backend](
            feats, region_lens, valid_u8, flat_cum, mask_embedding, seed, select_below, min_masked,
            bert, out, mask.view(torch.uint8), source,
        )
    return out, mask, source


@region_mask_fwd.register_fake
def _(feats, region_lens, valid_mask, mask_embedding, seed, select_below, min_masked, bert, backend):
    n_samples, n_regions, _ = feats.shape
    return (
        torch.empty_like(feats, memory_format=torch.contiguous_format),
        feats.new_empty((n_samples, n_regions), dtype=torch.bool),
        feats.new_empty((n_samples, n_regions), dtype=torch.int32),
    )


@torch.library.custom_op("mmkernels::region_mask_bwd", mutates_args=())
def region_mask_bwd(
    grad_out: torch.Tensor, source: torch.Tensor, embedding_grad: bool, bert: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d feats (B, R, D), d mask_embedding (D,) fp32, empty (0,) unless embedding_grad).

    grad_out: (B, R, D), any strides over B and R (0 included); source: region_mask_fwd's.
    """
    grad_out = last_dim_contiguous(grad_out)
    n_samples, _, dim = grad_out.shape
    grad_in = new_output(grad_out.shape, grad_out.dtype, grad_out.device)
    # per-sample partial sums: a (B, D) workspace, reduced below, instead of atomics across samples
    emb_partial = new_output((n_samples, dim), torch.float32, grad_out.device) if embedding_grad else None
    with launch_device(grad_out):
        _REGION_MASK_BWD[backend](grad_out, source, grad_in, emb_partial, bert)
    if emb_partial is None:
        return grad_in, grad_out.new_empty((0,), dtype=torch.float32)
    return grad_in, emb_partial.sum(0)


@region_mask_bwd.register_fake
def _(grad_out, source, embedding_grad, bert, backend):
    dim = grad_out.shape[-1] if embedding_grad else 0
    return (
        torch.empty_like(grad_out, memory_format=torch.contiguous_format),
        grad_out.new_empty((dim,), dtype=torch.float32),
    )


def _region_mask_setup_context(ctx, inputs, output):
    _, _, _, mask_embedding, _, _, _, bert, backend = inputs
    _, mask, source = output
    ctx.save_for_backward(source)
    ctx.mark_non_differentiable(mask, source)
    ctx.bert, ctx.backend = bert, backend
    ctx.embedding_dtype = mask_embedding.dtype if mask_embedding is not None else None


def _region_mask_backward(ctx, grad_out, _grad_mask, _grad_source):
    (source,) = ctx.saved_tensors
    embedding_grad = ctx.needs_input_grad[3]
    grad_in, grad_emb = torch.ops.mmkernels.region_mask_bwd(
        grad_out, source, embedding_grad, ctx.bert, ctx.backend
    )
    grad_emb = grad_emb.to(ctx.embedding_dtype) if embedding_grad else None
    return grad_in, None, None, grad_emb, None, None, None, None, None


region_mask_fwd.register_autograd(_region_mask_backward, setup_context=_region_mask_setup_context)


# --------------------------------------------------------------------------- masked_region_loss


@torch.library.custom_op("mmkernels::masked_region_loss_fwd", mutates_args=())
def masked_region_loss_fwd(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str, beta: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (per-region loss (B, R) fp32, 0 where not selected; stats (B, R, 2) fp32 for "kl"
    holding log-sum-exp(pred) and Σ target per region, else empty (0,))."""
    pred, target = last_dim_contiguous(pred), last_dim_contiguous(target)
    n_samples, n_regions, _ = pred.shape
    loss = new_output((n_samples, n_regions), torch.float32, pred.device)
    stats_shape = (n_samples, n_regions, 2) if kind == "kl" else (0,)
    stats = new_output(stats_shape, torch.float32, pred.device)
    with launch_device(pred):
        _LOSS_FWD[backend](pred, target, mask.view(torch.uint8), kind, beta, loss, stats)
    return loss, stats


@masked_region_loss_fwd.register_fake
def _(pred, target, mask, kind, beta, backend):
    n_samples, n_regions, _ = pred.shape
    stats_shape = (n_samples, n_regions, 2) if kind == "kl" else (0,)
    return (
        pred.new_empty((n_samples, n_regions), dtype=torch.float32),
        pred.new_empty(stats_shape, dtype=torch.float32),
    )


@torch.library.custom_op("mmkernels::masked_region_loss_bwd", mutates_args=())
def masked_region_loss_bwd(
    grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
    stats: torch.Tensor, kind: str, beta: float, target_grad: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d pred (B, R, K), d target (B, R, K), or empty (0,) unless target_grad).

    grad_loss: (B, R), the gradient of the per-region losses (any strides, 0 included).
    """
    pred, target = last_dim_contiguous(pred), last_dim_contiguous(target)
    grad_pred = new_output(pred.shape, pred.dtype, pred.device)
    grad_target = new_output(target.shape, target.dtype, target.device) if target_grad else None
    with launch_device(pred):
        _LOSS_BWD[backend](grad_loss, pred, target, mask.view(torch.uint8), stats, kind, beta, grad_pred, grad_target)
    if grad_target is None:
        grad_target = pred.new_empty((0,))
    return grad_pred, grad_target


@masked_region_loss_bwd.register_fake
def _(grad_loss, pred, target, mask, stats, kind, beta, target_grad, backend):
    grad_target = torch.empty(target.shape, dtype=target.dtype, device=target.device) if target_grad else pred.new_empty((0,))
    return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device), grad_target


def _loss_setup_context(ctx, inputs, output):
    pred, target, mask, kind, beta, backend = inputs
    _, stats = output
    ctx.save_for_backward(pred, target, mask, stats)
    ctx.mark_non_differentiable(stats)
    ctx.kind, ctx.beta, ctx.backend = kind, beta, backend


def _loss_backward(ctx, grad_loss, _grad_stats):
    pred, target, mask, stats = ctx.saved_tensors
    target_grad = ctx.needs_input_grad[1]
    grad_pred, grad_target = torch.ops.mmkernels.masked_region_loss_bwd(
        grad_loss, pred, target, mask, stats, ctx.kind, ctx.beta, target_grad, ctx.backend
    )
    return grad_pred, (grad_target if target_grad else None), None, None, None, None


masked_region_loss_fwd.register_autograd(_loss_backward, setup_context=_loss_setup_context)
