"""The attention patch for the transformers models on the attention registry: CLIP, SigLIP, SigLIP2
and BridgeTower (its text encoder and cross-modal layers; its vision tower is nn.MultiheadAttention,
patched by torch_mha).

These models pick their attention function, and the mask that goes with it, from
`config._attn_implementation` at every call. `model.set_attn_implementation("mmkernels")` would
write that on the config objects, which are shared: two models built from one config (a teacher
and a student, `CLIPModel(config)` twice) share them, and so do a model and its sub-models. So the
patch gives the model's modules a private copy of their configs instead:

- the outermost model of a supported family is found; every module under it that holds a
  transformers config gets a copy (one `copy.deepcopy` with a shared memo, so configs that were one
  object stay one object, and `config.text_config is text_model.config` still holds), with
  `_attn_implementation = "mmkernels"` on it and its sub-configs (a tower that an earlier
  `patch()` switched on its own keeps that patch's copies: each handle undoes its own);
- `integrations.transformers.register()` adds the name "mmkernels" to transformers'
  AttentionInterface and AttentionMaskInterface (no existing name changes), as a set-up of the
  patch (`ctx.set_up`): it runs again in a process that loads a pickled copy of the model, whose
  config copies name "mmkernels";
- undo puts the original config objects back on every module.

While patched, `model.config` is that copy: `model.config._attn_implementation == "mmkernels"`, and
a change made to `model.config` lasts until undo. Calls that the backend cannot compute are decided
by the backend (backend.py), not here.

BridgeTower's `attentions` output: BridgeTowerModel collects its cross-modal layers' self-attention
weights from every call (eager attention always forms them) and passes no `output_attentions` to its
layers, so the backend is never asked for them and returns None for each: a patched BridgeTower
returns the same structure, one (text, image) pair per cross-modal layer, with None in both places,
in every call. Forming them would put an (L, L) matrix per head back into every call the kernels
exist to avoid; a caller that needs them runs the model unpatched.

SigLIP's and SigLIP2's pooling heads call their nn.MultiheadAttention with its default
`need_weights=True` and keep only the output: those instances are patched as "weights discarded"
(see torch_mha), so they run the kernels instead of falling back at every call.
"""
from __future__ import annotations

import copy

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from mmkernels.integrations.patching import PatchContext, register_patcher
from mmkernels.integrations.torch_mha import patch_multihead_attention
from mmkernels.integrations.transformers import backend, compat
from mmkernels.integrations.transformers.compat import family

__all__ = ["ATTENTION_CLASSES"]

# The attention modules of each family that call the function AttentionInterface hands them.
ATTENTION_CLASSES = {
    "clip": ("CLIPAttention",),
    "siglip": ("SiglipAttention",),
    "siglip2": ("Siglip2Attention",),
    "bridgetower": ("BridgeTowerSelfAttention", "BridgeTowerCrossAttention"),
}
_POOLING_HEADS = {"siglip": "SiglipMultiheadAttentionPoolingHead", "siglip2": "Siglip2MultiheadAttentionPoolingHead"}

# The upstream code each family's attention patch mirrors (compat): the mask helpers the backend
# calls or compares against, the code that builds the masks and calls the attention function, the
# attention modules and the eager formula the kernels stand in for.
_MASKING = tuple(f"transformers.masking_utils:{name}" for name in (
    "sdpa_mask", "causal_mask_function", "bidirectional_mask_function", "create_causal_mask",
    "create_bidirectional_mask"))
