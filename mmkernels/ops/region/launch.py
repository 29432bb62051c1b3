"""The launchers of region_mask and masked_region_loss: the Triton kernels (kernels.py) and the CUDA
kernels of the compiled extension (csrc/region_mask.cu, csrc/region_loss.cu through mmkernels._C).

Each launcher takes the outputs registered.py allocated and fills them; `_REGION_MASK_FWD`,
`_REGION_MASK_BWD`, `_LOSS_FWD` and `_LOSS_BWD` map the backend ("triton" or "cuda") to its launcher.
"""
from __future__ import annotations

from mmkernels.ops import _extension
from mmkernels.ops._extension import DTYPE_CODE, cuda_stream
from mmkernels.ops.region import reference
from mmkernels.ops.region.kernels import (
    _masked_region_loss_bwd_kernel,
    _masked_region_loss_fwd_kernel,
    _region_mask_bwd_kernel,
    _region_mask_fwd_kernel,
    _region_mask_scatter_kernel,
)
from mmkernels.ops.region.plan import (
    _loss_blocks,
    _loss_bwd_grid,
    _loss_fwd_grid,
    _region_blocks,
    _region_grid,
    _scatter_blocks,
    _scatter_grid,
)

_KIND_CODE = {"mse": 0, "smooth_l1": 1, "kl": 2}  # as csrc/region.h, enum LossKind


# --------------------------------------------------------------------------- region_mask


def _seeds(seed) -> tuple[int, int]:
    seed0, seed1 = (int(s) for s in seed.tolist())
    return seed0, seed1


def _stream_keys(seed1: int) -> tuple[int, int, int]:
    return tuple(
        reference.region_stream_key(seed1, stream)
        for stream in (reference.REGION_STREAM_SELECT, reference.REGION_STREAM_ACTION,
                       reference.REGION_STREAM_SOURCE)
    )


def _region_mask_fwd_triton(feats, lens, valid_u8, flat_cum, emb, seed, select_below, min_masked,
                            bert, out, mask, source):
    n_samples, n_regions, dim = feats.shape
    n_rows = n_samples * n_regions
    seed0, seed1 = _seeds(seed)
    key_select, key_action, key_source = _stream_keys(seed1)
    cfg = _region_blocks(n_regions, dim, feats.device)
    dummy = source  # stands in for the pointers a constexpr flag switches off
    _region_mask_fwd_kernel[_region_grid(n_samples, dim, cfg)](
        feats, out, lens if lens is not None else dummy, valid_u8 if valid_u8 is not None else dummy,
        flat_cum if flat_cum is not None else dummy, emb if emb is not None else out, mask, source,
        n_regions, dim, n_rows, max(n_rows - 1, 0).bit_length(), feats.stride(0), feats.stride(1),
        valid_u8.stride(0) if valid_u8 is not None else 0, valid_u8.stride(1) if valid_u8 is not None else 0,
        seed0, key_select, key_action, key_source, select_below - 1, min_masked,
        MASK_BELOW=reference.REGION_MASK_BELOW, RANDOM_BELOW=reference.REGION_RANDOM_BELOW,
        HAS_LENS=lens is not None, HAS_EMB=emb is not None, BERT=bert, **cfg,
    )


def _region_mask_fwd_cuda(feats, lens, valid_u8, flat_cum, emb, seed, select_below, min_masked,
                          bert, out, mask, source):
    n_samples, n_regions, dim = feats.shape
    seed0, seed1 = _seeds(seed)
    key_select, key_action, key_source = _stream_keys(seed1)
    device, stream = cuda_stream(feats)
    _extension.extension().region_mask_forward(
        feats.data_ptr(), feats.stride(0), feats.stride(1), out.data_ptr(),
        lens.data_ptr() if lens is not None else 0,
        valid_u8.data_ptr() if valid_u8 is not None else 0,
        valid_u8.stride(0) if valid_u8 is not None else 0, valid_u8.stride(1) if valid_u8 is not None else 0,
        flat_cum.data_ptr() if flat_cum is not None else 0,
        emb.data_ptr() if emb is not None else 0,
        mask.data_ptr(), source.data_ptr(), n_samples, n_regions, dim, DTYPE_CODE[feats.dtype],
        seed0, key_select, key_action, key_source,
        select_below, min_masked, reference.REGION_MASK_BELOW, reference.REGION_RANDOM_BELOW,
        bert, device, stream,
    )


