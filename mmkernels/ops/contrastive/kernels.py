"""Triton kernels of the contrastive losses (CLIP, SigLIP, one-directional InfoNCE): S in row
panels, W in a bounded workspace. The launchers are in launch.py, the tiles and the workspace in plan.py.

Notation. A block row of the logits: image_emb a (M, D) against text_emb b (N, D), the positive of
row i at column offset + i. x_i = ra_i·a_i and y_j = rb_j·b_j, where ra, rb are 1 or the inverse L2
norms (normalize=True); U_ij = x_i·y_j and S_ij = logit_scale·U_ij (+ logit_bias for SigLIP). A
logit that is not finite is NaN (the loss of an Inf input is undefined; see reference.clip_logits).

- `_clip_stats_kernel` computes each tile of S once, keeps the online log-sum-exp of its rows and
  (CLIP; InfoNCE needs rows only) writes the per-(row block, column) partial column statistics
  (max, Σ exp) of the panel into the workspace; `_merge_lse_kernel` folds them into the running
  column statistics in a fixed order (deterministic, no atomics, no bound on |S| assumed).
- `_panel_kernel` computes each tile of S once and turns it into W (CLIP: W = 2·n_total·dL/dS;
  InfoNCE and SigLIP: n_total·dL/dS, SigLIP's with the loss terms), written for the panel's rows
  into the workspace as W~ = coef·W·ra_i·rb_j, so that torch.mm(W~, b) = ra_i·dL/dx_i and
  torch.mm(W~.T, a) = rb_j·dL/dy_j; d logit_scale = Σ W·U and d logit_bias = Σ W are reduced in the
  same kernel.
- `_finish_grad_kernel` applies the L2 normalisation's backward in place (O(N·D)).
"""
from __future__ import annotations

from mmkernels.ops._common import tl, triton

# _panel_kernel's MODE
MODE_CLIP = 0
MODE_SIGLIP = 1
MODE_INFONCE = 2  # one-directional: CE over the rows of S only


@triton.jit
def _unscaled_logits(
    a_ptr, b_ptr, ra_ptr, rb_ptr, offs_i, offs_j, mask_i, mask_j, D,
    stride_am, stride_ad, stride_bn, stride_bd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """U[offs_i, offs_j] = (ra_i · rb_j) · (a_i · b_j), fp32 (BLOCK_M, BLOCK_N); also ra, rb there.

    Every kernel computes U in this one orientation with one tile shape, so a logit comes out bit
    for bit the same in the statistics pass and in the gradient pass.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows_a = offs_i.to(tl.int64) * stride_am
    rows_b = offs_j.to(tl.int64) * stride_bn
    for k in range(0, D, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        a = tl.load(a_ptr + rows_a[:, None] + offs_k[None, :] * stride_ad,
                    mask=mask_i[:, None] & mask_k[None, :], other=0.0)
        # b's tile loaded as (BLOCK_K, BLOCK_N) directly: the same product as tl.dot(a, tl.trans(b)),
        # and a contiguous operand for the interpreter's numpy matmul (10× faster than a transposed view)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bd + rows_b[None, :],
                    mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    ra = tl.load(ra_ptr + offs_i, mask=mask_i, other=0.0)
    rb = tl.load(rb_ptr + offs_j, mask=mask_j, other=0.0)
    return acc * (ra[:, None] * rb[None, :]), ra, rb


@triton.jit
def _finite_or_nan(s):
    # |NaN| < inf is false too: NaN stays NaN, ±inf becomes NaN
    return tl.where(tl.abs(s) < float("inf"), s, float("nan"))


@triton.jit
def _log1p(u):
    """log(1 + u) accurate for small u >= 0: log(v)·u/(v - 1) with v = 1 + u rounded (Goldberg)."""
    v = 1.0 + u
    exact = v == 1.0
    # the divisor of the lanes that return u is 1, not 0: no division by zero is evaluated
    return tl.where(exact, u, tl.log(v) * (u / tl.where(exact, 1.0, v - 1.0)))


@triton.jit
def _minus_lse(s, lse):
    """s - lse, fp32, for lse (float64) the log-sum-exp of s's row (or column): as exact as the
    eager softmax's s - max. lse = hi + lo; s - hi is exact where s is near lse (the dominant
    logits, where P ≈ 1), so P = exp(s - lse) keeps the precision of P - t there. An fp32 lse
    would put u·|lse|/2 into every P, ~50 ulps at CLIP's logit scale 100.
    `lse` broadcasts against s ((BLOCK_M, 1) or (1, BLOCK_N)); an infinite or NaN lse acts as itself."""
    hi = lse.to(tl.float32)
    lo = tl.where(tl.abs(hi) < float("inf"), (lse - hi.to(tl.float64)).to(tl.float32), 0.0)
    return (s - hi) - lo


@triton.jit
def _positives(offs_i, offs_j, mask_i, mask_j, offset, n_pair, row_gid_ptr, col_gid_ptr, GROUPS: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: the tile's positive pairs. GROUPS: row i (block row offs_i) and a paired
    column j < n_pair with equal ids; else j = offset + i (offset >= N: none)."""
    if GROUPS:
        row_g = tl.load(row_gid_ptr + offs_i, mask=mask_i, other=0)
        paired = mask_j & (offs_j < n_pair)
        col_g = tl.load(col_gid_ptr + offs_j, mask=paired, other=0)
        return (row_g[:, None] == col_g[None, :]) & paired[None, :]
    else:
        return offs_j[None, :] == (offs_i + offset)[:, None]


