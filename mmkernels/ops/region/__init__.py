"""Masked region modeling (UNITER, LXMERT): `region_mask` samples and applies the region mask;
`masked_region_loss` scores the selected regions (MRFR, MRC-kl).

`region_mask` selects about `prob` of each sample's existing regions and replaces them, in one pass
over the features (each row read at most once, each output row written once). The selection comes
from a counter-based RNG (reference.region_random) that the Triton kernels (kernels.py), the CUDA
kernels (csrc/) and the PyTorch reference compute bit for bit alike, so one seed gives one mask
everywhere.

`masked_region_loss`'s kernels read the selected rows in place and skip the others, so no
(n_selected, K) gather is made and rows that are not selected (NaN or Inf there included) neither
count nor get a gradient other than 0.

One chain per pass: `_region_mask_fwd_kernel` (Triton, kernels.py; CUDA: csrc/region_mask.cu) →
`_region_mask_fwd_triton` / `_region_mask_fwd_cuda` (launch.py) → `torch.ops.mmkernels.region_mask_fwd`
(registered.py, with its backward `region_mask_bwd` as autograd) → `mmkernels.region_mask`; and
`_masked_region_loss_fwd_kernel` (csrc/region_loss.cu) → `_loss_fwd_triton` / `_loss_fwd_cuda` →
`torch.ops.mmkernels.masked_region_loss_fwd` (with `masked_region_loss_bwd`) →
`mmkernels.masked_region_loss`. Tile sizes and grids are plan.py's; the plain-PyTorch path is
reference.py's. The backend is chosen once per call by `_dispatch.resolve_backend`, after the
checks here (the registered ops do not check again).

Work: region_mask's forward reads each existing input row at most once per copy it makes and writes
B·R·D elements; its backward reads the gradient of the kept, masked and copied rows and writes
B·R·D elements (plus one atomic add per copied row in "bert" mode). masked_region_loss's forward
reads the selected rows of pred and target once; its backward reads them again and writes the
(B, R, K) gradient of pred (and of target when asked). No matrix products.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mmkernels.ops._args import check_choice, check_float_tensor, check_same_device
from mmkernels.ops._dispatch import check_backend, resolve_backend
from mmkernels.ops.region import reference, registered

__all__ = ["LOSS_KINDS", "MODES", "REDUCTIONS", "RegionMaskOutput", "masked_region_loss", "region_mask"]

MODES = ("zero", "bert")
LOSS_KINDS = ("mse", "smooth_l1", "kl")
REDUCTIONS = ("mean", "sum", "none")


class RegionMaskOutput(NamedTuple):
    """What region_mask returns.

    features: (B, R, D) the masked features, a new tensor in feats' dtype.
    mask: (B, R) bool, True for the selected regions (masked, replaced or kept alike): the
        regions a masked region modeling loss is computed on.
    """

    features: torch.Tensor
    mask: torch.Tensor


# --------------------------------------------------------------------------- the checks and the public functions


def _check_region_count(n_samples: int, n_regions: int) -> None:
    # the kernels index regions (b·R + r), and region_mask's copied rows (source), with int32
    if n_samples * n_regions >= 2**31:
        raise ValueError(f"expected B·R < 2^31 regions, got {n_samples}·{n_regions}")


def _check_region_mask_inputs(feats, region_lens, valid_mask, prob, mode, mask_embedding, min_masked,
                              generator, backend) -> None:
    check_float_tensor("feats", feats, 3, "(B, R, D)")
    n_samples, n_regions, dim = feats.shape
    if (region_lens is None) == (valid_mask is None):
        raise ValueError(
            "expected exactly one of region_lens (B,) and valid_mask (B, R) to say which regions exist, "
            f"got {'both' if region_lens is not None else 'neither'}"
        )
    if region_lens is not None:
        if not isinstance(region_lens, torch.Tensor):
            raise TypeError(f"expected region_lens to be a torch.Tensor, got {type(region_lens).__name__}")
        if region_lens.dtype.is_floating_point or region_lens.dtype.is_complex or region_lens.dtype == torch.bool:
            raise TypeError(f"expected region_lens to be an integer tensor, got dtype {region_lens.dtype}")
        if region_lens.shape != (n_samples,):
            raise ValueError(
                f"expected region_lens of shape (B,) = ({n_samples},), got {tuple(region_lens.shape)}"
            )
        if region_lens.device.type == "cpu":
            # CPU lengths are checked; CUDA ones (and any under torch.compile) are clamped to [0, R]:
            # a check would stall the host or break the graph.
            if not torch.compiler.is_compiling():
                bad = (region_lens < 0) | (region_lens > n_regions)
                if bool(bad.any()):
                    raise ValueError(
                        f"expected region_lens in [0, R] = [0, {n_regions}], got {region_lens[bad].tolist()[:8]}"
                    )
        elif region_lens.device != feats.device:
            raise ValueError(
                f"expected region_lens on feats' device {feats.device} or on the CPU, got {region_lens.device}"
            )
    if valid_mask is not None:
        if not isinstance(valid_mask, torch.Tensor) or valid_mask.dtype != torch.bool:
            got = valid_mask.dtype if isinstance(valid_mask, torch.Tensor) else type(valid_mask).__name__
            raise TypeError(f"expected valid_mask to be a bool tensor, got {got}")
        if valid_mask.shape != (n_samples, n_regions):
            raise ValueError(
                f"expected valid_mask of shape (B, R) = ({n_samples}, {n_regions}), got {tuple(valid_mask.shape)}"
            )
        check_same_device([("feats", feats), ("valid_mask", valid_mask)])
    if isinstance(prob, bool) or not isinstance(prob, (int, float)):
        raise TypeError(f"expected prob to be a float, got {type(prob).__name__}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"expected prob in [0, 1], got {prob}")
    check_choice("mode", mode, MODES)
    if mask_embedding is not None:
        check_float_tensor("mask_embedding", mask_embedding)
        if mask_embedding.shape != (dim,):
            raise ValueError(
                f"expected mask_embedding of shape (D,) = ({dim},), got {tuple(mask_embedding.shape)}"
            )
        check_same_device([("feats", feats), ("mask_embedding", mask_embedding)])
    if isinstance(min_masked, bool) or not isinstance(min_masked, int) or min_masked < 0:
        raise ValueError(f"expected min_masked to be an int >= 0, got {min_masked!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"expected generator to be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(
                "expected a CPU torch.Generator (the seed is drawn on the CPU, with no GPU sync), "
                f"got one on {generator.device}"
            )
    check_backend(backend)
    _check_region_count(n_samples, n_regions)


def region_mask(
    feats: torch.Tensor,
    region_lens: Optional[torch.Tensor] = None,
    valid_mask: Optional[torch.Tensor] = None,
    *,
    prob: float = 0.15,
    mode: str = "zero",
    mask_embedding: Optional[torch.Tensor] = None,
    min_masked: int = 1,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> RegionMaskOutput:
    """Mask image regions for masked region modeling (UNITER's MRFR/MRC, LXMERT's RoI-feature tasks).

    Args:
        feats: (B, R, D) region features (float16, bfloat16, float32; float64 takes the torch path).
        region_lens: (B,) integer count of existing regions per sample (regions 0..n-1 exist), on
            feats' device or on the CPU. CPU values outside [0, R] raise; CUDA ones (and any under
            torch.compile) are clamped to [0, R].
        valid_mask: (B, R) bool, True where a region exists. Give exactly one of the two.
        prob: the probability that each existing region is selected, in [0, 1].
        mode: "zero": selected regions become `mask_embedding` (or zeros). "bert": of the selected,
            80% become mask_embedding / zeros, 10% the features of another random existing region of
            the batch, 10% stay as they are.
        mask_embedding: (D,) learned mask row, or None for zeros. It gets the gradient of the rows
            it fills.
        min_masked: a sample with n >= 1 existing regions gets at least min(min_masked, n) selected
            regions: when the draw picks fewer, the regions with the smallest random numbers are added.
        generator: a CPU torch.Generator; the default generator when None. Two 31-bit seeds are
            drawn from it; the same seeds give the same mask on every backend.
        backend: "auto", "triton", "cuda" (the compiled extension mmkernels._C) or "torch" (the
            reference). "auto" runs CUDA tensors on mmkernels.ops._dispatch.AUTO_CUDA_BACKEND's
            choice, CPU float32/float16 on the Triton kernels under TRITON_INTERPRET=1, and
            everything else (CPU bfloat16 included) on the reference; "triton" on a CPU bfloat16
            tensor raises (Triton's interpreter has no bfloat16 support).

    Returns:
        RegionMaskOutput(features (B, R, D) new tensor, mask (B, R) bool of the selected regions).
        Padding regions are never selected and pass through unchanged. Gradients flow to the rows
        that are passed through or copied (as eager indexing gives them) and to mask_embedding.
    """
    _check_region_mask_inputs(
        feats, region_lens, valid_mask, prob, mode, mask_embedding, min_masked, generator, backend
    )
    impl = resolve_backend("region_mask", backend, feats)
    if feats.numel() == 0:
        impl = "torch"
    seed = torch.randint(0, 2**31, (2,), generator=generator, dtype=torch.int64, device="cpu")
    select_below = round(prob * 2**31)
    # no sample has more than R regions, so this changes no mask and keeps the int in 32 bits
    min_masked = min(min_masked, feats.shape[1])
    bert = mode == "bert"
    if region_lens is not None:
        # non_blocking: a blocking host-to-device copy would wait for the GPU to catch up
        region_lens = region_lens.to(device=feats.device, dtype=torch.int64, non_blocking=True)
    if mask_embedding is not None:
        mask_embedding = mask_embedding.to(feats.dtype)
    if impl == "torch":
        existing = reference.existing_regions(region_lens, valid_mask, feats.shape[1])
        seed0, seed1 = seed.tolist()
        features, mask = reference.region_mask(
            feats, existing, seed0, seed1, select_below, min_masked, bert, mask_embedding
        )
        return RegionMaskOutput(features, mask)
    features, mask, _ = registered.region_mask_fwd(
        feats, region_lens, valid_mask, mask_embedding, seed, select_below, min_masked, bert, impl
    )
    return RegionMaskOutput(features, mask)


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
    per_region, _ = registered.masked_region_loss_fwd(pred, target, mask, kind, float(beta), impl)
    return reference.reduce_region_losses(per_region, mask, reduction)
