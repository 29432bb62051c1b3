"""Contrastive losses without the N×N logit matrix: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss.

Both losses are functions of the logits S_ij = logit_scale · x_i · y_j (+ logit_bias), where
x_i = rx_i · image_emb_i and y_j = ry_j · text_emb_j, and rx, ry are 1 or the inverse L2 norms
(`normalize=True`). Two Triton kernels cover both losses, each streaming tiles of S that are
recomputed from the embeddings and never written to memory:

- `_contrastive_row_stat_kernel`: one fp32 number per row of S. CLIP: the row's log-sum-exp
  (launched a second time with TRANSPOSED for the columns). SigLIP: Σ_j softplus(-label_ij·S_ij).
- `_contrastive_grad_kernel`: G_i = Σ_j W(S_ij) · y_j, the part of dL/dx_i that needs all of row i.
  CLIP: W = P^row_ij + P^col_ij - 2(1-eps)·δ_ij - 2·eps/N (P: softmax of S over its row and over its
  column; eps: label smoothing), i.e. 2N·dL/dS.
  SigLIP: W = -label_ij · σ(-label_ij · S_ij). Launched with TRANSPOSED it gives the columns' G.

Everything else in the gradients (the normalisation, logit_scale and logit_bias) is O(N·D) and done
in PyTorch around the kernels.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple

import torch

from mmkernels.ops import reference
from mmkernels.ops._common import (
    check_float_tensor,
    check_same_device,
    last_dim_contiguous,
    scalar_tensor,
    tl,
    triton,
    triton_enabled,
)

__all__ = [
    "clip_loss",
    "siglip_loss",
    "ClipBlockStats",
    "ClipBlockGrads",
    "SiglipBlock",
    "clip_block_stats",
    "merge_column_stats",
    "clip_block_grads",
    "siglip_block",
]

MODE_CLIP = 0
MODE_SIGLIP = 1
_NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)
DEFAULT_WORKSPACE_BYTES = 256 * 2**20
WORKSPACE_ENV = "MMKERNELS_WORKSPACE_BYTES"


def resolve_workspace_bytes(workspace_bytes) -> int:
    """The workspace size: `workspace_bytes`, else $MMKERNELS_WORKSPACE_BYTES, else 256 MiB."""
    name = "workspace_bytes"
    if workspace_bytes is None:
        env = os.environ.get(WORKSPACE_ENV)
        if env is None:
            return DEFAULT_WORKSPACE_BYTES
        name = f"${WORKSPACE_ENV}"
        try:
            workspace_bytes = int(env)
        except ValueError:
            raise ValueError(f"expected {name} to be a whole number of bytes, got {env!r}") from None
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, numbers.Integral):
        raise TypeError(f"expected {name} to be an int (bytes), got {type(workspace_bytes).__name__}")
    if workspace_bytes <= 0:
        raise ValueError(f"expected {name} > 0, got {workspace_bytes}")
    return int(workspace_bytes)


def _check_label_smoothing(label_smoothing) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(
            f"expected label_smoothing to be a float in [0, 1], got {type(label_smoothing).__name__}"
        )
    value = float(label_smoothing)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"expected label_smoothing in [0, 1], got {label_smoothing}")
    return value


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _logits_tile(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale, bias, offs_i, offs_j, N, D,
    stride_an, stride_ad, stride_bn, stride_bd,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """S[offs_i, offs_j] = scale · (ra_i · rb_j) · (a_i · b_j) + bias, fp32 (BLOCK, BLOCK).

    Every kernel computes S in this one orientation (image rows, text columns) with one tile shape,
    so a logit comes out bit for bit the same in the row pass, the column pass and the backward.
    The softmax statistics and the probabilities built from them then agree to the last bit, as
    they do in the eager formula, where S exists once.
    """
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    mask_i = offs_i < N
    mask_j = offs_j < N
    for k in range(0, D, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        a = tl.load(
            a_ptr + offs_i[:, None] * stride_an + offs_k[None, :] * stride_ad,
            mask=mask_i[:, None] & mask_k[None, :], other=0.0,
        )
        b = tl.load(
            b_ptr + offs_j[:, None] * stride_bn + offs_k[None, :] * stride_bd,
            mask=mask_j[:, None] & mask_k[None, :], other=0.0,
        )
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    ra = tl.load(ra_ptr + offs_i, mask=mask_i, other=0.0)
    rb = tl.load(rb_ptr + offs_j, mask=mask_j, other=0.0)
    return acc * (scale * (ra[:, None] * rb[None, :])) + bias


@triton.jit
def _own_tile(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale, bias, offs_own, offs_other, N, D,
    stride_an, stride_ad, stride_bn, stride_bd,
    TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The tile of S (TRANSPOSED: of S.T) whose rows are this program's own rows."""
    if TRANSPOSED:
        s = tl.trans(_logits_tile(
            a_ptr, b_ptr, ra_ptr, rb_ptr, scale, bias, offs_other, offs_own, N, D,
            stride_an, stride_ad, stride_bn, stride_bd, BLOCK, BLOCK_K, DOT_PRECISION,
        ))
    else:
        s = _logits_tile(
            a_ptr, b_ptr, ra_ptr, rb_ptr, scale, bias, offs_own, offs_other, N, D,
            stride_an, stride_ad, stride_bn, stride_bd, BLOCK, BLOCK_K, DOT_PRECISION,
        )
    return s


