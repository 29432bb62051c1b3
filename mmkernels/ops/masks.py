"""`AttnSpec`: which keys each query row of `cross_attention` attends, in one type.

Its fields are `cross_attention`'s mask keywords, keys and queries apart, each named by its role:

    kv_lens           (B,) int32/int64: keys at positions >= kv_lens[b] do not exist   (keys)
    q_lens            (B,) int32/int64: rows at positions >= q_lens[b] do not exist    (queries)
    key_padding_mask  (B, Lk) bool, True = padding                                     (keys)
    attn_mask         bool (True = attend) or additive float, broadcastable to (B, H, Lq, Lk)
    is_causal         bool: row i attends keys j <= i, top-left aligned

`AttnSpec.checked(batch, heads, len_q, len_k, device)` validates it once against the attention's
geometry. The constructors translate other libraries' mask conventions into it:

    AttnSpec.from_transformers(attention_mask, ...)     what transformers hands an attention function
    AttnSpec.from_multihead_attention(...)              nn.MultiheadAttention's masks
    AttnSpec.from_extended_mask(mask, ...)              the additive masks of BERT-style fusion models

A query padding mask is never a key mask: the constructors take it as `query_mask` ((B, Lq), True =
a real query), which becomes q_lens; key masks become key_padding_mask and kv_lens. Where Lq == Lk
the shapes cannot tell the two apart, so the argument's name does.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkernels.ops._args import check_bool, check_lengths

__all__ = ["AttnSpec", "additive_mask_kv_lens", "attn_mask_problem"]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class AttnSpec:
    """Lengths and masks of one `cross_attention` call (fields as in the module docstring); every
    field optional. Keyword-only, so that a query mask cannot land in a key field by position;
    compared by identity (its fields are tensors)."""

    kv_lens: Optional[Tensor] = None
    q_lens: Optional[Tensor] = None
    key_padding_mask: Optional[Tensor] = None
    attn_mask: Optional[Tensor] = None
    is_causal: bool = False

    def checked(self, batch: int, heads: int, len_q: int, len_k: int, device: torch.device) -> "AttnSpec":
        """Raise TypeError/ValueError (naming the field and the values seen) unless every field fits
        the attention (batch, heads, len_q, len_k) on `device`; returns the spec with is_causal a bool."""
        check_lengths("kv_lens", self.kv_lens, batch, len_k, "Lk", device)
        check_lengths("q_lens", self.q_lens, batch, len_q, "Lq", device)
        _check_key_padding_mask(self.key_padding_mask, batch, len_k, device)
        _check_attn_mask(self.attn_mask, batch, heads, len_q, len_k, device)
        is_causal = check_bool("is_causal", self.is_causal)
        return self if is_causal is self.is_causal else dataclasses.replace(self, is_causal=is_causal)

    @classmethod
    def from_transformers(cls, attention_mask: Optional[Tensor], *, batch: int, kv_length: int, q_length: int,
                          is_causal: bool = False, query_mask: Optional[Tensor] = None) -> "AttnSpec":
        """The spec of what transformers hands an attention function registered as "mmkernels"
        (what `integrations.transformers.mmkernels_attention_mask` builds):

        - None: no mask; causal when `is_causal` and q_length > 1.
        - a bool (B or 1, Lk) key mask, True = attend: causal attention plus key padding.
        - a bool (B or 1, 1, 1, Lk) key mask, True = attend: key padding.
        - any other 4-D mask (bool True = attend, or additive), broadcastable to (B, H, Lq, Lk): attn_mask.

        A key mask becomes key_padding_mask plus kv_lens = 1 + its last kept key, so the kernels
        skip the blocks of trailing padding. query_mask: (B, Lq), True = a real query (the
        decoder's own padding in a cross-attention); rows past its last real query do not exist.
        """
        q_lens = None if query_mask is None else _query_lengths(query_mask, batch, q_length)
        if attention_mask is None:
            return cls(q_lens=q_lens, is_causal=is_causal and q_length > 1)
        if attention_mask.dim() == 2:
            if attention_mask.dtype != torch.bool:
                raise TypeError(
                    "expected a 2-D attention mask to be the bool causal key mask (B, Lk), True = attend, "
                    f"got dtype {attention_mask.dtype}"
                )
            return cls(q_lens=q_lens, is_causal=True, **_key_mask_fields(attention_mask, batch, kv_length))
        if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool and attention_mask.shape[1:3] == (1, 1):
            return cls(q_lens=q_lens, **_key_mask_fields(attention_mask[:, 0, 0, :], batch, kv_length))
        return cls(q_lens=q_lens, attn_mask=attention_mask)

    @classmethod
    def from_multihead_attention(cls, *, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                                 kv_lens: Optional[Tensor], is_causal: bool, num_heads: int, batch: int, len_q: int,
                                 len_k: int, extra_keys: int, like: Tensor) -> "AttnSpec":
        """The spec of nn.MultiheadAttention's masks (checked by the caller against its shapes):
        key_padding_mask (B, S), bool True = padding or additive; attn_mask (L, S) or (B·H, L, S),
        bool True = NOT allowed or additive; kv_lens (B,). `extra_keys` keys (bias_k, the zero key)
        are appended after the S keys and attended by every query; `like` is the projected q
        (B, H, L, d), whose dtype an additive key_padding_mask takes."""
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(batch, num_heads, len_q, len_k)
            attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            additive = key_padding_mask.to(like.dtype).view(batch, 1, 1, len_k)
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=like.dtype, device=like.device).masked_fill(
                    ~attn_mask, float("-inf")
                )
            attn_mask = additive if attn_mask is None else attn_mask + additive
            key_padding_mask = None
        if extra_keys and (kv_lens is not None or key_padding_mask is not None):
            # The appended keys sit past every sample's length: say "padding" with a mask instead.
            padding = torch.zeros(batch, len_k, dtype=torch.bool, device=like.device)
            if kv_lens is not None:
                kv_lens = kv_lens.to(like.device, non_blocking=True)
                padding = torch.arange(len_k, device=like.device) >= kv_lens.view(batch, 1)
            if key_padding_mask is not None:
                padding = padding | key_padding_mask
            key_padding_mask, kv_lens = F.pad(padding, (0, extra_keys), value=False), None
        if extra_keys and attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, extra_keys), value=True if attn_mask.dtype == torch.bool else 0.0)
        return cls(kv_lens=kv_lens, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal)

    @classmethod
    def from_extended_mask(cls, mask: Optional[Tensor], *, batch: int, len_k: int, like: Tensor,
                           query_mask: Optional[Tensor] = None) -> "AttnSpec":
        """The spec of a BERT-style fusion model's mask: additive, 0 where a key is attended and
        finfo(dtype).min where not, broadcastable to (B, H, Lq, Lk) (the "extended" (B, 1, 1, Lk) key
        mask, or (B, 1, Lq, Lk)); eager adds it to the scores. It goes to the kernels unchanged as
        attn_mask (on `like`'s device; a bool or integer mask is added as numbers, 1.0 / 0.0, in
        `like`'s dtype, as eager adds it), with `additive_mask_kv_lens` as kv_lens. query_mask:
        (B, Lq), True = a real query; rows past its last real query do not exist."""
        q_lens = None if query_mask is None else _query_lengths(query_mask, batch, like.shape[2])
        if mask is None:
            return cls(q_lens=q_lens)
        mask = mask.to(like.device)
        if not mask.is_floating_point():
            return cls(q_lens=q_lens, attn_mask=mask.to(like.dtype))
        return cls(q_lens=q_lens, attn_mask=mask, kv_lens=additive_mask_kv_lens(mask, batch, len_k))


def _lengths_from_keep(keep: Tensor) -> Tensor:
    """(B, L) keep mask (True = real) → (B,) 1 + the position of the last real entry (0 if none)."""
    positions = torch.arange(1, keep.shape[-1] + 1, device=keep.device)
    return (keep * positions).amax(dim=-1)


def _key_mask_fields(keep: Tensor, batch: int, kv_length: int) -> dict:
    """key_padding_mask and kv_lens of a (B or 1, Lk) key keep mask (True = attend)."""
    keep = keep.expand(batch, kv_length)
    return {"key_padding_mask": ~keep, "kv_lens": _lengths_from_keep(keep)}


def _query_lengths(query_mask: Tensor, batch: int, len_q: int) -> Tensor:
    """q_lens of a (B, Lq) query keep mask (True or nonzero = a real query)."""
    if not isinstance(query_mask, Tensor) or query_mask.dim() != 2 or query_mask.shape[1] != len_q \
            or query_mask.shape[0] not in (1, batch):
        seen = tuple(query_mask.shape) if isinstance(query_mask, Tensor) else type(query_mask).__name__
        raise ValueError(f"expected query_mask of shape (B, Lq) = ({batch}, {len_q}), got {seen}")
    return _lengths_from_keep(query_mask.to(torch.bool).expand(batch, len_q))


def additive_mask_kv_lens(mask: Tensor, batch: int, len_k: int) -> Optional[Tensor]:
    """Per-sample key lengths (B,) int32 that skip no key eager attends, from an additive mask
    broadcastable to (B, H, Lq, Lk); None for a bool or integer mask (eager adds it as numbers, so
    it masks no key).

    A key is dead where the mask is ≤ finfo(mask.dtype).min: eager gives it probability exactly 0
    whenever its row has a live key. kv_lens[b] = 1 + the last key live for some query of sample b,
    or Lk where sample b has a row with no live key (eager averages all keys there).
    """
    if not mask.is_floating_point():
        return None
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    live = m4 > torch.finfo(mask.dtype).min
    key_live = live.any(dim=2).any(dim=1)  # (b, Lk), b = B or 1
    dead_row = ~live.any(dim=-1)  # (b, h, q)
    positions = torch.arange(1, len_k + 1, device=mask.device, dtype=torch.int32)
    last_live = (key_live * positions).amax(dim=-1)
    lens = torch.where(dead_row.flatten(1).any(dim=-1), len_k, last_live).to(torch.int32)
    return lens.expand(batch).contiguous()


def attn_mask_problem(mask: Tensor, batch: int, heads: int, len_q: int, len_k: int) -> Optional[str]:
    """Why `mask` cannot be an attn_mask of a (B, H, Lq, Lk) attention (it does not broadcast to
    it, or it requires a gradient, which cross_attention does not give), or None."""
    full = (batch, heads, len_q, len_k)
    try:
        broadcast = torch.broadcast_shapes(tuple(mask.shape), full)
    except RuntimeError:
        broadcast = None
    if mask.dim() > 4 or broadcast != full:
        return f"expected attn_mask broadcastable to (B, H, Lq, Lk) = {full}, got shape {tuple(mask.shape)}"
    if mask.requires_grad:
        return "attn_mask requires grad, but cross_attention gives no gradient for it; detach it"
    return None


def _check_on_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"expected {name} on the inputs' device {device}, got {t.device}")


def _check_key_padding_mask(key_padding_mask, batch: int, len_k: int, device) -> None:
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        seen = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
        raise TypeError(f"expected key_padding_mask to be a bool tensor (True = padding), got {seen}")
    if tuple(key_padding_mask.shape) != (batch, len_k):
        raise ValueError(
            f"expected key_padding_mask of shape (B, Lk) = ({batch}, {len_k}), got {tuple(key_padding_mask.shape)}"
        )
    _check_on_device("key_padding_mask", key_padding_mask, device)


def _check_attn_mask(attn_mask, batch: int, heads: int, len_q: int, len_k: int, device) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"expected attn_mask to be a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"expected attn_mask to be bool (True = attend) or floating (additive), got {attn_mask.dtype}")
    problem = attn_mask_problem(attn_mask, batch, heads, len_q, len_k)
    if problem is not None:
        raise ValueError(problem)
    _check_on_device("attn_mask", attn_mask, device)
