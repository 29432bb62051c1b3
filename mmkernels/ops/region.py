"""Masked region modeling (UNITER, LXMERT): sample and apply the region mask; masked region losses.

`region_mask` selects about `prob` of each sample's existing regions and replaces them, in one pass
over the features (each row read at most once, each output row written once). The selection comes
from a counter-based RNG (reference.region_random) that the Triton kernels, the CUDA kernels
(csrc/) and the PyTorch reference compute bit for bit alike, so one seed gives one mask everywhere.

`masked_region_loss` computes MRFR / MRC-kl losses over the selected regions without gathering
them: the kernels read the selected rows in place and skip the others.

Kernels, per op and pass:
- `_region_mask_fwd_kernel`: one program per (sample, slice of D). It first finds the sample's
  min_masked cut (a scan over the sample's R random numbers), then streams the sample's rows.
- `_region_mask_bwd_kernel`: the same grid; passes the gradient of kept rows through, zeroes the
  others and sums the masked rows' gradient per sample for mask_embedding.
- `_region_mask_scatter_kernel` ("bert" only): adds the gradient of each randomly replaced row to
  the row it copied (atomic adds: the order of two adds to one row is not fixed).
- `_masked_region_loss_fwd_kernel` / `_bwd_kernel`: per-region loss and its gradient, one fused
  kernel each.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch

from mmkernels.ops import reference
from mmkernels.ops._common import (
    HAS_TRITON,
    KERNEL_DTYPES,
    check_float_tensor,
    check_same_device,
    interpreting,
    last_dim_contiguous,
    tl,
    triton,
)

__all__ = ["RegionMaskOutput", "region_mask", "masked_region_loss", "cuda_extension_available"]

try:
    from mmkernels import _C
except ImportError as _err:  # built by setup.py when nvcc is found; optional
    _C = None
    _C_IMPORT_ERROR = str(_err)
else:
    _C_IMPORT_ERROR = ""

MODES = ("zero", "bert")
LOSS_KINDS = ("mse", "smooth_l1", "kl")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cuda", "torch")
_KIND_CODE = {"mse": 0, "smooth_l1": 1, "kl": 2}
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # as csrc/region.h

# What backend="auto" runs for CUDA tensors in the three kernel dtypes. NOT MEASURED YET: no GPU
# was available when this was written. Set each entry to the faster of "triton" and "cuda" as
# `pytest benchmarks/bench_region.py --benchmark-only` measures them on an H100. "cuda" falls
# back to "triton" when the extension is not built.
AUTO_CUDA_BACKEND = {"region_mask": "triton", "masked_region_loss": "triton"}


class RegionMaskOutput(NamedTuple):
    """What region_mask returns.

    features: (B, R, D) the masked features, a new tensor in feats' dtype.
    mask: (B, R) bool, True for the selected regions (masked, replaced or kept alike): the
        regions a masked region modeling loss is computed on.
    """

    features: torch.Tensor
    mask: torch.Tensor


def cuda_extension_available() -> bool:
    """Whether the compiled CUDA extension mmkernels._C was built and imports."""
    return _C is not None


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _mix_u32(x):
    # murmur3's fmix32 finalizer (as reference._mix_u32): uint32 in, uint32 out. The products are
    # taken mod 2^32 in 64 bits: a wrapping 32-bit product trips Triton's debug-mode overflow check.
    x = x ^ (x >> 16)
    x = ((x.to(tl.uint64) * 0x85EBCA6B) & 0xFFFFFFFF).to(tl.uint32)
    x = x ^ (x >> 13)
    x = ((x.to(tl.uint64) * 0xC2B2AE35) & 0xFFFFFFFF).to(tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _region_random(seed0, key, b, rows):
    """31-bit int32 random numbers for sample b and regions `rows`, as reference.region_random."""
    x = _mix_u32(b.to(tl.uint32) ^ seed0.to(tl.uint32))
    x = _mix_u32(x ^ rows.to(tl.uint32))
    x = _mix_u32(x ^ key.to(tl.uint32))
    return (x >> 1).to(tl.int32)


@triton.jit
def _existing_regions(lens_ptr, valid_ptr, b, rows, R, stride_vb, stride_vr, HAS_LENS: tl.constexpr):
    """Bool (len(rows),): which of `rows` exist in sample b (region_lens, clamped to [0, R], or valid_mask)."""
    in_range = rows < R
    if HAS_LENS:
        n = tl.load(lens_ptr + b)
        n = tl.minimum(tl.maximum(n, 0), R)
        exists = in_range & (rows < n)
    else:
        v = tl.load(valid_ptr + b * stride_vb + rows * stride_vr, mask=in_range, other=0)
        exists = in_range & (v != 0)
    return exists


@triton.jit
def _min_masked_cut(
    lens_ptr, valid_ptr, b, R, stride_vb, stride_vr, seed0, key_select, select_max, min_masked,
    HAS_LENS: tl.constexpr, CHUNK: tl.constexpr,
):
    """(cut_u, cut_r) for sample b: regions with (u, r) <= (cut_u, cut_r) are selected on top of u <= select_max.

    When u <= select_max picks fewer than need = min(min_masked, n_existing) regions, the cut is
    the need-th smallest (u, r) among the existing regions (which includes every region the draw
    picked); otherwise it is (-1, -1), which adds nothing.
    """
    zero = b * 0
    n_existing = zero
    n_drawn = zero
    for r0 in range(0, R, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        exists = _existing_regions(lens_ptr, valid_ptr, b, rows, R, stride_vb, stride_vr, HAS_LENS)
        u = _region_random(seed0, key_select, b, rows)
        n_existing += tl.sum(exists.to(tl.int32), axis=0)
        n_drawn += tl.sum((exists & (u <= select_max)).to(tl.int32), axis=0)
    need = tl.minimum(n_existing, min_masked)
    cut_u = zero - 1
    cut_r = zero - 1
    if n_drawn < need:
        for _ in range(need):
            # the smallest (u, r) after the current cut, over all chunks
            best_u = zero + 2147483647
            best_r = zero + 2147483647
            for r0 in range(0, R, CHUNK):
                rows = r0 + tl.arange(0, CHUNK)
                exists = _existing_regions(lens_ptr, valid_ptr, b, rows, R, stride_vb, stride_vr, HAS_LENS)
                u = _region_random(seed0, key_select, b, rows)
                after_cut = (u > cut_u) | ((u == cut_u) & (rows > cut_r))
                candidate = exists & after_cut
                chunk_u = tl.min(tl.where(candidate, u, 2147483647), axis=0)
                chunk_r = tl.min(tl.where(candidate & (u == chunk_u), rows, 2147483647), axis=0)
                better = chunk_u < best_u  # chunks go up in r: a tie keeps the earlier region
                best_r = tl.where(better, chunk_r, best_r)
                best_u = tl.where(better, chunk_u, best_u)
            cut_u = best_u
            cut_r = best_r
    return cut_u, cut_r


@triton.jit
def _random_source(flat_cum_ptr, flat, total, w, n_rows, search_steps, is_random):
    """Flat index of the existing region that each random replacement copies (reference.region_mask_plan).

    flat_cum: (B·R,) int32 inclusive cumulative count of existing regions in flat order.
    """
    self_rank = tl.load(flat_cum_ptr + flat, mask=is_random, other=1) - 1
    k = ((w.to(tl.int64) * (total - 1).to(tl.int64)) >> 31).to(tl.int32)
    k = tl.where(k >= self_rank, k + 1, k)
    # binary search: the smallest i with flat_cum[i] > k
    lo = flat * 0
    hi = lo + (n_rows - 1)
    for _ in range(search_steps):
        mid = lo + (hi - lo) // 2
        c = tl.load(flat_cum_ptr + mid, mask=is_random, other=0)
        right = c <= k
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit(do_not_specialize=["seed0", "key_select", "key_action", "key_source", "select_max", "min_masked"])
def _region_mask_fwd_kernel(
    feats_ptr, out_ptr, lens_ptr, valid_ptr, flat_cum_ptr, emb_ptr, mask_ptr, source_ptr,
    R, D, n_rows, search_steps, stride_fb, stride_fr, stride_vb, stride_vr,
    seed0, key_select, key_action, key_source, select_max, min_masked,
    MASK_BELOW: tl.constexpr, RANDOM_BELOW: tl.constexpr,
    HAS_LENS: tl.constexpr, HAS_EMB: tl.constexpr, BERT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    cut_u, cut_r = _min_masked_cut(
        lens_ptr, valid_ptr, b, R, stride_vb, stride_vr, seed0, key_select, select_max, min_masked,
        HAS_LENS, CHUNK,
    )
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if HAS_EMB:
        fill = tl.load(emb_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        fill = tl.zeros((BLOCK_D,), dtype=out_ptr.dtype.element_ty)
    if BERT:
        total = tl.load(flat_cum_ptr + n_rows - 1)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        in_r = rows < R
        exists = _existing_regions(lens_ptr, valid_ptr, b, rows, R, stride_vb, stride_vr, HAS_LENS)
        u = _region_random(seed0, key_select, b, rows)
        selected = exists & ((u <= select_max) | (u < cut_u) | ((u == cut_u) & (rows <= cut_r)))
        flat = b * R + rows
        # source: the flat row this output row copies; -1: zero / mask embedding
        source = tl.where(selected, -1, flat)
        if BERT:
            v = _region_random(seed0, key_action, b, rows)
            # (a (BLOCK_R,) compare: the interpreter mis-types a bool tensor & a bool scalar)
            has_other = (flat * 0 + total) > 1
            is_random = selected & (v >= MASK_BELOW) & (v < RANDOM_BELOW) & has_other
            keep = selected & (v >= MASK_BELOW) & (~is_random)
            source = tl.where(keep, flat, source)
            if tl.sum(is_random.to(tl.int32), axis=0) > 0:
                w = _region_random(seed0, key_source, b, rows)
                copied = _random_source(flat_cum_ptr, flat, total, w, n_rows, search_steps, is_random)
                source = tl.where(is_random, copied, source)
        read = source >= 0
        src = tl.where(read, source, flat)
        src_b = (src // R).to(tl.int64)
        src_r = (src % R).to(tl.int64)
        x = tl.load(
            feats_ptr + src_b[:, None] * stride_fb + src_r[:, None] * stride_fr + offs_d[None, :],
            mask=(read & in_r)[:, None] & mask_d[None, :], other=0.0,
        )
        y = tl.where((source == -1)[:, None], fill[None, :].to(x.dtype), x)
        tl.store(
            out_ptr + flat.to(tl.int64)[:, None] * D + offs_d[None, :], y,
            mask=in_r[:, None] & mask_d[None, :],
        )
        if pid_d == 0:
            tl.store(mask_ptr + flat, selected.to(tl.uint8), mask=in_r)
            tl.store(source_ptr + flat, source, mask=in_r)


@triton.jit
def _region_mask_bwd_kernel(
    grad_out_ptr, source_ptr, grad_in_ptr, emb_partial_ptr, R, D, stride_gb, stride_gr,
    HAS_EMB_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    emb_grad = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        in_r = rows < R
        flat = b * R + rows
        source = tl.load(source_ptr + flat, mask=in_r, other=-2)
        kept = source == flat
        masked = source == -1
        needed = (kept | masked) if HAS_EMB_GRAD else kept
        g = tl.load(
            grad_out_ptr + b.to(tl.int64) * stride_gb + rows.to(tl.int64)[:, None] * stride_gr
            + offs_d[None, :],
            mask=needed[:, None] & mask_d[None, :], other=0.0,
        )
        tl.store(
            grad_in_ptr + flat.to(tl.int64)[:, None] * D + offs_d[None, :],
            tl.where(kept[:, None], g, 0.0).to(grad_in_ptr.dtype.element_ty),
            mask=in_r[:, None] & mask_d[None, :],
        )
        if HAS_EMB_GRAD:
            emb_grad += tl.sum(tl.where(masked[:, None], g.to(tl.float32), 0.0), axis=0)
    if HAS_EMB_GRAD:
        tl.store(emb_partial_ptr + b.to(tl.int64) * D + offs_d, emb_grad, mask=mask_d)


@triton.jit
def _region_mask_scatter_kernel(
    grad_out_ptr, source_ptr, grad_in_ptr, R, D, n_rows, stride_gb, stride_gr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    source = tl.load(source_ptr + rows, mask=rows < n_rows, other=-1)
    is_random = (source >= 0) & (source != rows)
    if tl.sum(is_random.to(tl.int32), axis=0) > 0:
        b = rows // R
        r = rows % R
        both = is_random[:, None] & mask_d[None, :]
        g = tl.load(
            grad_out_ptr + b[:, None] * stride_gb + r[:, None] * stride_gr + offs_d[None, :],
            mask=both, other=0.0,
        )
        tl.atomic_add(
            grad_in_ptr + source.to(tl.int64)[:, None] * D + offs_d[None, :], g, mask=both, sem="relaxed",
        )


@triton.jit
def _masked_region_loss_fwd_kernel(
    pred_ptr, target_ptr, mask_ptr, loss_ptr, stats_ptr, R, K, n_rows,
    stride_pb, stride_pr, stride_tb, stride_tr, stride_mb, stride_mr, beta,
    KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = rows < n_rows
    b = rows // R
    r = rows % R
    selected = in_r & (tl.load(mask_ptr + b * stride_mb + r * stride_mr, mask=in_r, other=0) != 0)
    pred_row = pred_ptr + b * stride_pb + r * stride_pr
    target_row = target_ptr + b * stride_tb + r * stride_tr
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)  # mse / smooth_l1: Σ_k loss; kl: Σ t·log t
    # kl: online softmax statistics of pred (running max m, Σ exp(p - m)), Σ t·(p - m) and Σ t
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    tp = tl.zeros((BLOCK_R,), dtype=tl.float32)
    t_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if tl.sum(selected.to(tl.int32), axis=0) > 0:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            ld = selected[:, None] & (offs_k < K)[None, :]
            p = tl.load(pred_row[:, None] + offs_k[None, :], mask=ld, other=0.0).to(tl.float32)
            t = tl.load(target_row[:, None] + offs_k[None, :], mask=ld, other=0.0).to(tl.float32)
            if KIND == 0:
                d = p - t
                acc += tl.sum(d * d, axis=1)
            elif KIND == 1:
                d = p - t
                ad = tl.abs(d)
                acc += tl.sum(tl.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta), axis=1)
            else:
                p_m = tl.where(ld, p, float("-inf"))
                m_new = tl.maximum(m, tl.max(p_m, axis=1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows not selected: nothing seen
                shift = m_ref - tl.where(m == float("-inf"), m_ref, m)
                s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(p_m - m_ref[:, None]), axis=1)
                # Σ t·(p - m) kept relative to the running max, so no large terms cancel
                tp = tp - t_sum * shift + tl.sum(t * (p - m_ref[:, None]), axis=1)
                t_sum += tl.sum(t, axis=1)
                acc += tl.sum(t * tl.log(tl.where(t > 0, t, 1.0)), axis=1)
                m = m_new
    if KIND == 2:
        log_s = tl.log(tl.where(selected, s, 1.0))
        # KL = Σ t log t - Σ t·p + (Σ t)·lse, with lse = m + log s
        loss = acc - tp + t_sum * log_s
        tl.store(stats_ptr + rows * 2, tl.where(selected, m + log_s, 0.0), mask=in_r)
        tl.store(stats_ptr + rows * 2 + 1, t_sum, mask=in_r)
    else:
        loss = acc / K
    tl.store(loss_ptr + rows, tl.where(selected, loss, 0.0), mask=in_r)


@triton.jit
def _masked_region_loss_bwd_kernel(
    grad_loss_ptr, pred_ptr, target_ptr, mask_ptr, stats_ptr, grad_pred_ptr, grad_target_ptr,
    R, K, n_rows, stride_gb, stride_gr, stride_pb, stride_pr, stride_tb, stride_tr,
    stride_mb, stride_mr, beta,
    KIND: tl.constexpr, TARGET_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_r = rows < n_rows
    in_k = offs_k < K
    b = rows // R
    r = rows % R
    selected = in_r & (tl.load(mask_ptr + b * stride_mb + r * stride_mr, mask=in_r, other=0) != 0)
    g = tl.load(grad_loss_ptr + b * stride_gb + r * stride_gr, mask=selected, other=0.0).to(tl.float32)
    ld = selected[:, None] & in_k[None, :]
    p = tl.load(pred_ptr + (b * stride_pb + r * stride_pr)[:, None] + offs_k[None, :], mask=ld, other=0.0)
    t = tl.load(target_ptr + (b * stride_tb + r * stride_tr)[:, None] + offs_k[None, :], mask=ld, other=0.0)
    p = p.to(tl.float32)
    t = t.to(tl.float32)
    if KIND == 0:
        grad_p = (2.0 / K) * (p - t) * g[:, None]
    elif KIND == 1:
        d = p - t
        slope = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        grad_p = tl.where(tl.abs(d) < beta, d / beta, slope) * (g / K)[:, None]
    else:
        lse = tl.load(stats_ptr + rows * 2, mask=selected, other=0.0)
        t_sum = tl.load(stats_ptr + rows * 2 + 1, mask=selected, other=0.0)
        log_q = p - lse[:, None]
        # d KL / d pred = (Σ t)·softmax(pred) - t
        grad_p = (t_sum[:, None] * tl.exp(log_q) - t) * g[:, None]
    out_mask = in_r[:, None] & in_k[None, :]
    offs = rows[:, None] * K + offs_k[None, :]
    tl.store(grad_pred_ptr + offs, tl.where(ld, grad_p, 0.0).to(grad_pred_ptr.dtype.element_ty), mask=out_mask)
    if TARGET_GRAD:
        if KIND == 2:
            # d KL / d target = log t + 1 - log q, and 0 where t = 0 (as F.kl_div)
            grad_t = tl.where(t > 0, (tl.log(tl.where(t > 0, t, 1.0)) + 1.0 - log_q) * g[:, None], 0.0)
        else:
            grad_t = -grad_p
        tl.store(
            grad_target_ptr + offs, tl.where(ld, grad_t, 0.0).to(grad_target_ptr.dtype.element_ty),
            mask=out_mask,
        )


# --------------------------------------------------------------------------- launchers


def _region_blocks(n_regions: int, dim: int, device: torch.device) -> dict:
    """Tile sizes. Under the interpreter: small enough that the tests cross every block edge."""
    if device.type != "cuda":
        return dict(CHUNK=16, BLOCK_R=8, BLOCK_D=64, num_warps=4)
    block_d = min(512, triton.next_power_of_2(dim))
    block_r = min(max(1, 4096 // block_d), triton.next_power_of_2(n_regions))
    chunk = min(1024, triton.next_power_of_2(n_regions))
    return dict(CHUNK=chunk, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


def _loss_blocks(dim: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_R=8, BLOCK_K=64, num_warps=4)
    return dict(BLOCK_R=4, BLOCK_K=min(1024, triton.next_power_of_2(dim)), num_warps=4)


def _existing_mask(region_lens, valid_mask, n_regions: int) -> torch.Tensor:
    """(B, R) bool from region_lens (clamped to [0, R]) or valid_mask."""
    if valid_mask is not None:
        return valid_mask
    positions = torch.arange(n_regions, device=region_lens.device)
    return positions[None, :] < region_lens.clamp(0, n_regions)[:, None]


def _seeds(seed: torch.Tensor) -> tuple[int, int]:
    seed0, seed1 = (int(s) for s in seed.tolist())
    return seed0, seed1


def _cuda_stream(t: torch.Tensor) -> tuple[int, int]:
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def _on_device_of(t: torch.Tensor):
    """Make t's GPU current while launching: Triton launches on the current device and stream."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _region_mask_fwd_triton(feats, lens, valid_u8, flat_cum, emb, seed, select_below, min_masked,
                            bert, out, mask, source):
    n_samples, n_regions, dim = feats.shape
    n_rows = n_samples * n_regions
    seed0, seed1 = _seeds(seed)
    cfg = _region_blocks(n_regions, dim, feats.device)
    grid = (n_samples, triton.cdiv(dim, cfg["BLOCK_D"]))
    dummy = source
    _region_mask_fwd_kernel[grid](
        feats, out, lens if lens is not None else dummy, valid_u8 if valid_u8 is not None else dummy,
        flat_cum if flat_cum is not None else dummy, emb if emb is not None else out, mask, source,
        n_regions, dim, n_rows, max(n_rows - 1, 0).bit_length(), feats.stride(0), feats.stride(1),
        valid_u8.stride(0) if valid_u8 is not None else 0, valid_u8.stride(1) if valid_u8 is not None else 0,
        seed0,
        reference.region_stream_key(seed1, reference.REGION_STREAM_SELECT),
        reference.region_stream_key(seed1, reference.REGION_STREAM_ACTION),
        reference.region_stream_key(seed1, reference.REGION_STREAM_SOURCE),
        select_below - 1, min_masked,
        MASK_BELOW=reference.REGION_MASK_BELOW, RANDOM_BELOW=reference.REGION_RANDOM_BELOW,
        HAS_LENS=lens is not None, HAS_EMB=emb is not None, BERT=bert, **cfg,
    )


