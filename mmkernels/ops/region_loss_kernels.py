"""Triton kernels of masked_region_loss (mmkernels/ops/region_loss.py holds their launchers and the op).

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
