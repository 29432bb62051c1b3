"""Cross-modal (and self-) attention with per-sample lengths and masks: the public function and its
input checks.

The package: `kernels.py` (the Triton kernels), `plan.py` (block sizes, autotune candidates,
grids), `launch.py` (the launchers), `registered.py` (the registered ops and their autograd),
`reference.py` (the plain-PyTorch path). Lengths and masks come as one `mmkernels.ops.masks.AttnSpec`.

Name chain: `_cross_attention_fwd_kernel` / `_cross_attention_bwd_dq_kernel` /
`_cross_attention_bwd_dkdv_kernel` (Triton) → `launch_forward()` / `launch_backward()` (launchers)
→ `torch.ops.mmkernels.cross_attention_fwd` / `..._bwd` (registered ops) → `cross_attention()`
(public function) → `mmkernels.nn.CrossModalAttention` (module).

CUDA tensors run the kernels (the CPU too, under TRITON_INTERPRET=1); other CPU tensors run
`reference.cross_attention`. Both compute the function that `cross_attention` documents, under
torch.autocast too (autocast off for its work, forward and backward).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from mmkernels.ops._args import check_bool, check_float_tensor, check_real, check_same_device, describe_type
from mmkernels.ops._common import autocast_off, without_autocast
from mmkernels.ops._dispatch import uses_kernels
from mmkernels.ops.attention import reference, registered  # noqa: F401  (registered: defines the ops)
from mmkernels.ops.attention.launch import draw_dropout_seed
from mmkernels.ops.attention.plan import attention_candidates
from mmkernels.ops.masks import AttnSpec

__all__ = ["cross_attention", "attention_candidates", "draw_dropout_seed", "AttnSpec",
           "LAYOUTS", "MAX_HEAD_DIM"]

LAYOUTS = ("bhld", "blhd")
MAX_HEAD_DIM = 256

# The keywords that are shorthand for the fields of an AttnSpec.
_SPEC_KEYWORDS = ("kv_lens", "q_lens", "key_padding_mask", "attn_mask", "is_causal")


# --------------------------------------------------------------------------- input checks


def _check_inputs(q, k, v, spec: AttnSpec, dropout_p, scale, layout, generator) -> AttnSpec:
    """Raise on any invalid input; returns the spec checked against the attention's geometry."""
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
    spec = spec.checked(batch, heads, len_q, len_k, q.device)
    check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"expected dropout_p in [0, 1), got {dropout_p}")
    check_real("scale", scale, optional=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"expected generator to be a torch.Generator, got {describe_type(generator)}")
    return spec


def _spec_of(spec: Optional[AttnSpec], kv_lens, q_lens, key_padding_mask, attn_mask, is_causal) -> AttnSpec:
    """The AttnSpec of a call: `spec`, or the one its mask keywords spell (passing both is a ValueError)."""
    if spec is None:
        return AttnSpec(kv_lens=kv_lens, q_lens=q_lens, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                        is_causal=is_causal)
    if not isinstance(spec, AttnSpec):
        raise TypeError(f"expected spec to be an AttnSpec or None, got {describe_type(spec)}")
    given = [name for name, value in zip(_SPEC_KEYWORDS, (kv_lens, q_lens, key_padding_mask, attn_mask))
             if value is not None]
    given += ["is_causal"] if check_bool("is_causal", is_causal) else []
    if given:
        raise ValueError(f"expected either spec or the mask keywords, got spec and {', '.join(given)}: "
                         f"pass them as AttnSpec fields")
    return spec


# --------------------------------------------------------------------------- public function


def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    spec: Optional[AttnSpec] = None,
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

    - spec: an `AttnSpec` holding the lengths and masks below (kv_lens, q_lens, key_padding_mask,
      attn_mask, is_causal); the keywords of the same names are shorthand for it (passing a spec
      and any of them raises ValueError). Its constructors translate transformers',
      nn.MultiheadAttention's and BERT-style models' masks.
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
    spec = _spec_of(spec, kv_lens, q_lens, key_padding_mask, attn_mask, is_causal)
    spec = _check_inputs(q, k, v, spec, dropout_p, scale, layout, generator)
    if layout == "blhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = cross_attention_unchecked(q, k, v, spec, float(dropout_p), scale, generator)
    return out if layout == "bhld" else out.transpose(1, 2)


def cross_attention_unchecked(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, dropout_p: float, scale: float,
                              generator: Optional[torch.Generator]) -> Tensor:
    """`cross_attention` on checked, normalised arguments: q (B, H, Lq, d), k and v (B, H, Lk, d),
    `spec` checked against them (is_causal a bool), dropout_p and scale floats. Returns
    (B, H, Lq, d) in (B, Lq, H, d) memory order."""
    kv_lens, q_lens, key_padding_mask, attn_mask = spec.kv_lens, spec.q_lens, spec.key_padding_mask, spec.attn_mask
    if uses_kernels("cross_attention", q):
        kv_lens = kv_lens.to(q.device, non_blocking=True) if kv_lens is not None else None
        q_lens = q_lens.to(q.device, non_blocking=True) if q_lens is not None else None
        seed = draw_dropout_seed(generator, q.device) if dropout_p > 0 else None
        with autocast_off(q):
            out, _ = torch.ops.mmkernels.cross_attention_fwd(
                q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, seed, spec.is_causal, dropout_p, scale
            )
        return out
    out = without_autocast(
        functools.partial(reference.cross_attention, generator=generator),
        q, k, v, kv_lens, q_lens, key_padding_mask, attn_mask, spec.is_causal, dropout_p, scale,
    ).to(q.dtype)
    return out.transpose(1, 2).contiguous().transpose(1, 2)
