"""Cross-modal (and self-) attention with per-sample lengths and masks, fused in Triton.

Name chain: `_cross_attention_fwd_kernel` / `_cross_attention_bwd_dq_kernel` /
`_cross_attention_bwd_dkdv_kernel` (Triton) → `cross_attention_fwd()` / `cross_attention_bwd()`
(launchers, registered as `torch.ops.mmkernels.cross_attention_fwd` / `..._bwd`) →
`cross_attention()` (public function) → `mmkernels.nn.CrossModalAttention` (module).

The forward is FlashAttention's online softmax: one program per (batch, head, block of queries)
walks the key blocks up to kv_lens[b] (keys past it are never loaded, so their work is skipped,
not masked) and keeps a running max and sum in fp32; it stores the output and the fp32
log-sum-exp of each row. The backward recomputes the probabilities from that log-sum-exp: a dq
pass (one program per query block, which also computes delta = rowsum(dO · O)) and a dk/dv pass
(one program per key block). Dropout masks come from Philox (`tl.rand`) keyed by the seed and the
(batch·head, query, key) position, so the backward regenerates the forward's mask without storing
it. No Lq × Lk tensor is written; a caller's attn_mask is read through its (broadcast) strides.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from mmkernels.ops import reference
from mmkernels.ops._common import (
    check_float_tensor,
    check_same_device,
    interpreting,
    last_dim_contiguous,
    tl,
    triton,
    triton_enabled,
)

__all__ = ["cross_attention", "LAYOUTS", "MAX_HEAD_DIM"]

LAYOUTS = ("bhld", "blhd")
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
# MASK_KIND of the kernels: no attn_mask, bool (True = attend), additive float.
_MASK_NONE, _MASK_BOOL, _MASK_ADDITIVE = 0, 1, 2


# --------------------------------------------------------------------------- Triton helpers


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
    not attended. offs_q and offs_k broadcast to the tile's shape, in either orientation.
    MASK_KIND: 0 no attn_mask, 1 bool (True = attend), 2 additive."""
    s = qk * qk_scale
    if MASK_KIND == 1:
        in_bounds = (offs_q < Lq) & (offs_k < Lk)
        allowed = tl.load(mask_base + offs_q * stride_mask_m + offs_k * stride_mask_n, mask=in_bounds, other=0)
        s = tl.where(allowed != 0, s, float("-inf"))
    if MASK_KIND == 2:
        in_bounds = (offs_q < Lq) & (offs_k < Lk)
        bias = tl.load(mask_base + offs_q * stride_mask_m + offs_k * stride_mask_n, mask=in_bounds,
                       other=0.0).to(tl.float32)
        # Clamp before converting to log2 units so that finite masks such as finfo.min stay finite
        # (as in the eager formula); -inf stays -inf.
        s = tl.where(bias == float("-inf"), float("-inf"), s + tl.maximum(bias, -1e38) * 1.4426950408889634)
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
    Q, K, V, Out, Lse, KvLens, QLens, Kpm, Mask, Seed,
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
    """Program (query block, head, batch): Out[b, h, rows] and Lse[b, h, rows] (natural log)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    kv_len, q_len = _lengths(KvLens, QLens, b, Lq, Lk, HAS_KV_LENS, HAS_Q_LENS)
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    full_end, kv_end = _key_range(m_start, kv_len, q_len, IS_CAUSAL, BLOCK_M, BLOCK_N)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    kpm_row = Kpm + b.to(tl.int64) * stride_kpm_b
    mask_base = Mask + b.to(tl.int64) * stride_mask_b + h.to(tl.int64) * stride_mask_h
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, offs_m, q_len,
                   offs_d, HEAD_DIM, BLOCK_D, True)
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

    # Rows with no attended key (l = 0) and rows past q_len: output 0, log-sum-exp +inf, so that
    # the backward's exp(s - lse) is 0 for them.
    has_key = (l_i > 0.0) & (offs_m < q_len)
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                   float("inf"))
    tl.store(Lse + bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------- backward


@triton.jit
def _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_n0, offs_d, kv_len,
                 Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, kpm_row, stride_kpm_n,
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
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _cross_attention_bwd_dq_kernel(
    Q, K, V, Out, DOut, Lse, Delta, DQ, KvLens, QLens, Kpm, Mask, Seed,
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
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (query block, head, batch): Delta[rows] = rowsum(dO · O) and DQ[b, h, rows]."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
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
    do = _load_tile(DOut + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D, True)
    o = _load_tile(Out + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                   offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)
    lse2 = tl.load(Lse + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < q_len, other=float("inf")) * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_n0, offs_d, kv_len,
                          Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, kpm_row, stride_kpm_n,
                          mask_base, stride_mask_m, stride_mask_n, seed, bh, dropout_p,
                          HEAD_DIM, BLOCK_D, HAS_KPM, MASK_KIND, False, False, HAS_DROPOUT, DOT_PRECISION)
    for start_n in range(full_end, kv_end, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, offs_n0, offs_d, kv_len,
                          Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, kpm_row, stride_kpm_n,
                          mask_base, stride_mask_m, stride_mask_n, seed, bh, dropout_p,
                          HEAD_DIM, BLOCK_D, HAS_KPM, MASK_KIND, True, IS_CAUSAL, HAS_DROPOUT, DOT_PRECISION)
    dq_ptrs = (DQ + b64 * stride_dqb + h64 * stride_dqh
               + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, Lse, Delta, start_m, offs_n, offs_m0, offs_d, q_len,
                   Lq, Lk, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, kpm_row, stride_kpm_n,
                   mask_base, stride_mask_m, stride_mask_n, seed, bh, dropout_p,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KPM: tl.constexpr,
                   MASK_KIND: tl.constexpr, CAUSAL_TILE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """dv += P̃ᵀ @ dO and dk += dSᵀ @ q over the query block at start_m, in (key, query) orientation."""
    offs_m = start_m + offs_m0
    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, offs_m, q_len,
                   offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, offs_m, q_len,
                    offs_d, HEAD_DIM, BLOCK_D, True)
    lse2 = tl.load(Lse + offs_m, mask=offs_m < q_len, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + offs_m, mask=offs_m < q_len, other=0.0)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    # Keys past kv_len are not masked here: their rows of dk and dv are zeroed at the store.
    s_t = _scores(qk_t, offs_m[None, :], offs_n[:, None], Lk, Lq, Lk, qk_scale, kpm_row, stride_kpm_n,
                  mask_base, stride_mask_m, stride_mask_n, HAS_KPM, MASK_KIND, False, CAUSAL_TILE)
    p_t = tl.math.exp2(s_t - lse2[None, :])
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep_t = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], Lk, dropout_p)
        dv += tl.dot(tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0).to(do.dtype), do,
                     input_precision=DOT_PRECISION)
        dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _cross_attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, KvLens, QLens, Kpm, Mask, Seed,
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
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (key block, head, batch): DK[b, h, keys] and DV[b, h, keys]."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
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
    lse_row = Lse + bh.to(tl.int64) * Lq
    delta_row = Delta + bh.to(tl.int64) * Lq
    kpm_row = Kpm + b64 * stride_kpm_b
    mask_base = Mask + b64 * stride_mask_b + h64 * stride_mask_h
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    k = _load_tile(K + b64 * stride_kb + h64 * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, kv_len, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + b64 * stride_vb + h64 * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   offs_n, kv_len, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:
        for start_m in range(q_begin, diag_end, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_row, delta_row, start_m, offs_n, offs_m0,
                                    offs_d, q_len, Lq, Lk, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale,
                                    kpm_row, stride_kpm_n, mask_base, stride_mask_m, stride_mask_n, seed, bh,
                                    dropout_p, HEAD_DIM, BLOCK_D, HAS_KPM, MASK_KIND, True, HAS_DROPOUT,
                                    DOT_PRECISION)
    for start_m in range(tl.maximum(diag_end, q_begin), q_end, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_row, delta_row, start_m, offs_n, offs_m0,
                                offs_d, q_len, Lq, Lk, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale,
                                kpm_row, stride_kpm_n, mask_base, stride_mask_m, stride_mask_n, seed, bh,
                                dropout_p, HEAD_DIM, BLOCK_D, HAS_KPM, MASK_KIND, False, HAS_DROPOUT,
                                DOT_PRECISION)
    key_valid = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
    in_bounds = (offs_n[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = (DK + b64 * stride_dkb + h64 * stride_dkh
               + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
    dv_ptrs = (DV + b64 * stride_dvb + h64 * stride_dvh
               + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd)
    tl.store(dk_ptrs, tl.where(key_valid, dk * scale, 0.0).to(DK.dtype.element_ty), mask=in_bounds)
    tl.store(dv_ptrs, tl.where(key_valid, dv, 0.0).to(DV.dtype.element_ty), mask=in_bounds)


@triton.jit
def _dropout_keep_kernel(Keep, Seed, Lq, Lk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep[bh, i, j] of the dropout mask the attention kernels draw (for tests)."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(Seed), bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
    ptrs = Keep + (bh.to(tl.int64) * Lq + offs_m[:, None]) * Lk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


# --------------------------------------------------------------------------- block sizes


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_d(head_dim: int) -> int:
    return max(16, _next_power_of_2(head_dim))


def _length_bucket(n: int) -> int:
    """Autotuning key for a length: its power-of-two ceiling (capped), so that batches of
    slightly different lengths share one tuned config."""
    return min(_next_power_of_2(max(n, 1)), 4096)


# Under the interpreter every block costs Python time: small fixed blocks, no autotuning.
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per padded head dim for the CUDA autotuner.
_FWD_CANDIDATES = {
    "small": [(128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (32, 64, 4, 3), (128, 128, 8, 3)],
    128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (128, 32, 8, 2)],
}
# dq pass: many queries per program; dk/dv pass: many keys per program.
_BWD_DQ_CANDIDATES = {
    "small": [(128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3)],
    128: [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
    256: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2), (32, 64, 8, 2)],
}
_BWD_DKDV_CANDIDATES = {
    "small": [(32, 128, 4, 4), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (16, 64, 4, 3)],
    128: [(32, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 3), (16, 64, 4, 3)],
    256: [(32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2)],
}
_TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "HAS_KV_LENS", "HAS_Q_LENS", "HAS_KPM", "MASK_KIND",
             "IS_CAUSAL", "HAS_DROPOUT"]


def _shape_of(config) -> tuple:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _candidates_for(table):
    """All the table's configs, and a pruner keeping those of the head dim's group whose blocks
    do not exceed the (power-of-two) lengths, or else the smallest of the group."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        group = set(table[args["BLOCK_D"] if args["BLOCK_D"] >= 128 else "small"])
        candidates = [c for c in configs if _shape_of(c) in group]
        fitting = [
            c for c in candidates
            if c.kwargs["BLOCK_M"] <= max(args["LQ_BUCKET"], 16) and c.kwargs["BLOCK_N"] <= max(args["LK_BUCKET"], 16)
        ]
        return fitting or [min(candidates, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    shapes = sorted({shape for group in table.values() for shape in group})
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]
    return configs, prune


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str):
    """The CUDA autotuner around one of the three attention kernels (built on first use)."""
    kernel, table = {
        "fwd": (_cross_attention_fwd_kernel, _FWD_CANDIDATES),
        "dq": (_cross_attention_bwd_dq_kernel, _BWD_DQ_CANDIDATES),
        "dkdv": (_cross_attention_bwd_dkdv_kernel, _BWD_DKDV_CANDIDATES),
    }[kernel_name]
    configs, prune = _candidates_for(table)
    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune})(kernel)