def _region_mask_bwd_triton(grad_out, source, grad_in, emb_partial, bert):
    n_samples, n_regions, dim = grad_out.shape
    cfg = _region_blocks(n_regions, dim, grad_out.device)
    cfg.pop("CHUNK")
    _region_mask_bwd_kernel[_region_grid(n_samples, dim, cfg)](
        grad_out, source, grad_in, emb_partial if emb_partial is not None else grad_in,
        n_regions, dim, grad_out.stride(0), grad_out.stride(1),
        HAS_EMB_GRAD=emb_partial is not None, **cfg,
    )
    if bert:
        n_rows = n_samples * n_regions
        blocks = _scatter_blocks(cfg["BLOCK_D"], grad_out.is_cuda)
        _region_mask_scatter_kernel[_scatter_grid(n_rows, dim, blocks)](
            grad_out, source, grad_in, n_regions, dim, n_rows, grad_out.stride(0), grad_out.stride(1),
            num_warps=cfg["num_warps"], **blocks,
        )


def _region_mask_bwd_cuda(grad_out, source, grad_in, emb_partial, bert):
    n_samples, n_regions, dim = grad_out.shape
    device, stream = cuda_stream(grad_out)
    _extension.extension().region_mask_backward(
        grad_out.data_ptr(), grad_out.stride(0), grad_out.stride(1), source.data_ptr(),
        grad_in.data_ptr(), emb_partial.data_ptr() if emb_partial is not None else 0,
        n_samples, n_regions, dim, DTYPE_CODE[grad_out.dtype], bert, device, stream,
    )


_REGION_MASK_FWD = {"triton": _region_mask_fwd_triton, "cuda": _region_mask_fwd_cuda}
_REGION_MASK_BWD = {"triton": _region_mask_bwd_triton, "cuda": _region_mask_bwd_cuda}


# --------------------------------------------------------------------------- masked_region_loss


def _loss_fwd_triton(pred, target, mask_u8, kind, beta, loss, stats):
    n_samples, n_regions, dim = pred.shape
    n_rows = n_samples * n_regions
    cfg = _loss_blocks(dim, pred.device)
    _masked_region_loss_fwd_kernel[_loss_fwd_grid(n_rows, cfg)](
        pred, target, mask_u8, loss, stats if stats.numel() else loss, n_regions, dim, n_rows,
        pred.stride(0), pred.stride(1), target.stride(0), target.stride(1),
        mask_u8.stride(0), mask_u8.stride(1), float(beta), KIND=_KIND_CODE[kind], **cfg,
    )


def _loss_fwd_cuda(pred, target, mask_u8, kind, beta, loss, stats):
    n_samples, n_regions, dim = pred.shape
    device, stream = cuda_stream(pred)
    _extension.extension().masked_region_loss_forward(
        pred.data_ptr(), pred.stride(0), pred.stride(1), target.data_ptr(), target.stride(0),
        target.stride(1), mask_u8.data_ptr(), mask_u8.stride(0), mask_u8.stride(1), loss.data_ptr(),
        stats.data_ptr() if stats.numel() else 0, n_samples, n_regions, dim,
        DTYPE_CODE[pred.dtype], _KIND_CODE[kind], float(beta), device, stream,
    )


def _loss_bwd_triton(grad_loss, pred, target, mask_u8, stats, kind, beta, grad_pred, grad_target):
    n_samples, n_regions, dim = pred.shape
    n_rows = n_samples * n_regions
    cfg = _loss_blocks(dim, pred.device)
    _masked_region_loss_bwd_kernel[_loss_bwd_grid(n_rows, dim, cfg)](
        grad_loss, pred, target, mask_u8, stats if stats.numel() else grad_loss, grad_pred,
        grad_target if grad_target is not None else grad_pred, n_regions, dim, n_rows,
        grad_loss.stride(0), grad_loss.stride(1), pred.stride(0), pred.stride(1),
        target.stride(0), target.stride(1), mask_u8.stride(0), mask_u8.stride(1), float(beta),
        KIND=_KIND_CODE[kind], TARGET_GRAD=grad_target is not None, **cfg,
    )


def _loss_bwd_cuda(grad_loss, pred, target, mask_u8, stats, kind, beta, grad_pred, grad_target):
    n_samples, n_regions, dim = pred.shape
    grad_loss = grad_loss.float()  # the CUDA entry point reads fp32
    device, stream = cuda_stream(pred)
    _extension.extension().masked_region_loss_backward(
        grad_loss.data_ptr(), grad_loss.stride(0), grad_loss.stride(1),
        pred.data_ptr(), pred.stride(0), pred.stride(1), target.data_ptr(), target.stride(0),
        target.stride(1), mask_u8.data_ptr(), mask_u8.stride(0), mask_u8.stride(1),
        stats.data_ptr() if stats.numel() else 0, grad_pred.data_ptr(),
        grad_target.data_ptr() if grad_target is not None else 0, n_samples, n_regions, dim,
        DTYPE_CODE[pred.dtype], _KIND_CODE[kind], float(beta), device, stream,
    )


_LOSS_FWD = {"triton": _loss_fwd_triton, "cuda": _loss_fwd_cuda}
_LOSS_BWD = {"triton": _loss_bwd_triton, "cuda": _loss_bwd_cuda}
