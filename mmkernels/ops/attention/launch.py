"""The launchers of `cross_attention`'s kernels: allocate the outputs, turn masks into pointers,
strides and flags, and launch the forward and the backward passes (through the CUDA autotuner, or
with fixed blocks under the interpreter)."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from mmkernels.ops._common import last_dim_contiguous, new_output, triton
from mmkernels.ops._dispatch import interpreting
from mmkernels.ops.attention.kernels import (
    LOG2E,
    MASK_ADDITIVE,
    MASK_BOOL,
    MASK_NONE,
    _cross_attention_bwd_dkdv_kernel,
    _cross_attention_bwd_dq_kernel,
    _cross_attention_fwd_kernel,
)
from mmkernels.ops.attention.plan import (
    _EXTRA_TUNE_KEY,
    _INTERPRETER_BLOCKS,
    _TUNE_KEY,
    _block_d,
    _candidates_for,
    _grid,
    _length_bucket,
)


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


def _launch(kernel_name: str, kernel, grid_of, args: list, meta: dict) -> None:
    """Launch with the interpreter's fixed blocks or through the CUDA autotuner of the device that
    holds the first argument (q)."""
    if interpreting():
        blocks = dict(_INTERPRETER_BLOCKS)
        kernel[grid_of(blocks)](*args, **meta, **blocks)
    else:
        capability = torch.cuda.get_device_capability(args[0].device)
        _tuned(kernel_name, capability)[grid_of](*args, **meta)


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


def _unused_gradient(t: Tensor) -> Tensor:
    """What cross_attention_bwd returns for a gradient it was not asked for: an empty tensor."""
    return t.new_empty(0)


def launch_forward(q: Tensor, k: Tensor, v: Tensor, kv_lens: Optional[Tensor], q_lens: Optional[Tensor],
                   key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], seed: Optional[Tensor],
                   is_causal: bool, dropout_p: float, scale: float) -> tuple[Tensor, Tensor]:
    """The forward kernel's launch (what `registered.cross_attention_fwd` runs): out (B, H, Lq, d)
    in (B, Lq, H, d) memory order and the statistics (B, H, 2, Lq)."""
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


def launch_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
                    kv_lens: Optional[Tensor], q_lens: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    attn_mask: Optional[Tensor], seed: Optional[Tensor], is_causal: bool, dropout_p: float,
                    scale: float, need_dq: bool, need_dk: bool, need_dv: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The backward passes' launches (what `registered.cross_attention_bwd` runs): dq, dk, dv,
    a gradient not needed an empty tensor."""
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


def draw_dropout_seed(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """A (1,) int64 Philox seed on `device`, drawn from `generator` (or `device`'s default one)
    without synchronising with the GPU: the kernels load it from memory."""
    source = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=source, generator=generator)
    return seed.to(device, non_blocking=True)