def _launch(kernel_name: str, kernel, grid_of, args: list, meta: dict) -> None:
    """Launch with the interpreter's fixed blocks or through the CUDA autotuner."""
    if interpreting():
        blocks = dict(_INTERPRETER_BLOCKS)
        kernel[grid_of(blocks)](*args, **meta, **blocks)
    else:
        _tuned(kernel_name)[grid_of](*args, **meta)


# --------------------------------------------------------------------------- launchers


def _new_output(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocate a kernel output. The tests swap in a NaN-filled allocation to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _grad_buffer(t: Tensor) -> Tensor:
    """A (B, H, L, d) buffer for the gradient of t: in (B, L, H, d) memory order when t is a view
    of such a tensor (its head stride below its length stride), so that the gradient flows back
    into the caller's projection without a transposing copy; contiguous otherwise."""
    batch, heads, length, head_dim = t.shape
    if t.stride(1) < t.stride(2):
        return _new_output((batch, length, heads, head_dim), t.dtype, t.device).transpose(1, 2)
    return _new_output((batch, heads, length, head_dim), t.dtype, t.device)


def _pointer(t: Optional[Tensor], stand_in: Tensor) -> Tensor:
    """The kernel argument for an optional tensor: `stand_in` when it is absent (its flag is off,
    so the kernel never reads it, and nothing is allocated for it)."""
    return t if t is not None else stand_in


def _mask_args(q: Tensor, k: Tensor, key_padding_mask, attn_mask):
    """Pointers, strides and flags of the masks; bool masks are read as bytes, broadcast ones
    through stride 0."""
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    if key_padding_mask is None:
        kpm, kpm_strides = q, (0, 0)
    else:
        kpm = key_padding_mask.view(torch.uint8)
        kpm_strides = kpm.stride()
    if attn_mask is None:
        mask, mask_strides, mask_kind = q, (0, 0, 0, 0), _MASK_NONE
    else:
        mask = attn_mask.expand(batch, heads, len_q, len_k)
        if mask.dtype == torch.bool:
            mask, mask_kind = mask.view(torch.uint8), _MASK_BOOL
        else:
            mask_kind = _MASK_ADDITIVE
        mask_strides = mask.stride()
    return kpm, kpm_strides, mask, mask_strides, mask_kind


def _meta(q, kv_lens, q_lens, key_padding_mask, mask_kind, is_causal, dropout_p) -> dict:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        HAS_KV_LENS=kv_lens is not None,
        HAS_Q_LENS=q_lens is not None,
        HAS_KPM=key_padding_mask is not None,
        MASK_KIND=mask_kind,
        IS_CAUSAL=bool(is_causal),
        HAS_DROPOUT=dropout_p > 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


@torch.library.custom_op("mmkernels::cross_attention_fwd", mutates_args=())
def cross_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_lens: Optional[Tensor],
    q_lens: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    seed: Optional[Tensor],
    is_causal: bool,
    dropout_p: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Launch the forward. q: (B, H, Lq, d), k, v: (B, H, Lk, d), any strides.

    Returns out (B, H, Lq, d), allocated in (B, Lq, H, d) memory order, and the fp32 log-sum-exp
    (B, H, Lq) of each row's scaled, masked scores (+inf for rows with no key or past q_lens).
    """
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    out = _new_output((batch, len_q, heads, head_dim), q.dtype, q.device).transpose(1, 2)
    lse = _new_output((batch, heads, len_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    kpm, kpm_strides, mask, mask_strides, mask_kind = _mask_args(q, k, key_padding_mask, attn_mask)
    args = [
        q, k, v, out, lse,
        _pointer(kv_lens, q), _pointer(q_lens, q), kpm, mask, _pointer(seed, q),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *kpm_strides, *mask_strides,
        heads, len_q, len_k, scale * _LOG2E, dropout_p, _length_bucket(len_q), _length_bucket(len_k),
    ]
    meta = _meta(q, kv_lens, q_lens, key_padding_mask, mask_kind, is_causal, dropout_p)
    _launch("fwd", _cross_attention_fwd_kernel,
            lambda m: (triton.cdiv(len_q, m["BLOCK_M"]), heads, batch), args, meta)
    return out, lse


@cross_attention_fwd.register_fake
def _(q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, seed, is_causal, dropout_p, scale):
    batch, heads, len_q, head_dim = q.shape
    out = q.new_empty(batch, len_q, heads, head_dim).transpose(1, 2)
    return out, q.new_empty(batch, heads, len_q, dtype=torch.float32)


@torch.library.custom_op("mmkernels::cross_attention_bwd", mutates_args=())
def cross_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    kv_lens: Optional[Tensor],
    q_lens: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    seed: Optional[Tensor],
    is_causal: bool,
    dropout_p: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward: dq (dq pass, which also computes delta), then dk and dv.

    dout, out: (B, H, Lq, d); lse: (B, H, Lq) from the forward. Returns dq, dk, dv shaped and
    strided like q, k, v.
    """
    dq, dk, dv = _grad_buffer(q), _grad_buffer(k), _grad_buffer(v)
    dout = last_dim_contiguous(dout)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    delta = _new_output((batch, heads, len_q), torch.float32, q.device)
    kpm, kpm_strides, mask, mask_strides, mask_kind = _mask_args(q, k, key_padding_mask, attn_mask)
    lens_and_masks = [
        _pointer(kv_lens, q), _pointer(q_lens, q), kpm, mask, _pointer(seed, q),
    ]
    sizes = [heads, len_q, len_k, scale * _LOG2E, scale, dropout_p, _length_bucket(len_q), _length_bucket(len_k)]
    meta = _meta(q, kv_lens, q_lens, key_padding_mask, mask_kind, is_causal, dropout_p)
    if dq.numel() > 0:
        dq_args = [q, k, v, out, dout, lse, delta, dq, *lens_and_masks,
                   *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride(),
                   *kpm_strides, *mask_strides, *sizes]
        _launch("dq", _cross_attention_bwd_dq_kernel,
                lambda m: (triton.cdiv(len_q, m["BLOCK_M"]), heads, batch), dq_args, meta)
    if dk.numel() > 0:
        dkdv_args = [q, k, v, dout, lse, delta, dk, dv, *lens_and_masks,
                     *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
                     *kpm_strides, *mask_strides, *sizes]
        _launch("dkdv", _cross_attention_bwd_dkdv_kernel,
                lambda m: (triton.cdiv(len_k, m["BLOCK_N"]), heads, batch), dkdv_args, meta)
    return dq, dk, dv


@cross_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, kv_lens, q_lens, key_padding_mask, attn_mask, seed, is_causal, dropout_p, scale):
    return _grad_buffer(q), _grad_buffer(k), _grad_buffer(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, seed, is_causal, dropout_p, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lens, q_lens, key_padding_mask, attn_mask, seed)
    ctx.is_causal, ctx.dropout_p, ctx.scale = is_causal, dropout_p, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_lens, q_lens, key_padding_mask, attn_mask, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.mmkernels.cross_attention_bwd(
        dout, q, k, v, out, lse, kv_lens, q_lens, key_padding_mask, attn_mask, seed,
        ctx.is_causal, ctx.dropout_p, ctx.scale,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


cross_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def dropout_keep_mask(seed: Tensor, batch: int, heads: int, len_q: int, len_k: int, dropout_p: float) -> Tensor:
    """The (B, H, Lq, Lk) bool keep mask that the kernels draw for `seed` (a (1,) int64 tensor
    from `draw_dropout_seed`). Materialises Lq × Lk per head: for tests on small shapes, where the
    kernels run (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    keep = torch.empty(batch * heads, len_q, len_k, dtype=torch.int8, device=seed.device)
    if keep.numel() > 0:
        grid = (triton.cdiv(len_q, 32), triton.cdiv(len_k, 32), batch * heads)
        _dropout_keep_kernel[grid](keep, seed, len_q, len_k, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return keep.view(batch, heads, len_q, len_k).bool()


def draw_dropout_seed(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """A (1,) int64 Philox seed on `device`, drawn from `generator` (or `device`'s default one)
    without synchronising with the GPU: the kernels load it from memory."""
    source = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=source, generator=generator)
    return seed.to(device, non_blocking=True)


# --------------------------------------------------------------------------- public function


def check_lengths(name: str, lens, batch: int, limit: int, limit_name: str, device: torch.device) -> None:
    """Raise unless `lens` is None or a (batch,) int32/int64 tensor on `device` or the CPU, with
    values in [0, limit] (checked only where that needs no GPU sync: on the CPU, outside torch.compile)."""
    if lens is None:
        return
    if not isinstance(lens, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor of shape ({batch},), got {type(lens).__name__}")
    if lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expected {name} to have dtype int32 or int64, got {lens.dtype}")
    if tuple(lens.shape) != (batch,):
        raise ValueError(f"expected {name} to have shape ({batch},) (one length per sample), got {tuple(lens.shape)}")
    if lens.device != device and lens.device.type != "cpu":
        raise ValueError(f"expected {name} on {device} (or on the CPU), got {lens.device}")
    # Values are checked where that costs no GPU sync; on the GPU the kernels clamp them to [0, limit].
    if lens.device.type == "cpu" and not torch.compiler.is_compiling() and lens.numel() > 0:
        low, high = int(lens.min()), int(lens.max())
        if low < 0 or high > limit:
            raise ValueError(f"expected {name} in [0, {limit_name}={limit}], got values from {low} to {high}")


def _check_on_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"expected {name} on the inputs' device {device}, got {t.device}")


def _check_masks(key_padding_mask, attn_mask, batch: int, heads: int, len_q: int, len_k: int, device) -> None:
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            is_tensor = isinstance(key_padding_mask, torch.Tensor)
            seen = key_padding_mask.dtype if is_tensor else type(key_padding_mask).__name__
            raise TypeError(f"expected key_padding_mask to be a bool tensor (True = padding), got {seen}")
        if tuple(key_padding_mask.shape) != (batch, len_k):
            raise ValueError(
                f"expected key_padding_mask of shape (B, Lk) = ({batch}, {len_k}), got {tuple(key_padding_mask.shape)}"
            )
        _check_on_device("key_padding_mask", key_padding_mask, device)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"expected attn_mask to be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(
                f"expected attn_mask to be bool (True = attend) or floating (additive), got {attn_mask.dtype}"
            )
        full = (batch, heads, len_q, len_k)
        try:
            broadcast = torch.broadcast_shapes(tuple(attn_mask.shape), full)
        except RuntimeError:
            broadcast = None
        if attn_mask.dim() > 4 or broadcast != full:
            raise ValueError(
                f"expected attn_mask broadcastable to (B, H, Lq, Lk) = {full}, got shape {tuple(attn_mask.shape)}"
            )
        if attn_mask.requires_grad:
            raise ValueError("attn_mask requires grad, but cross_attention gives no gradient for it; detach it")
        _check_on_device("attn_mask", attn_mask, device)


def _check_inputs(q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, is_causal, dropout_p, scale, layout,
                  generator) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"expected layout to be one of {LAYOUTS}, got {layout!r}")
    doc = "(B, H, L, d)" if layout == "bhld" else "(B, L, H, d)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, 4, doc)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"expected q, k and v to have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    check_same_device([("q", q), ("k", k), ("v", v)])
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"expected k and v to have the same shape {doc}, got {tuple(k.shape)} and {tuple(v.shape)}")
    q_bhld = q if layout == "bhld" else q.transpose(1, 2)
    k_bhld = k if layout == "bhld" else k.transpose(1, 2)
    batch, heads, len_q, head_dim = q_bhld.shape
    if k_bhld.shape[0] != batch or k_bhld.shape[1] != heads:
        raise ValueError(
            f"expected q and k to have the same batch size and number of heads in layout {layout!r}, "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if k_bhld.shape[3] != head_dim:
        raise ValueError(f"expected q and k to have the same head dim, got {head_dim} and {k_bhld.shape[3]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"expected a head dim in [1, {MAX_HEAD_DIM}], got {head_dim}")
    len_k = k_bhld.shape[2]
    check_lengths("kv_lens", kv_lens, batch, len_k, "Lk", q.device)
    check_lengths("q_lens", q_lens, batch, len_q, "Lq", q.device)
    _check_masks(key_padding_mask, attn_mask, batch, heads, len_q, len_k, q.device)
    if not isinstance(is_causal, bool):
        raise TypeError(f"expected is_causal to be a bool, got {type(is_causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"expected dropout_p to be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"expected dropout_p in [0, 1), got {dropout_p}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"expected scale to be a float or None, got {type(scale).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"expected generator to be a torch.Generator, got {type(generator).__name__}")


def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kv_lens: Optional[Tensor] = None,
    q_lens: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    layout: str = "bhld",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Attention of queries over keys with per-sample lengths and masks: softmax(scale·q·kᵀ)·v.

    Shapes by `layout`: "bhld": q (B, H, Lq, d), k and v (B, H, Lk, d), returns (B, H, Lq, d);
    "blhd": q (B, Lq, H, d), k and v (B, Lk, H, d), returns (B, Lq, H, d). Lq and Lk are
    independent; d ≤ 256 (16, 32, 64, 80, 96, 128, 256 are the tuned ones). Neither layout copies
    its inputs. The output is allocated in (B, Lq, H, d) memory order in both layouts: with "bhld"
    it is a permuted view, so `out.transpose(1, 2)` is contiguous at no cost (what a Hugging Face
    attention function must return).

    - kv_lens: (B,) int32/int64; keys at positions ≥ kv_lens[b] do not exist (their blocks are
      never loaded). q_lens: (B,); output rows at positions ≥ q_lens[b] are zeros and pass no
      gradient. Either may live on the CPU; values are validated there, while lengths already on
      the GPU are clamped to [0, L] by the kernels (checking them would need a sync).
    - key_padding_mask: (B, Lk) bool, True = padding (nn.MultiheadAttention's convention).
    - attn_mask: bool (True = attend, SDPA's convention) or additive float, broadcastable to
      (B, H, Lq, Lk); read through broadcast strides, never expanded. No gradient flows to it.
    - is_causal: query i attends keys j ≤ i, aligned top-left as SDPA does when Lq ≠ Lk.
    - A query row left with no key to attend (all masked, kv_lens[b] = 0, an additive -inf
      everywhere) returns zeros and passes zero gradients, never NaN.
    - dropout_p: dropout on the attention probabilities, Philox-driven from a seed drawn from
      `generator` (or the default generator of q's device) without a GPU sync; the same seed gives
      the same result, and the backward regenerates the mask instead of storing it.
    - scale: defaults to d ** -0.5.

    CUDA tensors (fp16, bf16, fp32) run the Triton kernels; CPU tensors run the PyTorch reference
    (the kernels, under TRITON_INTERPRET=1).
    """
    _check_inputs(q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, is_causal, dropout_p, scale, layout,
                  generator)
    if layout == "blhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if triton_enabled(q):
        kv_lens = kv_lens.to(q.device, non_blocking=True) if kv_lens is not None else None
        q_lens = q_lens.to(q.device, non_blocking=True) if q_lens is not None else None
        seed = draw_dropout_seed(generator, q.device) if dropout_p > 0 else None
        out, _ = torch.ops.mmkernels.cross_attention_fwd(
            q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, seed, is_causal, float(dropout_p), scale
        )
    else:
        out = reference.cross_attention(
            q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, is_causal, dropout_p, scale,
            generator=generator,
        ).to(q.dtype)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out if layout == "bhld" else out.transpose(1, 2)
