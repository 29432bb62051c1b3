"""Triton kernels and launchers of the contrastive losses (CLIP, SigLIP, one-directional InfoNCE):
S in row panels, W in a bounded workspace.

Notation. A block row of the logits: image_emb a (M, D) against text_emb b (N, D), the positive of
row i at column offset + i. x_i = ra_i·a_i and y_j = rb_j·b_j, where ra, rb are 1 or the inverse L2
norms (normalize=True); U_ij = x_i·y_j and S_ij = logit_scale·U_ij (+ logit_bias for SigLIP). A
logit that is not finite is NaN (the loss of an Inf input is undefined; see reference.clip_logits).

Work (matrix FLOPs; each logit tile is computed exactly once per pass, never per chunk of D):
- `clip_stats`: one pass over S, 2·M·N·D. `_clip_stats_kernel` computes each tile of S once, keeps
  the online log-sum-exp of its rows and (CLIP; InfoNCE needs rows only) writes the per-(row block,
  column) partial column statistics (max, Σ exp) of the panel into the workspace; `_merge_lse_kernel`
  folds them into the running column statistics in a fixed order (deterministic, no atomics, no
  bound on |S| assumed).
- `panel_pass`: one pass over S, 2·M·N·D, plus one cuBLAS product per side whose gradient is asked,
  2·M·N·D each. `_panel_kernel` computes each tile of S once and turns it into W (CLIP:
  W = 2·n_total·dL/dS; InfoNCE and SigLIP: n_total·dL/dS, SigLIP's with the loss terms), written for the panel's rows
  into the workspace as W~ = coef·W·ra_i·rb_j, so that torch.mm(W~, b) = ra_i·dL/dx_i and
  torch.mm(W~.T, a) = rb_j·dL/dy_j; d logit_scale = Σ W·U and d logit_bias = Σ W are reduced in the
  same kernel. `_finish_grad_kernel` applies the L2 normalisation's backward in place (O(N·D)).

Workspace. Beyond O((M + N)·D) buffers (the fp32 gradient accumulator of the text side, fp32 copies
of fp16 operands, the gradients themselves) and O(M + N) statistics, every buffer comes from one
workspace of at most `workspace_bytes`; the panel height derives from it. W is bf16 for bf16 inputs
(its products then accumulate in fp32 through torch.mm(..., out_dtype=torch.float32) where the
torch build has it) and fp32 otherwise (fp16 would underflow: W's entries are ~1/N).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from mmkernels.ops._common import new_output, tl, triton

MODE_CLIP = 0
MODE_SIGLIP = 1
MODE_INFONCE = 2  # one-directional: CE over the rows of S only
NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)
# the row scale of a clamped row, 1 / eps, rounded as row_scales rounds it
_R_CLAMPED = float(1.0 / torch.tensor(NORM_EPS, dtype=torch.float32))
_ALIGN = 256  # bytes between the workspace's regions
_W_ROW_ALIGN = 8  # W's row stride, in elements: cuBLAS wants 16-byte aligned leading dimensions


# --------------------------------------------------------------------------- Triton kernels


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
    would put u·|lse|/2 into every P, ~50 ulps at CLIP's logit scale 100 (seed 3690557941).
    `lse` broadcasts against s ((BLOCK_M, 1) or (1, BLOCK_N)); an infinite or NaN lse acts as itself."""
    hi = lse.to(tl.float32)
    lo = tl.where(tl.abs(hi) < float("inf"), (lse - hi.to(tl.float64)).to(tl.float32), 0.0)
    return (s - hi) - lo