def _region_mask_fwd_cuda(feats, lens, valid_u8, flat_cum, emb, seed, select_below, min_masked,
                          bert, out, mask, source):
    n_samples, n_regions, dim = feats.shape
    seed0, seed1 = _seeds(seed)
    device, stream = _cuda_stream(feats)
    _C.region_mask_forward(
        feats.data_ptr(), feats.stride(0), feats.stride(1), out.data_ptr(),
        lens.data_ptr() if lens is not None else 0,
        valid_u8.data_ptr() if valid_u8 is not None else 0,
        valid_u8.stride(0) if valid_u8 is not None else 0, valid_u8.stride(1) if valid_u8 is not None else 0,
        flat_cum.data_ptr() if flat_cum is not None else 0,
        emb.data_ptr() if emb is not None else 0,
        mask.data_ptr(), source.data_ptr(), n_samples, n_regions, dim, _DTYPE_CODE[feats.dtype],
        seed0,
        reference.region_stream_key(seed1, reference.REGION_STREAM_SELECT),
        reference.region_stream_key(seed1, reference.REGION_STREAM_ACTION),
        reference.region_stream_key(seed1, reference.REGION_STREAM_SOURCE),
        select_below, min_masked, reference.REGION_MASK_BELOW, reference.REGION_RANDOM_BELOW,
        bert, device, stream,
    )


