"""Cross-modal (and self-) attention with per-sample lengths and masks: launchers, registered ops,
autograd, input checks and the public function. The Triton kernels are in `attention_kernels.py`.

Name chain: `_cross_attention_fwd_kernel` / `_cross_attention_bwd_dq_kernel` /
`_cross_attention_bwd_dkdv_kernel` (Triton) → `cross_attention_fwd()` / `cross_attention_bwd()`
(launchers, registered as `torch.ops.mmkernels.cross_attention_fwd` / `..._bwd`) →
`cross_attention()` (public function) → `mmkernels.nn.CrossModalAttention` (module).

CUDA tensors run the kernels (the CPU too, under TRITON_INTERPRET=1); other CPU tensors run
`reference.cross_attention`. Both compute the function that `cross_attention` documents, under
torch.autocast too (autocast off for its work, forward and backward).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from mmkernels.ops import reference
from mmkernels.ops._args import check_bool, check_lengths, check_real, describe_type
from mmkernels.ops._args import check_float_tensor, check_same_device
from mmkernels.ops._common import autocast_off, last_dim_contiguous, new_output, triton, without_autocast
from mmkernels.ops._dispatch import interpreting, triton_enabled
from mmkernels.ops.attention_kernels import (
    LOG2E,
    MASK_ADDITIVE,
    MASK_BOOL,
    MASK_NONE,
    _cross_attention_bwd_dkdv_kernel,
    _cross_attention_bwd_dq_kernel,
    _cross_attention_fwd_kernel,
)

__all__ = ["cross_attention", "attention_candidates", "draw_dropout_seed",
           "LAYOUTS", "MAX_HEAD_DIM"]

LAYOUTS = ("bhld", "blhd")
MAX_HEAD_DIM = 256


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

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of the CUDA autotuner, by kernel, target and
# padded head dim ("small": 16, 32 and 64). Each one compiles with ptxas for its target without a
# register spill at head dims 16, 32, 64, 96, 128, 200 and 256 in the variants checked (no flag;
# lengths, key padding, an additive mask, causal and dropout; the same with a bool mask; fp16 also
# without dropout), and fits the target's shared memory (sm_80: 163 KiB, sm_90: 227 KiB). ptxas
# trades a few bytes of spill for a register count at an occupancy step where it sees fit, so a
# variant not checked can still spill a little (the project's compile check compiles every variant
# the launcher can pick; float64 masks reach the kernels as fp32).
# On sm_90 the products' M side (BLOCK_M in the forward and dq passes, BLOCK_N in the dk/dv pass,
# whose products are in (key, query) orientation) is a multiple of 64 and num_warps a multiple of
# 4, so that fp16/bf16 products are warpgroup MMAs (wgmma), except at d = 256 (see
# _SM90_CANDIDATES).
_SM80_CANDIDATES = {
    "fwd": {
        "small": [(64, 32, 4, 3)],
        128: [(64, 32, 8, 3, 168)],
        256: [(32, 16, 4, 2)],
    },
    "dq": {
        "small": [(32, 32, 4, 3)],
        128: [(64, 32, 8, 3)],
        256: [(32, 16, 4, 2), (32, 16, 8, 2)],
    },
    "dkdv": {
        "small": [(16, 64, 4, 2)],
        128: [(16, 64, 8, 3)],
        256: [(16, 32, 8, 2), (32, 32, 8, 2)],
    },
}
# At d = 256 every warpgroup tile tried on sm_90 (64 or 128 rows, 4 or 8 warps, 1 or 2 stages)
# spills: the 64 x 256 fp32 accumulator of p·v, kept live by the asynchronous wgmma while the next
# block's scores, masks and dropout bits are computed, leaves too few of the 255 registers. That
# head dim runs 32-row tiles there (mma.sync); the compile check reads this set.
SM90_MMA_SYNC_HEAD_DIMS = frozenset({256})
_SM90_CANDIDATES = {
    "fwd": {
        "small": [(64, 32, 4, 3), (128, 32, 8, 3)],
        128: [(64, 32, 8, 3)],
        256: [(32, 16, 4, 2)],
    },
    "dq": {
        "small": [(64, 32, 4, 3), (128, 32, 8, 3)],
        128: [(128, 16, 8, 3), (64, 16, 4, 3)],
        256: [(32, 16, 8, 2)],
    },
    "dkdv": {
        "small": [(16, 64, 4, 3), (32, 128, 8, 3)],
        128: [(16, 64, 8, 3)],
        256: [(16, 16, 4, 2), (16, 32, 8, 2)],
    },
}
# fp32 runs DOT_PRECISION="ieee": FMA products, as accurate as eager fp32 (tf32 products would not
# meet the numerics rule, an error at most 2x eager fp32's against float64). An FMA product holds
# each thread's rows and columns of both operands over the whole head dim in registers, so only
# small tiles compile without spills (8 warps share a 16 x 16 tile where the head dim needs it); the same ones
# on every target. Left to itself ptxas caps some of these at 80 or 128 registers and spills a few
# bytes (an occupancy step it aims at); the fifth entry, `maxnreg` = 255, lifts that cap (a lower
# explicit cap, 128 or 168, spills more).
_FP32_CANDIDATES = {
    "fwd": {
        "small": [(16, 16, 4, 2, 255), (32, 16, 4, 2, 255)],
        128: [(16, 16, 8, 2, 255)],
        256: [(16, 16, 8, 2, 255)],
    },
    "dq": {
        "small": [(16, 16, 4, 2, 255)],
        128: [(16, 16, 8, 2, 255)],
        256: [(16, 16, 8, 2, 255)],
    },
    "dkdv": {
        "small": [(16, 16, 8, 2, 255)],
        128: [(16, 16, 4, 1, 255)],
        256: [(16, 16, 8, 1, 255)],
    },
}
_TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "HAS_KV_LENS", "HAS_Q_LENS", "HAS_KPM", "MASK_KIND",
             "IS_CAUSAL", "HAS_DROPOUT"]
# The backward passes' variants (which gradients they compute) are tuned apart.
_EXTRA_TUNE_KEY = {"fwd": [], "dq": ["COMPUTE_DQ"], "dkdv": ["COMPUTE_DK", "COMPUTE_DV"]}


def _group(block_d: int):
    return block_d if block_d >= 128 else "small"


def _candidate_tables(dtype: torch.dtype, capability: tuple[int, int]) -> dict:
    if dtype == torch.float32:
        return _FP32_CANDIDATES
    return _SM90_CANDIDATES if capability[0] >= 9 else _SM80_CANDIDATES


def attention_candidates(kernel: str, block_d: int, dtype: torch.dtype,
                         capability: tuple[int, int]) -> list[tuple[int, ...]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) configs that the CUDA autotuner tries for one of
    the kernels ("fwd", "dq" or "dkdv") at a padded head dim (BLOCK_D: 16, 32, 64, 128 or 256), an
    input dtype and a device's compute capability, e.g. (9, 0). Capabilities below 9 take the
    sm_80 list, 9 and above the sm_90 one (devices with less shared memory than the A100 skip the
    configs that do not fit, as the autotuner skips any that fail to launch)."""
    return list(_candidate_tables(dtype, capability)[kernel][_group(block_d)])


