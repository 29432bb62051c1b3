"""The Triton kernels of `cross_attention` (launched from `mmkernels.ops.attention.launch`).

One program per (block of rows, batch · head), the grid flattened onto axis 0 (CUDA caps axes 1 and 2
at 65535, so B · H there would limit the batch): `pid = row_block + n_row_blocks · (b · H + h)`.

- `_cross_attention_fwd_kernel`: FlashAttention's online softmax over the key blocks up to kv_lens[b]
  (keys past it are never loaded). Stores the output and two fp32 softmax statistics per row, in
  log2 units: M, the row's largest score, and LG = log2 Σ_j exp2(s_j − M). Keeping them apart (not
  as one log-sum-exp M + LG) keeps the backward exact when every score of a row is huge: with an
  additive mask of finfo.min on every key, M ≈ −4.9e38 and M + LG would round LG away.
- `_cross_attention_bwd_dq_kernel`: per query block, delta = rowsum(dO · O) and dq.
- `_cross_attention_bwd_dkdv_kernel`: per key block, dk and dv.

Matrix products per tile (BLOCK_M × BLOCK_N × d each): forward 2 (q·kᵀ, p·v); dq pass 3 (q·kᵀ,
dO·vᵀ, dS·k); dk/dv pass 4 (k·qᵀ, v·dOᵀ, pᵀ·dO, dSᵀ·q). So q·kᵀ is computed three times per
training step and dO·vᵀ twice; a pass whose gradient is not needed is not launched (COMPUTE_*),
and one for dv alone skips v·dOᵀ and dSᵀ·q.

Row semantics (the definition `cross_attention` documents): a row with no attended key has l = 0
(every exp2 term is 0): output 0, statistics (+inf, +inf), so that the backward's exp2(s − M − LG)
is 0 there. A row with a NaN (or +inf) score has l = NaN: its output is NaN whatever dropout
keeps, and so is LG, which carries the NaN into the backward. A row that attends keys whose
scores are all -inf (from an Inf in the data) is 0 / 0 = NaN, as in eager attention.
"""
from __future__ import annotations

from mmkernels.ops._common import tl, triton

LOG2E = 1.4426950408889634
# MASK_KIND of the kernels: no attn_mask, bool (True = attend), additive float.
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@triton.jit
def _program_ids(L, H, BLOCK: tl.constexpr):
    """(row block, b, h, b · H + h) of this program: axis 0 holds row_block + n_blocks · (b · H + h)."""
    n_blocks = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    bh = pid // n_blocks
    return pid % n_blocks, bh // H, bh % H, bh


@triton.jit
def _lengths(KvLens, QLens, b, Lq, Lk, HAS_KV_LENS: tl.constexpr, HAS_Q_LENS: tl.constexpr):
    """kv_lens[b] and q_lens[b] clamped to [0, Lk] and [0, Lq] (Lk and Lq when not given)."""
    kv_len = Lk
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(KvLens + b).to(tl.int32), 0), Lk)
    q_len = Lq
    if HAS_Q_LENS:
        q_len = tl.minimum(tl.maximum(tl.load(QLens + b).to(tl.int32), 0), Lq)
    return kv_len, q_len


