"""Contrastive losses without the N×N logit matrix: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss.

Both losses are functions of the logits S_ij = logit_scale · x_i · y_j (+ logit_bias), where
x_i = rx_i · image_emb_i and y_j = ry_j · text_emb_j, and rx, ry are 1 or the inverse L2 norms
(`normalize=True`). Two Triton kernels cover both losses, each streaming tiles of S that are
recomputed from the embeddings and never written to memory:

- `_contrastive_row_stat_kernel`: one fp32 number per row of S. CLIP: the row's log-sum-exp
  (launched a second time on (text, image) for the columns). SigLIP: Σ_j softplus(-label_ij·S_ij).
- `_contrastive_grad_kernel`: G_i = Σ_j W(S_ij) · y_j, the part of dL/dx_i that needs all of row i.
  CLIP: W = P^row_ij + P^col_ij (softmax of S over its row and over its column).
  SigLIP: W = -label_ij · σ(-label_ij · S_ij). Launched on (text, image) it gives the columns' G.

Everything else in the gradients (the diagonal, label smoothing, the normalisation, logit_scale and
logit_bias) is O(N·D) and done in PyTorch around the kernels.
"""
from __future__ import annotations

import torch

from mmkernels.ops import reference
from mmkernels.ops._common import (
    check_float_tensor,
    check_same_device,
    scalar_tensor,
    tl,
    triton,
    triton_enabled,
)

__all__ = ["clip_loss", "siglip_loss"]

