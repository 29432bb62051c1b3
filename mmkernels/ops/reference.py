"""Plain-PyTorch definition of every op: the CPU path and the tests' oracle (run in float64).

Each function here computes in at least float32 (float64 stays float64) and relies on PyTorch's
autograd for its gradients. Inputs are assumed checked by the public function that calls them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- contrastive losses
# A logit that is not finite (an Inf or NaN among the inputs, or a product that overflows) makes
# the loss undefined: it becomes NaN here, and in the kernels, before any loss term is formed.
# Without this rule a SigLIP or CLIP loss can come out finite, or +Inf, from an Inf input.


def clip_logits(image_emb, text_emb, logit_scale, normalize: bool = False, logit_bias=None) -> torch.Tensor:
    """S = logit_scale · image_emb @ text_emb.T (+ logit_bias), (M, N), in the compute dtype.

    Non-finite logits are NaN.
    """
    dtype = _compute_dtype(image_emb)
    image_emb, text_emb = image_emb.to(dtype), text_emb.to(dtype)
    if normalize:
        image_emb = F.normalize(image_emb, dim=-1)
        text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.to(dtype) * (image_emb @ text_emb.T)
    if logit_bias is not None:
        logits = logits + logit_bias.to(dtype)
    return torch.where(torch.isfinite(logits), logits, torch.nan)


def clip_loss(image_emb, text_emb, logit_scale, normalize: bool = False, label_smoothing: float = 0.0):
    """CLIP's symmetric InfoNCE: (CE(rows of S) + CE(columns of S)) / 2 with targets arange(N).

    image_emb, text_emb: (N, D); logit_scale: 0-dim tensor (already exponentiated). Returns a scalar.
    """
    logits = clip_logits(image_emb, text_emb, logit_scale, normalize)
    labels = torch.arange(logits.shape[0], device=logits.device)
    rows = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    cols = F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)
    return (rows + cols) / 2


def _siglip_labels(m: int, n: int, offset: int | None, like: torch.Tensor) -> torch.Tensor:
    """(m, n): +1 at (i, offset + i), -1 elsewhere (everywhere when offset is None: no positives)."""
    labels = torch.full((m, n), -1.0, dtype=like.dtype, device=like.device)
    if offset is not None:
        rows = torch.arange(m, device=like.device)
        labels[rows, offset + rows] = 1.0
    return labels


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias, normalize: bool = False):
    """SigLIP's sigmoid loss: -Σ_ij log σ(label_ij · S_ij) / N, label +1 on the diagonal, -1 elsewhere.

    S = logit_scale · image_emb @ text_emb.T + logit_bias; image_emb, text_emb: (N, D). Returns a scalar.
    """
    logits = clip_logits(image_emb, text_emb, logit_scale, normalize, logit_bias)
    n = logits.shape[0]
    return -F.logsigmoid(_siglip_labels(n, n, 0, logits) * logits).sum() / n


def info_nce_loss(query, keys, logit_scale, normalize: bool = False, label_smoothing: float = 0.0):
    """One-directional InfoNCE: mean_i CE(logit_scale · query_i @ keys.T, target i), F.cross_entropy's
    value (label smoothing included). query, keys: (N, D); logit_scale: 0-dim tensor. Returns a scalar.
    """
    logits = clip_logits(query, keys, logit_scale, normalize)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


# The block-row functions: rows offset .. offset+M-1 of the global batch (image_emb (M, D)) against
# all columns (text_emb (N, D)); the positive of row i sits at column offset + i. The CPU path of
# mmkernels.ops.contrastive's block API and the tests' oracle for its kernels. No autograd graph
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


def clip_block_stats(image_emb, text_emb, logit_scale, offset: int, normalize: bool):
    """(row_lse (M,), col_max (N,), col_sumexp (N,), diag (M,), row_sum (M,)) of the block's logits,
    row_lse in float64 (see _minus_lse), the others in the compute dtype.

    col_sumexp_j = Σ_i exp(S_ij - col_max_j); an empty block (M = 0) gives col_max = -inf, col_sumexp = 0.
    """
    with torch.no_grad():
        logits = clip_logits(image_emb, text_emb, logit_scale, normalize)
        m, n = logits.shape
        row_lse = _lse_float64(logits, 1)
        if m == 0:
            col_max = torch.full((n,), float("-inf"), dtype=logits.dtype, device=logits.device)
            col_sumexp = torch.zeros(n, dtype=logits.dtype, device=logits.device)
        else:
            col_max = logits.max(dim=0).values
            col_sumexp = torch.exp(logits - col_max).sum(dim=0)
        rows = torch.arange(m, device=logits.device)
        return row_lse, col_max, col_sumexp, logits[rows, offset + rows], logits.sum(dim=1)


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


def clip_block_grads(image_emb, text_emb, logit_scale, row_lse, col_lse, offset: int, n_total: int,
                     label_smoothing: float, normalize: bool, image_grad: bool, text_grad: bool,
                     grad_output=None):
    """This block's share of the gradients of the global CLIP loss over n_total pairs.

    dL/dS_ij = ((P^row_ij - t_ij) + (P^col_ij - t_ij)) / (2·n_total), with P^row_ij = exp(S_ij - row_lse_i),
    P^col_ij = exp(S_ij - col_lse_j), t_ij = (1-eps)·[j = offset+i] + eps/n_total, times grad_output
    (default 1). Each direction's target comes off its own softmax, in that order, as the eager
    cross-entropy's backward does it (P^row + P^col ≈ 2 at a dominant positive would round first).
    Returns (d image_emb (M, D) or None, d text_emb (N, D) or None, d logit_scale ()).
    """
    dtype = _compute_dtype(image_emb)
    a, b, scale = _leaves(image_emb, text_emb, logit_scale, dtype=dtype)
    with torch.enable_grad():
        logits = clip_logits(a, b, scale, normalize)
        m, n = logits.shape
        rows = torch.arange(m, device=logits.device)
        with torch.no_grad():
            targets = torch.full_like(logits, label_smoothing / n_total)
            targets[rows, offset + rows] += 1 - label_smoothing
            w = ((torch.exp(_minus_lse(logits, row_lse[:, None])) - targets)
                 + (torch.exp(_minus_lse(logits, col_lse[None, :])) - targets))
            d_logits = w / (2 * n_total)
            if grad_output is not None:
                d_logits = d_logits * grad_output.to(dtype)
        d_image, d_text, d_scale = torch.autograd.grad(logits, (a, b, scale), d_logits, allow_unused=True)
    d_image = d_image if d_image is not None else torch.zeros_like(a)
    d_text = d_text if d_text is not None else torch.zeros_like(b)
    return (d_image if image_grad else None), (d_text if text_grad else None), d_scale


def siglip_block(image_emb, text_emb, logit_scale, logit_bias, offset: int | None, n_total: int,
                 normalize: bool, image_grad: bool, text_grad: bool, scalar_grads: bool):
    """This block's share of the global SigLIP loss, -Σ_ij log σ(label_ij · S_ij) / n_total over its
    rows, and, when asked, of its gradients; offset None: a block without positives (every label
    -1, the rows against another rank's columns). Returns (loss (), d image_emb (M, D) or None,
    d text_emb (N, D) or None, d logit_scale () or None, d logit_bias () or None)."""
    dtype = _compute_dtype(image_emb)
    a, b, scale, bias = _leaves(image_emb, text_emb, logit_scale, logit_bias, dtype=dtype)
    with torch.enable_grad():
        logits = clip_logits(a, b, scale, normalize, bias)
        m, n = logits.shape
        loss = -F.logsigmoid(_siglip_labels(m, n, offset, logits) * logits).sum() / n_total
        if image_grad or text_grad or scalar_grads:
            grads = torch.autograd.grad(loss, (a, b, scale, bias), allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for t, g in zip((a, b, scale, bias), grads)]
        else:
            grads = [None] * 4
    wanted = (image_grad, text_grad, scalar_grads, scalar_grads)
    return (loss.detach(),) + tuple(g if want else None for g, want in zip(grads, wanted))


# --------------------------------------------------------------------------- region masking

# The counter-based RNG of region_mask, computed bit for bit alike by the Triton kernels
# (mmkernels/ops/region_kernels.py), the CUDA kernels (csrc/region_math.h) and this reference. Every
# random number is a 31-bit integer h(seed0, key_s, b, r) >> 1 for region r of sample b, where
# key_s = (seed1 + s · 0x9E3779B9) mod 2^31 picks the stream s:
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
    dtype = _compute_dtype(pred)
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