@triton.jit
def _key_range(m_start, kv_len, q_len, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys that the query block starting at m_start visits, as (full_end, kv_end): the key blocks in
    [0, full_end) need no bound or causal check, those in [full_end, kv_end) do. A query block
    entirely past q_len visits none."""
    kv_end = kv_len
    full_end = kv_len
    if IS_CAUSAL:
        kv_end = tl.minimum(kv_len, m_start + BLOCK_M)
        full_end = tl.minimum(kv_len, m_start + 1)
    kv_end = tl.where(m_start < q_len, kv_end, 0)
    full_end = tl.where(m_start < q_len, (full_end // BLOCK_N) * BLOCK_N, 0)
    return full_end, kv_end


@triton.jit
def _load_tile(ptrs, rows, row_limit, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile in the tensor's dtype, zero past row_limit and past HEAD_DIM."""
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=rows[:, None] < row_limit, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < row_limit) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _scores(qk, offs_q, offs_k, kv_len, Lq, Lk, qk_scale, kpm_row, stride_kpm_n,
            mask_base, stride_mask_m, stride_mask_n,
            HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, CHECK_KV: tl.constexpr,
            CAUSAL_TILE: tl.constexpr):
    """Scores of one tile in log2 units ((scale · q·k + attn_mask) · log2 e), -inf where a key is
    not attended. offs_q and offs_k broadcast to the tile's shape, in either orientation."""
    s = qk * qk_scale
    if MASK_KIND == 1:
        in_bounds = (offs_q < Lq) & (offs_k < Lk)
        allowed = tl.load(mask_base + offs_q * stride_mask_m + offs_k * stride_mask_n, mask=in_bounds, other=0)
        s = tl.where(allowed != 0, s, float("-inf"))
    if MASK_KIND == 2:
        in_bounds = (offs_q < Lq) & (offs_k < Lk)
        # Out of bounds (keys past Lk in the dk/dv pass's last block): -inf, so that exp2 stays 0 there.
        bias = tl.load(mask_base + offs_q * stride_mask_m + offs_k * stride_mask_n, mask=in_bounds,
                       other=float("-inf"))
        bias = bias.to(tl.float32)
        # Clamp before converting to log2 units so that finite masks such as finfo.min stay finite
        # (as in the eager formula); -inf stays -inf, and a NaN bias stays NaN (a NaN score).
        clamped = tl.maximum(bias, -1e38, propagate_nan=tl.PropagateNan.ALL)
        s = tl.where(bias == float("-inf"), float("-inf"), s + clamped * 1.4426950408889634)
    if HAS_KPM:
        padded = tl.load(kpm_row + offs_k * stride_kpm_n, mask=offs_k < Lk, other=1)
        s = tl.where(padded == 0, s, float("-inf"))
    if CHECK_KV:
        s = tl.where(offs_k < kv_len, s, float("-inf"))
    if CAUSAL_TILE:
        s = tl.where(offs_k <= offs_q, s, float("-inf"))
    return s


@triton.jit
def _dropout_keep(seed, bh, offs_q, offs_k, Lk, dropout_p):
    """Philox keep mask (uniform ≥ dropout_p) of the (query, key) pairs of head `bh`. The counter
    is (query · Lk + key, bh, 0, 0): 32-bit lanes, so that the tile needs no 64-bit offsets."""
    bits, _, _, _ = tl.philox(seed, offs_q * Lk + offs_k, bh, 0, 0)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _probabilities(s, row_max, row_log_sum):
    """exp2(s − M − LG): the softmax probabilities from the forward's statistics. s − M first, so
    that a row whose scores are all about −4.9e38 (finfo.min masks) still gets exactly 1/n."""
    return tl.math.exp2((s - row_max) - row_log_sum)