@triton.jit
def _clip_stats_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr, col_m_ptr, col_l_ptr, row_ptr, row_gid_ptr, col_gid_ptr,
    row_cnt_ptr, row0, P, N, D, offset, n_pair, cols_per_split,
    stride_am, stride_ad, stride_bn, stride_bd, stride_col, stride_row_k, stride_row_s,
    COLUMNS: tl.constexpr, GROUPS: tl.constexpr, EXTRA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (r, s): panel rows r·BLOCK_M.. (block rows row0 + ...) against columns split s.

    COLUMNS: writes, over its columns, the partial column statistics of its row block: col_m[r, j] =
    max_i S_ij, col_l[r, j] = Σ_i exp(S_ij - col_m[r, j]). Always, for its rows over its column split:
    row[0, s, i] = max_j S_ij, row[1, s, i] = Σ_j exp(S_ij - row[0, s, i]) (online over the tiles),
    row[2, s, i] = S[i, offset + i] if that column is in the split (else 0) (GROUPS: Σ over the row's
    positives in the split of S_ij / row_cnt_i), row[3, s, i] = Σ_{j < n_pair} S_ij, row[4, s, i] =
    Σ_{j >= n_pair} S_ij (the extra columns'; EXTRA, else 0).
    """
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_p = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_i = offs_p < P
    offs_i = row0 + offs_p
    scale = tl.load(scale_ptr)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
    line_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    extra_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_begin = pid_s * cols_per_split
    col_end = tl.minimum(N, col_begin + cols_per_split)
    for start in range(col_begin, col_end, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        mask_j = offs_j < N
        u, ra, rb = _unscaled_logits(
            a_ptr, b_ptr, ra_ptr, rb_ptr, offs_i, offs_j, mask_i, mask_j, D,
            stride_am, stride_ad, stride_bn, stride_bd, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
        )
        s = _finite_or_nan(u * scale)
        # rows: the online log-sum-exp. A tile's first column is always valid, so m_new is finite
        # unless S holds NaN, and then the NaN that spreads is the answer.
        s_rows = tl.where(mask_j[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_rows, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_rows - m_new[:, None]), axis=1)
        m_i = m_new
        positive = _positives(offs_i, offs_j, mask_i, mask_j, offset, n_pair, row_gid_ptr, col_gid_ptr, GROUPS)
        diag += tl.sum(tl.where(positive, s, 0.0), axis=1)
        if EXTRA:  # columns n_pair.. are extra negatives: their sum apart
            line_sum += tl.sum(tl.where((mask_j & (offs_j < n_pair))[None, :], s, 0.0), axis=1)
            extra_sum += tl.sum(tl.where((mask_j & (offs_j >= n_pair))[None, :], s, 0.0), axis=1)
        else:
            line_sum += tl.sum(tl.where(mask_j[None, :], s, 0.0), axis=1)
        if COLUMNS:  # this row block's share, from its valid rows (there is at least one)
            s_cols = tl.where(mask_i[:, None], s, float("-inf"))
            col_m = tl.max(s_cols, axis=0)
            col_l = tl.sum(tl.exp(s_cols - col_m[None, :]), axis=0)
            tl.store(col_m_ptr + pid_r * stride_col + offs_j, col_m, mask=mask_j)
            tl.store(col_l_ptr + pid_r * stride_col + offs_j, col_l, mask=mask_j)
    if GROUPS:  # the row's target spreads over its group: 1/count each
        diag = diag / tl.load(row_cnt_ptr + offs_i, mask=mask_i, other=1).to(tl.float32)
    row_out = row_ptr + pid_s * stride_row_s + offs_p
    tl.store(row_out, m_i, mask=mask_i)
    tl.store(row_out + stride_row_k, l_i, mask=mask_i)
    tl.store(row_out + 2 * stride_row_k, diag, mask=mask_i)
    tl.store(row_out + 3 * stride_row_k, line_sum, mask=mask_i)
    tl.store(row_out + 4 * stride_row_k, extra_sum, mask=mask_i)


@triton.jit
def _merge_lse_kernel(
    part_m_ptr, part_l_ptr, run_m_ptr, run_l_ptr, lse_ptr, P, L, stride_p,
    INIT: tl.constexpr, WRITE_LSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Fold P partial (max, Σ exp) rows (P, L) into running statistics (L,), in order p = 0, 1, ...

    INIT: start from (-inf, 0) instead of the running values. WRITE_LSE: store the log-sum-exp
    max + log Σ into lse (L,) float64 instead of the running values. A -inf max adds nothing; NaN spreads.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    if INIT:
        m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK,), dtype=tl.float32)
    else:
        m = tl.load(run_m_ptr + offs, mask=mask, other=0.0)
        l = tl.load(run_l_ptr + offs, mask=mask, other=0.0)
    for p in range(0, P):
        m_p = tl.load(part_m_ptr + p * stride_p + offs, mask=mask, other=0.0)
        l_p = tl.load(part_l_ptr + p * stride_p + offs, mask=mask, other=0.0)
        m_new = tl.maximum(m, m_p)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - ref) + l_p * tl.exp(m_p - ref)
        m = m_new
    if WRITE_LSE:  # lse is float64: see _minus_lse
        # l == 0 (no finite score, or a lane past L) gives lse = -inf without evaluating log(0)
        log_l = tl.where(l == 0.0, float("-inf"), tl.log(tl.where(l == 0.0, 1.0, l)))
        lse = tl.where(m == float("-inf"), 0.0, m).to(tl.float64) + log_l.to(tl.float64)
        tl.store(lse_ptr + offs, lse, mask=mask)
    else:
        tl.store(run_m_ptr + offs, m, mask=mask)
        tl.store(run_l_ptr + offs, l, mask=mask)


@triton.jit
def _panel_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr, bias_ptr, coef_ptr, row_lse_ptr, col_lse_ptr, w_ptr, part_ptr,
    row_gid_ptr, col_gid_ptr, row_cnt_ptr, col_cnt_ptr,
    row0, P, N, D, offset, n_pair, n_total, row_classes, label_smoothing,
    stride_am, stride_ad, stride_bn, stride_bd, stride_w, stride_part_k, stride_part_r,
    MODE: tl.constexpr, SCALARS: tl.constexpr, WRITE_W: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (r, c): one tile of S, computed once, turned into W.

    CLIP: W = (P^row - t^row) + (P^col - t^col) (= 2·n_total·dL/dS), t^row = (1-eps)·[j = offset+i] +
    eps/row_classes, t^col = (1-eps)·[j = offset+i] + eps/n_total; the columns j >= n_pair (extra
    negatives) have no column term. GROUPS: the positives are the pairs with equal ids, and the
    positive's 1 - eps is divided by the row's (t^row) or the column's (t^col) group size.
    InfoNCE: W = P^row - t^row (= n_total·dL/dS).
    SigLIP: W = -label·σ(-label·S) (= n_total·dL/dS), and the loss terms softplus(-label·S); label +1
    on the positives.
    part[0, r, c] = Σ loss terms (SigLIP; CLIP: 0), part[1, r, c] = Σ W, part[2, r, c] = Σ W·U over
    the tile (SCALARS; else 0); WRITE_W: w[i, j] = coef·W_ij·ra_i·rb_j for the panel's rows i (row stride stride_w).
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_i = offs_p < P
    mask_j = offs_j < N
    offs_i = row0 + offs_p
    u, ra, rb = _unscaled_logits(
        a_ptr, b_ptr, ra_ptr, rb_ptr, offs_i, offs_j, mask_i, mask_j, D,
        stride_am, stride_ad, stride_bn, stride_bd, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
    )
    s = _finite_or_nan(u * tl.load(scale_ptr) + tl.load(bias_ptr))
    positive = _positives(offs_i, offs_j, mask_i, mask_j, offset, n_pair, row_gid_ptr, col_gid_ptr, GROUPS)
    valid = mask_i[:, None] & mask_j[None, :]
    part = part_ptr + pid_r * stride_part_r + pid_c
    if MODE != 1:  # CLIP and InfoNCE: softmax cross-entropies
        lse_r = tl.load(row_lse_ptr + offs_i, mask=mask_i, other=0.0)
        # each direction's target off its own softmax, as the eager backward subtracts it: P^row + P^col
        # ≈ 2 at a dominant positive would lose the low bits first
        on = 1.0 - label_smoothing
        if GROUPS:
            cnt_r = tl.load(row_cnt_ptr + offs_i, mask=mask_i, other=1).to(tl.float32)
            t = tl.where(positive, on / cnt_r[:, None], 0.0) + label_smoothing / row_classes
        else:
            t = tl.where(positive, on, 0.0) + label_smoothing / row_classes
        w = tl.exp(_minus_lse(s, lse_r[:, None])) - t
        if MODE == 0:
            paired = mask_j & (offs_j < n_pair)
            # +inf off the paired columns: exp(s - inf) = 0 there, no overflow computed and discarded
            lse_c = tl.load(col_lse_ptr + offs_j, mask=paired, other=float("inf"))
            if GROUPS:
                cnt_c = tl.load(col_cnt_ptr + offs_j, mask=paired, other=1).to(tl.float32)
                t = tl.where(positive, on / cnt_c[None, :], 0.0) + label_smoothing / n_total
            else:
                t = tl.where(positive, on, 0.0) + label_smoothing / n_total
            w = w + tl.where(paired[None, :], tl.exp(_minus_lse(s, lse_c[None, :])) - t, 0.0)
        tl.store(part, 0.0)
    else:
        z = tl.where(positive, s, -s)  # label · S
        # softplus(-z) = -log σ(z) = max(-z, 0) + log1p(exp(-|z|)), without overflow
        e = tl.exp(-tl.abs(z))
        terms = tl.maximum(-z, 0.0) + _log1p(e)
        tl.store(part, tl.sum(tl.sum(tl.where(valid, terms, 0.0), axis=1), axis=0))
        if SCALARS or WRITE_W:
            # σ(-z) from the same exp(-|z|), which never overflows: 1/(1+e) for z <= 0, e/(1+e) above
            sig = tl.where(z <= 0.0, 1.0, e) / (1.0 + e)
            w = tl.where(positive, -sig, sig)
    if SCALARS or WRITE_W:
        w = tl.where(valid, w, 0.0)
    if SCALARS:
        tl.store(part + stride_part_k, tl.sum(tl.sum(w, axis=1), axis=0))
        tl.store(part + 2 * stride_part_k, tl.sum(tl.sum(w * u, axis=1), axis=0))
    else:
        tl.store(part + stride_part_k, 0.0)
        tl.store(part + 2 * stride_part_k, 0.0)
    if WRITE_W:
        w = w * (tl.load(coef_ptr) * (ra[:, None] * rb[None, :]))
        tl.store(w_ptr + offs_p.to(tl.int64)[:, None] * stride_w + offs_j[None, :],
                 w.to(w_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _finish_grad_kernel(
    g_ptr, emb_ptr, r_ptr, out_ptr, R, D, stride_g, stride_e, stride_ed, stride_o, r_clamped,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out_i = g_i - r_i²·(e_i·g_i)·e_i (where r_i < r_clamped = 1/eps; else g_i): the backward of e / max(||e||, eps)
    for g_i = r_i·dL/d(normalised e_i). fp32 g (R, D); out may be g itself."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    rows = offs_r.to(tl.int64)
    dots = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < D)[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g + offs_d[None, :], mask=mask, other=0.0)
        e = tl.load(emb_ptr + rows[:, None] * stride_e + offs_d[None, :] * stride_ed, mask=mask, other=0.0)
        dots += tl.sum(g * e.to(tl.float32), axis=1)
    r = tl.load(r_ptr + offs_r, mask=mask_r, other=0.0)
    # where the eps clamp is active, e / eps has no projection to take out
    coef = tl.where(r < r_clamped, r * r * dots, 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < D)[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g + offs_d[None, :], mask=mask, other=0.0)
        e = tl.load(emb_ptr + rows[:, None] * stride_e + offs_d[None, :] * stride_ed, mask=mask, other=0.0)
        out = g - coef[:, None] * e.to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_o + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
