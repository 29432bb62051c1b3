"""region_mask: sample and apply the region mask of masked region modeling (UNITER, LXMERT).

`region_mask` selects about `prob` of each sample's existing regions and replaces them, in one pass
over the features (each row read at most once, each output row written once). The selection comes
from a counter-based RNG (reference.region_random) that the Triton kernels (region_kernels.py), the
CUDA kernels (csrc/) and the PyTorch reference compute bit for bit alike, so one seed gives one mask
everywhere.

One chain per pass: `_region_mask_fwd_kernel` (Triton; csrc/region_mask.cu for CUDA) →
`_region_mask_fwd_triton` / `_region_mask_fwd_cuda` (launchers) → `torch.ops.mmkernels.region_mask_fwd`
(registered op, with its backward `region_mask_bwd` as autograd) → `mmkernels.region_mask`.
The backend is chosen once per call by `_dispatch.resolve_backend`.

Work: the forward reads each existing input row at most once per copy it makes and writes B·R·D
elements; the backward reads the gradient of the kept, masked and copied rows and writes B·R·D
elements (plus one atomic add per copied row in "bert" mode). No matrix products.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mmkernels.ops import _extension, reference
from mmkernels.ops._args import check_choice, check_float_tensor, check_same_device
from mmkernels.ops._common import last_dim_contiguous, new_output, triton
from mmkernels.ops._dispatch import check_backend, resolve_backend
from mmkernels.ops._extension import DTYPE_CODE, cuda_stream, launch_device
from mmkernels.ops.region_kernels import (
    _region_mask_bwd_kernel,
    _region_mask_fwd_kernel,
    _region_mask_scatter_kernel,
)

__all__ = ["RegionMaskOutput", "region_mask"]

MODES = ("zero", "bert")


class RegionMaskOutput(NamedTuple):
    """What region_mask returns.

    features: (B, R, D) the masked features, a new tensor in feats' dtype.
    mask: (B, R) bool, True for the selected regions (masked, replaced or kept alike): the
        regions a masked region modeling loss is computed on.
    """

    features: torch.Tensor
    mask: torch.Tensor


# --------------------------------------------------------------------------- launchers


def _region_blocks(n_regions: int, dim: int, device: torch.device) -> dict:
    """Tile sizes. Under the interpreter: small enough that the tests cross every block edge."""
    if device.type != "cuda":
        return dict(CHUNK=16, BLOCK_R=8, BLOCK_D=64, num_warps=4)
    block_d = min(512, triton.next_power_of_2(dim))
    block_r = min(max(1, 4096 // block_d), triton.next_power_of_2(n_regions))
    chunk = min(1024, triton.next_power_of_2(n_regions))
    return dict(CHUNK=chunk, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


def _existing_mask(region_lens, valid_mask, n_regions: int) -> torch.Tensor:
    """(B, R) bool from region_lens (clamped to [0, R]) or valid_mask."""
    if valid_mask is not None:
        return valid_mask
    positions = torch.arange(n_regions, device=region_lens.device)
    return positions[None, :] < region_lens.clamp(0, n_regions)[:, None]


def _seeds(seed: torch.Tensor) -> tuple[int, int]:
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
    grid = (n_samples, triton.cdiv(dim, cfg["BLOCK_D"]))
    dummy = source  # stands in for the pointers a constexpr flag switches off
    _region_mask_fwd_kernel[grid](
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
    grid = (n_samples, triton.cdiv(dim, cfg["BLOCK_D"]))
    _region_mask_bwd_kernel[grid](
        grad_out, source, grad_in, emb_partial if emb_partial is not None else grad_in,
        n_regions, dim, grad_out.stride(0), grad_out.stride(1),
        HAS_EMB_GRAD=emb_partial is not None, **cfg,
    )
    if bert:
        n_rows = n_samples * n_regions
        # 8 x 256 on the GPU: a 64 x 512 tile spilled 1-4 KB per thread (ptxas, sm_80 and sm_90), and
        # 16 x 64 bf16 8-12 bytes on sm_80, whose bf16 atomic add is a compare-and-swap loop
        block_r = 8 if grad_out.is_cuda else 4
        block_d = min(256, cfg["BLOCK_D"])
        grid = (triton.cdiv(n_rows, block_r), triton.cdiv(dim, block_d))
        _region_mask_scatter_kernel[grid](
            grad_out, source, grad_in, n_regions, dim, n_rows, grad_out.stride(0), grad_out.stride(1),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=cfg["num_warps"],
        )


def _region_mask_bwd_cuda(grad_out, source, grad_in, emb_partial, bert):
    n_samples, n_regions, dim = grad_out.shape
    device, stream = cuda_stream(grad_out)
    _extension.extension().region_mask_backward(
        grad_out.data_ptr(), grad_out.stride(0), grad_out.stride(1), source.data_ptr(),
        grad_in.data_ptr(), emb_partial.data_ptr() if emb_partial is not None else 0,
        n_samples, n_regions, dim, DTYPE_CODE[grad_out.dtype], bert, device, stream,
    )


_FWD = {"triton": _region_mask_fwd_triton, "cuda": _region_mask_fwd_cuda}
_BWD = {"triton": _region_mask_bwd_triton, "cuda": _region_mask_bwd_cuda}


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("mmkernels::region_mask_fwd", mutates_args=())
def region_mask_fwd(
    feats: torch.Tensor, region_lens: Optional[torch.Tensor], valid_mask: Optional[torch.Tensor],
    mask_embedding: Optional[torch.Tensor], seed: torch.Tensor, select_below: int, min_masked: int,
    bert: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (features (B, R, D), mask (B, R) bool, source (B, R) int32; see reference.region_mask_plan).

    region_lens: (B,) int64, or valid_mask: (B, R) bool, on feats' device; mask_embedding: (D,)
    in feats' dtype; seed: (2,) int64 on the CPU; backend: "triton" or "cuda".
    """
    feats = last_dim_contiguous(feats)
    n_samples, n_regions, dim = feats.shape
    # the kernels index region_lens and mask_embedding with unit stride
    if region_lens is not None:
        region_lens = region_lens.long().contiguous()
    if mask_embedding is not None:
        mask_embedding = mask_embedding.contiguous()
    valid_u8 = valid_mask.view(torch.uint8) if valid_mask is not None else None
    flat_cum = None
    if bert:
        existing = _existing_mask(region_lens, valid_mask, n_regions)
        flat_cum = existing.flatten().cumsum(0, dtype=torch.int32)
    out = new_output(feats.shape, feats.dtype, feats.device)
    mask = new_output((n_samples, n_regions), torch.bool, feats.device)
    source = new_output((n_samples, n_regions), torch.int32, feats.device)
    with launch_device(feats):
        _FWD[backend](
            feats, region_lens, valid_u8, flat_cum, mask_embedding, seed, select_below, min_masked,
            bert, out, mask.view(torch.uint8), source,
        )
    return out, mask, source