@triton.jit
def _clip_stats_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr, col_m_ptr, col_l_ptr, row_ptr,
    row0, P, N, D, offset, cols_per_split,
    stride_am, stride_ad, stride_bn, stride_bd, stride_col, stride_row_k, stride_row_s,
    COLUMNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (r, s): panel rows r·BLOCK_M.. (block rows row0 + ...) against columns split s.

    COLUMNS: writes, over its columns, the partial column statistics of its row block: col_m[r, j] =
    max_i S_ij, col_l[r, j] = Σ_i exp(S_ij - col_m[r, j]). Always, for its rows over its column split:
    row[0, s, i] = max_j S_ij, row[1, s, i] = Σ_j exp(S_ij - row[0, s, i]) (online over the tiles),
    row[2, s, i] = S[i, offset + i] if that column is in the split (else 0), row[3, s, i] = Σ_j S_ij.
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
        diag += tl.sum(tl.where(offs_j[None, :] == (offs_i + offset)[:, None], s, 0.0), axis=1)
        line_sum += tl.sum(tl.where(mask_j[None, :], s, 0.0), axis=1)
        if COLUMNS:  # this row block's share, from its valid rows (there is at least one)
            s_cols = tl.where(mask_i[:, None], s, float("-inf"))
            col_m = tl.max(s_cols, axis=0)
            col_l = tl.sum(tl.exp(s_cols - col_m[None, :]), axis=0)
            tl.store(col_m_ptr + pid_r * stride_col + offs_j, col_m, mask=mask_j)
            tl.store(col_l_ptr + pid_r * stride_col + offs_j, col_l, mask=mask_j)
    row_out = row_ptr + pid_s * stride_row_s + offs_p
    tl.store(row_out, m_i, mask=mask_i)
    tl.store(row_out + stride_row_k, l_i, mask=mask_i)
    tl.store(row_out + 2 * stride_row_k, diag, mask=mask_i)
    tl.store(row_out + 3 * stride_row_k, line_sum, mask=mask_i)


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
    row0, P, N, D, offset, n_total, label_smoothing,
    stride_am, stride_ad, stride_bn, stride_bd, stride_w, stride_part_k, stride_part_r,
    MODE: tl.constexpr, SCALARS: tl.constexpr, WRITE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (r, c): one tile of S, computed once, turned into W.

    CLIP: W = (P^row - t) + (P^col - t), t = (1-eps)·[j = offset+i] + eps/n_total (= 2·n_total·dL/dS).
    InfoNCE: W = P^row - t (= n_total·dL/dS).
    SigLIP: W = -label·σ(-label·S) (= n_total·dL/dS), and the loss terms softplus(-label·S).
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
    positive = offs_j[None, :] == (offs_i + offset)[:, None]
    valid = mask_i[:, None] & mask_j[None, :]
    part = part_ptr + pid_r * stride_part_r + pid_c
    if MODE != 1:  # CLIP and InfoNCE: softmax cross-entropies
        lse_r = tl.load(row_lse_ptr + offs_i, mask=mask_i, other=0.0)
        # each direction's target t = (1-eps)·[positive] + eps/n_total off its own softmax, as the eager
        # backward subtracts it: P^row + P^col ≈ 2 at a dominant positive would lose the low bits first
        t = tl.where(positive, 1.0 - label_smoothing, 0.0) + label_smoothing / n_total
        w = tl.exp(_minus_lse(s, lse_r[:, None])) - t
        if MODE == 0:
            lse_c = tl.load(col_lse_ptr + offs_j, mask=mask_j, other=0.0)
            w = w + (tl.exp(_minus_lse(s, lse_c[None, :])) - t)
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


# --------------------------------------------------------------------------- tiles and workspace


def gpu_tile_config(d: int, dtype: torch.dtype) -> dict:
    """The GPU's tiles: 64×64 logits per program (one warpgroup of 4 warps: wgmma on sm_90) over
    BLOCK_K-wide steps of D; the same tiles in every pass, so a logit comes out the same in each.

    Sized by ptxas (tests/compile_check.py): at 64×64 and 4 warps no kernel spills and each fits
    two or more blocks per SM on sm_80 and sm_90. 64×128 (4 warps) and 128×128 (8 warps) spill
    hundreds of bytes per thread in the gradient pass: its softmax terms (the logit, W, each
    column's float64 log-sum-exp split into two fp32 values) stay live across the tile. fp32
    inputs (FMA products) take BLOCK_K = 16: at 32 the statistics pass spills on sm_80.
    A D that is not a multiple of 16 (the rows' stride: no 16-element alignment, so the loads are
    neither vectorised nor asynchronous copies and every element keeps its own address) takes
    BLOCK_K = 32 for fp16/bf16 and no software pipelining for fp32: otherwise the statistics pass
    spills 16-52 bytes per thread on sm_80.

    `programs`: at least this many programs per launch of the statistics pass, which splits the
    columns when a panel has few row blocks (1024: several waves on any current GPU).
    """
    width = max(16, 1 << (d - 1).bit_length())
    aligned = d % 16 == 0
    block_k = 16 if dtype == torch.float32 else (64 if aligned else 32)
    stages = 1 if dtype == torch.float32 and not aligned else 3
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(block_k, width), num_warps=4, num_stages=stages,
                programs=1024)


