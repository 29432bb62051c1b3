"""Triton kernels of region_mask and masked_region_loss (launch.py launches them).

region_mask:

- `_region_mask_fwd_kernel`: one program per (sample, slice of D). It first finds the sample's
  min_masked cut (a scan over the sample's R random numbers), then streams the sample's rows: each
  input row is read at most once per slice, each output row written once.
- `_region_mask_bwd_kernel`: the same grid; passes the gradient of kept rows through, zeroes the
  others and sums the masked rows' gradient per sample for mask_embedding.
- `_region_mask_scatter_kernel` ("bert" only): adds the gradient of each randomly replaced row to
  the row it copied (atomic adds: the order of two adds to one row is not fixed).

The random numbers are reference.region_random's, bit for bit (as csrc/region_math.h's).

masked_region_loss:

- `_masked_region_loss_fwd_kernel`: BLOCK_R regions per program, streaming K in BLOCK_K slices;
  writes each region's loss (0 where not selected; unselected rows are never read) and, for "kl",
  the region's log-sum-exp of pred and Σ target for the backward.
- `_masked_region_loss_bwd_kernel`: one (BLOCK_R, BLOCK_K) tile per program: the gradient of pred
  (and of target when asked), 0 on the rows that are not selected.

"kl" computes, per selected region, Σ_k where(t_k == 0, 0, t_k·(log t_k - log_softmax(p)_k)) for
any target (the contract of reference.masked_region_loss): a negative t_k gives NaN (log of a
negative number), a zero t_k adds exactly 0 even where p_k = -inf, and Σ_k t_k need not be 1.
Written as Σ t·log t - Σ t·(p - m) + (Σ t)·(log Σ exp(p - m)) with m the running max of p.
"""
from mmkernels.ops._common import tl, triton


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
    # kl: online softmax statistics of pred (running max m, Σ exp(p - m)), Σ t·(p - m) and Σ t.
    # While every p seen is -inf, m is -inf and the sums are taken relative to 0 instead (their
    # terms are then 0 or infinite, so the reference point does not matter).
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    tp = tl.zeros((BLOCK_R,), dtype=tl.float32)
    t_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    # smooth_l1 with beta = 0 (pure L1) never takes the quadratic branch: divide by 1 there, not by 0
    quadratic_beta = tl.where(beta > 0, beta, 1.0)
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
                quadratic = 0.5 * d * d / quadratic_beta
                acc += tl.sum(tl.where(ad < beta, quadratic, ad - 0.5 * beta), axis=1)
            else:
                p_m = tl.where(ld, p, float("-inf"))
                m_new = tl.maximum(m, tl.max(p_m, axis=1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                shift = m_ref - tl.where(m == float("-inf"), m_ref, m)
                s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(p_m - m_ref[:, None]), axis=1)
                # terms with t = 0 are exactly 0 (0·(-inf) would be NaN); masked-off lanes load t = 0
                nonzero = t != 0.0
                tp = tp - tl.where(t_sum != 0.0, t_sum * shift, 0.0)
                tp += tl.sum(tl.where(nonzero, t * (p - m_ref[:, None]), 0.0), axis=1)
                t_sum += tl.sum(t, axis=1)
                acc += tl.sum(tl.where(nonzero, t * tl.log(tl.where(nonzero, t, 1.0)), 0.0), axis=1)
                m = m_new
    if KIND == 2:
        log_s = tl.log(tl.where(selected, s, 1.0))
        # KL = Σ t log t - Σ t·(p - m) + (Σ t)·log s; the last term is 0 when every t is 0
        loss = acc - tp + tl.where(t_sum != 0.0, t_sum * log_s, 0.0)
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
        # as torch's backward: -1 below -beta, 1 above beta, d / beta between (so NaN for a NaN d),
        # and 0 between when beta = 0 (l1)
        inner = tl.where(beta > 0, d / tl.where(beta > 0, beta, 1.0), 0.0)
        grad_p = tl.where(d < -beta, -1.0, tl.where(d > beta, 1.0, inner)) * (g / K)[:, None]
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
            # d KL / d target = log t + 1 - log q (NaN for t < 0), and 0 where t = 0
            nonzero = t != 0.0
            grad_t = tl.where(nonzero, (tl.log(tl.where(nonzero, t, 1.0)) + 1.0 - log_q) * g[:, None], 0.0)
        else:
            grad_t = -grad_p
        tl.store(
            grad_target_ptr + offs, tl.where(ld, grad_t, 0.0).to(grad_target_ptr.dtype.element_ty),
            mask=out_mask,
        )
