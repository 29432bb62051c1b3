"""Attention of the fusion models whose attention transformers writes by hand, through
`mmkernels.cross_attention`: LXMERT, VisualBERT, ViLT, FLAVA and BLIP (each patch applies where the
module's code is one the tests ran on: see compat).

These models do not go through transformers' attention registry: each attention module computes
softmax(q·kᵀ / √d + mask) · v itself. `replacements()` maps each such module class to a replacement
forward, a pure function `forward(module, *args, **kwargs)` with the module's own signature that
returns what the module's forward returns, with the same parameters, computed by the kernels:

    LxmertAttention          (self- and cross-modality attention; the visual padding mask)
    VisualBertSelfAttention  ViltSelfAttention  FlavaSelfAttention
    BlipAttention            (vision tower; fused qkv projection, no mask)
    BlipTextSelfAttention    (text self-attention, causal in the decoder, and cross-attention)

Whatever a call asks that the kernels cannot give raises `Unsupported(reason)` before any work is
done (no projection, no cache update, no random number drawn), and the patch runs the module's own
forward for that call instead (or raises, under strict): attention weights requested
(`output_attentions=True`, or transformers' output recorder collecting BLIP's attentions), a mask
that needs a gradient or does not broadcast to (B, H, Lq, Lk), a dropout module that is not
`nn.Dropout` or drops everything, a head dim the kernels do not take, keywords the module does not
take. BLIP's key/value cache (the text decoder builds one even in training) is used as eager uses
it: filled, reused, attended over. (Head masks and relative position biases do not exist in these
modules in transformers 5.x.)

Masks. The models hand their attention an additive float mask, 0 where a key is attended and
`finfo(dtype).min` where it is not, shaped (B, 1, 1, Lk) (LXMERT, VisualBERT) or (B, 1, Lq, Lk)
(ViLT, FLAVA, BLIP; causal plus padding in BLIP's decoder). `AttnSpec.from_extended_mask` passes it
to the kernels unchanged as `attn_mask`, read through its strides, so every row computes exactly
eager's function, including the rows where every key is masked: there eager adds finfo.min to every
score, which absorbs the scores, and returns the uniform average of all values; so do the kernels.
On top of it, each sample's trailing keys that are masked for every query become `kv_lens` (one
past the last key some query attends), so the kernels skip their blocks instead of masking them:
text padding, LXMERT's padded regions, ViLT's padded patches. Where a sample has a query row with
no key at all, its kv_lens stays Lk, because skipping would change eager's uniform average. Keys
masked inside the sequence (ViLT's text padding before the image tokens) are masked by the mask.
Bool and integer masks are added as numbers (1.0 / 0.0), as eager adds them. The lengths are
computed on the device from the mask: no host sync.

Dropout on the attention probabilities (training mode, p > 0) comes from the kernels' Philox
stream, not torch's: the same distribution (each probability kept with 1 - p and scaled by
1 / (1 - p)), not the same draws: training with dropout is statistically, not bitwise, the same.
Compare patched and unpatched models in eval mode or with p = 0.

What differs from eager, by design: BLIP's attention modules return `(output, None)`: the
attention probabilities, which eager always returns and its callers discard, are never formed (when
they are requested through `output_attentions`, the call falls back and returns them). A row whose
every key is -inf (transformers never builds such masks; it uses finfo.min) returns zeros where
eager returns NaN.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

from torch import Tensor, nn

from transformers.cache_utils import EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention
from transformers.models.flava.modeling_flava import FlavaSelfAttention
from transformers.models.lxmert.modeling_lxmert import LxmertAttention
from transformers.models.vilt.modeling_vilt import ViltSelfAttention
from transformers.models.visual_bert.modeling_visual_bert import (
    VisualBertRegionToPhraseAttention,
    VisualBertSelfAttention,
)

from mmkernels.integrations.patching import call_original, register_patcher
from mmkernels.integrations.transformers import compat
from mmkernels.integrations.transformers.backend import weights_requested
from mmkernels.ops.attention import MAX_HEAD_DIM, cross_attention
from mmkernels.ops.masks import AttnSpec, attn_mask_problem

__all__ = ["Unsupported", "replacements"]


class Unsupported(Exception):
    """Raised by a replacement forward, before any work, when the kernels cannot compute this call;
    `reason` says why, in words a user reads in a PatchHandle or a strict-mode error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- shared pieces


