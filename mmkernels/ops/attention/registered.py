"""The registered ops of `cross_attention`: `torch.ops.mmkernels.cross_attention_fwd` and
`torch.ops.mmkernels.cross_attention_bwd` (torch.library custom ops, with their fake
implementations for torch.compile and the forward's autograd), each the launcher of the same name
in `launch.py`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmkernels.ops.attention.launch import _grad_buffer, _unused_gradient, launch_backward, launch_forward


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
    return launch_forward(q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, seed, is_causal, dropout_p, scale)


@cross_attention_fwd.register_fake
def _(q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, seed, is_causal, dropout_p, scale):
    batch, heads, len_q, head_dim = q.shape
    out = q.new_empty(batch, len_q, heads, head_dim).transpose(1, 2)
    return out, q.new_empty(batch, heads, 2, len_q, dtype=torch.float32)


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
    return launch_backward(dout, q, k, v, out, stats, kv_lens, q_lens, key_padding_mask, attn_mask, seed,
                           is_causal, dropout_p, scale, need_dq, need_dk, need_dv)


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
