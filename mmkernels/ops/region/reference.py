"""Plain-PyTorch definition of region_mask and masked_region_loss: the CPU path and the tests' oracle
(run in float64).

Each function here computes in at least float32 (float64 stays float64) and relies on PyTorch's
autograd for its gradients. Inputs are assumed checked by the public function that calls them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkernels.ops._common import reference_dtype


# The counter-based RNG of region_mask, computed bit for bit alike by the Triton kernels (kernels.py),
# the CUDA kernels (csrc/region_math.h) and this reference. Every random number is a 31-bit integer
# h(seed0, key_s, b, r) >> 1 for region r of sample b, where key_s = (seed1 + s · 0x9E3779B9) mod 2^31 picks the stream s:
REGION_STREAM_SELECT = 0  # u: the region is selected iff u < round(prob · 2^31)
REGION_STREAM_ACTION = 1  # v ("bert"): v < 80% of 2^31 masks, v < 90% copies a random region, else keep
REGION_STREAM_SOURCE = 2  # w ("bert"): which other existing region a random replacement copies
REGION_MASK_BELOW = round(0.8 * 2**31)
REGION_RANDOM_BELOW = round(0.9 * 2**31)
_U32 = 0xFFFFFFFF


def region_stream_key(seed1: int, stream: int) -> int:
    """The 31-bit key of one random stream."""
    return (seed1 + stream * 0x9E3779B9) & 0x7FFFFFFF


def _mul_u32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x · c mod 2^32 for int64 x in [0, 2^32), split so that no int64 product overflows.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _U32


def _mix_u32(x: torch.Tensor) -> torch.Tensor:
    # murmur3's fmix32 finalizer, on uint32 values held in int64.
    x = x ^ (x >> 16)
    x = _mul_u32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul_u32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def region_random(seed0: int, key: int, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """31-bit random integers (int64) for samples b and regions r (broadcast int64 tensors)."""
    x = _mix_u32(b ^ seed0)
    x = _mix_u32(x ^ r)
    return _mix_u32(x ^ key) >> 1


def existing_regions(region_lens, valid_mask, n_regions: int) -> torch.Tensor:
    """(B, R) bool, the existing regions: valid_mask, or the first region_lens[b] (clamped to [0, R])."""
    if valid_mask is not None:
        return valid_mask
    positions = torch.arange(n_regions, device=region_lens.device)
    return positions[None, :] < region_lens.clamp(0, n_regions)[:, None]


def region_mask_plan(valid, seed0: int, seed1: int, select_below: int, min_masked: int, bert: bool):
    """Which regions region_mask selects and where each output row comes from.

    valid: (B, R) bool, the existing regions. select_below: round(prob · 2^31).
    Returns (mask, source): mask (B, R) bool, the selected regions; source (B, R) int64, the flat
    index b·R + r of the input row that output row (b, r) copies, or -1 where it becomes zero /
    the mask embedding.

    Selection: u < select_below; then a sample that got fewer than min(min_masked, n_valid)
    regions gets exactly that many: those with the smallest (u, r). Mode "bert" splits the
    selected regions by v into mask / random / keep; a random one copies the existing region of
    the batch whose rank (in b·R + r order, itself excluded) is floor(w · (n_total - 1) / 2^31),
    and stays unchanged when the batch has no other existing region.
    """
    n_samples, n_regions = valid.shape
    device = valid.device
    b = torch.arange(n_samples, device=device, dtype=torch.int64)[:, None]
    r = torch.arange(n_regions, device=device, dtype=torch.int64)[None, :]
    u = region_random(seed0, region_stream_key(seed1, REGION_STREAM_SELECT), b, r)
    mask = valid & (u < select_below)
    need = valid.sum(1).clamp(max=min_masked)
    # rank of each existing region by (u, r): a stable sort keeps r order among equal u
    order = torch.argsort(torch.where(valid, u, 2**31), dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, r.expand_as(order).contiguous())
    mask = mask | (valid & (rank < need[:, None]))

    flat = b * n_regions + r
    source = torch.where(mask, -1, flat)
    if bert:
        v = region_random(seed0, region_stream_key(seed1, REGION_STREAM_ACTION), b, r)
        flat_cum = valid.flatten().cumsum(0)
        total = flat_cum[-1] if flat_cum.numel() else flat_cum.new_zeros(())
        is_random = mask & (v >= REGION_MASK_BELOW) & (v < REGION_RANDOM_BELOW) & (total > 1)
        keep = mask & (v >= REGION_MASK_BELOW) & ~is_random
        w = region_random(seed0, region_stream_key(seed1, REGION_STREAM_SOURCE), b, r)
        k = (w * (total - 1).clamp(min=0)) >> 31
        self_rank = flat_cum.view(n_samples, n_regions) - 1
        k = k + (k >= self_rank).long()
        copied = torch.searchsorted(flat_cum, k, right=True)  # the existing region of rank k
        source = torch.where(keep, flat, source)
        source = torch.where(is_random, copied, source)
    return mask, source


def region_mask(feats, valid, seed0: int, seed1: int, select_below: int, min_masked: int,
                bert: bool, mask_embedding=None):
    """feats (B, R, D) with the rows chosen by region_mask_plan; returns (features, mask).

    A masked row becomes mask_embedding (D,) cast to feats' dtype, or zeros. Gradients flow as
    eager indexing gives them: to the rows each output row copies and to mask_embedding.
    """
    mask, source = region_mask_plan(valid, seed0, seed1, select_below, min_masked, bert)
    n_samples, n_regions, dim = feats.shape
    rows = feats.reshape(n_samples * n_regions, dim)[source.clamp(min=0).flatten()]
    rows = rows.view(n_samples, n_regions, dim)
    if mask_embedding is None:
        fill = feats.new_zeros(())
    else:
        fill = mask_embedding.to(feats.dtype)
    return torch.where((source == -1)[..., None], fill, rows), mask


def masked_region_loss(pred, target, mask, kind: str, reduction: str = "mean", beta: float = 1.0):
    """Masked region modeling losses over the selected regions, in the compute dtype.

    pred, target: (B, R, K); mask: (B, R) bool. Per region: "mse" and "smooth_l1" (with `beta`)
    average over K; "kl" sums over K the terms target·(log target - log_softmax(pred)), each 0 where
    target is 0 (with a 0 target gradient there), for any target: a negative one gives NaN, one that
    does not sum to 1 is taken as it is. Regions that are not selected take no part: their loss and
    gradient are 0 whatever they hold. reduction "none" gives the (B, R) per-region losses (0 where
    not selected), "sum" their sum, "mean" the sum divided by max(number selected, 1).
    """
    dtype = reference_dtype(pred)
    # Rows that are not selected are replaced by zeros before the loss, so that NaN or Inf there
    # reaches neither the loss nor a gradient (masking the per-region loss alone would still send
    # 0 · NaN = NaN back to them).
    selected = mask[..., None]
    pred = torch.where(selected, pred.to(dtype), 0.0)
    target = torch.where(selected, target.to(dtype), 0.0)
    if kind == "mse":
        per_region = (pred - target).pow(2).mean(-1)
    elif kind == "smooth_l1":
        per_region = F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(-1)
    else:
        # F.kl_div's pointwise value, written out so that a term with target 0 is exactly 0 in value
        # and gradient, even where log_softmax is -inf (F.kl_div gives 0 · -inf = NaN there)
        nonzero = target != 0
        log_q = torch.where(nonzero, F.log_softmax(pred, dim=-1), 0.0)
        log_t = torch.log(torch.where(nonzero, target, 1.0))
        per_region = torch.where(nonzero, target * (log_t - log_q), 0.0).sum(-1)
    return reduce_region_losses(torch.where(mask, per_region, 0.0), mask, reduction)


def reduce_region_losses(per_region, mask, reduction: str):
    """(B, R) per-region losses, 0 where mask is False: "none" returns them, "sum" their sum, "mean"
    the sum over max(number selected, 1), so 0 with zero gradient when nothing is selected."""
    if reduction == "none":
        return per_region
    total = per_region.sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)