@triton.jit
def _log1p(u):
    """log(1 + u) accurate for small u >= 0: log(v)·u/(v - 1) with v = 1 + u rounded (Goldberg)."""
    v = 1.0 + u
    return tl.where(v == 1.0, u, tl.log(v) * (u / (v - 1.0)))


@triton.jit
def _contrastive_row_stat_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr, bias_ptr, out_ptr, N, D,
    stride_an, stride_ad, stride_bn, stride_bd,
    MODE: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out (3, N): [0] the statistic of each row of S (TRANSPOSED: of each column), and for CLIP
    [1] S_ii and [2] Σ_j S_ij (Σ_i S_ij when TRANSPOSED) for label smoothing."""
    pid = tl.program_id(0)
    offs_o = pid * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    # CLIP: online log-sum-exp (running max m_i, running sum l_i). SigLIP: running sum in l_i.
    m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    diag = tl.zeros((BLOCK,), dtype=tl.float32)
    line_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs_t = start + tl.arange(0, BLOCK)
        s = _own_tile(
            a_ptr, b_ptr, ra_ptr, rb_ptr, scale, bias, offs_o, offs_t, N, D,
            stride_an, stride_ad, stride_bn, stride_bd, TRANSPOSED, BLOCK, BLOCK_K, DOT_PRECISION,
        )
        valid_t = (offs_t < N)[None, :]
        on_diag = offs_o[:, None] == offs_t[None, :]
        if MODE == 0:
            diag += tl.sum(tl.where(on_diag, s, 0.0), axis=1)
            line_sum += tl.sum(tl.where(valid_t, s, 0.0), axis=1)
            s = tl.where(valid_t, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # Index 0 lies in the first block, so m_new is finite unless the inputs hold Inf/NaN,
            # in which case the NaN this produces is the answer we want.
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        else:
            z = tl.where(on_diag, s, -s)  # label_ij · S_ij
            # softplus(-z) = -log σ(z) = max(-z, 0) + log1p(exp(-|z|)), without overflow
            nls = tl.maximum(-z, 0.0) + _log1p(tl.exp(-tl.abs(z)))
            l_i += tl.sum(tl.where(valid_t, nls, 0.0), axis=1)
    mask_o = offs_o < N
    if MODE == 0:
        tl.store(out_ptr + offs_o, m_i + tl.log(l_i), mask=mask_o)
        tl.store(out_ptr + N + offs_o, diag, mask=mask_o)
        tl.store(out_ptr + 2 * N + offs_o, line_sum, mask=mask_o)
    else:
        tl.store(out_ptr + offs_o, l_i, mask=mask_o)


@triton.jit
def _contrastive_grad_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr, bias_ptr, own_stat_ptr, other_stat_ptr,
    g_ptr, wsum_ptr, N, D, label_smoothing,
    stride_an, stride_ad, stride_bn, stride_bd, stride_gn, stride_gd,
    MODE: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, W_FP32: tl.constexpr, W_DOT_PRECISION: tl.constexpr,
):
    """G = W @ (rb·b) and wsum = W.sum(1); TRANSPOSED: G = W.T @ (ra·a) and wsum = W.sum(0)."""
    pid_o = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_o = pid_o * BLOCK + tl.arange(0, BLOCK)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_o = offs_o < N
    mask_d = offs_d < D
    if TRANSPOSED:
        other_ptr, r_other_ptr, stride_on, stride_od = a_ptr, ra_ptr, stride_an, stride_ad
    else:
        other_ptr, r_other_ptr, stride_on, stride_od = b_ptr, rb_ptr, stride_bn, stride_bd
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    if MODE == 0:
        lse_own = tl.load(own_stat_ptr + offs_o, mask=mask_o, other=0.0)
    acc = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    wsum = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs_t = start + tl.arange(0, BLOCK)
        mask_t = offs_t < N
        s = _own_tile(
            a_ptr, b_ptr, ra_ptr, rb_ptr, scale, bias, offs_o, offs_t, N, D,
            stride_an, stride_ad, stride_bn, stride_bd, TRANSPOSED, BLOCK, BLOCK_K, DOT_PRECISION,
        )
        on_diag = offs_o[:, None] == offs_t[None, :]
        if MODE == 0:
            lse_other = tl.load(other_stat_ptr + offs_t, mask=mask_t, other=0.0)
            w = tl.exp(s - lse_own[:, None]) + tl.exp(s - lse_other[None, :])
            # the targets, subtracted before the product as the eager backward does (no cancellation)
            w = tl.where(on_diag, w - 2.0 * (1.0 - label_smoothing), w) - 2.0 * label_smoothing / N
        else:
            label = tl.where(on_diag, 1.0, -1.0)
            w = -label * tl.sigmoid(-label * s)
        w = tl.where(mask_t[None, :], w, 0.0)
        wsum += tl.sum(w, axis=1)
        r_other = tl.load(r_other_ptr + offs_t, mask=mask_t, other=0.0)
        other = tl.load(
            other_ptr + offs_t[:, None] * stride_on + offs_d[None, :] * stride_od,
            mask=mask_t[:, None] & mask_d[None, :], other=0.0,
        )
        if W_FP32:
            # fp16 inputs: W·r can be below fp16's normal range (confident SigLIP rows are ~1e-5),
            # so this product runs on fp32 operands (tf32 units: fp16's precision, fp32's range).
            acc = tl.dot(w * r_other[None, :], other.to(tl.float32), acc, input_precision=W_DOT_PRECISION)
        else:
            acc = tl.dot((w * r_other[None, :]).to(other.dtype), other, acc, input_precision=DOT_PRECISION)
    tl.store(
        g_ptr + offs_o[:, None] * stride_gn + offs_d[None, :] * stride_gd, acc,
        mask=mask_o[:, None] & mask_d[None, :],
    )
    if pid_d == 0:
        tl.store(wsum_ptr + offs_o, wsum, mask=mask_o)


# --------------------------------------------------------------------------- launchers


def _blocks(d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes, one square BLOCK for every kernel so that all of them tile S alike.

    GPU: 64×64 tiles over 8 warps; BLOCK_D bounds the backward's (BLOCK, BLOCK_D) fp32 accumulator.
    These are the configurations that compile for sm_90 without register spills (Triton 3.9's
    ptxas report: bf16 up to BLOCK_D=256; fp32 operands, which fp16's W product also uses, up to 128).
    CPU (interpreter): large enough to keep the number of interpreted block operations low, small
    enough that D=200 still takes several K steps and several D chunks.
    """
    if device.type != "cuda":
        return dict(BLOCK=64, BLOCK_K=64, BLOCK_D=128, num_warps=4)
    width = max(16, triton.next_power_of_2(d))
    return dict(BLOCK=64, BLOCK_K=min(64, width), BLOCK_D=min(256 if dtype == torch.bfloat16 else 128, width),
                num_warps=8, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products: tf32 would be ~1e-3 off the fp32 eager formula.
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_row_stat(a, b, ra, rb, scale, bias, mode: int, transposed: bool) -> torch.Tensor:
    """Statistics of S's rows (of its columns when transposed): (3, N) fp32 for CLIP (log-sum-exp,
    S_ii, line sum), (1, N) for SigLIP (Σ softplus(-label·S))."""
    n, d = a.shape
    out = torch.full((3 if mode == MODE_CLIP else 1, n), float("nan"), dtype=torch.float32, device=a.device)
    cfg = _blocks(d, a.dtype, a.device)
    cfg.pop("BLOCK_D")
    _contrastive_row_stat_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
        a, b, ra, rb, scale, bias, out, n, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        MODE=mode, TRANSPOSED=transposed, DOT_PRECISION=_dot_precision(a.dtype), **cfg,
    )
    return out