def _dropout_p(module: nn.Module) -> float:
    """The attention-probability dropout of `module.dropout` as eager applies it (0 in eval mode)."""
    dropout = module.dropout
    if type(dropout) is not nn.Dropout:
        raise Unsupported(f"its dropout is a {type(dropout).__name__}, not nn.Dropout")
    p = float(dropout.p) if dropout.training else 0.0
    if p >= 1.0:
        raise Unsupported(f"dropout p={p} drops every attention probability")
    return p


def _check_head_dim(head_dim: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise Unsupported(f"head dim {head_dim} is outside the kernels' range [1, {MAX_HEAD_DIM}]")


def _check_mask(mask, batch: int, heads: int, len_q: int, len_k: Optional[int]) -> None:
    """Raise Unsupported unless eager would add `mask` to the (B, H, Lq, Lk) scores by plain
    broadcasting, with no gradient to it (the kernels give none). len_k=None: not known yet (a
    cache update decides it); the mask's last dim is checked after, by `_check_mask_keys`."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise Unsupported(f"its attention mask is a {type(mask).__name__}, not a tensor")
    if len_k is None:
        len_k = mask.shape[-1] if mask.dim() > 0 else 1
    problem = attn_mask_problem(mask, batch, heads, len_q, len_k)
    if problem is not None:
        raise Unsupported(f"its attention mask: {problem}")


def _check_mask_keys(mask, len_k: int) -> None:
    """After a cache update: the mask's key dim must fit the keys, as eager's `scores + mask` needs."""
    if mask is not None and mask.dim() > 0 and mask.shape[-1] not in (1, len_k):
        raise ValueError(
            f"expected the attention mask's last dim to be the number of keys {len_k} (after the cache update), "
            f"got mask shape {tuple(mask.shape)}"
        )


def _check_kwargs(module: nn.Module, unexpected: dict) -> None:
    if unexpected:
        raise Unsupported(f"keyword arguments {sorted(unexpected)} that {type(module).__name__}.forward does not take")


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, dropout_p: float) -> Tensor:
    """softmax(scale·q·kᵀ + mask)·v for q (B, H, Lq, d), k, v (B, H, Lk, d) (any strides), as eager
    computes it with an additive mask. Returns (B, Lq, H, d), contiguous."""
    spec = AttnSpec.from_extended_mask(mask, batch=k.shape[0], len_k=k.shape[2], like=q)
    out = cross_attention(q, k, v, spec=spec, scale=scale, dropout_p=dropout_p)
    return out.transpose(1, 2)  # (B, H, Lq, d) in (B, Lq, H, d) memory order: contiguous


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """(B, L, H·d) → (B, H, L, d), a view (eager's `.view(*shape, -1, head_dim).transpose(1, 2)`)."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def _merge_heads(out: Tensor) -> Tensor:
    return out.reshape(*out.shape[:-2], out.shape[-2] * out.shape[-1])


def _bert_style(module: nn.Module, hidden_states: Tensor, context: Tensor, mask) -> Tensor:
    """The BERT-style attention that LXMERT, VisualBERT, ViLT, FLAVA and BLIP's text write:
    separate query/key/value projections, scores / √attention_head_size, additive mask, dropout.
    hidden_states: (B, Lq, E); context: (B, Lk, Ec). Returns the context layer (B, Lq, H·d)."""
    head_dim = module.attention_head_size
    _check_head_dim(head_dim)
    heads = module.query.out_features // head_dim
    _check_mask(mask, hidden_states.shape[0], heads, hidden_states.shape[-2], context.shape[-2])
    dropout_p = _dropout_p(module)
    q = _heads(module.query(hidden_states), head_dim)
    k = _heads(module.key(context), head_dim)
    v = _heads(module.value(context), head_dim)
    out = _attend(q, k, v, mask, 1.0 / math.sqrt(head_dim), dropout_p)
    return _merge_heads(out)


# --------------------------------------------------------------------------- replacement forwards


def lxmert_attention_forward(module, hidden_states, context, attention_mask=None, output_attentions=False,
                             **unexpected):
    """`LxmertAttention.forward`: hidden_states (B, Lq, E) attend context (B, Lk, Ec) (the same
    tensor for self-attention, the other modality for cross-attention) under the extended mask
    (B, 1, 1, Lk). Returns (context_layer (B, Lq, E),)."""
    _check_kwargs(module, unexpected)
    if output_attentions:
        raise Unsupported("attention weights requested (output_attentions=True)")
    return (_bert_style(module, hidden_states, context, attention_mask),)


def bert_self_attention_forward(module, hidden_states, attention_mask=None, output_attentions=False,
                                **unexpected):
    """`VisualBertSelfAttention` / `ViltSelfAttention` / `FlavaSelfAttention.forward`:
    hidden_states (B, L, E), additive mask broadcastable to (B, 1, L, L). Returns (context_layer,)."""
    _check_kwargs(module, unexpected)
    if output_attentions:
        raise Unsupported("attention weights requested (output_attentions=True)")
    return (_bert_style(module, hidden_states, hidden_states, attention_mask),)


def blip_vision_attention_forward(module, hidden_states, **kwargs):
    """`BlipAttention.forward`: hidden_states (B, L, E), fused qkv projection, no mask, scale
    `module.scale`. Returns (output (B, L, E), None); the probabilities are not formed."""
    if weights_requested(kwargs):
        raise Unsupported("attention weights requested (output_attentions)")
    batch, length, embed_dim = hidden_states.shape
    heads = module.num_heads
    head_dim = embed_dim // heads
    _check_head_dim(head_dim)
    dropout_p = _dropout_p(module)
    qkv = module.qkv(hidden_states).reshape(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(dim=0)
    out = _attend(q, k, v, None, module.scale, dropout_p)
    return module.projection(out.reshape(batch, length, embed_dim)), None


def _blip_text_keys_values(module, current_states: Tensor, head_dim: int, is_cross_attention: bool, cache,
                           kwargs: dict) -> tuple[Tensor, Tensor]:
    """Keys and values (B, H, Lk, d) of `BlipTextSelfAttention`, through its cache as eager does: a
    cross-attention layer whose cache is filled reuses it; otherwise project, then append to the cache."""
    is_updated = False
    layer_cache = cache
    if isinstance(cache, EncoderDecoderCache):
        is_updated = cache.is_updated.get(module.layer_idx)
        layer_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
    if is_cross_attention and cache is not None and is_updated:
        return layer_cache.layers[module.layer_idx].keys, layer_cache.layers[module.layer_idx].values
    k = _heads(module.key(current_states), head_dim)
    v = _heads(module.value(current_states), head_dim)
    if cache is not None:
        k, v = layer_cache.update(k, v, module.layer_idx, kwargs=kwargs)
        if is_cross_attention and isinstance(cache, EncoderDecoderCache):
            cache.is_updated[module.layer_idx] = True
    return k, v


def blip_text_attention_forward(module, hidden_states, attention_mask=None, encoder_hidden_states=None,
                                encoder_attention_mask=None, cache=None, **kwargs):
    """`BlipTextSelfAttention.forward`: self-attention over hidden_states (B, L, E), or
    cross-attention to encoder_hidden_states (B, Lk, Ee) when given, under the mask eager picks
    (encoder_attention_mask for cross-attention, attention_mask otherwise; (B, 1, Lq, Lk) additive,
    causal in the decoder), through the key/value cache when one is passed (the decoder in training
    and in generation). Returns (context_layer (B, L, E), None)."""
    past_key_values = kwargs.pop("past_key_values", None)  # the cache's name before transformers 5.24
    if cache is not None and past_key_values is not None:
        raise Unsupported("both cache and past_key_values were passed")
    cache = cache if cache is not None else past_key_values
    if weights_requested(kwargs):
        raise Unsupported("attention weights requested (output_attentions)")
    is_cross_attention = encoder_hidden_states is not None
    mask = encoder_attention_mask if is_cross_attention else attention_mask
    current_states = encoder_hidden_states if is_cross_attention else hidden_states
    head_dim = module.attention_head_size
    _check_head_dim(head_dim)
    heads = module.query.out_features // head_dim
    len_k = current_states.shape[-2] if cache is None else None
    _check_mask(mask, hidden_states.shape[0], heads, hidden_states.shape[-2], len_k)
    dropout_p = _dropout_p(module)
    q = _heads(module.query(hidden_states), head_dim)
    k, v = _blip_text_keys_values(module, current_states, head_dim, is_cross_attention, cache, kwargs)
    _check_mask_keys(mask, k.shape[-2])
    out = _attend(q, k, v, mask, 1.0 / math.sqrt(head_dim), dropout_p)
    return _merge_heads(out), None


def replacements() -> dict[type, Callable]:
    """{attention module class: replacement forward} for transformers' LXMERT, VisualBERT, ViLT,
    FLAVA and BLIP."""
    return {
        LxmertAttention: lxmert_attention_forward,
        VisualBertSelfAttention: bert_self_attention_forward,
        ViltSelfAttention: bert_self_attention_forward,
        FlavaSelfAttention: bert_self_attention_forward,
        BlipAttention: blip_vision_attention_forward,
        BlipTextSelfAttention: blip_text_attention_forward,
    }


# --------------------------------------------------------------------------- registration with mmkernels.patch

# The upstream code each replacement mirrors (compat): the module's constructor (the attributes
# the replacement reads) and its forward.
UPSTREAM = {
    cls: compat.declare(f"attention: {cls.__name__}",
                        *(f"{cls.__module__}:{cls.__name__}.{method}" for method in ("__init__", "forward")))
    for cls in replacements()
}

_PIECE = "mmkernels.cross_attention"
_WEIGHTS = "output_attentions=True"


def _describe(cls: type) -> tuple[str, str]:
    """(piece, falls_back) as a PatchHandle lists them."""
    if cls is BlipAttention:
        return f"{_PIECE} (fused qkv, no mask)", _WEIGHTS
    if cls is BlipTextSelfAttention:
        return f"{_PIECE} (additive mask, padding as kv_lens; through the key/value cache)", _WEIGHTS
    if cls is LxmertAttention:
        return f"{_PIECE} (additive mask, text and region padding as kv_lens)", _WEIGHTS
    return f"{_PIECE} (additive mask, padding as kv_lens)", _WEIGHTS


class _FallingBackOnUnsupported:
    """The patched forward `(module, *args, **kwargs)`: the replacement, or the module's own forward
    for a call it cannot do. A module-level class holding a module-level function, so that a pickled
    patched model loads with it."""

    def __init__(self, replacement: Callable):
        self.replacement = replacement
        self.__name__ = replacement.__name__
        self.__doc__ = replacement.__doc__

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.replacement)

    def __call__(self, module, *args, **kwargs):
        try:
            return self.replacement(module, *args, **kwargs)
        except Unsupported as why:
            return call_original(module, why.reason, *args, **kwargs)


@register_patcher("attention")
def _patch_fusion_attention(module: nn.Module, path: str, ctx) -> bool:
    """Family patcher: the exact attention classes of LXMERT, VisualBERT, ViLT, FLAVA and BLIP (a
    subclass may compute something else); VisualBERT's region-to-phrase scorer is left as it is."""
    cls = type(module)
    if cls is VisualBertRegionToPhraseAttention:
        ctx.skip(path, "attention", "VisualBertRegionToPhraseAttention returns the attention scores themselves, "
                                    "which the kernels never form")
        return True
    replacement = replacements().get(cls)
    if replacement is None:
        return False
    reason = compat.incompatibility(f"attention: {cls.__name__}")
    if reason is not None:
        ctx.skip(path, "attention", reason)
        return True
    piece, falls_back = _describe(cls)
    ctx.replace_forward(module, path, "attention", piece, _FallingBackOnUnsupported(replacement), falls_back)
    return True