def _region_mask_bwd_triton(grad_out, source, grad_in, emb_partial, bert):
    n_samples, n_regions, dim = grad_out.shape
    cfg = _region_blocks(n_regions, dim, grad_out.device)
    cfg.pop("CHUNK")
    grid = (n_samples, triton.cdiv(dim, cfg["BLOCK_D"]))
    _region_mask_bwd_kernel[grid](
        grad_out, source, grad_in, emb_partial if emb_partial is not None else grad_in,
        n_regions, dim, grad_out.stride(0), grad_out.stride(1),
        HAS_EMB_GRAD=emb_partial is not None, **cfg,
    )
    if bert:
        n_rows = n_samples * n_regions
        # 16 x 256 on the GPU: a 64 x 512 tile spilled 1-4 KB per thread (ptxas, sm_80 and sm_90)
        block_r = 16 if grad_out.is_cuda else 4
        block_d = min(256, cfg["BLOCK_D"])
        grid = (triton.cdiv(n_rows, block_r), triton.cdiv(dim, block_d))
        _region_mask_scatter_kernel[grid](
            grad_out, source, grad_in, n_regions, dim, n_rows, grad_out.stride(0), grad_out.stride(1),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=cfg["num_warps"],
        )


def _region_mask_bwd_cuda(grad_out, source, grad_in, emb_partial, bert):
    n_samples, n_regions, dim = grad_out.shape
    device, stream = _cuda_stream(grad_out)
    _C.region_mask_backward(
        grad_out.data_ptr(), grad_out.stride(0), grad_out.stride(1), source.data_ptr(),
        grad_in.data_ptr(), emb_partial.data_ptr() if emb_partial is not None else 0,
        n_samples, n_regions, dim, _DTYPE_CODE[grad_out.dtype], bert, device, stream,
    )


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
    device, stream = _cuda_stream(pred)
    _C.masked_region_loss_forward(
        pred.data_ptr(), pred.stride(0), pred.stride(1), target.data_ptr(), target.stride(0),
        target.stride(1), mask_u8.data_ptr(), mask_u8.stride(0), mask_u8.stride(1), loss.data_ptr(),
        stats.data_ptr() if stats.numel() else 0, n_samples, n_regions, dim,
        _DTYPE_CODE[pred.dtype], _KIND_CODE[kind], float(beta), device, stream,
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
    grad_loss = grad_loss.float()
    device, stream = _cuda_stream(pred)
    _C.masked_region_loss_backward(
        grad_loss.data_ptr(), grad_loss.stride(0), grad_loss.stride(1),
        pred.data_ptr(), pred.stride(0), pred.stride(1), target.data_ptr(), target.stride(0),
        target.stride(1), mask_u8.data_ptr(), mask_u8.stride(0), mask_u8.stride(1),
        stats.data_ptr() if stats.numel() else 0, grad_pred.data_ptr(),
        grad_target.data_ptr() if grad_target is not None else 0, n_samples, n_regions, dim,
        _DTYPE_CODE[pred.dtype], _KIND_CODE[kind], float(beta), device, stream,
    )


_REGION_FWD = {"triton": _region_mask_fwd_triton, "cuda": _region_mask_fwd_cuda}
_REGION_BWD = {"triton": _region_mask_bwd_triton, "cuda": _region_mask_bwd_cuda}
_LOSS_FWD = {"triton": _loss_fwd_triton, "cuda": _loss_fwd_cuda}
_LOSS_BWD = {"triton": _loss_bwd_triton, "cuda": _loss_bwd_cuda}


# --------------------------------------------------------------------------- registered ops


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
        existing = _existing_mask(region_lens, valid_mask, n_regions)
        flat_cum = existing.flatten().cumsum(0, dtype=torch.int32)
    out = torch.empty_like(feats, memory_format=torch.contiguous_format)
    mask = torch.empty((n_samples, n_regions), dtype=torch.bool, device=feats.device)
    source = torch.empty((n_samples, n_regions), dtype=torch.int32, device=feats.device)
    with _on_device_of(feats):
        _REGION_FWD[backend](
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
    """Returns (d feats (B, R, D), d mask_embedding (D,) fp32, empty (0,) unless embedding_grad)."""
    grad_out = last_dim_contiguous(grad_out)
    n_samples, _, dim = grad_out.shape
    grad_in = torch.empty_like(grad_out, memory_format=torch.contiguous_format)
    emb_partial = None
    if embedding_grad:
        emb_partial = torch.empty((n_samples, dim), dtype=torch.float32, device=grad_out.device)
    with _on_device_of(grad_out):
        _REGION_BWD[backend](grad_out, source, grad_in, emb_partial, bert)
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
    feats, _, _, mask_embedding, _, _, _, bert, backend = inputs
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


@torch.library.custom_op("mmkernels::masked_region_loss_fwd", mutates_args=())
def masked_region_loss_fwd(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str, beta: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (per-region loss (B, R) fp32, 0 where not selected; stats (B, R, 2) fp32 for "kl"
    holding log-sum-exp(pred) and Σ target per region, else empty (0,))."""
    pred, target = last_dim_contiguous(pred), last_dim_contiguous(target)
    n_samples, n_regions, _ = pred.shape
    loss = torch.empty((n_samples, n_regions), dtype=torch.float32, device=pred.device)
    stats_shape = (n_samples, n_regions, 2) if kind == "kl" else (0,)
    stats = torch.empty(stats_shape, dtype=torch.float32, device=pred.device)
    with _on_device_of(pred):
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
    grad_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    grad_target = torch.empty(target.shape, dtype=target.dtype, device=target.device) if target_grad else None
    with _on_device_of(pred):
        _LOSS_BWD[backend](
            grad_loss, pred, target, mask.view(torch.uint8), stats, kind, beta, grad_pred, grad_target
        )
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


# --------------------------------------------------------------------------- backend choice


def _cuda_build_hint() -> str:
    reason = f" (import failed: {_C_IMPORT_ERROR})" if _C_IMPORT_ERROR else ""
    return (
        "the CUDA extension mmkernels._C is not built" + reason + ". Build it with nvcc on PATH "
        "(or CUDA_HOME set): `pip install -e .` (or `pip install --no-build-isolation -e .`), "
        "or `python setup.py build_ext --inplace` from the repository root"
    )


def _resolve_backend(op: str, backend: str, x: torch.Tensor) -> str:
    """"triton", "cuda" or "torch" for this call, or an error saying why the asked one cannot run."""
    if backend == "torch":
        return "torch"
    if backend in ("triton", "cuda") and x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend={backend!r} supports float16, bfloat16 and float32, got {x.dtype}; "
            "use backend='torch' (or 'auto') for other dtypes"
        )
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs triton installed; use backend='torch'")
        if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {x.device}"
            )
        return "triton"
    if backend == "cuda":
        if not x.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {x.device}")
        if _C is None:
            raise RuntimeError(f"backend='cuda': {_cuda_build_hint()}")
        return "cuda"
    if x.is_cuda and x.dtype in KERNEL_DTYPES:
        choice = AUTO_CUDA_BACKEND[op]
        if choice == "cuda" and _C is None:
            choice = "triton"
        if choice == "triton" and not HAS_TRITON:
            choice = "cuda" if _C is not None else "torch"
        return choice
    if HAS_TRITON and x.device.type == "cpu" and interpreting() and x.dtype in KERNEL_DTYPES:
        return "triton"
    return "torch"


# --------------------------------------------------------------------------- public functions


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"expected {name} to be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_region_count(n_samples: int, n_regions: int) -> None:
    # the kernels index regions (b·R + r) with int32
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
        if region_lens.device.type == "cpu" and not torch.compiler.is_compiling():
            # CPU lengths are checked; CUDA ones (and any under torch.compile) are clamped to [0, R]:
            # a check would stall the host or break the graph.
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
    _check_choice("mode", mode, MODES)
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
    _check_choice("backend", backend, BACKENDS)
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
        backend: "auto" (see AUTO_CUDA_BACKEND), "triton", "cuda" (the compiled extension), "torch".

    Returns:
        RegionMaskOutput(features (B, R, D) new tensor, mask (B, R) bool of the selected regions).
        Padding regions are never selected and pass through unchanged. Gradients flow to the rows
        that are passed through or copied (as eager indexing gives them) and to mask_embedding.
    """
    _check_region_mask_inputs(
        feats, region_lens, valid_mask, prob, mode, mask_embedding, min_masked, generator, backend
    )
    impl = _resolve_backend("region_mask", backend, feats)
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
        existing = _existing_mask(region_lens, valid_mask, feats.shape[1])
        seed0, seed1 = _seeds(seed)
        features, mask = reference.region_mask(
            feats, existing, seed0, seed1, select_below, min_masked, bert, mask_embedding
        )
        return RegionMaskOutput(features, mask)
    features, mask, _ = torch.ops.mmkernels.region_mask_fwd(
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
    _check_choice("kind", kind, LOSS_KINDS)
    _check_choice("reduction", reduction, REDUCTIONS)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"expected beta to be a float >= 0, got {beta!r}")
    _check_choice("backend", backend, BACKENDS)
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
        reduction: "mean": the sum over selected regions divided by their number (0, with zero
            gradients, when none is selected); "sum"; "none": (B, R) per-region losses, 0 where not
            selected.
        beta: smooth_l1's threshold, as in F.smooth_l1_loss.
        backend: "auto", "triton", "cuda" or "torch", as in region_mask.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or (B, R) for reduction="none".
        pred gets its gradient; target too when it requires grad.
    """
    _check_loss_inputs(pred, target, mask, kind, reduction, beta, backend)
    impl = _resolve_backend("masked_region_loss", backend, pred)
    if pred.numel() == 0:
        impl = "torch"
    if impl == "torch":
        return reference.masked_region_loss(pred, target, mask, kind, reduction, float(beta))
    per_region, _ = torch.ops.mmkernels.masked_region_loss_fwd(pred, target, mask, kind, float(beta), impl)
    return reference.reduce_region_losses(per_region, mask, reduction)