def _shape_of(config) -> tuple:
    shape = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    return shape + ((config.maxnreg,) if config.maxnreg is not None else ())


def _config(shape: tuple):
    """A candidate (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) as a triton.Config."""
    block_m, block_n, warps, stages, *maxnreg = shape
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg[0] if maxnreg else None)


def _candidates_for(kernel: str, capability: tuple[int, int]):
    """Every config that `attention_candidates` lists for the kernel on this capability, and a
    pruner keeping those of the call's head dim and dtype whose blocks do not exceed the
    (power-of-two) lengths, or else the smallest of them."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        group = set(attention_candidates(kernel, args["BLOCK_D"], args["Q"].dtype, capability))
        candidates = [c for c in configs if _shape_of(c) in group]
        fitting = [
            c for c in candidates
            if c.kwargs["BLOCK_M"] <= max(args["LQ_BUCKET"], 16) and c.kwargs["BLOCK_N"] <= max(args["LK_BUCKET"], 16)
        ]
        return fitting or [min(candidates, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    shapes = sorted({
        shape
        for dtype in (torch.float16, torch.float32)
        for group in _candidate_tables(dtype, capability)[kernel].values()
        for shape in group
    })
    configs = [_config(shape) for shape in shapes]
    return configs, prune


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, capability: tuple[int, int]):
    """The CUDA autotuner around one of the three attention kernels for a compute capability
    (built on first use)."""
    kernel = {
        "fwd": _cross_attention_fwd_kernel,
        "dq": _cross_attention_bwd_dq_kernel,
        "dkdv": _cross_attention_bwd_dkdv_kernel,
    }[kernel_name]
    configs, prune = _candidates_for(kernel_name, capability)
    key = _TUNE_KEY + _EXTRA_TUNE_KEY[kernel_name]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


def _grid(length: int, block: str, batch: int, heads: int):
    """The launch grid of a kernel whose programs each take `block` rows of `length`: one axis of
    n_blocks · B · H programs (axes 1 and 2 are capped at 65535 on CUDA; axis 0 at 2^31 - 1)."""
    return lambda meta: (triton.cdiv(length, meta[block]) * batch * heads,)


def _launch(kernel_name: str, kernel, grid_of, args: list, meta: dict) -> None:
    """Launch with the interpreter's fixed blocks or through the CUDA autotuner of the device that
    holds the first argument (q)."""
    if interpreting():
        blocks = dict(_INTERPRETER_BLOCKS)
        kernel[grid_of(blocks)](*args, **meta, **blocks)
    else:
        capability = torch.cuda.get_device_capability(args[0].device)
        _tuned(kernel_name, capability)[grid_of](*args, **meta)


# --------------------------------------------------------------------------- launchers


def _grad_buffer(t: Tensor) -> Tensor:
    """A (B, H, L, d) buffer for the gradient of t: in (B, L, H, d) memory order when t is a view
    of such a tensor (its head stride below its length stride), so that the gradient flows back
    into the caller's projection without a transposing copy; contiguous otherwise."""
    batch, heads, length, head_dim = t.shape
    if t.stride(1) < t.stride(2):
        return new_output((batch, length, heads, head_dim), t.dtype, t.device).transpose(1, 2)
    return new_output((batch, heads, length, head_dim), t.dtype, t.device)


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
        mask, mask_strides, mask_kind = q, (0, 0, 0, 0), MASK_NONE
    else:
        if attn_mask.dtype == torch.float64:
            # The kernels add the mask in fp32: round it once here, finite entries past fp32's range
            # clamped to ±1e38 so that they stay finite (a finite mask masks nothing); ±inf and NaN
            # stay as they are. (Kernels specialised for float64 masks would cost registers.)
            attn_mask = torch.where(attn_mask.isinf(), attn_mask, attn_mask.clamp(-1e38, 1e38)).to(torch.float32)
        mask = attn_mask.expand(batch, heads, len_q, len_k)
        if mask.dtype == torch.bool:
            mask, mask_kind = mask.view(torch.uint8), MASK_BOOL
        else:
            mask_kind = MASK_ADDITIVE
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

    Returns out (B, H, Lq, d), allocated in (B, Lq, H, d) memory order, and the fp32 softmax
    statistics (B, H, 2, Lq) of each row in log2 units: [:, :, 0] its largest score M, [:, :, 1]
    LG = log2 Σ_j exp2(s_j − M); both +inf for rows with no key and rows past q_lens.
    """
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    out = new_output((batch, len_q, heads, head_dim), q.dtype, q.device).transpose(1, 2)
    stats = new_output((batch, heads, 2, len_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, stats
    kpm, kpm_strides, mask, mask_strides, mask_kind = _mask_args(q, k, key_padding_mask, attn_mask)
    args = [
        q, k, v, out, stats,
        _pointer(kv_lens, q), _pointer(q_lens, q), kpm, mask, _pointer(seed, q),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *kpm_strides, *mask_strides,
        heads, len_q, len_k, scale * LOG2E, dropout_p, _length_bucket(len_q), _length_bucket(len_k),
    ]
    meta = _meta(q, kv_lens, q_lens, key_padding_mask, mask_kind, is_causal, dropout_p)
    _launch("fwd", _cross_attention_fwd_kernel, _grid(len_q, "BLOCK_M", batch, heads), args, meta)
    return out, stats


@cross_attention_fwd.register_fake
def _(q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, seed, is_causal, dropout_p, scale):
    batch, heads, len_q, head_dim = q.shape
    out = q.new_empty(batch, len_q, heads, head_dim).transpose(1, 2)
    return out, q.new_empty(batch, heads, 2, len_q, dtype=torch.float32)


def _unused_gradient(t: Tensor) -> Tensor:
    """What cross_attention_bwd returns for a gradient it was not asked for: an empty tensor."""
    return t.new_empty(0)


@torch.library.custom_op("mmkernels::cross_attention_bwd", mutates_args=())
def cross_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    kv_lens: Optional[Tensor],
    q_lens: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    seed: Optional[Tensor],
    is_causal: bool,
    dropout_p: float,
    scale: float,
    need_dq: bool,
    need_dk: bool,
    need_dv: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward passes that the needed gradients take: the dq pass (which computes
    delta = rowsum(dO · O) too) when dq or dk is needed (delta alone, without dq's three matrix
    products per tile, when only dk is), then the dk/dv pass when dk or dv is needed (only
    pᵀ·dO per tile when only dv is).

    dout, out: (B, H, Lq, d); stats: (B, H, 2, Lq) from the forward. Returns dq, dk, dv shaped and
    strided like q, k, v; a gradient not needed is an empty tensor and costs nothing.
    """
    dq = _grad_buffer(q) if need_dq else _unused_gradient(q)
    dk = _grad_buffer(k) if need_dk else _unused_gradient(k)
    dv = _grad_buffer(v) if need_dv else _unused_gradient(v)
    dout = last_dim_contiguous(dout)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    kpm, kpm_strides, mask, mask_strides, mask_kind = _mask_args(q, k, key_padding_mask, attn_mask)
    lens_and_masks = [_pointer(kv_lens, q), _pointer(q_lens, q), kpm, mask, _pointer(seed, q)]
    sizes = [heads, len_q, len_k, scale * LOG2E, scale, dropout_p, _length_bucket(len_q), _length_bucket(len_k)]
    meta = _meta(q, kv_lens, q_lens, key_padding_mask, mask_kind, is_causal, dropout_p)
    rows = batch * heads
    delta = stats
    if (need_dq or need_dk) and rows * len_q > 0:
        delta = new_output((batch, heads, len_q), torch.float32, q.device)
        dq_out = dq if need_dq else q
        dq_args = [q, k, v, out, dout, stats, delta, dq_out, *lens_and_masks,
                   *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq_out.stride(),
                   *kpm_strides, *mask_strides, *sizes]
        _launch("dq", _cross_attention_bwd_dq_kernel, _grid(len_q, "BLOCK_M", batch, heads), dq_args,
                dict(meta, COMPUTE_DQ=need_dq))
    if (need_dk or need_dv) and rows * len_k > 0:
        dk_out, dv_out = (dk if need_dk else k), (dv if need_dv else v)
        dkdv_args = [q, k, v, dout, stats, delta, dk_out, dv_out, *lens_and_masks,
                     *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk_out.stride(), *dv_out.stride(),
                     *kpm_strides, *mask_strides, *sizes]
        _launch("dkdv", _cross_attention_bwd_dkdv_kernel, _grid(len_k, "BLOCK_N", batch, heads), dkdv_args,
                dict(meta, COMPUTE_DK=need_dk, COMPUTE_DV=need_dv))
    return dq, dk, dv


