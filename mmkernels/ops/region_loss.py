"""masked_region_loss: the masked region modeling losses (MRFR, MRC-kl) over the selected regions.

The kernels read the selected rows in place and skip the others, so no (n_selected, K) gather is
made and rows that are not selected (NaN or Inf there included) neither count nor get a gradient
other than 0.

One chain per pass: `_masked_region_loss_fwd_kernel` (Triton, region_loss_kernels.py; CUDA:
csrc/region_loss.cu) → `_loss_fwd_triton` / `_loss_fwd_cuda` (launchers) →
`torch.ops.mmkernels.masked_region_loss_fwd` (registered op, with `masked_region_loss_bwd` as its
autograd) → `mmkernels.masked_region_loss`. The backend is chosen by `_dispatch.resolve_backend`.

Work: the forward reads the selected rows of pred and target once; the backward reads them again
and writes the (B, R, K) gradient of pred (and of target when asked). No matrix products.
"""
from __future__ import annotations

import torch

from mmkernels.ops import _extension, reference
from mmkernels.ops._args import check_choice, check_float_tensor, check_same_device
from mmkernels.ops._common import last_dim_contiguous, new_output, triton
from mmkernels.ops._dispatch import check_backend, resolve_backend
from mmkernels.ops._extension import DTYPE_CODE, cuda_stream, launch_device
from mmkernels.ops.region_loss_kernels import _masked_region_loss_bwd_kernel, _masked_region_loss_fwd_kernel

__all__ = ["masked_region_loss"]

LOSS_KINDS = ("mse", "smooth_l1", "kl")
REDUCTIONS = ("mean", "sum", "none")
_KIND_CODE = {"mse": 0, "smooth_l1": 1, "kl": 2}  # as csrc/region.h, enum LossKind


# --------------------------------------------------------------------------- launchers


def _loss_blocks(dim: int, device: torch.device) -> dict:
    """Tile sizes. Under the interpreter: small enough that the tests cross every block edge."""
    if device.type != "cuda":
        return dict(BLOCK_R=8, BLOCK_K=64, num_warps=4)
    return dict(BLOCK_R=4, BLOCK_K=min(512, triton.next_power_of_2(dim)), num_warps=4)


def _loss_fwd_triton(pred, target, mask_u8, kind, beta, loss, stats):
    n_samples, n_regions, dim = pred.shape
    n_rows = n_samples * n_regions
    cfg = _loss_blocks(dim, pred.device)
    _masked_region_loss_fwd_kernel[(triton.cdiv(n_rows, cfg["BLOCK_R"]),)](
        pred, target, mask_u8, loss, stats if stats.numel() else loss, n_regions, dim, n_rows,
        pred.stride(0), pred.stride(1), target.stride(0), target.stride(1),
        mask_u8.stride(0), mask_u8.stride(1), float(beta), KIND=_KIND_CODE[kind], **cfg,
    )


def _loss_fwd_cuda(pred, target, mask_u8, kind, beta, loss, stats):
    n_samples, n_regions, dim = pred.shape
    device, stream = cuda_stream(pred)
    _extension.extension().masked_region_loss_forward(
        pred.data_ptr(), pred.stride(0), pred.stride(1), target.data_ptr(), target.stride(0),
        target.stride(1), mask_u8.data_ptr(), mask_u8.stride(0), mask_u8.stride(1), loss.data_ptr(),
        stats.data_ptr() if stats.numel() else 0, n_samples, n_regions, dim,
        DTYPE_CODE[pred.dtype], _KIND_CODE[kind], float(beta), device, stream,
    )


def _loss_bwd_triton(grad_loss, pred, target, mask_u8, stats, kind, beta, grad_pred, grad_target):
    n_samples, n_regions, dim = pred.shape
    n_rows = n_samples * n_regions
    cfg = _loss_blocks(dim, pred.device)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]), triton.cdiv(dim, cfg["BLOCK_K"]))
    _masked_region_loss_bwd_kernel[grid](
        grad_loss, pred, target, mask_u8, stats if stats.numel() else grad_loss, grad_pred,
        grad_target if grad_target is not None else grad_pred, n_regions, dim, n_rows,
        grad_loss.stride(0), grad_loss.stride(1), pred.stride(0), pred.stride(1),
        target.stride(0), target.stride(1), mask_u8.stride(0), mask_u8.stride(1), float(beta),
        KIND=_KIND_CODE[kind], TARGET_GRAD=grad_target is not None, **cfg,
    )


def _loss_bwd_cuda(grad_loss, pred, target, mask_u8, stats, kind, beta, grad_pred, grad_target):
    n_samples, n_regions, dim = pred.shape
    grad_loss = grad_loss.float()  # the CUDA entry point reads fp32
    device, stream = cuda_stream(pred)
    _extension.extension().masked_region_loss_backward(
        grad_loss.data_ptr(), grad_loss.stride(0), grad_loss.stride(1),
        pred.data_ptr(), pred.stride(0), pred.stride(1), target.data_ptr(), target.stride(0),
        target.stride(1), mask_u8.data_ptr(), mask_u8.stride(0), mask_u8.stride(1),
        stats.data_ptr() if stats.numel() else 0, grad_pred.data_ptr(),
        grad_target.data_ptr() if grad_target is not None else 0, n_samples, n_regions, dim,
        DTYPE_CODE[pred.dtype], _KIND_CODE[kind], float(beta), device, stream,
    )


