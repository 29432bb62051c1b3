"""Hugging Face transformers backend: run a model's attention on `mmkernels.cross_attention`.

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

from mmkernels.ops._args import check_bool
from mmkernels.ops.attention import cross_attention
from mmkernels.ops.masks import AttnSpec

__all__ = ["BACKEND_NAME", "register", "mmkernels_attention_forward", "mmkernels_attention_mask"]

try:  # where transformers records the outputs a forward was asked for (transformers 5.x)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions pass output_attentions down
    _active_collector = None

BACKEND_NAME = "mmkernels"
# The recorded outputs that are attention weights.
_WEIGHT_KEYS = ("attentions", "cross_attentions")

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


def weights_requested(kwargs: dict) -> bool:
    """Whether the caller asked for attention weights: `output_attentions=True` reached this call, or
    transformers' output capturing (`capture_outputs`, which models such as SiglipTextModel use without
    passing the flag down) is collecting attentions for the running forward."""
    if kwargs.get("output_attentions"):
        return True
    collecting = _active_collector.get() if _active_collector is not None else None
    return bool(collecting) and any(key in collecting for key in _WEIGHT_KEYS)


def _check_inputs(query, key, value, attention_mask, kwargs: dict) -> None:
    """Raise before any work on what this backend cannot read: not 4-D q/k/v, masks it does not know,
    keywords that ask for math it does not implement."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            seen = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"attn_implementation='mmkernels' expects {name} of shape (B, heads, L, head_dim), got {seen}"
            )
    batch, _, q_length, _ = query.shape
    kv_length = key.shape[2]
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                "attn_implementation='mmkernels' expects the attention mask as a torch.Tensor or None, "
                f"got {type(attention_mask).__name__}"
            )
        shape = tuple(attention_mask.shape)
        if attention_mask.dim() == 2 and (shape[0] not in (1, batch) or shape[1] != kv_length):
            raise ValueError(
                "attn_implementation='mmkernels' reads a 2-D attention mask as the causal key mask (B, Lk) that "
                f"its mask function builds, expected ({batch}, {kv_length}) (or (1, {kv_length})), got {shape}"
            )
        if attention_mask.dim() == 4 and shape[1:3] == (1, 1) and (shape[0] not in (1, batch) or shape[3] != kv_length):
            raise ValueError(
                "attn_implementation='mmkernels' expects a key mask of shape (B, 1, 1, Lk) = "
                f"({batch}, 1, 1, {kv_length}) (or B = 1), got {shape}"
            )
        if attention_mask.dim() not in (2, 4):
            raise ValueError(
                "attn_implementation='mmkernels' expects a 2-D (B, Lk) or 4-D (B, 1, Lq, Lk) attention mask, "
                f"got shape {shape} (query length {q_length}, key length {kv_length})"
            )
        full = (batch, query.shape[1], q_length, kv_length)
        if attention_mask.dim() == 4 and any(n not in (1, m) for n, m in zip(shape, full)):
            raise ValueError(
                "attn_implementation='mmkernels' expects a 4-D attention mask broadcastable to (B, heads, Lq, Lk) = "
                f"{full}, got shape {shape}"
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


def _eager_attention_with_weights(query, key, value, spec: AttnSpec, scaling: float | None, dropout: float,
                                  training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (its `eager_attention_forward` formula) for the masks that
    `spec` describes: bool masks become the additive finfo(dtype).min mask eager attention
    receives. Returns (attn_output (B, Lq, H, d), attn_weights (B, H, Lq, Lk))."""
    len_q, len_k = query.shape[2], key.shape[2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    allowed = None
    if spec.key_padding_mask is not None:
        allowed = ~spec.key_padding_mask[:, None, None, :]
    if spec.is_causal:
        causal = torch.ones(len_q, len_k, dtype=torch.bool, device=query.device).tril()
        allowed = causal if allowed is None else allowed & causal
    attn_mask = spec.attn_mask
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask if allowed is None else allowed & attn_mask
    elif attn_mask is not None:
        weights = weights + attn_mask
    if allowed is not None:
        zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
        weights = weights + torch.where(allowed, zero, torch.finfo(weights.dtype).min)
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function for `AttentionInterface`, with the signature transformers calls.

    query: (B, H, Lq, d); key, value: (B, Hkv, Lk, d) with H a multiple of Hkv (grouped-query
    attention repeats each key/value head H / Hkv times); attention_mask: what
    `mmkernels_attention_mask` built ((B, Lk) or (B, 1, 1, Lk) bool), or a 4-D bool or additive
    float mask broadcastable to (B, H, Lq, Lk). Dropout `dropout` applies only while
    `module.training`, as in eager attention.

    Returns (attn_output (B, Lq, H, d), None): the kernels never materialise the weights. When the
    caller asks for them (`output_attentions=True`, passed down or being recorded by transformers'
    output capturing), that call computes eager attention's formula
    instead (softmax(q·kᵀ·scaling + the additive finfo.min mask eager attention gets), its dropout)
    and returns (attn_output, attn_weights (B, H, Lq, Lk)), so the weights are never silently
    missing. There a row with every key masked attends all keys uniformly, as in eager attention,
    where the kernels return zeros.
    """
    _check_inputs(query, key, value, attention_mask, kwargs)
    is_causal = False if is_causal is None else check_bool("is_causal", is_causal)
    batch, heads, q_length, _ = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    if kv_heads != heads:
        if heads % kv_heads != 0:
            raise ValueError(
                f"expected the query heads to be a multiple of the key/value heads, got {heads} and {kv_heads}"
            )
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    spec = AttnSpec.from_transformers(attention_mask, batch=batch, q_length=q_length, kv_length=kv_length,
                                      is_causal=is_causal)
    dropout = dropout if module.training else 0.0
    if weights_requested(kwargs):
        return _eager_attention_with_weights(query, key, value, spec, scaling, dropout, module.training)
    out = cross_attention(query, key, value, spec=spec, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2), None