@cross_attention_bwd.register_fake
def _(dout, q, k, v, out, stats, kv_lens, q_lens, key_padding_mask, attn_mask, seed, is_causal, dropout_p, scale,
      need_dq, need_dk, need_dv):
    return tuple(_grad_buffer(t) if needed else _unused_gradient(t)
                 for t, needed in ((q, need_dq), (k, need_dk), (v, need_dv)))


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, seed, is_causal, dropout_p, scale = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, kv_lens, q_lens, key_padding_mask, attn_mask, seed)
    ctx.is_causal, ctx.dropout_p, ctx.scale = is_causal, dropout_p, scale
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dout, dstats):
    q, k, v, out, stats, kv_lens, q_lens, key_padding_mask, attn_mask, seed = ctx.saved_tensors
    need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
    dq, dk, dv = torch.ops.mmkernels.cross_attention_bwd(
        dout, q, k, v, out, stats, kv_lens, q_lens, key_padding_mask, attn_mask, seed,
        ctx.is_causal, ctx.dropout_p, ctx.scale, need_dq, need_dk, need_dv,
    )
    grads = [g if needed else None for g, needed in zip((dq, dk, dv), (need_dq, need_dk, need_dv))]
    return (*grads, None, None, None, None, None, None, None, None)


cross_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def draw_dropout_seed(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """A (1,) int64 Philox seed on `device`, drawn from `generator` (or `device`'s default one)
    without synchronising with the GPU: the kernels load it from memory."""
    source = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=source, generator=generator)
    return seed.to(device, non_blocking=True)


