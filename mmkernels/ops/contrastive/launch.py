"""The launchers of the contrastive kernels: allocate the outputs, carve the workspace (plan.py),
launch the Triton kernels (kernels.py) panel by panel, and run the products on cuBLAS.

Work (matrix FLOPs; each logit tile is computed exactly once per pass, never per chunk of D):
- `clip_stats`: one pass over S, 2·M·N·D: the rows' log-sum-exps, the positives' logits, the rows'
  sums and (CLIP) the column statistics, merged in a fixed order (deterministic, no atomics).
- `panel_pass`: one pass over S, 2·M·N·D, plus one cuBLAS product per side whose gradient is asked,
  2·M·N·D each: W per panel of rows in the workspace, then W~·b and W~.T·a.
Memory: O((M + N)·D) and the workspace of at most `workspace_bytes`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from mmkernels.ops._common import last_dim_contiguous, new_output, triton
from mmkernels.ops.contrastive import plan
from mmkernels.ops.contrastive.kernels import (
    MODE_CLIP,
    MODE_INFONCE,
    MODE_SIGLIP,
    _clip_stats_kernel,
    _finish_grad_kernel,
    _merge_lse_kernel,
    _panel_kernel,
)

__all__ = ["MODE_CLIP", "MODE_INFONCE", "MODE_SIGLIP", "ClipStats", "PanelResult", "clip_loss_from_stats",
           "clip_stats", "finish_normalize_grad", "merge_lse", "operands", "panel_pass", "row_scales"]

NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)
# the row scale of a clamped row, 1 / eps, rounded as row_scales rounds it
_R_CLAMPED = float(1.0 / torch.tensor(NORM_EPS, dtype=torch.float32))


def row_scales(emb: torch.Tensor, normalize: bool) -> torch.Tensor:
    """(rows,) fp32: 1 / max(||emb_i||, eps) when normalising, else ones."""
    if not normalize:
        return torch.ones(emb.shape[0], dtype=torch.float32, device=emb.device)
    norms = torch.linalg.vector_norm(emb, dim=1, dtype=torch.float32)
    return 1.0 / norms.clamp_min(NORM_EPS)


def operands(image_emb, text_emb, normalize: bool):
    """(image, text, r_image, r_text): the embeddings with a contiguous last dim, their row scales."""
    a, b = last_dim_contiguous(image_emb), last_dim_contiguous(text_emb)
    return a, b, row_scales(a, normalize), row_scales(b, normalize)


def merge_lse(part_m, part_l, run_m=None, run_l=None, lse=None) -> None:
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
    extra_sum: torch.Tensor | None  # None without extra columns


def _group_args(groups, like: torch.Tensor) -> tuple:
    """(row ids, row counts, col ids, col counts) pointers for the kernels; `like` stands in for the
    ones a launch without groups does not read."""
    return (like, like, like, like) if groups is None else tuple(groups)


def clip_stats(a, b, ra, rb, scale, offset: int, workspace_bytes: int, columns: bool = True, *,
               groups=None, n_pair: int | None = None) -> ClipStats:
    """CLIP's statistics of the block row a (M, D) against b (N, D) (see ClipBlockStats), fp32 but
    row_lse float64; without `columns` (InfoNCE) the rows' only: col_max and col_sumexp are None.

    a, b: last dimension contiguous; ra (M,), rb (N,) row scales; scale: 0-dim fp32 tensor.
    groups: None or (row ids (M,), row counts (M,), col ids (n_pair,), col counts (n_pair,)) int64;
    n_pair: the paired columns (default N; the others are extra negatives, summed in extra_sum).
    """
    m, d = a.shape
    n = b.shape[0]
    cfg = plan.tile_config(d, a.dtype, a.device)
    rows, layout = plan.stats_plan(m, n, cfg, workspace_bytes, columns)
    n_pair = n if n_pair is None else n_pair
    extra = n_pair < n
    f32 = dict(dtype=torch.float32, device=a.device)
    row_lse = new_output((m,), torch.float64, a.device)
    diag, row_sum = (new_output((m,), **f32) for _ in range(2))
    extra_sum = new_output((m,), **f32) if extra else None
    col_max = torch.full((n,), float("-inf"), **f32) if columns else None
    col_sumexp = torch.zeros(n, **f32) if columns else None
    if m == 0:
        return ClipStats(row_lse, col_max, col_sumexp, diag, row_sum, extra_sum)
    gids = _group_args(groups, a)
    ws = layout.carve(a.device)
    (_, splits), per_split = plan.stats_grid(rows, n, cfg)  # the column splits of a full panel
    row_part = ws["row"]
    for p0 in range(0, m, rows):
        p = min(rows, m - p0)
        row_blocks = triton.cdiv(p, cfg["BLOCK_M"])
        col_m, col_l = (ws["col_m"], ws["col_l"]) if columns else (row_part, row_part)  # unused without
        _clip_stats_kernel[(row_blocks, splits)](
            a, b, ra, rb, scale, col_m, col_l, row_part, gids[0], gids[2], gids[1],
            p0, p, n, d, offset, n_pair, per_split,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), col_m.stride(0),
            row_part.stride(0), row_part.stride(1),
            COLUMNS=columns, GROUPS=groups is not None, EXTRA=extra, DOT_PRECISION=plan.dot_precision(a.dtype),
            **plan.launch_options(cfg),
        )
        merge_lse(row_part[0, :, :p], row_part[1, :, :p], lse=row_lse[p0:p0 + p])
        torch.sum(row_part[2, :, :p], 0, out=diag[p0:p0 + p])
        torch.sum(row_part[3, :, :p], 0, out=row_sum[p0:p0 + p])
        if extra:
            torch.sum(row_part[4, :, :p], 0, out=extra_sum[p0:p0 + p])
        if columns:
            merge_lse(col_m[:row_blocks], col_l[:row_blocks], col_max, col_sumexp)
    return ClipStats(row_lse, col_max, col_sumexp, diag, row_sum, extra_sum)



def clip_loss_from_stats(n_total: int, label_smoothing: float, *, rows=None, col_lse=None,
                         directions: int = 2, row_classes: int | None = None) -> torch.Tensor:
    """CLIP's loss (directions=2) or one-directional InfoNCE (directions=1) from the statistics of
    S, or the share of it that the rows and columns given carry; float64 ().

    With eps = label_smoothing and the targets' logits t_i = (1 - eps)·diag_i + eps/n_total·row_sum_i
    (CE with smoothing: lse_i - (1-eps)·S_ii - (eps/n_total)·Σ_j S_ij; the columns' Σ of targets is
    the rows', also with group targets, whose row and column shares of a group are the same), the sum
    over the rows given of (row_lse_i - directions·t_i), plus the sum over the columns given of
    col_lse_j, divided by directions·n_total. With extra columns (rows.extra_sum not None) or
    row_classes given, the rows' own target is (1 - eps)·diag_i + eps/row_classes·(row_sum_i + extra_sum_i)
    (their smoothing spreads over row_classes = n_total + K classes) and the columns' stays t_i.

    rows: the rows' statistics (anything with row_lse (M,) float64, diag and row_sum (M,), and
        optionally extra_sum: ClipStats, ClipBlockStats), or None for none. col_lse: (K,) float64
        column log-sum-exps, or None.
    The sum is linear, so the shares of disjoint rows and columns add up to the loss.
    """
    total = torch.zeros((), dtype=torch.float64, device=(rows.row_lse if rows is not None else col_lse).device)
    if rows is not None:
        extra_sum = getattr(rows, "extra_sum", None)
        targets = (1 - label_smoothing) * rows.diag.double() + (label_smoothing / n_total) * rows.row_sum.double()
        if extra_sum is None and row_classes in (None, n_total):
            total = total + (rows.row_lse.double() - directions * targets).sum()
        else:
            line = rows.row_sum.double() + (0.0 if extra_sum is None else extra_sum.double())
            row_targets = (1 - label_smoothing) * rows.diag.double() + (label_smoothing / row_classes) * line
            total = total + (rows.row_lse.double() - row_targets).sum()
            if directions == 2:
                total = total - targets.sum()
    if col_lse is not None:
        total = total + col_lse.double().sum()
    return total / (directions * n_total)


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
               grad_dtype: torch.dtype, workspace_bytes: int, groups=None, n_pair: int | None = None,
               row_classes: int | None = None) -> PanelResult:
    """One pass over the block row's logits, W per panel, and the products the sides asked for.

    groups, n_pair: as in clip_stats; row_classes: the rows' label-smoothing classes (default n_total).

    The gradients come out as coef·(the matching Σ W products), the normalisation's backward applied:
    image rows complete (M, D); the text side (N, D) summed over this block's rows.
    row_lse (M,), col_lse (N,): CLIP's statistics, float64 (InfoNCE reads row_lse only; SigLIP neither).
    """
    m, d = a.shape
    n = b.shape[0]
    cfg, w_dtype, rows, layout = plan.panel_plan(m, n, d, a.dtype, a.device, image_grad, text_grad, grad_dtype,
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
    gids = _group_args(groups, a)
    for p0 in range(0, m, rows):
        p = min(rows, m - p0)
        grid = plan.panel_grid(p, n, cfg)
        _panel_kernel[grid](
            a, b, ra, rb, scale, bias, coef, row_lse, col_lse, w_all, part, gids[0], gids[2], gids[1], gids[3],
            p0, p, n, d, offset, n if n_pair is None else n_pair, n_total,
            n_total if row_classes is None else row_classes, label_smoothing,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), w_all.stride(0), part.stride(0), part.stride(1),
            MODE=mode, SCALARS=scalars, WRITE_W=write_w, GROUPS=groups is not None,
            DOT_PRECISION=plan.dot_precision(a.dtype), **plan.launch_options(cfg),
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