def cpu_tile_config(d: int, dtype: torch.dtype) -> dict:
    """The interpreter's tiles: 64×64, large enough to keep the interpreted block operations few,
    small enough that the tests' shapes take several tiles and several steps of D."""
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1, programs=1)


def tile_config(d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The tiles the launchers use on `device` (tests substitute gpu_tile_config under the interpreter).
    Plain Python on shapes only, so that the public functions can size the workspace before a launch."""
    if device.type == "cuda":
        return gpu_tile_config(d, dtype)
    return cpu_tile_config(d, dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products, as the fp32 eager formula (tf32 would be ~1e-3 off)
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


class _Layout:
    """Regions carved out of one uint8 workspace, each aligned to _ALIGN bytes."""

    def __init__(self, regions: dict):
        self.regions = {name: spec for name, spec in regions.items() if spec is not None}
        self.nbytes = sum(_round_up(_numel(shape) * dtype.itemsize, _ALIGN) for shape, dtype in self.regions.values())

    def carve(self, device) -> dict:
        buffer = new_output((self.nbytes,), torch.uint8, device)
        views, start = {}, 0
        for name, (shape, dtype) in self.regions.items():
            size = _numel(shape) * dtype.itemsize
            views[name] = buffer[start:start + size].view(dtype).view(shape)
            start += _round_up(size, _ALIGN)
        return views


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _largest_panel(m: int, block_m: int, layout_of, workspace_bytes: int, what: str) -> tuple[int, _Layout]:
    """The most rows per panel (a multiple of block_m, at most m) whose layout fits the workspace."""
    if m == 0:
        return 0, layout_of(0)
    lo, hi = 1, -(-m // block_m)
    smallest = layout_of(min(block_m, m))
    if smallest.nbytes > workspace_bytes:
        raise ValueError(
            f"expected workspace_bytes >= {smallest.nbytes} (one block of {min(block_m, m)} rows of S for "
            f"{what}), got {workspace_bytes}"
        )
    while lo < hi:  # the largest k with layout_of(k·block_m) fitting; the bytes grow with k
        mid = (lo + hi + 1) // 2
        if layout_of(min(mid * block_m, m)).nbytes <= workspace_bytes:
            lo = mid
        else:
            hi = mid - 1
    rows = min(lo * block_m, m)
    return rows, layout_of(rows)


def _column_splits(row_blocks: int, n: int, cfg: dict) -> tuple[int, int]:
    """(splits, columns per split) so that row_blocks · splits reaches cfg["programs"] when it can."""
    tiles = -(-n // cfg["BLOCK_N"])
    splits = max(1, min(tiles, -(-cfg["programs"] // max(row_blocks, 1))))
    per_split = -(-tiles // splits) * cfg["BLOCK_N"]
    return -(-n // per_split), per_split


def _stats_layout(rows: int, n: int, cfg: dict, columns: bool = True) -> _Layout:
    row_blocks = -(-rows // cfg["BLOCK_M"])
    splits, _ = _column_splits(row_blocks, n, cfg)
    f32 = torch.float32
    col = ((row_blocks, n), f32) if columns else None
    return _Layout({"col_m": col, "col_l": col, "row": ((4, splits, rows), f32)})


def _stats_plan(m: int, n: int, cfg: dict, workspace_bytes: int, columns: bool) -> tuple[int, _Layout]:
    return _largest_panel(m, cfg["BLOCK_M"], lambda r: _stats_layout(r, n, cfg, columns), workspace_bytes,
                          "the CLIP statistics" if columns else "the row statistics")


def stats_panel_bytes(rows: int, n: int, d: int, dtype, device, columns: bool = True) -> int:
    """Workspace bytes that clip_stats uses for a panel of `rows` rows against n columns."""
    return _stats_layout(rows, n, tile_config(d, dtype, device), columns).nbytes


def stats_workspace(m: int, n: int, d: int, dtype, device, workspace_bytes: int, columns: bool = True) -> int:
    """Rows per panel of clip_stats; raises ValueError (naming the minimum) if the workspace is too small."""
    return _stats_plan(m, n, tile_config(d, dtype, device), workspace_bytes, columns)[0]


def _w_dtype(dtype: torch.dtype) -> torch.dtype:
    """W's dtype: bf16 for bf16 inputs, else fp32 (fp16's range would lose W's small entries)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


@functools.lru_cache(maxsize=None)
def _fp32_out_products(device: torch.device) -> bool:
    """Whether torch.mm / torch.addmm take out_dtype=torch.float32 for bf16 operands on `device`
    (torch >= 2.8 on CUDA). Feature-detected once on tiny tensors; no host sync."""
    if device.type != "cuda":
        return False
    x = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
    out = torch.zeros(16, 16, dtype=torch.float32, device=device)
    try:
        torch.mm(x, x, out_dtype=torch.float32, out=out)
        torch.addmm(out, x, x, out_dtype=torch.float32, out=out)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _panel_layout(rows: int, n: int, d: int, cfg: dict, w_dtype, write_w: bool, image_buffer: bool) -> _Layout:
    row_blocks = -(-rows // cfg["BLOCK_M"])
    col_blocks = -(-n // cfg["BLOCK_N"])
    return _Layout({
        "w": ((rows, _round_up(n, _W_ROW_ALIGN)), w_dtype) if write_w else None,
        "image": ((rows, d), torch.float32) if image_buffer else None,
        "part": ((3, row_blocks, col_blocks), torch.float32),
    })


def _panel_plan(m, n, d, dtype, device, image_grad, text_grad, grad_dtype, workspace_bytes):
    cfg = tile_config(d, dtype, device)
    w_dtype = _w_dtype(dtype)
    write_w = image_grad or text_grad
    image_buffer = image_grad and grad_dtype != torch.float32
    rows, layout = _largest_panel(
        m, cfg["BLOCK_M"], lambda r: _panel_layout(r, n, d, cfg, w_dtype, write_w, image_buffer), workspace_bytes,
        "the gradient pass" if write_w else "the loss pass",
    )
    return cfg, w_dtype, rows, layout


def panel_bytes(rows, n, d, dtype, device, image_grad, text_grad, grad_dtype) -> int:
    """Workspace bytes that panel_pass uses for a panel of `rows` rows against n columns."""
    cfg = tile_config(d, dtype, device)
    return _panel_layout(rows, n, d, cfg, _w_dtype(dtype), image_grad or text_grad,
                         image_grad and grad_dtype != torch.float32).nbytes


def panel_workspace(m, n, d, dtype, device, image_grad, text_grad, grad_dtype, workspace_bytes) -> int:
    """Rows per panel of panel_pass; raises ValueError (naming the minimum) if the workspace is too small."""
    return _panel_plan(m, n, d, dtype, device, image_grad, text_grad, grad_dtype, workspace_bytes)[2]


def check_call_workspace(m: int, n: int, d: int, dtype, device, workspace_bytes: int, *, stats: bool = False,
                         columns: bool = True, panel: tuple | None = None) -> None:
    """Raise ValueError unless the workspace holds one block of rows in every pass that a call runs:
    clip_stats (`stats`, with or without `columns`) and panel_pass (`panel` = (image_grad, text_grad,
    grad_dtype)). The minimum named is the largest over those passes, so that the size named works
    for the whole call (a pass checked alone would name its own, too small for the next pass)."""
    cfg = tile_config(d, dtype, device)
    rows = min(cfg["BLOCK_M"], m)
    if rows == 0:
        return
    needs = {}
    if stats:
        needs["the CLIP statistics" if columns else "the row statistics"] = _stats_layout(rows, n, cfg, columns).nbytes
    if panel is not None:
        image_grad, text_grad, grad_dtype = panel
        write_w = image_grad or text_grad
        layout = _panel_layout(rows, n, d, cfg, _w_dtype(dtype), write_w, image_grad and grad_dtype != torch.float32)
        needs["the gradient pass" if write_w else "the loss pass"] = layout.nbytes
    need = max([0, *needs.values()])
    if need > workspace_bytes:
        raise ValueError(
            f"expected workspace_bytes >= {need} (one block of {rows} rows of S for {' and '.join(needs)}), "
            f"got {workspace_bytes}"
        )


# --------------------------------------------------------------------------- launchers


def row_scales(emb: torch.Tensor, normalize: bool) -> torch.Tensor:
    """(rows,) fp32: 1 / max(||emb_i||, eps) when normalising, else ones."""
    if not normalize:
        return torch.ones(emb.shape[0], dtype=torch.float32, device=emb.device)
    norms = torch.linalg.vector_norm(emb, dim=1, dtype=torch.float32)
    return 1.0 / norms.clamp_min(NORM_EPS)


def _merge_lse(part_m, part_l, run_m=None, run_l=None, lse=None) -> None:
    """Fold partial statistics (P, L) into the running (run_m, run_l) (L,), or, without them, into
    the log-sum-exp lse (L,); the rows' last dimension contiguous, one row stride for both."""
    p, length = part_m.shape
    block = 1024 if part_m.is_cuda else 256
    unused = part_m
    _merge_lse_kernel[(triton.cdiv(length, block),)](
        part_m, part_l, unused if run_m is None else run_m, unused if run_l is None else run_l,
        unused if lse is None else lse, p, length, part_m.stride(0),
        INIT=run_m is None, WRITE_LSE=lse is not None, BLOCK=block,
    )


class ClipStats(NamedTuple):
    row_lse: torch.Tensor  # float64 (its low bits reach P = exp(S - lse): see _minus_lse)
    col_max: torch.Tensor | None
    col_sumexp: torch.Tensor | None
    diag: torch.Tensor
    row_sum: torch.Tensor


def clip_stats(a, b, ra, rb, scale, offset: int, workspace_bytes: int, columns: bool = True) -> ClipStats:
    """CLIP's statistics of the block row a (M, D) against b (N, D) (see ClipBlockStats), fp32 but
    row_lse float64; without `columns` (InfoNCE) the rows' only: col_max and col_sumexp are None.

    a, b: last dimension contiguous; ra (M,), rb (N,) row scales; scale: 0-dim fp32 tensor.
    """
    m, d = a.shape
    n = b.shape[0]
    cfg = tile_config(d, a.dtype, a.device)
    rows, layout = _stats_plan(m, n, cfg, workspace_bytes, columns)
    f32 = dict(dtype=torch.float32, device=a.device)
    row_lse = new_output((m,), torch.float64, a.device)
    diag, row_sum = (new_output((m,), **f32) for _ in range(2))
    col_max = torch.full((n,), float("-inf"), **f32) if columns else None
    col_sumexp = torch.zeros(n, **f32) if columns else None
    if m == 0:
        return ClipStats(row_lse, col_max, col_sumexp, diag, row_sum)
    ws = layout.carve(a.device)
    splits, per_split = _column_splits(-(-rows // cfg["BLOCK_M"]), n, cfg)
    row_part = ws["row"]
    for p0 in range(0, m, rows):
        p = min(rows, m - p0)
        row_blocks = triton.cdiv(p, cfg["BLOCK_M"])
        col_m, col_l = (ws["col_m"], ws["col_l"]) if columns else (row_part, row_part)  # unused without
        _clip_stats_kernel[(row_blocks, splits)](
            a, b, ra, rb, scale, col_m, col_l, row_part,
            p0, p, n, d, offset, per_split,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), col_m.stride(0),
            row_part.stride(0), row_part.stride(1),
            COLUMNS=columns, DOT_PRECISION=_dot_precision(a.dtype), **_launch_options(cfg),
        )
        _merge_lse(row_part[0, :, :p], row_part[1, :, :p], lse=row_lse[p0:p0 + p])
        torch.sum(row_part[2, :, :p], 0, out=diag[p0:p0 + p])
        torch.sum(row_part[3, :, :p], 0, out=row_sum[p0:p0 + p])
        if columns:
            _merge_lse(col_m[:row_blocks], col_l[:row_blocks], col_max, col_sumexp)
    return ClipStats(row_lse, col_max, col_sumexp, diag, row_sum)


def _product(out, x, y, accumulate: bool) -> None:
    """out (fp32) = x @ y, or out += x @ y. bf16 operands accumulate in fp32 (out_dtype=torch.float32);
    where torch lacks that, their product is rounded to bf16 once before it joins out."""
    if x.dtype == out.dtype:
        if accumulate:
            out.addmm_(x, y)
        else:
            torch.mm(x, y, out=out)
    elif not _fp32_out_products(out.device):
        product = torch.mm(x, y)
        out.add_(product) if accumulate else out.copy_(product)
    elif accumulate:
        torch.addmm(out, x, y, out_dtype=out.dtype, out=out)
    else:
        torch.mm(x, y, out_dtype=out.dtype, out=out)


def finish_normalize_grad(g, emb, r, out) -> None:
    """out = the gradient of emb from g = r·dL/d(emb normalised), in place when out is g."""
    rows, d = g.shape
    if rows == 0:
        return
    block_r = 16 if g.is_cuda else 32
    block_d = min(256 if g.is_cuda else 128, max(16, triton.next_power_of_2(d)))
    _finish_grad_kernel[(triton.cdiv(rows, block_r),)](
        g, emb, r, out, rows, d, g.stride(0), emb.stride(0), emb.stride(1), out.stride(0), _R_CLAMPED,
        BLOCK_R=block_r, BLOCK_D=block_d,
    )


class PanelResult(NamedTuple):
    sums: torch.Tensor  # (3,) fp32: Σ loss terms, Σ W, Σ W·U over the block
    image_grad: torch.Tensor | None  # (M, D) grad_dtype
    text_grad: torch.Tensor | None  # (N, D) fp32 (text_fp32) or grad_dtype


def panel_pass(mode: int, a, b, ra, rb, scale, bias, coef, row_lse, col_lse, *, offset: int, n_total: int,
               label_smoothing: float, normalize: bool, scalars: bool, image_grad: bool, text_grad: bool,
               grad_dtype: torch.dtype, workspace_bytes: int) -> PanelResult:
    """One pass over the block row's logits, W per panel, and the products the sides asked for.

    The gradients come out as coef·(the matching Σ W products), the normalisation's backward applied:
    image rows complete (M, D); the text side (N, D) summed over this block's rows.
    row_lse (M,), col_lse (N,): CLIP's statistics, float64 (InfoNCE reads row_lse only; SigLIP neither).
    """
    m, d = a.shape
    n = b.shape[0]
    cfg, w_dtype, rows, layout = _panel_plan(m, n, d, a.dtype, a.device, image_grad, text_grad, grad_dtype,
                                             workspace_bytes)
    sums = torch.zeros(3, dtype=torch.float32, device=a.device)
    d_image = new_output((m, d), grad_dtype, a.device) if image_grad else None
    d_text = new_output((n, d), torch.float32, a.device) if text_grad else None
    if m == 0:
        if d_text is not None:
            d_text.zero_()
        return PanelResult(sums, d_image, None if d_text is None else d_text.to(grad_dtype))
    # the products' operands: the embeddings themselves when W has their dtype, else fp32 copies
    image_op = (a if w_dtype == a.dtype else a.to(torch.float32)) if text_grad else None
    text_op = (b if w_dtype == b.dtype else b.to(torch.float32)) if image_grad else None
    ws = layout.carve(a.device)
    part = ws["part"]
    write_w = image_grad or text_grad
    w_all = ws["w"] if write_w else part
    for p0 in range(0, m, rows):
        p = min(rows, m - p0)
        grid = (triton.cdiv(p, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _panel_kernel[grid](
            a, b, ra, rb, scale, bias, coef, row_lse, col_lse, w_all, part,
            p0, p, n, d, offset, n_total, label_smoothing,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), w_all.stride(0), part.stride(0), part.stride(1),
            MODE=mode, SCALARS=scalars, WRITE_W=write_w, DOT_PRECISION=_dot_precision(a.dtype), **_launch_options(cfg),
        )
        sums += part[:, :grid[0]].sum((1, 2))
        if not write_w:
            continue
        w = w_all[:p, :n]
        if image_grad:
            # ra_i·dL/dx_i for the panel's rows, complete: W~ (p, N) @ b (N, D)
            g = d_image[p0:p0 + p] if grad_dtype == torch.float32 else ws["image"][:p]
            _product(g, w, text_op, accumulate=False)
            if normalize:
                finish_normalize_grad(g, a[p0:p0 + p], ra[p0:p0 + p], d_image[p0:p0 + p])
            elif g is not d_image[p0:p0 + p]:
                d_image[p0:p0 + p].copy_(g)
        if text_grad:
            # rb_j·dL/dy_j, this panel's share: W~.T (N, p) @ a (p, D)
            _product(d_text, w.T, image_op[p0:p0 + p], accumulate=p0 > 0)
    del ws, w_all, part
    if d_text is not None:
        if normalize:
            out = d_text if grad_dtype == torch.float32 else new_output((n, d), grad_dtype, a.device)
            finish_normalize_grad(d_text, b, rb, out)
            d_text = out
        else:
            d_text = d_text.to(grad_dtype)
    return PanelResult(sums, d_image, d_text)
