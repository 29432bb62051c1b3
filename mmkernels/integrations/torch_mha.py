"""`nn.MultiheadAttention` instances on mmkernels' kernels: the attention patch `mmkernels.patch`
applies to every nn.MultiheadAttention (open_clip's towers, BridgeTower's vision tower, SigLIP's
pooling head, user models).

The patched forward runs `mmkernels.nn.CrossModalAttention.forward` on the module itself: on a
CrossModalAttention object whose attribute dictionary *is* the nn.MultiheadAttention's `__dict__`
(the same parameters, submodules, flags and training mode; nothing is copied or registered, so the
state_dict, the parameters' identity and `.train()`/`.eval()` are the module's own). CrossModalAttention
has nn.MultiheadAttention's parameter names and forward, so every argument keeps its meaning:
batch_first or not, unbatched inputs, `key_padding_mask` (bool or additive), `attn_mask` ((L, S) or
(N·H, L, S), bool or additive: open_clip's causal text mask), `is_causal`, `bias_k`/`bias_v`,
`add_zero_attn`, kdim/vdim. A module whose class lacks an attribute CrossModalAttention reads is left
as it is (listed in the handle).

Per call, these run the module's own forward instead (counted in `handle.fallbacks`; under
strict=True they raise StrictPatchError):
- `need_weights=True` (nn.MultiheadAttention's default): the kernels never build the (L, S) weights,
  so a caller that asks for them gets them exactly as nn.MultiheadAttention computes them (averaged
  over heads or not, as `average_attn_weights` says). Call with `need_weights=False` to get the
  kernels. Where a known caller discards the weights it asks for by default (SigLIP's and SigLIP2's
  pooling heads take `[0]`), the family patcher uses `patch_multihead_attention(..., weights_discarded_by=...)`
  and that instance returns `(output, None)` through the kernels.
- `is_causal=True` without `attn_mask`, which nn.MultiheadAttention refuses (its error is kept).
- nested-tensor inputs.

One difference remains, documented rather than hidden: a query whose keys are all masked returns
the out-projection of a zero vector (its bias) where nn.MultiheadAttention returns NaN. Attention
dropout draws its mask from mmkernels' generator: the same distribution, not the same draws.
"""
from __future__ import annotations

import functools

from torch import Tensor, nn

from mmkernels.integrations.patching import PatchContext, call_original, register_patcher
from mmkernels.nn.attention import CrossModalAttention

__all__ = ["patch_multihead_attention"]

_PIECE = "mmkernels.nn.CrossModalAttention kernels, with the module's own parameters"


def _attribute_names(module: nn.Module) -> set:
    """Every instance attribute name of a module: plain ones, parameters, buffers and submodules."""
    return set(vars(module)) | set(module._parameters) | set(module._buffers) | set(module._modules)


@functools.cache
def _attributes_read() -> frozenset:
    """The instance attributes a CrossModalAttention has (what its forward may read)."""
    return frozenset(_attribute_names(CrossModalAttention(2, 1)))


def _as_cross_modal_attention(module: nn.MultiheadAttention) -> CrossModalAttention:
    """A CrossModalAttention whose attribute dictionary is `module.__dict__` (a view, no copy)."""
    view = object.__new__(CrossModalAttention)
    object.__setattr__(view, "__dict__", module.__dict__)
    return view


def _unsupported(query: Tensor, key: Tensor, value: Tensor, attn_mask, is_causal: bool) -> str | None:
    if is_causal and attn_mask is None:
        return "is_causal=True without attn_mask"
    if query.is_nested or key.is_nested or value.is_nested:
        return "nested tensor inputs"
    return None


def _forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
             average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention.forward's signature; need_weights=True falls back (see the module docstring)."""
    reason = "need_weights=True" if need_weights else _unsupported(query, key, value, attn_mask, is_causal)
    return _run(self, reason, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                is_causal)


def _forward_weights_discarded(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                               average_attn_weights=True, is_causal=False):
    """For an instance whose only caller discards the weights: returns (output, None) whatever need_weights."""
    reason = _unsupported(query, key, value, attn_mask, is_causal)
    return _run(self, reason, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                is_causal)


def _run(self, reason, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
    """The module's own forward for this call where `reason` says why, else CrossModalAttention's."""
    if reason is not None:
        return call_original(self, reason, query, key, value, key_padding_mask=key_padding_mask,
                             need_weights=need_weights, attn_mask=attn_mask,
                             average_attn_weights=average_attn_weights, is_causal=is_causal)
    return CrossModalAttention.forward(_as_cross_modal_attention(self), query, key, value,
                                       key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal)


def patch_multihead_attention(module: nn.MultiheadAttention, path: str, ctx: PatchContext, *,
                              weights_discarded_by: str | None = None) -> bool:
    """Patch one nn.MultiheadAttention (or record why not). Returns True (the module is handled).

    weights_discarded_by: the name of the caller that asks for the weights by default and discards
    them; that instance then never falls back for need_weights=True.
    """
    if type(module).forward is not nn.MultiheadAttention.forward:
        ctx.skip(path, "attention", f"{type(module).__name__} overrides nn.MultiheadAttention.forward")
        return True
    missing = sorted(_attributes_read() - _attribute_names(module))
    if missing:
        ctx.skip(path, "attention", f"{type(module).__name__} lacks {', '.join(missing)}, which CrossModalAttention reads")
        return True
    if weights_discarded_by is None:
        ctx.replace_forward(module, path, "attention", _PIECE, _forward,
                            falls_back="need_weights=True, is_causal without attn_mask, nested tensors")
    else:
        ctx.replace_forward(module, path, "attention", f"{_PIECE} (weights discarded by {weights_discarded_by})",
                            _forward_weights_discarded, falls_back="is_causal without attn_mask, nested tensors")
    return True  # patched, or listed as skipped by replace_forward


@register_patcher("attention")
def _patch_any_multihead_attention(module, path: str, ctx: PatchContext) -> bool:
    if not isinstance(module, nn.MultiheadAttention):
        return False
    return patch_multihead_attention(module, path, ctx)