# --------------------------------------------------------------------------- input checks


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


def _check_inputs(q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, dropout_p, scale, layout, generator) -> None:
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
    check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"expected dropout_p in [0, 1), got {dropout_p}")
    check_real("scale", scale, optional=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"expected generator to be a torch.Generator, got {describe_type(generator)}")


# --------------------------------------------------------------------------- public function


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

    - kv_lens: (B,) int32/int64, keys at positions ≥ kv_lens[b] do not exist (their blocks are
      never loaded); q_lens: (B,), query rows at positions ≥ q_lens[b] do not exist. Either may
      live on the CPU; values are validated there, while lengths already on the GPU are clamped
      to [0, L] by the kernels (checking them would need a sync).
    - key_padding_mask: (B, Lk) bool, True = padding (nn.MultiheadAttention's convention).
    - attn_mask: bool (True = attend, SDPA's convention) or additive float, broadcastable to
      (B, H, Lq, Lk); read through broadcast strides, never expanded. No gradient flows to it.
    - is_causal: a bool (or numpy.bool_); query i attends keys j ≤ i, aligned top-left as SDPA
      does when Lq ≠ Lk.
    - dropout_p: dropout on the attention probabilities, Philox-driven from a seed drawn from
      `generator` (or the default generator of q's device) without a GPU sync; the same seed gives
      the same result, and the backward regenerates the mask instead of storing it.
    - scale: defaults to d ** -0.5.

    What each row computes (both paths, the kernels and the CPU reference, compute exactly this):

    - Rows and keys that do not exist (past q_lens / kv_lens) are never read: nothing they hold,
      NaN included, changes any result. A row that does not exist returns zeros and passes no
      gradient; keys that do not exist get zero gradients.
    - An existing row i *attends* key j when j exists and no mask removes it: key_padding_mask[b, j]
      is False, a bool attn_mask is True, an additive attn_mask is not -inf, and j ≤ i if is_causal.
      A finite additive mask removes nothing, however negative: a row whose keys all carry
      finfo(dtype).min attends them all (uniformly, as eager attention and nn.MultiheadAttention do),
      and so does a float64 mask whose values lie below fp32's range (-1e300) for fp32 inputs.
    - *A row with no key* is an existing row that attends no key. Masks and lengths alone decide
      it, never the values. It returns zeros and passes zero gradient to its query, never NaN.
    - Any other row returns softmax over its attended keys of (scale · q_i·k_j + attn_mask_ij),
      times v. *A row whose scores are NaN* (NaN in q_i, in an attended k_j or mask entry, or a
      +inf score; also attended scores that are all -inf from the data, an Inf in q_i, as 0 / 0)
      returns NaN in every element, whatever dropout drops, and passes NaN to its query's
      gradient. A NaN or Inf in the value of an attended key makes the row non-finite.
    - The value of a key that exists but that row i does not attend enters as 0 · v_j, as in eager
      attention and nn.MultiheadAttention, where 0 · NaN = NaN: a NaN or Inf there may make row i
      NaN (eager: always; the kernels: where they read that key's block, never past the causal
      diagonal's). Likewise a non-finite input reaches the gradients of other rows and keys through
      zero probabilities, as in eager's backward. To have padding never read, pass it as kv_lens.

    Work: 4·d FLOPs per visited (query, key) pair forward, 14·d backward (the score and dO·vᵀ
    products are recomputed: q·kᵀ three times per step, dO·vᵀ twice). Key blocks past kv_lens and
    past the causal diagonal are skipped. The backward runs only the passes that the gradients
    asked for need: frozen k and v cost no dk/dv pass, a frozen q no dq products.
    """
    _check_inputs(q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, dropout_p, scale, layout, generator)
    is_causal = check_bool("is_causal", is_causal)
    dropout_p = float(dropout_p)
    if layout == "blhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if triton_enabled(q):
        kv_lens = kv_lens.to(q.device, non_blocking=True) if kv_lens is not None else None
        q_lens = q_lens.to(q.device, non_blocking=True) if q_lens is not None else None
        seed = draw_dropout_seed(generator, q.device) if dropout_p > 0 else None
        with autocast_off(q):
            out, _ = torch.ops.mmkernels.cross_attention_fwd(
                q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, seed, is_causal, dropout_p, scale
            )
    else:
        out = without_autocast(
            functools.partial(reference.cross_attention, generator=generator),
            q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, is_causal, dropout_p, scale,
        ).to(q.dtype)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out if layout == "bhld" else out.transpose(1, 2)
