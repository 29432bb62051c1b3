"""Hugging Face transformers backend: run a model's attention on `mmkernels.ops.attention`.

    from mmkernels.integrations.transformers import register
    register()
    model = CLIPModel.from_pretrained(name, attn_implementation="mmkernels")
    # or, on a model already built: model.set_attn_implementation("mmkernels")

`register()` adds the name "mmkernels" to two transformers registries: `AttentionInterface` (the
attention function each attention layer calls) and `AttentionMaskInterface` (the function that
turns the model's 2-D padding mask into what that attention function receives). The second one is
not optional: transformers 5.x hands no mask at all to a backend that has no mask function, so a
padded batch would silently attend to its padding.

What the mask function builds (never a (B, 1, Lq, Lk) tensor for plain padding):

- bidirectional attention (SigLIP, BridgeTower, CLIP's vision tower): `None` without padding, else a
  bool (B, 1, 1, Lk) mask, True = attend. It is also a valid SDPA mask, so model code that reads the
  mask itself (SigLIP2's pooling head) still works. The attention function turns it into a
  (B, Lk) `key_padding_mask`.
- causal attention (CLIP's text tower): a bool (B, Lk) mask, True = attend, the convention
  transformers' own flash-attention backends use for "causal plus key padding"; built even without
  padding, so that causality never depends on the model passing `is_causal=True`. The attention
  function runs it as `is_causal=True` plus `key_padding_mask`.
- anything else (sliding windows, packed sequences, extra mask functions, KV-cache offsets): the
  full bool (B, 1, Lq, Lk) mask from transformers' `sdpa_mask`, run as `attn_mask`.

Causality comes from the mask when there is one (as in eager and SDPA attention, where the mask
transformers built says it all) and from the `is_causal` keyword when there is none, never from
`module.is_causal`: BridgeTower's cross-modal image layers set that attribute yet run bidirectionally
in eager attention. A key mask also passes `kv_lens` (one past the last kept key), so the kernels
skip the blocks of right padding instead of masking them.

A query row with no key left to attend to (a sequence that is all padding) returns zeros, where
eager attention returns the mean of all values.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

from mmkernels.ops.attention import cross_attention

__all__ = ["BACKEND_NAME", "register", "mmkernels_attention_forward", "mmkernels_attention_mask"]

BACKEND_NAME = "mmkernels"

# Keyword arguments some transformers models pass to their attention function that change the math
# in ways mmkernels' attention does not implement.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias",
}


def register() -> None:
    """Register the "mmkernels" attention and mask functions with transformers (idempotent).

    Afterwards `attn_implementation="mmkernels"` works in `from_pretrained`, `from_config` and
    `model.set_attn_implementation`. Other registered names are left as they were.
    """
    AttentionInterface.register(BACKEND_NAME, mmkernels_attention_forward)
    AttentionMaskInterface.register(BACKEND_NAME, mmkernels_attention_mask)


def _padding_keep_mask(attention_mask: torch.Tensor, kv_length: int) -> torch.Tensor:
    """The 2-D keep mask (B, kv_length), True = attend; keys past the mask's end are padding."""
    keep = attention_mask[:, :kv_length].to(torch.bool)
    if keep.shape[1] < kv_length:
        keep = torch.nn.functional.pad(keep, (0, kv_length - keep.shape[1]), value=False)
    return keep


def mmkernels_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for `AttentionMaskInterface`: transformers calls it with the mask's geometry.

    attention_mask: (B, >= kv_length) bool padding mask, True = real token, or None.
    Returns None, a (B, 1, 1, Lk) bool mask (bidirectional with padding), a (B, Lk) bool mask
    (causal, top-left aligned, with padding), or a full (B, 1, Lq, Lk) bool mask (anything else).
    True = attend in all of them.
    """
    no_offsets = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    if no_offsets and mask_function is bidirectional_mask_function:
        if attention_mask is None:
            return None
        return _padding_keep_mask(attention_mask, kv_length)[:, None, None, :]
    if no_offsets and mask_function is causal_mask_function:
        if attention_mask is None:
            return torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
        return _padding_keep_mask(attention_mask, kv_length)
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        device=device,
        **kwargs,
    )


def _check_inputs(attention_mask, kwargs: dict, q_length: int) -> None:
    """Raise before any work when the mask is not a tensor or a keyword asks for unsupported math."""
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            "attn_implementation='mmkernels' expects the attention mask as a torch.Tensor or None, "
            f"got {type(attention_mask).__name__}"
        )
    for name, feature in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"attn_implementation='mmkernels' does not support {feature} (`{name}` was passed); "
                "use attn_implementation='eager' for this model"
            )
    full_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[2] == q_length
    if kwargs.get("sliding_window") is not None and not full_mask:
        raise ValueError(
            "attn_implementation='mmkernels' applies a sliding window only through the attention mask that "
            f"transformers builds, got sliding_window={kwargs['sliding_window']} with "
            + ("no mask" if attention_mask is None else f"a mask of shape {tuple(attention_mask.shape)}")
        )


def _key_mask_arguments(keep: torch.Tensor, batch: int, kv_length: int) -> dict:
    """`cross_attention` arguments for a (B or 1, Lk) keep mask (True = attend): the padding mask,
    plus kv_lens = 1 + the last kept position, so the kernels skip the blocks of trailing padding."""
    keep = keep.expand(batch, kv_length)
    positions = torch.arange(1, kv_length + 1, device=keep.device)
    return {"key_padding_mask": ~keep, "kv_lens": (keep * positions).amax(dim=-1)}


def _mask_arguments(
    attention_mask: torch.Tensor | None, is_causal: bool | None, batch: int, q_length: int, kv_length: int
) -> dict:
    """Translate what the mask function built into `cross_attention` keyword arguments."""
    if attention_mask is None:
        return {"is_causal": bool(is_causal) and q_length > 1}
    if attention_mask.dim() == 2:
        if attention_mask.dtype != torch.bool:
            raise TypeError(
                "attn_implementation='mmkernels' reads a 2-D attention mask as the bool causal key mask "
                f"that its mask function builds, got dtype {attention_mask.dtype}"
            )
        return {"is_causal": True, **_key_mask_arguments(attention_mask, batch, kv_length)}
    if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool and attention_mask.shape[1:3] == (1, 1):
        return _key_mask_arguments(attention_mask[:, 0, 0, :], batch, kv_length)
    return {"attn_mask": attention_mask}


def mmkernels_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for `AttentionInterface`, with the signature transformers calls.

    query: (B, H, Lq, d); key, value: (B, Hkv, Lk, d) with H a multiple of Hkv (grouped-query
    attention repeats each key/value head H / Hkv times); attention_mask: what
    `mmkernels_attention_mask` built, or a 4-D bool or additive float mask broadcastable to
    (B, H, Lq, Lk). Dropout `dropout` applies only while `module.training`, as in eager attention.
    Returns (attn_output (B, Lq, H, d), None): no attention weights are ever materialized.
    """
    batch, heads, q_length, _ = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    _check_inputs(attention_mask, kwargs, q_length)
    if kv_heads != heads:
        if heads % kv_heads != 0:
            raise ValueError(
                f"expected the query heads to be a multiple of the key/value heads, got {heads} and {kv_heads}"
            )
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    out = cross_attention(
        query,
        key,
        value,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        **_mask_arguments(attention_mask, is_causal, batch, q_length, kv_length),
    )
    return out.transpose(1, 2), None