# --------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n0, offs_d, kv_len, Lq, Lk,
              stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, kpm_row, stride_kpm_n,
              mask_base, stride_mask_m, stride_mask_n, seed, bh, dropout_p,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KPM: tl.constexpr,
              MASK_KIND: tl.constexpr, CHECK_KV: tl.constexpr, CAUSAL_TILE: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the key block at start_n."""
    offs_n = start_n + offs_n0
    k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, kv_len,
                   offs_d, HEAD_DIM, BLOCK_D, CHECK_KV)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = _scores(qk, offs_m[:, None], offs_n[None, :], kv_len, Lq, Lk, qk_scale, kpm_row, stride_kpm_n,
                mask_base, stride_mask_m, stride_mask_n, HAS_KPM, MASK_KIND, CHECK_KV, CAUSAL_TILE)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    # l sums the probabilities before dropout: it decides whether the row has a key (l ≠ 0) and
    # carries a NaN score to the output whatever dropout drops.
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
        p = tl.where(keep, p, 0.0)
    v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n, kv_len,
                   offs_d, HEAD_DIM, BLOCK_D, CHECK_KV)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _cross_attention_fwd_kernel(
    Q, K, V, Out, Stats, KvLens, QLens, Kpm, Mask, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_kpm_b, stride_kpm_n,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    H, Lq, Lk, qk_scale, dropout_p, LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, HAS_Q_LENS: tl.constexpr, HAS_KPM: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (query block, b · H + h): Out[b, h, rows] and Stats[b, h, :, rows] = (M, LG)."""
    pid_m, b, h, bh = _program_ids(Lq, H, BLOCK_M)
    kv_len, q_len = _lengths(KvLens, QLens, b, Lq, Lk, HAS_KV_LENS, HAS_Q_LENS)
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    full_end, kv_end = _key_range(m_start, kv_len, q_len, IS_CAUSAL, BLOCK_M, BLOCK_N)

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    kpm_row = Kpm + b64 * stride_kpm_b
    mask_base = Mask + b64 * stride_mask_b + h64 * stride_mask_h
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    q = _load_tile(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n0, offs_d,
                                  kv_len, Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                  kpm_row, stride_kpm_n, mask_base, stride_mask_m, stride_mask_n,
                                  seed, bh, dropout_p, HEAD_DIM, BLOCK_D, HAS_KPM, MASK_KIND,
                                  False, False, HAS_DROPOUT, DOT_PRECISION)
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n0, offs_d,
                                  kv_len, Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                  kpm_row, stride_kpm_n, mask_base, stride_mask_m, stride_mask_n,
                                  seed, bh, dropout_p, HEAD_DIM, BLOCK_D, HAS_KPM, MASK_KIND,
                                  True, IS_CAUSAL, HAS_DROPOUT, DOT_PRECISION)

    # l = NaN (NaN != 0) when a score was NaN or +inf; l = 0 when every score was -inf: no key was
    # attended, or (rare) the attended keys' scores were -inf from the data (an Inf in q or k).
    # Only the masks decide which: for such rows, one pass over the masks alone (no products).
    summed_to_zero = (l_i == 0.0) & (offs_m < q_len)
    if tl.max(summed_to_zero.to(tl.int32), 0) > 0:
        zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        attended = tl.zeros([BLOCK_M], dtype=tl.int32)
        for start_n in range(0, kv_end, BLOCK_N):
            offs_n = start_n + offs_n0
            masked = _scores(zeros, offs_m[:, None], offs_n[None, :], kv_len, Lq, Lk, qk_scale, kpm_row,
                             stride_kpm_n, mask_base, stride_mask_m, stride_mask_n, HAS_KPM, MASK_KIND, True,
                             IS_CAUSAL)
            attended = tl.maximum(attended, tl.max((masked != float("-inf")).to(tl.int32), 1))
        # 0 / 0: those rows are NaN, as in eager attention's softmax.
        l_i = tl.where(summed_to_zero & (attended > 0), float("nan"), l_i)
    has_key = (l_i != 0.0) & (offs_m < q_len)
    inv_l = 1.0 / tl.where(has_key, l_i, 1.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    # A select, not a product: a row with no key is 0 even where acc holds 0 · NaN.
    out = tl.where(has_key[:, None], acc * inv_l[:, None], 0.0)
    row_max = tl.where(has_key, m_i, float("inf"))
    row_log_sum = tl.where(has_key, tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    stats_row = Stats + bh.to(tl.int64) * 2 * Lq
    tl.store(stats_row + offs_m, row_max, mask=offs_m < Lq)
    tl.store(stats_row + Lq + offs_m, row_log_sum, mask=offs_m < Lq)
    o_ptrs = (Out + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------- backward


@triton.jit
def _bwd_dq_tile(dq, q, do, row_max, row_log_sum, delta, k_base, v_base, start_n, offs_m, offs_n0, offs_d,
                 kv_len, Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, kpm_row, stride_kpm_n,
                 mask_base, stride_mask_m, stride_mask_n, seed, bh, dropout_p,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KPM: tl.constexpr,
                 MASK_KIND: tl.constexpr, CHECK_KV: tl.constexpr, CAUSAL_TILE: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq += dS @ k over the key block at start_n (dS = P ∘ (dP - delta), unscaled)."""
    offs_n = start_n + offs_n0
    k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, kv_len,
                   offs_d, HEAD_DIM, BLOCK_D, CHECK_KV)
    v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n, kv_len,
                   offs_d, HEAD_DIM, BLOCK_D, CHECK_KV)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = _scores(qk, offs_m[:, None], offs_n[None, :], kv_len, Lq, Lk, qk_scale, kpm_row, stride_kpm_n,
                mask_base, stride_mask_m, stride_mask_n, HAS_KPM, MASK_KIND, CHECK_KV, CAUSAL_TILE)
    p = _probabilities(s, row_max[:, None], row_log_sum[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _cross_attention_bwd_dq_kernel(
    Q, K, V, Out, DOut, Stats, Delta, DQ, KvLens, QLens, Kpm, Mask, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_kpm_b, stride_kpm_n,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    H, Lq, Lk, qk_scale, scale, dropout_p, LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, HAS_Q_LENS: tl.constexpr, HAS_KPM: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (query block, b · H + h): Delta[rows] = rowsum(dO · O), and DQ[b, h, rows] when
    COMPUTE_DQ (without it the program only computes delta, for the dk pass)."""
    pid_m, b, h, bh = _program_ids(Lq, H, BLOCK_M)
    kv_len, q_len = _lengths(KvLens, QLens, b, Lq, Lk, HAS_KV_LENS, HAS_Q_LENS)
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    do = _load_tile(DOut + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D, True)
    o = _load_tile(Out + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                   offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)

    if COMPUTE_DQ:
        full_end, kv_end = _key_range(m_start, kv_len, q_len, IS_CAUSAL, BLOCK_M, BLOCK_N)
        k_base = K + b64 * stride_kb + h64 * stride_kh
        v_base = V + b64 * stride_vb + h64 * stride_vh
        kpm_row = Kpm + b64 * stride_kpm_b
        mask_base = Mask + b64 * stride_mask_b + h64 * stride_mask_h
        seed = 0
        if HAS_DROPOUT:
            seed = tl.load(Seed)
        q = _load_tile(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm
                       + offs_d[None, :] * stride_qd, offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D, True)
        stats_row = Stats + bh.to(tl.int64) * 2 * Lq
        row_max = tl.load(stats_row + offs_m, mask=offs_m < q_len, other=float("inf"))
        row_log_sum = tl.load(stats_row + Lq + offs_m, mask=offs_m < q_len, other=float("inf"))

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, full_end, BLOCK_N):
            dq = _bwd_dq_tile(dq, q, do, row_max, row_log_sum, delta, k_base, v_base, start_n, offs_m, offs_n0,
                              offs_d, kv_len, Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, kpm_row,
                              stride_kpm_n, mask_base, stride_mask_m, stride_mask_n, seed, bh, dropout_p,
                              HEAD_DIM, BLOCK_D, HAS_KPM, MASK_KIND, False, False, HAS_DROPOUT, DOT_PRECISION)
        for start_n in range(full_end, kv_end, BLOCK_N):
            dq = _bwd_dq_tile(dq, q, do, row_max, row_log_sum, delta, k_base, v_base, start_n, offs_m, offs_n0,
                              offs_d, kv_len, Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, kpm_row,
                              stride_kpm_n, mask_base, stride_mask_m, stride_mask_n, seed, bh, dropout_p,
                              HEAD_DIM, BLOCK_D, HAS_KPM, MASK_KIND, True, IS_CAUSAL, HAS_DROPOUT, DOT_PRECISION)
        # Rows with no key and rows past q_len (LG = +inf) pass no gradient, whatever 0 · NaN gave.
        row_attends = row_log_sum != float("inf")
        dq_ptrs = (DQ + b64 * stride_dqb + h64 * stride_dqh
                   + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
        tl.store(dq_ptrs, tl.where(row_attends[:, None], dq * scale, 0.0).to(DQ.dtype.element_ty),
                 mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, Stats, Delta, start_m, offs_n, offs_m0, offs_d, q_len,
                   Lq, Lk, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, kpm_row, stride_kpm_n,
                   mask_base, stride_mask_m, stride_mask_n, seed, bh, dropout_p,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KPM: tl.constexpr,
                   MASK_KIND: tl.constexpr, CAUSAL_TILE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dv += P̃ᵀ @ dO and dk += dSᵀ @ q over the query block at start_m, in (key, query) orientation."""
    offs_m = start_m + offs_m0
    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, offs_m, q_len,
                   offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, offs_m, q_len,
                    offs_d, HEAD_DIM, BLOCK_D, True)
    row_max = tl.load(Stats + offs_m, mask=offs_m < q_len, other=float("inf"))
    row_log_sum = tl.load(Stats + Lq + offs_m, mask=offs_m < q_len, other=float("inf"))
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    # Keys past kv_len are not masked here: their rows of dk and dv are zeroed at the store.
    s_t = _scores(qk_t, offs_m[None, :], offs_n[:, None], Lk, Lq, Lk, qk_scale, kpm_row, stride_kpm_n,
                  mask_base, stride_mask_m, stride_mask_n, HAS_KPM, MASK_KIND, False, CAUSAL_TILE)
    p_t = _probabilities(s_t, row_max[None, :], row_log_sum[None, :])
    # Rows past q_len do not exist: 0, not exp2(NaN - inf) where their attn_mask entries hold NaN/+inf.
    p_t = tl.where(offs_m[None, :] < q_len, p_t, 0.0)
    if HAS_DROPOUT:
        keep_t = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], Lk, dropout_p)
    if COMPUTE_DV:
        if HAS_DROPOUT:
            dv += tl.dot(tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0).to(do.dtype), do,
                         input_precision=DOT_PRECISION)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    if COMPUTE_DK:
        delta = tl.load(Delta + offs_m, mask=offs_m < q_len, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _cross_attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Stats, Delta, DK, DV, KvLens, QLens, Kpm, Mask, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_kpm_b, stride_kpm_n,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    H, Lq, Lk, qk_scale, scale, dropout_p, LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, HAS_Q_LENS: tl.constexpr, HAS_KPM: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (key block, b · H + h): DK[b, h, keys] when COMPUTE_DK, DV[b, h, keys] when COMPUTE_DV."""
    pid_n, b, h, bh = _program_ids(Lk, H, BLOCK_N)
    kv_len, q_len = _lengths(KvLens, QLens, b, Lq, Lk, HAS_KV_LENS, HAS_Q_LENS)
    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    # Causal: query blocks before the diagonal see none of these keys; those on it need the
    # causal check; those after it see all of them.
    q_begin = 0
    diag_end = 0
    if IS_CAUSAL:
        q_begin = (n_start // BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(tl.cdiv(n_start + BLOCK_N - 1, BLOCK_M) * BLOCK_M, q_len)
    # A key block entirely past kv_len does no work.
    q_end = tl.where(n_start < kv_len, q_len, 0)
    diag_end = tl.where(n_start < kv_len, diag_end, 0)

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DOut + b64 * stride_dob + h64 * stride_doh
    stats_row = Stats + bh.to(tl.int64) * 2 * Lq
    delta_row = Delta + bh.to(tl.int64) * Lq
    kpm_row = Kpm + b64 * stride_kpm_b
    mask_base = Mask + b64 * stride_mask_b + h64 * stride_mask_h
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    k = _load_tile(K + b64 * stride_kb + h64 * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, kv_len, offs_d, HEAD_DIM, BLOCK_D, True)
    v = k
    if COMPUTE_DK:
        v = _load_tile(V + b64 * stride_vb + h64 * stride_vh + offs_n[:, None] * stride_vn
                       + offs_d[None, :] * stride_vd, offs_n, kv_len, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:
        for start_m in range(q_begin, diag_end, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, stats_row, delta_row, start_m, offs_n, offs_m0,
                                    offs_d, q_len, Lq, Lk, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale,
                                    kpm_row, stride_kpm_n, mask_base, stride_mask_m, stride_mask_n, seed, bh,
                                    dropout_p, HEAD_DIM, BLOCK_D, HAS_KPM, MASK_KIND, True, HAS_DROPOUT,
                                    COMPUTE_DK, COMPUTE_DV, DOT_PRECISION)
    for start_m in range(tl.maximum(diag_end, q_begin), q_end, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, stats_row, delta_row, start_m, offs_n, offs_m0,
                                offs_d, q_len, Lq, Lk, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale,
                                kpm_row, stride_kpm_n, mask_base, stride_mask_m, stride_mask_n, seed, bh,
                                dropout_p, HEAD_DIM, BLOCK_D, HAS_KPM, MASK_KIND, False, HAS_DROPOUT,
                                COMPUTE_DK, COMPUTE_DV, DOT_PRECISION)
    key_valid = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
    in_bounds = (offs_n[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM)
    if COMPUTE_DK:
        dk_ptrs = (DK + b64 * stride_dkb + h64 * stride_dkh
                   + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
        tl.store(dk_ptrs, tl.where(key_valid, dk * scale, 0.0).to(DK.dtype.element_ty), mask=in_bounds)
    if COMPUTE_DV:
        dv_ptrs = (DV + b64 * stride_dvb + h64 * stride_dvh
                   + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd)
        tl.store(dv_ptrs, tl.where(key_valid, dv, 0.0).to(DV.dtype.element_ty), mask=in_bounds)