def _launch_grad(a, b, ra, rb, scale, bias, own_stat, other_stat, mode: int, transposed: bool,
                 label_smoothing: float = 0.0):
    """G (N, D) fp32 = W @ (rb·b), wsum (N,) = W.sum(1); when transposed W.T @ (ra·a) and W.sum(0)."""
    n, d = a.shape
    g = torch.full((n, d), float("nan"), dtype=torch.float32, device=a.device)
    wsum = torch.full((n,), float("nan"), dtype=torch.float32, device=a.device)
    cfg = _blocks(d, a.dtype, a.device)
    grid = (triton.cdiv(n, cfg["BLOCK"]), triton.cdiv(d, cfg["BLOCK_D"]))
    _contrastive_grad_kernel[grid](
        a, b, ra, rb, scale, bias, own_stat, other_stat, g, wsum, n, d, label_smoothing,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), g.stride(0), g.stride(1),
        MODE=mode, TRANSPOSED=transposed, DOT_PRECISION=_dot_precision(a.dtype),
        W_FP32=a.dtype != torch.bfloat16, W_DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        **cfg,
    )
    return g, wsum


def _row_scales(emb: torch.Tensor, normalize: bool) -> torch.Tensor:
    """(N,) fp32: 1 / max(||emb_i||, eps) when normalising, else ones."""
    if not normalize:
        return torch.ones(emb.shape[0], dtype=torch.float32, device=emb.device)
    norms = torch.linalg.vector_norm(emb, dim=1, dtype=torch.float32)
    return 1.0 / norms.clamp_min(_NORM_EPS)