_FWD = {"triton": _loss_fwd_triton, "cuda": _loss_fwd_cuda}
_BWD = {"triton": _loss_bwd_triton, "cuda": _loss_bwd_cuda}


# --------------------------------------------------------------------------- registered ops


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
        _FWD[backend](pred, target, mask.view(torch.uint8), kind, beta, loss, stats)
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
        _BWD[backend](grad_loss, pred, target, mask.view(torch.uint8), stats, kind, beta, grad_pred, grad_target)
    if grad_target is None:
        grad_target = pred.new_empty((0,))
    return grad_pred, grad_target


@masked_region_loss_bwd.register_fake
def _(grad_loss, pred, target, mask, stats, kind, beta, target_grad, backend):
    grad_target = torch.empty(target.shape, dtype=target.dtype, device=target.device) if target_grad else pred.new_empty((0,))
    return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device), grad_target


def _setup_context(ctx, inputs, output):
    pred, target, mask, kind, beta, backend = inputs
    _, stats = output
    ctx.save_for_backward(pred, target, mask, stats)
    ctx.mark_non_differentiable(stats)
    ctx.kind, ctx.beta, ctx.backend = kind, beta, backend


def _backward(ctx, grad_loss, _grad_stats):
    pred, target, mask, stats = ctx.saved_tensors
    target_grad = ctx.needs_input_grad[1]
    grad_pred, grad_target = torch.ops.mmkernels.masked_region_loss_bwd(
        grad_loss, pred, target, mask, stats, ctx.kind, ctx.beta, target_grad, ctx.backend
    )
    return grad_pred, (grad_target if target_grad else None), None, None, None, None


masked_region_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def _check_region_count(n_samples: int, n_regions: int) -> None:
    # the CUDA kernels count regions (b·R + r) in int32
    if n_samples * n_regions >= 2**31:
        raise ValueError(f"expected B·R < 2^31 regions, got {n_samples}·{n_regions}")


def _check_loss_inputs(pred, target, mask, kind, reduction, beta, backend) -> None:
    check_float_tensor("pred", pred, 3, "(B, R, K)")
    check_float_tensor("target", target, 3, "(B, R, K)")
    if pred.shape != target.shape:
        raise ValueError(
            f"expected pred and target of the same shape (B, R, K), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.dtype != target.dtype:
        raise TypeError(
            f"expected pred and target to share a dtype, got {pred.dtype} and {target.dtype} "
            "(cast target with target.to(pred.dtype))"
        )
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"expected mask to be a bool tensor, got {got}")
    if mask.shape != pred.shape[:2]:
        raise ValueError(
            f"expected mask of shape (B, R) = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}"
        )
    check_same_device([("pred", pred), ("target", target), ("mask", mask)])
    check_choice("kind", kind, LOSS_KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"expected beta to be a float >= 0, got {beta!r}")
    check_backend(backend)
    _check_region_count(*pred.shape[:2])


def masked_region_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "mse",
    reduction: str = "mean",
    *,
    beta: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Masked region modeling loss over the selected regions, without gathering them.

    Args:
        pred: (B, R, K) predictions: regressed features ("mse", "smooth_l1") or class logits ("kl").
        target: (B, R, K) same dtype: target features, or class probabilities ("kl").
        mask: (B, R) bool, the selected regions (RegionMaskOutput.mask).
        kind: per selected region, "mse": mean_k (pred - target)^2 (UNITER's MRFR);
            "smooth_l1": mean_k smooth_l1(pred - target; beta) (LXMERT's feature loss);
            "kl": KL(target || softmax(pred)) = Σ_k target·(log target - log_softmax(pred)) (UNITER's
            MRC-kl; UNITER's code further divides by K when it averages F.kl_div over elements).
            Defined for any target, with no check (a check would sync the GPU), on every backend
            alike: each term is F.kl_div's pointwise target·(log target - log_softmax(pred)), except
            that a term whose target is exactly 0 is 0 (F.kl_div gives NaN there when that logit is
            -inf). So a target need not sum to 1 (the pred gradient is then (Σ target)·softmax(pred)
            - target), and a negative target gives NaN for its region (log of a negative number),
            as F.kl_div does; its pred gradient stays (Σ target)·softmax(pred) - target. An
            infinite target entry gives a non-finite loss (Inf or NaN; the backends may differ
            in which: the kernels split the sum into terms that Inf can turn into Inf - Inf).
        reduction: "mean": the sum over selected regions divided by their number (0, with zero
            gradients, when none is selected); "sum"; "none": (B, R) per-region losses, 0 where not
            selected.
        beta: smooth_l1's threshold, as in F.smooth_l1_loss.
        backend: "auto", "triton", "cuda" or "torch", as in region_mask.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or (B, R) for reduction="none".
        pred gets its gradient; target too when it requires grad. Regions that are not selected
        are not in the loss: whatever they hold (NaN and Inf included), their gradient is 0 and
        they leave the loss finite. NaN or Inf in a selected region reaches the loss as eager
        PyTorch would carry it (NaN, or Inf where the formula gives Inf).
    """
    _check_loss_inputs(pred, target, mask, kind, reduction, beta, backend)
    impl = resolve_backend("masked_region_loss", backend, pred)
    if pred.numel() == 0:
        impl = "torch"
    if impl == "torch":
        return reference.masked_region_loss(pred, target, mask, kind, reduction, float(beta))
    per_region, _ = torch.ops.mmkernels.masked_region_loss_fwd(pred, target, mask, kind, float(beta), impl)
    return reference.reduce_region_losses(per_region, mask, reduction)