_MASK_BUILDERS = {
    "clip": ("CLIPTextModel.forward",),
    "siglip": ("SiglipTextModel.forward",),
    "siglip2": ("Siglip2TextModel.forward", "Siglip2VisionModel.forward"),
    "bridgetower": ("BridgeTowerTextModel._create_attention_masks", "BridgeTowerModel.forward"),
}
UPSTREAM = {
    name: compat.declare(
        f"attention: {name}", *_MASKING,
        *(f"transformers.models.{name}.modeling_{name}:{q}" for q in (
            "eager_attention_forward",
            *(f"{cls}.{method}" for cls in classes for method in ("__init__", "forward")),
            *_MASK_BUILDERS[name])))
    for name, classes in ATTENTION_CLASSES.items()
}
POOLING_UPSTREAM = {
    name: compat.declare(f"attention: {name} pooling head", f"transformers.models.{name}.modeling_{name}:{cls}.forward")
    for name, cls in _POOLING_HEADS.items()
}
_PIECE = "mmkernels.cross_attention via transformers' AttentionInterface (attn_implementation='mmkernels')"
_CONFIG_PIECE = "private config copies with attn_implementation='mmkernels' (shared configs untouched)"
_MEMO_KEY = "transformers.attention: config copies"  # ids of the config copies this patch() made


@register_patcher("attention")
def _patch_registry_family(module, path: str, ctx: PatchContext) -> bool:
    if not isinstance(module, PreTrainedModel) or family(module) not in ATTENTION_CLASSES:
        return False
    copies = ctx.memo.setdefault(_MEMO_KEY, set())
    if id(module.config) in copies:
        return False  # under a model of the family that this patch() already switched
    own = list(_not_patched_before(module, path, ctx))
    attention = [(sub_path, sub) for sub_path, sub in own if _is_registry_attention(sub)]
    if not attention and any(_is_registry_attention(sub) for sub in module.modules()):
        return False  # every attention module under it keeps the patch an earlier patch() gave its tower
    reason = compat.incompatibility(f"attention: {family(module)}")
    if reason is not None:
        for sub_path, _ in attention:
            ctx.skip(sub_path, "attention", reason)
        return True
    ctx.set_up(backend.register)
    memo: dict = {}
    for _, sub in own:
        config = sub.__dict__.get("config")
        if isinstance(config, PretrainedConfig) and id(config) not in copies:
            private = copy.deepcopy(config, memo)
            private._attn_implementation = backend.BACKEND_NAME  # also sets it on its sub-configs
            ctx.set_attribute(sub, "config", private)
    copies.update(id(c) for c in memo.values() if isinstance(c, PretrainedConfig))
    ctx.mark_patched(module, path, "attention", _CONFIG_PIECE)
    for sub_path, sub in attention:
        ctx.mark_patched(sub, sub_path, "attention", _PIECE, falls_back="decided by the backend per call")
    return True


def _not_patched_before(module, path: str, ctx: PatchContext):
    """(path, module) of `module`'s subtree, itself included, without the subtrees whose root an
    earlier mmkernels.patch patched for attention (a tower patched on its own before its model):
    those keep their config copies and their handle, so either patch can be undone first."""
    earlier: list[str] = []
    for sub_path, sub in module.named_modules(prefix=path):
        if any(sub_path.startswith(root + ".") for root in earlier):
            continue
        if sub is not module and ctx.is_patched(sub, "attention"):
            earlier.append(sub_path)
            continue
        yield sub_path, sub


def _is_registry_attention(module) -> bool:
    return type(module).__name__ in ATTENTION_CLASSES.get(family(module), ())


@register_patcher("attention")
def _patch_pooling_head(module, path: str, ctx: PatchContext) -> bool:
    name = _POOLING_HEADS.get(family(module))
    if name is None or type(module).__name__ != name:
        return False
    attention = module.attention
    if not isinstance(attention, nn.MultiheadAttention) or ctx.is_patched(attention, "attention"):
        return False
    reason = compat.incompatibility(f"attention: {family(module)} pooling head")
    if reason is not None:
        # Patched as a plain nn.MultiheadAttention it would fall back at every call (the head asks for
        # the weights by default): leave it as it is, listed with the reason.
        ctx.skip(f"{path}.attention", "attention", reason)
        return True
    return patch_multihead_attention(attention, f"{path}.attention", ctx, weights_discarded_by=name)