def _embedding_grad(emb, r, h, coef, normalize: bool):
    """dL/d emb from H = (dL/dx) / coef, where x = r · emb; H is overwritten.

    Returns (the gradient in emb's dtype, Σ_i x_i·H_i).
    """
    x = emb.to(torch.float32, copy=True).mul_(r[:, None])
    x_dot_h = torch.bmm(x.unsqueeze(1), h.unsqueeze(2)).view(-1)  # no (N, D) temporary
    dx = h.mul_(coef)
    if normalize:
        # d(emb / max(||emb||, eps)): project out x's direction, except where the eps clamp is active.
        unclamped = (r < 1.0 / _NORM_EPS).float()
        dx.addcmul_(x, (x_dot_h * coef * unclamped)[:, None], value=-1.0).mul_(r[:, None])
    return dx.to(emb.dtype), x_dot_h.sum()


def _operands(image_emb, text_emb, normalize: bool):
    """(image, text, r_image, r_text): the embeddings with a contiguous last dim, their row scales."""
    a, b = last_dim_contiguous(image_emb), last_dim_contiguous(text_emb)
    return a, b, _row_scales(a, normalize), _row_scales(b, normalize)


def _zero_bias(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("mmkernels::clip_loss_fwd", mutates_args=())
def clip_loss_fwd(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
    normalize: bool, label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss: () fp32, lse_rows: (N,) fp32, lse_cols: (N,) fp32)."""
    a, b, ra, rb = _operands(image_emb, text_emb, normalize)
    n = a.shape[0]
    bias = _zero_bias(a)
    lse_r, diag, row_sum = _launch_row_stat(a, b, ra, rb, logit_scale, bias, MODE_CLIP, False)
    lse_c = _launch_row_stat(a, b, ra, rb, logit_scale, bias, MODE_CLIP, True)[0]
    eps = label_smoothing
    # CE_i with smoothing = lse_i - (1-eps)·S_ii - (eps/N)·Σ_j S_ij; the columns' S_ii and Σ_ij S_ij
    # are the rows' own.
    targets = (1 - eps) * diag + eps / n * row_sum
    loss = ((lse_r - targets).sum() + (lse_c - targets).sum()) / (2 * n)
    return loss, lse_r, lse_c


@clip_loss_fwd.register_fake
def _(image_emb, text_emb, logit_scale, normalize, label_smoothing):
    n = image_emb.shape[0]
    stat = image_emb.new_empty((n,), dtype=torch.float32)
    return image_emb.new_empty((), dtype=torch.float32), stat, stat.clone()


@torch.library.custom_op("mmkernels::clip_loss_bwd", mutates_args=())
def clip_loss_bwd(
    grad_loss: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor,
    logit_scale: torch.Tensor, lse_r: torch.Tensor, lse_c: torch.Tensor,
    normalize: bool, label_smoothing: float, image_grad: bool, text_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d image_emb, d text_emb, d logit_scale); a side not asked for is an empty tensor
    and costs no kernel pass (a locked image tower, as in LiT, halves the backward)."""
    a, b, ra, rb = _operands(image_emb, text_emb, normalize)
    n = a.shape[0]
    bias = _zero_bias(a)
    # dL/dS_ij = W_ij / (2N), so dL/dx_i = s/(2N) · G_i and dL/ds = Σ_i x_i·G_i / (2N) = Σ_j y_j·G'_j / (2N).
    coef = grad_loss * logit_scale / (2 * n)
    d_image = d_text = a.new_empty(0)
    if image_grad or not text_grad:
        g_a, _ = _launch_grad(a, b, ra, rb, logit_scale, bias, lse_r, lse_c, MODE_CLIP, False, label_smoothing)
        d_image, xg = _embedding_grad(a, ra, g_a, coef, normalize)
        del g_a
    if text_grad:
        g_b, _ = _launch_grad(a, b, ra, rb, logit_scale, bias, lse_c, lse_r, MODE_CLIP, True, label_smoothing)
        d_text, xg = _embedding_grad(b, rb, g_b, coef, normalize)
    d_scale = grad_loss * xg / (2 * n)
    return d_image if image_grad else a.new_empty(0), d_text, d_scale.to(logit_scale.dtype)


@clip_loss_bwd.register_fake
def _(grad_loss, image_emb, text_emb, logit_scale, lse_r, lse_c, normalize, label_smoothing, image_grad, text_grad):
    return _fake_grads(image_emb, text_emb, image_grad, text_grad) + (logit_scale.new_empty(()),)


def _fake_grads(image_emb, text_emb, image_grad: bool, text_grad: bool):
    d_image = image_emb.new_empty(image_emb.shape if image_grad else (0,))
    d_text = text_emb.new_empty(text_emb.shape if text_grad else (0,))
    return d_image, d_text


def _clip_setup_context(ctx, inputs, output):
    image_emb, text_emb, logit_scale, normalize, label_smoothing = inputs
    _, lse_r, lse_c = output
    ctx.save_for_backward(image_emb, text_emb, logit_scale, lse_r, lse_c)
    ctx.normalize, ctx.label_smoothing = normalize, label_smoothing


def _clip_backward(ctx, grad_loss, _grad_lse_r, _grad_lse_c):
    image_emb, text_emb, logit_scale, lse_r, lse_c = ctx.saved_tensors
    image_grad, text_grad = ctx.needs_input_grad[:2]
    d_image, d_text, d_scale = torch.ops.mmkernels.clip_loss_bwd(
        grad_loss, image_emb, text_emb, logit_scale, lse_r, lse_c, ctx.normalize, ctx.label_smoothing,
        image_grad, text_grad,
    )
    return d_image if image_grad else None, d_text if text_grad else None, d_scale, None, None


clip_loss_fwd.register_autograd(_clip_backward, setup_context=_clip_setup_context)


@torch.library.custom_op("mmkernels::siglip_loss_fwd", mutates_args=())
def siglip_loss_fwd(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
    logit_bias: torch.Tensor, normalize: bool,
) -> torch.Tensor:
    """Returns the loss: () fp32."""
    a, b, ra, rb = _operands(image_emb, text_emb, normalize)
    rows = _launch_row_stat(a, b, ra, rb, logit_scale, logit_bias, MODE_SIGLIP, False)
    return rows.sum() / a.shape[0]


@siglip_loss_fwd.register_fake
def _(image_emb, text_emb, logit_scale, logit_bias, normalize):
    return image_emb.new_empty((), dtype=torch.float32)


@torch.library.custom_op("mmkernels::siglip_loss_bwd", mutates_args=())
def siglip_loss_bwd(
    grad_loss: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor,
    logit_scale: torch.Tensor, logit_bias: torch.Tensor, normalize: bool, image_grad: bool, text_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d image_emb, d text_emb, d logit_scale, d logit_bias); a side not asked for is an
    empty tensor and costs no kernel pass."""
    a, b, ra, rb = _operands(image_emb, text_emb, normalize)
    n = a.shape[0]
    # dL/dS_ij = W_ij / N with W = -label·σ(-label·S); G_i = Σ_j W_ij·y_j, so dL/dx_i = s/N · G_i,
    # dL/ds = Σ_i x_i·G_i / N (= Σ_j y_j·G'_j / N) and dL/db = Σ_ij W_ij / N.
    unused = torch.empty(0, dtype=torch.float32, device=a.device)
    coef = grad_loss * logit_scale / n
    d_image = d_text = a.new_empty(0)
    if image_grad or not text_grad:
        g_a, wsum = _launch_grad(a, b, ra, rb, logit_scale, logit_bias, unused, unused, MODE_SIGLIP, False)
        d_image, xg = _embedding_grad(a, ra, g_a, coef, normalize)
        del g_a
    if text_grad:
        g_b, wsum = _launch_grad(a, b, ra, rb, logit_scale, logit_bias, unused, unused, MODE_SIGLIP, True)
        d_text, xg = _embedding_grad(b, rb, g_b, coef, normalize)
    d_scale = grad_loss * xg / n
    d_bias = grad_loss * wsum.sum() / n
    d_image = d_image if image_grad else a.new_empty(0)
    return d_image, d_text, d_scale.to(logit_scale.dtype), d_bias.to(logit_bias.dtype)


@siglip_loss_bwd.register_fake
def _(grad_loss, image_emb, text_emb, logit_scale, logit_bias, normalize, image_grad, text_grad):
    return _fake_grads(image_emb, text_emb, image_grad, text_grad) + (
        logit_scale.new_empty(()), logit_bias.new_empty(()))


def _siglip_setup_context(ctx, inputs, output):
    image_emb, text_emb, logit_scale, logit_bias, normalize = inputs
    ctx.save_for_backward(image_emb, text_emb, logit_scale, logit_bias)
    ctx.normalize = normalize


def _siglip_backward(ctx, grad_loss):
    image_emb, text_emb, logit_scale, logit_bias = ctx.saved_tensors
    image_grad, text_grad = ctx.needs_input_grad[:2]
    d_image, d_text, d_scale, d_bias = torch.ops.mmkernels.siglip_loss_bwd(
        grad_loss, image_emb, text_emb, logit_scale, logit_bias, ctx.normalize, image_grad, text_grad
    )
    return d_image if image_grad else None, d_text if text_grad else None, d_scale, d_bias, None


siglip_loss_fwd.register_autograd(_siglip_backward, setup_context=_siglip_setup_context)


# --------------------------------------------------------------------------- public functions


def _check_embeddings(image_emb, text_emb) -> None:
    check_float_tensor("image_emb", image_emb, 2, "(N, D)")
    check_float_tensor("text_emb", text_emb, 2, "(N, D)")
    check_same_device([("image_emb", image_emb), ("text_emb", text_emb)])
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(
            "expected image_emb and text_emb to hold the same number of pairs N, "
            f"got {image_emb.shape[0]} and {text_emb.shape[0]}"
        )
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            "expected image_emb and text_emb to have the same last dimension, "
            f"got {image_emb.shape[1]} and {text_emb.shape[1]}"
        )
    if image_emb.shape[0] == 0:
        raise ValueError("expected at least one pair, got N = 0")
    if image_emb.shape[1] == 0:
        raise ValueError("expected an embedding dimension D >= 1, got D = 0")
    if image_emb.dtype != text_emb.dtype:
        raise TypeError(
            f"expected image_emb and text_emb to share a dtype, got {image_emb.dtype} and {text_emb.dtype}"
        )


def clip_loss(image_emb, text_emb, logit_scale, *, normalize: bool = False, label_smoothing: float = 0.0):
    """CLIP's symmetric InfoNCE loss, as Hugging Face `clip_loss` and open_clip `ClipLoss` compute it.

    Args:
        image_emb: (N, D) image embeddings; pair i is the positive of row i and of column i.
        text_emb: (N, D) text embeddings, same dtype and device.
        logit_scale: the multiplier, already exponentiated (`model.logit_scale.exp()`): a Python
            float or a 0-dim tensor. A tensor that requires grad gets its gradient.
        normalize: L2-normalise both inputs inside the op (forward and backward).
        label_smoothing: as in `F.cross_entropy`, in [0, 1].

    Returns:
        () float32 tensor: (CE(rows of S) + CE(columns of S)) / 2 with S = logit_scale · image_emb @ text_emb.T.
        On CUDA (or under TRITON_INTERPRET=1) S is never materialised: memory is O(N·D).
    """
    _check_embeddings(image_emb, text_emb)
    label_smoothing = _check_label_smoothing(label_smoothing)
    scale = scalar_tensor("logit_scale", logit_scale, image_emb)
    if not triton_enabled(image_emb):
        return reference.clip_loss(image_emb, text_emb, scale, normalize, float(label_smoothing))
    return torch.ops.mmkernels.clip_loss_fwd(
        image_emb, text_emb, scale, bool(normalize), float(label_smoothing)
    )[0]


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias, *, normalize: bool = False):
    """SigLIP's pairwise sigmoid loss, as Hugging Face `SiglipModel` computes it.

    Args:
        image_emb: (N, D) image embeddings; pair i is the positive of row i and of column i.
        text_emb: (N, D) text embeddings, same dtype and device.
        logit_scale: the multiplier, already exponentiated; a Python float or a 0-dim tensor.
        logit_bias: the additive bias; a Python float or a 0-dim tensor.
        normalize: L2-normalise both inputs inside the op (forward and backward).

    Returns:
        () float32 tensor: -Σ_ij log σ(label_ij · S_ij) / N with S = logit_scale · image_emb @ text_emb.T
        + logit_bias, label +1 on the diagonal and -1 elsewhere. Gradients reach both embeddings,
        logit_scale and logit_bias.
    """
    _check_embeddings(image_emb, text_emb)
    scale = scalar_tensor("logit_scale", logit_scale, image_emb)
    bias = scalar_tensor("logit_bias", logit_bias, image_emb)
    if not triton_enabled(image_emb):
        loss = reference.siglip_loss(image_emb, text_emb, scale, bias, normalize)
    else:
        loss = torch.ops.mmkernels.siglip_loss_fwd(image_emb, text_emb, scale, bias, bool(normalize))
    # Finite inputs give a finite loss; an Inf among the inputs leaves it undefined: NaN, as for CLIP.
    return torch.where(torch.isinf(loss), torch.nan, loss)


# --------------------------------------------------------------------------- the block-row API
# Rows offset .. offset+M-1 of a global batch of n_total pairs (image_emb (M, D)) against the text
# embeddings of all columns (text_emb (N, D)); the positive of row i is column offset + i. The
# multi-GPU losses are built from these; a single GPU is the case M = N, offset = 0.


class ClipBlockStats(NamedTuple):
    """What one block row of S contributes to CLIP's softmax statistics (fp32; float64 for float64
    inputs). With S the block's logits (M, N):

    - row_lse (M,): log Σ_j exp(S_ij), complete (a block row holds whole rows).
    - col_max (N,): max_i S_ij over the block's rows (-inf when M = 0).
    - col_sumexp (N,): Σ_i exp(S_ij - col_max_j) over the block's rows.
    - diag (M,): S[i, offset + i], the positives' logits.
    - row_sum (M,): Σ_j S_ij, for label smoothing.

    The global loss with smoothing eps: col_lse = merge_column_stats(stacked col_max, stacked
    col_sumexp) over all blocks, targets_i = (1 - eps)·diag_i + eps/n_total·row_sum_i, and
    loss = (Σ_i row_lse_i + Σ_j col_lse_j - 2·Σ_i targets_i) / (2·n_total), sums over all rows.
    """

    row_lse: torch.Tensor
    col_max: torch.Tensor
    col_sumexp: torch.Tensor
    diag: torch.Tensor
    row_sum: torch.Tensor


class ClipBlockGrads(NamedTuple):
    """One block's contribution to the gradients of the global CLIP loss.

    - image_grad (M, D): d loss / d image_emb for the block's rows, complete; None when not asked.
    - text_grad (N, D): the share of d loss / d text_emb that comes through the block's rows; the
      gradient is the sum of every block's share. None when not asked.
    - scale_grad (): the block's share of d loss / d logit_scale (a sum over blocks).
    """

    image_grad: torch.Tensor | None
    text_grad: torch.Tensor | None
    scale_grad: torch.Tensor


class SiglipBlock(NamedTuple):
    """One block's share of the global SigLIP loss and, when asked, of its gradients.

    - loss (): Σ over the block's rows i and all columns j of softplus(-label_ij · S_ij), / n_total.
    - image_grad (M, D): complete for the block's rows; None when not asked.
    - text_grad (N, D): the block's share (sum over blocks); None when not asked.
    - scale_grad, bias_grad (): the block's shares (sums over blocks); None when not asked.
    """

    loss: torch.Tensor
    image_grad: torch.Tensor | None
    text_grad: torch.Tensor | None
    scale_grad: torch.Tensor | None
    bias_grad: torch.Tensor | None


def _check_block(image_emb, text_emb, offset, n_total=None) -> None:
    check_float_tensor("image_emb", image_emb, 2, "(M, D)")
    check_float_tensor("text_emb", text_emb, 2, "(N, D)")
    check_same_device([("image_emb", image_emb), ("text_emb", text_emb)])
    if image_emb.dtype != text_emb.dtype:
        raise TypeError(
            f"expected image_emb and text_emb to share a dtype, got {image_emb.dtype} and {text_emb.dtype}"
        )
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            "expected image_emb and text_emb to have the same last dimension, "
            f"got {image_emb.shape[1]} and {text_emb.shape[1]}"
        )
    if image_emb.shape[1] == 0:
        raise ValueError("expected an embedding dimension D >= 1, got D = 0")
    if text_emb.shape[0] == 0:
        raise ValueError("expected text_emb to hold at least one column, got N = 0")
    _check_int("offset", offset, 0)
    m, n = image_emb.shape[0], text_emb.shape[0]
    if offset + m > n:
        raise ValueError(
            f"expected offset + M <= N (row i's positive is column offset + i), got offset {offset}, "
            f"M {m}, N {n}"
        )
    if n_total is not None:
        _check_int("n_total", n_total, 1)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"expected {name} to be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"expected {name} >= {minimum}, got {value}")


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected {name} to be a bool, got {type(value).__name__}")
    return value


def clip_block_stats(image_emb, text_emb, logit_scale, *, offset: int, normalize: bool,
                     workspace_bytes: int | None = None) -> ClipBlockStats:
    """CLIP's softmax statistics of one block row of S (see ClipBlockStats); no gradient.

    Args:
        image_emb: (M, D) the block's image embeddings (rows offset .. offset+M-1 of the batch).
        text_emb: (N, D) the text embeddings of all columns; same dtype and device. N >= offset + M.
        logit_scale: the multiplier (already exponentiated), a Python float or a 0-dim tensor.
        offset: the column of row 0's positive.
        normalize: L2-normalise both embeddings first.
        workspace_bytes: the kernels' workspace (see `workspace_bytes` in clip_loss).

    Work: 2·M·N·D (each logit computed once).
    """
    _check_block(image_emb, text_emb, offset)
    normalize = _check_flag("normalize", normalize)
    scale = scalar_tensor("logit_scale", logit_scale, image_emb).detach()
    resolve_workspace_bytes(workspace_bytes)
    return ClipBlockStats(*reference.clip_block_stats(image_emb.detach(), text_emb.detach(), scale, offset, normalize))


def merge_column_stats(col_max: torch.Tensor, col_sumexp: torch.Tensor) -> torch.Tensor:
    """Column log-sum-exps (N,) of the whole S from P blocks' partial statistics.

    Args:
        col_max, col_sumexp: (P, N), block p's ClipBlockStats.col_max and .col_sumexp in row p.

    Returns log Σ_p col_sumexp_p · exp(col_max_p), computed stably. Deterministic (one fixed
    reduction order, no atomics); blocks with col_max = -inf add nothing (all of them: -inf); a
    NaN or +inf statistic gives NaN.
    """
    check_float_tensor("col_max", col_max, 2, "(P, N)")
    check_float_tensor("col_sumexp", col_sumexp, 2, "(P, N)")
    check_same_device([("col_max", col_max), ("col_sumexp", col_sumexp)])
    if col_max.shape != col_sumexp.shape:
        raise ValueError(
            f"expected col_max and col_sumexp of one shape (P, N), got {tuple(col_max.shape)} and "
            f"{tuple(col_sumexp.shape)}"
        )
    return reference.merge_column_stats(col_max, col_sumexp.to(col_max.dtype))


def _check_stat(name: str, t, length: int, like: torch.Tensor) -> None:
    check_float_tensor(name, t, 1, f"({length},)")
    if t.shape[0] != length:
        raise ValueError(f"expected {name} of shape ({length},), got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"expected {name} on the inputs' device {like.device}, got {t.device}")


def clip_block_grads(image_emb, text_emb, logit_scale, row_lse, col_lse, *, offset: int, n_total: int,
                     label_smoothing: float, normalize: bool, image_grad: bool, text_grad: bool,
                     grad_output=None, workspace_bytes: int | None = None) -> ClipBlockGrads:
    """One block's contribution to the gradients of the global CLIP loss (see ClipBlockGrads).

    The global loss is the one a single process computes over all n_total pairs
    (`clip_loss(all_images, all_texts, logit_scale, ...)`); its gradients are the sums of every
    block's contributions (image rows: each block gives its own rows, complete).

    Args:
        image_emb (M, D), text_emb (N, D), logit_scale, offset, normalize: as in clip_block_stats.
        row_lse: (M,) the block's row log-sum-exps (ClipBlockStats.row_lse).
        col_lse: (N,) the global column log-sum-exps (merge_column_stats over all blocks).
        n_total: the number of pairs in the global batch (the loss is a mean over 2·n_total terms).
        label_smoothing: eps in [0, 1], as in clip_loss.
        image_grad, text_grad: which embedding gradients to compute; a side not asked costs no
            matrix product and comes back as None.
        grad_output: the gradient of the global loss, a 0-dim tensor (default 1); every result is
            scaled by it.

    Work: 2·M·N·D to recompute the block's logits once, plus 2·M·N·D per side asked.
    Results are fp32 (float64 for float64 inputs).
    """
    _check_block(image_emb, text_emb, offset, n_total)
    eps = _check_label_smoothing(label_smoothing)
    normalize = _check_flag("normalize", normalize)
    image_grad, text_grad = _check_flag("image_grad", image_grad), _check_flag("text_grad", text_grad)
    _check_stat("row_lse", row_lse, image_emb.shape[0], image_emb)
    _check_stat("col_lse", col_lse, text_emb.shape[0], image_emb)
    scale = scalar_tensor("logit_scale", logit_scale, image_emb).detach()
    grad = None if grad_output is None else scalar_tensor("grad_output", grad_output, image_emb).detach()
    resolve_workspace_bytes(workspace_bytes)
    out = reference.clip_block_grads(
        image_emb.detach(), text_emb.detach(), scale, row_lse.detach(), col_lse.detach(), offset, n_total, eps,
        normalize, image_grad, text_grad, grad,
    )
    return ClipBlockGrads(*out)


def siglip_block(image_emb, text_emb, logit_scale, logit_bias, *, offset: int, n_total: int, normalize: bool,
                 image_grad: bool, text_grad: bool, scalar_grads: bool = True,
                 workspace_bytes: int | None = None) -> SiglipBlock:
    """One block's share of the global SigLIP loss and of its gradients (see SiglipBlock).

    The global loss is siglip_loss over all n_total pairs: the sum of every block's loss; its
    gradients are the sums of every block's shares (image rows: complete per block).

    Args:
        image_emb (M, D), text_emb (N, D), logit_scale, offset, normalize: as in clip_block_stats.
        logit_bias: the additive bias, a Python float or a 0-dim tensor.
        n_total: the number of pairs in the global batch (the loss is divided by it).
        image_grad, text_grad: which embedding gradients to compute; a side not asked costs no
            matrix product and comes back as None.
        scalar_grads: also compute the shares of d logit_scale and d logit_bias (no extra
            product: they come out of the same pass); None when False.

    Work: 2·M·N·D for the loss (each logit computed once), plus 2·M·N·D per side asked.
    Results are fp32 (float64 for float64 inputs).
    """
    _check_block(image_emb, text_emb, offset, n_total)
    normalize = _check_flag("normalize", normalize)
    image_grad, text_grad = _check_flag("image_grad", image_grad), _check_flag("text_grad", text_grad)
    scalar_grads = _check_flag("scalar_grads", scalar_grads)
    scale = scalar_tensor("logit_scale", logit_scale, image_emb).detach()
    bias = scalar_tensor("logit_bias", logit_bias, image_emb).detach()
    resolve_workspace_bytes(workspace_bytes)
    out = reference.siglip_block(
        image_emb.detach(), text_emb.detach(), scale, bias, offset, n_total, normalize, image_grad, text_grad,
        scalar_grads,
    )
    return SiglipBlock(*out)