@region_mask_fwd.register_fake
def _(feats, region_lens, valid_mask, mask_embedding, seed, select_below, min_masked, bert, backend):
    n_samples, n_regions, _ = feats.shape
    return (
        torch.empty_like(feats, memory_format=torch.contiguous_format),
        feats.new_empty((n_samples, n_regions), dtype=torch.bool),
        feats.new_empty((n_samples, n_regions), dtype=torch.int32),
    )


@torch.library.custom_op("mmkernels::region_mask_bwd", mutates_args=())
def region_mask_bwd(
    grad_out: torch.Tensor, source: torch.Tensor, embedding_grad: bool, bert: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d feats (B, R, D), d mask_embedding (D,) fp32, empty (0,) unless embedding_grad).

    grad_out: (B, R, D), any strides over B and R (0 included); source: region_mask_fwd's.
    """
    grad_out = last_dim_contiguous(grad_out)
    n_samples, _, dim = grad_out.shape
    grad_in = new_output(grad_out.shape, grad_out.dtype, grad_out.device)
    # per-sample partial sums: a (B, D) workspace, reduced below, instead of atomics across samples
    emb_partial = new_output((n_samples, dim), torch.float32, grad_out.device) if embedding_grad else None
    with launch_device(grad_out):
        _BWD[backend](grad_out, source, grad_in, emb_partial, bert)
    if emb_partial is None:
        return grad_in, grad_out.new_empty((0,), dtype=torch.float32)
    return grad_in, emb_partial.sum(0)


@region_mask_bwd.register_fake
def _(grad_out, source, embedding_grad, bert, backend):
    dim = grad_out.shape[-1] if embedding_grad else 0
    return (
        torch.empty_like(grad_out, memory_format=torch.contiguous_format),
        grad_out.new_empty((dim,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    _, _, _, mask_embedding, _, _, _, bert, backend = inputs
    _, mask, source = output
    ctx.save_for_backward(source)
    ctx.mark_non_differentiable(mask, source)
    ctx.bert, ctx.backend = bert, backend
    ctx.embedding_dtype = mask_embedding.dtype if mask_embedding is not None else None


def _backward(ctx, grad_out, _grad_mask, _grad_source):
    (source,) = ctx.saved_tensors
    embedding_grad = ctx.needs_input_grad[3]
    grad_in, grad_emb = torch.ops.mmkernels.region_mask_bwd(
        grad_out, source, embedding_grad, ctx.bert, ctx.backend
    )
    grad_emb = grad_emb.to(ctx.embedding_dtype) if embedding_grad else None
    return grad_in, None, None, grad_emb, None, None, None, None, None


region_mask_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def _check_region_count(n_samples: int, n_regions: int) -> None:
    # the kernels index regions (b·R + r) and the copied rows (source) with int32
    if n_samples * n_regions >= 2**31:
        raise ValueError(f"expected B·R < 2^31 regions, got {n_samples}·{n_regions}")


def _check_region_mask_inputs(feats, region_lens, valid_mask, prob, mode, mask_embedding, min_masked,
                              generator, backend) -> None:
    check_float_tensor("feats", feats, 3, "(B, R, D)")
    n_samples, n_regions, dim = feats.shape
    if (region_lens is None) == (valid_mask is None):
        raise ValueError(
            "expected exactly one of region_lens (B,) and valid_mask (B, R) to say which regions exist, "
            f"got {'both' if region_lens is not None else 'neither'}"
        )
    if region_lens is not None:
        if not isinstance(region_lens, torch.Tensor):
            raise TypeError(f"expected region_lens to be a torch.Tensor, got {type(region_lens).__name__}")
        if region_lens.dtype.is_floating_point or region_lens.dtype.is_complex or region_lens.dtype == torch.bool:
            raise TypeError(f"expected region_lens to be an integer tensor, got dtype {region_lens.dtype}")
        if region_lens.shape != (n_samples,):
            raise ValueError(
                f"expected region_lens of shape (B,) = ({n_samples},), got {tuple(region_lens.shape)}"
            )
        if region_lens.device.type == "cpu":
            # CPU lengths are checked; CUDA ones (and any under torch.compile) are clamped to [0, R]:
            # a check would stall the host or break the graph.
            if not torch.compiler.is_compiling():
                bad = (region_lens < 0) | (region_lens > n_regions)
                if bool(bad.any()):
                    raise ValueError(
                        f"expected region_lens in [0, R] = [0, {n_regions}], got {region_lens[bad].tolist()[:8]}"
                    )
        elif region_lens.device != feats.device:
            raise ValueError(
                f"expected region_lens on feats' device {feats.device} or on the CPU, got {region_lens.device}"
            )
    if valid_mask is not None:
        if not isinstance(valid_mask, torch.Tensor) or valid_mask.dtype != torch.bool:
            got = valid_mask.dtype if isinstance(valid_mask, torch.Tensor) else type(valid_mask).__name__
            raise TypeError(f"expected valid_mask to be a bool tensor, got {got}")
        if valid_mask.shape != (n_samples, n_regions):
            raise ValueError(
                f"expected valid_mask of shape (B, R) = ({n_samples}, {n_regions}), got {tuple(valid_mask.shape)}"
            )
        check_same_device([("feats", feats), ("valid_mask", valid_mask)])
    if isinstance(prob, bool) or not isinstance(prob, (int, float)):
        raise TypeError(f"expected prob to be a float, got {type(prob).__name__}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"expected prob in [0, 1], got {prob}")
    check_choice("mode", mode, MODES)
    if mask_embedding is not None:
        check_float_tensor("mask_embedding", mask_embedding)
        if mask_embedding.shape != (dim,):
            raise ValueError(
                f"expected mask_embedding of shape (D,) = ({dim},), got {tuple(mask_embedding.shape)}"
            )
        check_same_device([("feats", feats), ("mask_embedding", mask_embedding)])
    if isinstance(min_masked, bool) or not isinstance(min_masked, int) or min_masked < 0:
        raise ValueError(f"expected min_masked to be an int >= 0, got {min_masked!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"expected generator to be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(
                "expected a CPU torch.Generator (the seed is drawn on the CPU, with no GPU sync), "
                f"got one on {generator.device}"
            )
    check_backend(backend)
    _check_region_count(n_samples, n_regions)


def region_mask(
    feats: torch.Tensor,
    region_lens: Optional[torch.Tensor] = None,
    valid_mask: Optional[torch.Tensor] = None,
    *,
    prob: float = 0.15,
    mode: str = "zero",
    mask_embedding: Optional[torch.Tensor] = None,
    min_masked: int = 1,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> RegionMaskOutput:
    """Mask image regions for masked region modeling (UNITER's MRFR/MRC, LXMERT's RoI-feature tasks).

    Args:
        feats: (B, R, D) region features (float16, bfloat16, float32; float64 takes the torch path).
        region_lens: (B,) integer count of existing regions per sample (regions 0..n-1 exist), on
            feats' device or on the CPU. CPU values outside [0, R] raise; CUDA ones (and any under
            torch.compile) are clamped to [0, R].
        valid_mask: (B, R) bool, True where a region exists. Give exactly one of the two.
        prob: the probability that each existing region is selected, in [0, 1].
        mode: "zero": selected regions become `mask_embedding` (or zeros). "bert": of the selected,
            80% become mask_embedding / zeros, 10% the features of another random existing region of
            the batch, 10% stay as they are.
        mask_embedding: (D,) learned mask row, or None for zeros. It gets the gradient of the rows
            it fills.
        min_masked: a sample with n >= 1 existing regions gets at least min(min_masked, n) selected
            regions: when the draw picks fewer, the regions with the smallest random numbers are added.
        generator: a CPU torch.Generator; the default generator when None. Two 31-bit seeds are
            drawn from it; the same seeds give the same mask on every backend.
        backend: "auto", "triton", "cuda" (the compiled extension mmkernels._C) or "torch" (the
            reference). "auto" runs CUDA tensors on mmkernels.ops._dispatch.AUTO_CUDA_BACKEND's
            choice, CPU float32/float16 on the Triton kernels under TRITON_INTERPRET=1, and
            everything else (CPU bfloat16 included) on the reference; "triton" on a CPU bfloat16
            tensor raises (Triton's interpreter has no bfloat16 support).

    Returns:
        RegionMaskOutput(features (B, R, D) new tensor, mask (B, R) bool of the selected regions).
        Padding regions are never selected and pass through unchanged. Gradients flow to the rows
        that are passed through or copied (as eager indexing gives them) and to mask_embedding.
    """
    _check_region_mask_inputs(
        feats, region_lens, valid_mask, prob, mode, mask_embedding, min_masked, generator, backend
    )
    impl = resolve_backend("region_mask", backend, feats)
    if feats.numel() == 0:
        impl = "torch"
    seed = torch.randint(0, 2**31, (2,), generator=generator, dtype=torch.int64, device="cpu")
    select_below = round(prob * 2**31)
    # no sample has more than R regions, so this changes no mask and keeps the int in 32 bits
    min_masked = min(min_masked, feats.shape[1])
    bert = mode == "bert"
    if region_lens is not None:
        # non_blocking: a blocking host-to-device copy would wait for the GPU to catch up
        region_lens = region_lens.to(device=feats.device, dtype=torch.int64, non_blocking=True)
    if mask_embedding is not None:
        mask_embedding = mask_embedding.to(feats.dtype)
    if impl == "torch":
        existing = _existing_mask(region_lens, valid_mask, feats.shape[1])
        seed0, seed1 = _seeds(seed)
        features, mask = reference.region_mask(
            feats, existing, seed0, seed1, select_below, min_masked, bert, mask_embedding
        )
        return RegionMaskOutput(features, mask)
    features, mask, _ = torch.ops.mmkernels.region_mask_fwd(
        feats, region_lens, valid_mask, mask_embedding, seed, select_below, min_masked, bert, impl
    )
    return RegionMaskOutput(features, mask)