MODE_CLIP = 0
MODE_SIGLIP = 1
_NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _logits_tile(
    x_ptr, y_ptr, rx_ptr, ry_ptr, scale, bias, offs_m, offs_n, N, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """S[offs_m, offs_n] = scale · rx · ry · (x @ y.T) + bias, fp32 (BLOCK_M, BLOCK_N)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    mask_m = offs_m < N
    mask_n = offs_n < N
    for k in range(0, D, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xn + offs_k[None, :] * stride_xd,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        y = tl.load(
            y_ptr + offs_n[:, None] * stride_yn + offs_k[None, :] * stride_yd,
            mask=mask_n[:, None] & mask_k[None, :], other=0.0,
        )
        acc = tl.dot(x, tl.trans(y), acc, input_precision=DOT_PRECISION)
    rx = tl.load(rx_ptr + offs_m, mask=mask_m, other=0.0)
    ry = tl.load(ry_ptr + offs_n, mask=mask_n, other=0.0)
    return acc * (scale * rx)[:, None] * ry[None, :] + bias


@triton.jit
def _contrastive_row_stat_kernel(
    x_ptr, y_ptr, rx_ptr, ry_ptr, scale_ptr, bias_ptr, out_ptr, N, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out (3, N): [0] the row statistic, [1] S_ii, [2] Σ_j S_ij (the last two for label smoothing)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    # CLIP: online log-sum-exp (running max m_i, running sum l_i). SigLIP: running sum in l_i.
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = _logits_tile(
            x_ptr, y_ptr, rx_ptr, ry_ptr, scale, bias, offs_m, offs_n, N, D,
            stride_xn, stride_xd, stride_yn, stride_yd,
            BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
        )
        valid_n = (offs_n < N)[None, :]
        on_diag = offs_m[:, None] == offs_n[None, :]
        if MODE == 0:
            diag += tl.sum(tl.where(on_diag, s, 0.0), axis=1)
            row_sum += tl.sum(tl.where(valid_n, s, 0.0), axis=1)
            s = tl.where(valid_n, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # Column 0 lies in the first block, so m_new is finite unless the inputs hold Inf/NaN,
            # in which case the NaN this produces is the answer we want.
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        else:
            z = tl.where(on_diag, s, -s)  # label_ij · S_ij
            # softplus(-z) = -log σ(z), computed without overflow
            nls = tl.maximum(-z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
            l_i += tl.sum(tl.where(valid_n, nls, 0.0), axis=1)
    mask_m = offs_m < N
    if MODE == 0:
        tl.store(out_ptr + offs_m, m_i + tl.log(l_i), mask=mask_m)
        tl.store(out_ptr + N + offs_m, diag, mask=mask_m)
        tl.store(out_ptr + 2 * N + offs_m, row_sum, mask=mask_m)
    else:
        tl.store(out_ptr + offs_m, l_i, mask=mask_m)


@triton.jit
def _contrastive_grad_kernel(
    x_ptr, y_ptr, rx_ptr, ry_ptr, scale_ptr, bias_ptr, row_stat_ptr, col_stat_ptr,
    g_ptr, wsum_ptr, N, D,
    stride_xn, stride_xd, stride_yn, stride_yd, stride_gn, stride_gd,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < D
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    if MODE == 0:
        lse_row = tl.load(row_stat_ptr + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        s = _logits_tile(
            x_ptr, y_ptr, rx_ptr, ry_ptr, scale, bias, offs_m, offs_n, N, D,
            stride_xn, stride_xd, stride_yn, stride_yd,
            BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
        )
        if MODE == 0:
            lse_col = tl.load(col_stat_ptr + offs_n, mask=mask_n, other=0.0)
            w = tl.exp(s - lse_row[:, None]) + tl.exp(s - lse_col[None, :])
        else:
            label = tl.where(offs_m[:, None] == offs_n[None, :], 1.0, -1.0)
            w = -label * tl.sigmoid(-label * s)
        w = tl.where(mask_n[None, :], w, 0.0)
        wsum += tl.sum(w, axis=1)
        ry = tl.load(ry_ptr + offs_n, mask=mask_n, other=0.0)
        y = tl.load(
            y_ptr + offs_n[:, None] * stride_yn + offs_d[None, :] * stride_yd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )
        acc = tl.dot((w * ry[None, :]).to(y.dtype), y, acc, input_precision=DOT_PRECISION)
    tl.store(
        g_ptr + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd, acc,
        mask=mask_m[:, None] & mask_d[None, :],
    )
    if pid_d == 0:
        tl.store(wsum_ptr + offs_m, wsum, mask=mask_m)


# --------------------------------------------------------------------------- launchers


def _blocks(d: int, device: torch.device) -> dict:
    """Tile sizes: tensor-core sized on the GPU; on the CPU (interpreter) large enough to keep the
    number of interpreted block operations low, small enough that D=200 still takes several K steps
    and several D chunks."""
    if device.type != "cuda":
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=128, num_warps=4)
    block_d = min(256, max(16, triton.next_power_of_2(d)))
    return dict(BLOCK_M=64 if block_d > 128 else 128, BLOCK_N=64, BLOCK_K=64, BLOCK_D=block_d,
                num_warps=8, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products: tf32 would be ~1e-3 off the fp32 eager formula.
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_row_stat(x, y, rx, ry, scale, bias, mode: int) -> torch.Tensor:
    """(3, N) fp32 for CLIP (log-sum-exp, S_ii, Σ_j S_ij of each row), (1, N) for SigLIP."""
    n, d = x.shape
    out = torch.full((3 if mode == MODE_CLIP else 1, n), float("nan"), dtype=torch.float32, device=x.device)
    cfg = _blocks(d, x.device)
    cfg.pop("BLOCK_D")
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    _contrastive_row_stat_kernel[grid](
        x, y, rx, ry, scale, bias, out, n, d,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        MODE=mode, DOT_PRECISION=_dot_precision(x.dtype), **cfg,
    )
    return out


def _launch_grad(x, y, rx, ry, scale, bias, row_stat, col_stat, mode: int):
    """G (N, D) fp32 = Σ_j W_ij · ry_j · y_j and wsum (N,) = Σ_j W_ij."""
    n, d = x.shape
    g = torch.full((n, d), float("nan"), dtype=torch.float32, device=x.device)
    wsum = torch.full((n,), float("nan"), dtype=torch.float32, device=x.device)
    cfg = _blocks(d, x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_D"]))
    _contrastive_grad_kernel[grid](
        x, y, rx, ry, scale, bias, row_stat, col_stat, g, wsum, n, d,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), g.stride(0), g.stride(1),
        MODE=mode, DOT_PRECISION=_dot_precision(x.dtype), **cfg,
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


def _subtract_targets(g, other, r_other, label_smoothing: float):
    """H = G - 2(1-eps)·y - (2·eps/N)·Σ_j y_j in place on G, with y = r_other · other."""
    n = g.shape[0]
    g.addcmul_(other, r_other[:, None], value=-2 * (1 - label_smoothing))
    if label_smoothing:
        g.sub_(r_other @ other.float(), alpha=2 * label_smoothing / n)
    return g


def _prepare(emb: torch.Tensor) -> torch.Tensor:
    return emb if emb.stride(-1) == 1 else emb.contiguous()


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("mmkernels::clip_loss_fwd", mutates_args=())
def clip_loss_fwd(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
    normalize: bool, label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss: () fp32, lse_rows: (N,) fp32, lse_cols: (N,) fp32)."""
    a, b = _prepare(image_emb), _prepare(text_emb)
    n = a.shape[0]
    ra, rb = _row_scales(a, normalize), _row_scales(b, normalize)
    bias = torch.zeros((), dtype=torch.float32, device=a.device)
    lse_r, diag, row_sum = _launch_row_stat(a, b, ra, rb, logit_scale, bias, MODE_CLIP)
    lse_c = _launch_row_stat(b, a, rb, ra, logit_scale, bias, MODE_CLIP)[0]
    eps = label_smoothing
    # CE_i with smoothing = lse_i - (1-eps)·S_ii - (eps/N)·Σ_j S_ij; the columns' S_ii and Σ_ij S_ij
    # are the rows' own.
    loss = (lse_r.sum() + lse_c.sum() - 2 * (1 - eps) * diag.sum() - 2 * eps / n * row_sum.sum()) / (2 * n)
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
    normalize: bool, label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d image_emb, d text_emb, d logit_scale)."""
    a, b = _prepare(image_emb), _prepare(text_emb)
    n = a.shape[0]
    ra, rb = _row_scales(a, normalize), _row_scales(b, normalize)
    bias = torch.zeros((), dtype=torch.float32, device=a.device)
    eps = label_smoothing
    # dL/dS_ij = (P^row_ij + P^col_ij - 2(1-eps)·δ_ij - 2·eps/N) / (2N), so with
    # H_i = G_i - 2(1-eps)·y_i - (2·eps/N)·Σ_j y_j:  dL/dx_i = s/(2N) · H_i, dL/ds = Σ_i x_i·H_i / (2N).
    coef = grad_loss * logit_scale / (2 * n)
    g_a, _ = _launch_grad(a, b, ra, rb, logit_scale, bias, lse_r, lse_c, MODE_CLIP)
    d_image, xh = _embedding_grad(a, ra, _subtract_targets(g_a, b, rb, eps), coef, normalize)
    del g_a
    g_b, _ = _launch_grad(b, a, rb, ra, logit_scale, bias, lse_c, lse_r, MODE_CLIP)
    d_text, _ = _embedding_grad(b, rb, _subtract_targets(g_b, a, ra, eps), coef, normalize)
    d_scale = grad_loss * xh / (2 * n)
    return d_image, d_text, d_scale.to(logit_scale.dtype)


@clip_loss_bwd.register_fake
def _(grad_loss, image_emb, text_emb, logit_scale, lse_r, lse_c, normalize, label_smoothing):
    return torch.empty_like(image_emb), torch.empty_like(text_emb), torch.empty_like(logit_scale)


def _clip_setup_context(ctx, inputs, output):
    image_emb, text_emb, logit_scale, normalize, label_smoothing = inputs
    _, lse_r, lse_c = output
    ctx.save_for_backward(image_emb, text_emb, logit_scale, lse_r, lse_c)
    ctx.normalize, ctx.label_smoothing = normalize, label_smoothing


def _clip_backward(ctx, grad_loss, _grad_lse_r, _grad_lse_c):
    image_emb, text_emb, logit_scale, lse_r, lse_c = ctx.saved_tensors
    d_image, d_text, d_scale = torch.ops.mmkernels.clip_loss_bwd(
        grad_loss, image_emb, text_emb, logit_scale, lse_r, lse_c, ctx.normalize, ctx.label_smoothing
    )
    return d_image, d_text, d_scale, None, None


clip_loss_fwd.register_autograd(_clip_backward, setup_context=_clip_setup_context)


@torch.library.custom_op("mmkernels::siglip_loss_fwd", mutates_args=())
def siglip_loss_fwd(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
    logit_bias: torch.Tensor, normalize: bool,
) -> torch.Tensor:
    """Returns the loss: () fp32."""
    a, b = _prepare(image_emb), _prepare(text_emb)
    ra, rb = _row_scales(a, normalize), _row_scales(b, normalize)
    rows = _launch_row_stat(a, b, ra, rb, logit_scale, logit_bias, MODE_SIGLIP)
    return rows.sum() / a.shape[0]


@siglip_loss_fwd.register_fake
def _(image_emb, text_emb, logit_scale, logit_bias, normalize):
    return image_emb.new_empty((), dtype=torch.float32)


@torch.library.custom_op("mmkernels::siglip_loss_bwd", mutates_args=())
def siglip_loss_bwd(
    grad_loss: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor,
    logit_scale: torch.Tensor, logit_bias: torch.Tensor, normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d image_emb, d text_emb, d logit_scale, d logit_bias)."""
    a, b = _prepare(image_emb), _prepare(text_emb)
    n = a.shape[0]
    ra, rb = _row_scales(a, normalize), _row_scales(b, normalize)
    # dL/dS_ij = W_ij / N with W = -label·σ(-label·S); G_i = Σ_j W_ij·y_j, so dL/dx_i = s/N · G_i,
    # dL/ds = Σ_i x_i·G_i / N and dL/db = Σ_ij W_ij / N.
    unused = torch.empty(0, dtype=torch.float32, device=a.device)
    g_a, wsum = _launch_grad(a, b, ra, rb, logit_scale, logit_bias, unused, unused, MODE_SIGLIP)
    coef = grad_loss * logit_scale / n
    d_image, xg = _embedding_grad(a, ra, g_a, coef, normalize)
    del g_a
    g_b, _ = _launch_grad(b, a, rb, ra, logit_scale, logit_bias, unused, unused, MODE_SIGLIP)
    d_text, _ = _embedding_grad(b, rb, g_b, coef, normalize)
    d_scale = grad_loss * xg / n
    d_bias = grad_loss * wsum.sum() / n
    return d_image, d_text, d_scale.to(logit_scale.dtype), d_bias.to(logit_bias.dtype)


@siglip_loss_bwd.register_fake
def _(grad_loss, image_emb, text_emb, logit_scale, logit_bias, normalize):
    return (torch.empty_like(image_emb), torch.empty_like(text_emb),
            torch.empty_like(logit_scale), torch.empty_like(logit_bias))


def _siglip_setup_context(ctx, inputs, output):
    image_emb, text_emb, logit_scale, logit_bias, normalize = inputs
    ctx.save_for_backward(image_emb, text_emb, logit_scale, logit_bias)
    ctx.normalize = normalize


def _siglip_backward(ctx, grad_loss):
    image_emb, text_emb, logit_scale, logit_bias = ctx.saved_tensors
    grads = torch.ops.mmkernels.siglip_loss_bwd(
        grad_loss, image_emb, text_emb, logit_scale, logit_bias, ctx.normalize
    )
    return (*grads, None)


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
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"expected label_smoothing in [0, 1], got {label_smoothing}")
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
