"""The loss patches for transformers' contrastive models: the image-text contrastive loss computed
with `mmkernels.clip_loss` / `mmkernels.siglip_loss` / `mmkernels.info_nce_loss` from the embeddings,
never through an N x N logit matrix that autograd keeps.

- CLIPModel, BlipModel: `clip_loss(image_embeds, text_embeds, logit_scale.exp())`.
- SiglipModel, Siglip2Model: `siglip_loss(image_embeds, text_embeds, logit_scale.exp(), logit_bias)`.
- BridgeTowerForContrastiveLearning: its three one-directional cross-entropies, text to image, text
  to cross-modal and image to cross-modal, each `info_nce_loss(query, keys, logit_scale.exp())`,
  averaged. Its `logits` field is the (N, 3, D) stack of the three normalised embeddings (the model
  returns no N x N matrix); it follows keep_logits as the other families' logits do.
- FlavaForPreTraining: its global contrastive term, `clip_loss(...) * global_contrastive_weight`;
  the rest of its forward (MIM, MLM, ITM, MMM) runs as the model's own code (the patched forward
  runs it with the contrastive weight at 0 for that call, on a view of the model, then adds the
  term).

The patched forward of a dual encoder runs the model's own towers (`get_image_features`,
`vision_model`, ...) exactly as its forward does, then the loss. It returns the model's own output
class with the same fields: `loss` (in the dtype the model's loss has), the embeddings, the tower
outputs, and the logits: with `keep_logits=True` they are computed without autograd (the values the
model returns, detached: backpropagate through `loss`, not through them); with `keep_logits=False`
they are None and no N x N tensor is built (on the kernels path; the CPU reference path of the loss
builds S). `return_dict=False` returns the same tuple as the model.

With `patch(model, global_loss=True)` and a torch.distributed process group of more than one
process initialised at the time of the call, each of these losses is the loss of the global batch
(every process's local pairs concatenated in rank order), computed with `mmkernels.distributed`
(`clip_loss`, `siglip_loss`, `info_nce_loss`; grad_scaling="ddp", so that DDP's averaging gives the
single-process gradient), the same value on every process; FLAVA's global contrastive term likewise
(its MIM, MLM, ITM and MMM terms stay each process's own). The logits stay the local ones (this
process's rows against its own columns). Otherwise the local loss of the call's batch.

Calls the patch does not cover run the model's own forward: `return_loss` not set (no loss asked
for: the logits keep their autograd, nothing is counted); and, counted as fallbacks (StrictPatchError
under strict=True), for FLAVA: `return_dict=False`, torch.distributed initialised without
`global_loss=True` (FLAVA then gathers the embeddings of every process itself), `itm_labels` with both
matching and non-matching pairs (FLAVA then takes the contrastive loss over the matching rows only,
against every column, which is not a square contrastive loss; deciding this reads itm_labels on the
host, one sync).

Not loss patches at all: BlipForImageTextRetrieval computes no loss (its `use_itm_head=False` output
is the similarity matrix the caller asked for).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys

import torch
import torch.nn.functional as F
from transformers import (
    BlipModel,
    BridgeTowerForContrastiveLearning,
    CLIPModel,
    FlavaForPreTraining,
    Siglip2Model,
    SiglipModel,
)
from transformers.utils.generic import can_return_tuple

import mmkernels.distributed as mmd
from mmkernels.ops.contrastive import clip_loss, info_nce_loss, siglip_loss  # public: they check their inputs
from mmkernels.integrations.patching import PatchContext, call_original, patch_state, register_patcher
from mmkernels.integrations.transformers import compat

__all__ = ["LOSS_FORWARDS"]


def _normalized(embeds: torch.Tensor, model) -> torch.Tensor:
    """embeds / ||embeds||, with the model's own norm helper where its module has one (CLIP's)."""
    vector_norm = getattr(sys.modules[type(model).__module__], "_get_vector_norm", None)
    return embeds / (vector_norm(embeds) if vector_norm is not None else embeds.norm(p=2, dim=-1, keepdim=True))


def _loss_dtype(text_embeds: torch.Tensor, scale: torch.Tensor, cross_entropy: bool) -> torch.dtype:
    """The dtype of the model's own loss: its logits' dtype, or fp32 where autocast runs cross_entropy."""
    if cross_entropy and torch.is_autocast_enabled(text_embeds.device.type):
        return torch.float32
    return torch.promote_types(text_embeds.dtype, scale.dtype)


# mmkernels' single-process losses and their global-batch versions
_GLOBAL = {clip_loss: mmd.clip_loss, siglip_loss: mmd.siglip_loss, info_nce_loss: mmd.info_nce_loss}


@torch.compiler.disable
def _global(loss, *args):
    """`loss` (a mmkernels.distributed loss) of the global batch from this process's rows, gradients
    scaled for DDP's averaging. Runs eagerly under torch.compile: its collectives and the ranks'
    check stay outside the graph."""
    return loss(*args, grad_scaling="ddp")


def _loss(model, local, *args):
    """`local` (clip_loss, siglip_loss or info_nce_loss) of this call's pairs, or its
    mmkernels.distributed version of the global batch where the global loss is in force."""
    if patch_state(model).global_loss_world:
        return _global(_GLOBAL[local], *args)
    return local(*args)


def _contrastive(model, image_embeds, text_embeds, bias=None):
    """(loss, logits_per_text, logits_per_image) for normalised (N, D) embeddings: the loss by
    mmkernels (local or global, see the module docstring), the logits without autograd (or None
    without keep_logits)."""
    scale = model.logit_scale.exp().to(text_embeds.device)
    image = image_embeds.to(device=text_embeds.device, dtype=text_embeds.dtype)
    if bias is None:
        loss = _loss(model, clip_loss, image, text_embeds, scale)
    else:
        bias = bias.to(text_embeds.device)
        loss = _loss(model, siglip_loss, image, text_embeds, scale, bias)
    loss = loss.to(_loss_dtype(text_embeds, scale, cross_entropy=bias is None))
    if not patch_state(model).keep_logits:
        return loss, None, None
    with torch.no_grad():
        logits_per_text = torch.matmul(text_embeds, image.t()) * scale
        if bias is not None:
            logits_per_text = logits_per_text + bias
    return loss, logits_per_text, logits_per_text.t()


def _output(model, image_pooled, text_pooled, vision_outputs, text_outputs, bias=None, *, image_on_text=False):
    """The model's own output class from its towers' pooled (N, D) embeddings: normalised, the loss
    by mmkernels (`bias`: SigLIP's), the logits per `keep_logits`. `image_on_text`: image_embeds is
    returned on the text embeddings' device and dtype (BLIP's forward moves it there)."""
    image_embeds, text_embeds = _normalized(image_pooled, model), _normalized(text_pooled, model)
    loss, per_text, per_image = _contrastive(model, image_embeds, text_embeds, bias=bias)
    if image_on_text:
        image_embeds = image_embeds.to(device=text_embeds.device, dtype=text_embeds.dtype)
    return _OUTPUTS[type(model)](loss=loss, logits_per_image=per_image, logits_per_text=per_text,
                                 text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_outputs,
                                 vision_model_output=vision_outputs)


def _without_loss(model, *args, **kwargs):
    """A call with no loss asked for: the model's own forward, uncounted. Its ModelOutput comes back
    (return_dict=True): `can_return_tuple` on the patched forward already took the caller's
    return_dict (or the config's) and makes the tuple if that asks for one."""
    return call_original(model, None, *args, return_dict=True, **kwargs)


@can_return_tuple
def _clip_forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                  return_loss=None, interpolate_pos_encoding=False, **kwargs):
    if not return_loss:
        return _without_loss(self, input_ids, pixel_values, attention_mask, position_ids, return_loss,
                             interpolate_pos_encoding, **kwargs)
    vision_outputs = self.get_image_features(pixel_values=pixel_values,
                                             interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
    text_outputs = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, **kwargs)
    return _output(self, vision_outputs.pooler_output, text_outputs.pooler_output, vision_outputs, text_outputs)


@can_return_tuple
def _siglip_forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                    return_loss=None, interpolate_pos_encoding=False, **kwargs):
    if not return_loss:
        return _without_loss(self, input_ids, pixel_values, attention_mask, position_ids, return_loss,
                             interpolate_pos_encoding, **kwargs)
    vision_outputs = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                       **kwargs)
    text_outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   **kwargs)
    return _output(self, vision_outputs.pooler_output, text_outputs.pooler_output, vision_outputs, text_outputs,
                   bias=self.logit_bias)


@can_return_tuple
def _siglip2_forward(self, input_ids=None, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None,
                     attention_mask=None, position_ids=None, return_loss=None, **kwargs):
    if not return_loss:
        return _without_loss(self, input_ids, pixel_values, pixel_attention_mask, spatial_shapes,
                             attention_mask, position_ids, return_loss, **kwargs)
    vision_outputs = self.vision_model(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                                       spatial_shapes=spatial_shapes, **kwargs)
    text_outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   **kwargs)
    return _output(self, vision_outputs.pooler_output, text_outputs.pooler_output, vision_outputs, text_outputs,
                   bias=self.logit_bias)


@can_return_tuple
def _blip_forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                  return_loss=None, interpolate_pos_encoding=False, **kwargs):
    if not return_loss:
        return _without_loss(self, input_ids, pixel_values, attention_mask, position_ids, return_loss,
                             interpolate_pos_encoding, **kwargs)
    vision_outputs = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                       **kwargs)
    text_outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   **kwargs)
    return _output(self, self.visual_projection(vision_outputs.pooler_output),
                   self.text_projection(text_outputs.pooler_output), vision_outputs, text_outputs,
                   image_on_text=True)


@can_return_tuple
def _bridgetower_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None,
                         pixel_mask=None, inputs_embeds=None, image_embeds=None, return_loss=None, **kwargs):
    """BridgeTowerForContrastiveLearning.forward: the same towers and heads, the loss by info_nce_loss.
    `attentions` is what the patched BridgeTowerModel returns, with or without the loss: one (text,
    image) pair of None per cross-modal layer where eager returns their weights (see attention.py)."""
    if not return_loss:
        return _without_loss(self, input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask,
                             inputs_embeds, image_embeds, return_loss, **kwargs)
    kwargs.setdefault("output_hidden_states", True)
    outputs = self.bridgetower(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               pixel_values=pixel_values, pixel_mask=pixel_mask, inputs_embeds=inputs_embeds,
                               image_embeds=image_embeds, **kwargs)
    hidden_states_txt, hidden_states_img, _ = outputs.hidden_states
    tower = self.bridgetower
    image_with_ln = tower.vision_model.visual.forward_post(hidden_states_img[-1])
    image_type = tower.token_type_embeddings(
        torch.full((1,), 1, dtype=torch.long, device=tower.token_type_embeddings.weight.device)
    ).expand_as(image_with_ln)
    image_hidden = tower.cross_modal_image_transform(image_with_ln) + image_type
    text_embeds = F.normalize(self.itc_text_head(hidden_states_txt[-1][:, 0, :]), dim=-1, p=2)
    image_embeds = F.normalize(self.itc_image_head(image_hidden[:, 0, :]), dim=-1, p=2).to(device=text_embeds.device)
    cross_embeds = F.normalize(self.itc_cross_modal_head(outputs.pooler_output), dim=-1, p=2).to(
        device=text_embeds.device)
    scale = self.logit_scale.exp().to(device=text_embeds.device)
    terms = [_loss(self, info_nce_loss, query, keys, scale) for query, keys in
             ((text_embeds, image_embeds), (text_embeds, cross_embeds), (image_embeds, cross_embeds))]
    loss = (terms[0] + terms[1] + terms[2]) / 3.0
    loss = loss.to(_loss_dtype(text_embeds, scale, cross_entropy=True))
    logits = None
    if patch_state(self).keep_logits:
        with torch.no_grad():
            logits = torch.stack([text_embeds, image_embeds, cross_embeds], dim=-2)
    return _BRIDGETOWER_OUTPUT(loss=loss, logits=logits, text_embeds=text_embeds, image_embeds=image_embeds,
                               cross_embeds=cross_embeds, hidden_states=outputs.hidden_states,
                               attentions=outputs.attentions)


def _flava_forward(self, *args, **kwargs):
    """FlavaForPreTraining.forward with the global contrastive term by mmkernels (see the module
    docstring for the calls that fall back)."""
    bound = _signature(type(self)).bind(self, *args, **kwargs)
    arguments = {**bound.arguments, **bound.arguments.pop("kwargs", {})}
    arguments.pop("self")
    return_loss = arguments.get("return_loss")
    return_loss = return_loss if return_loss is not None else self.config.return_loss
    return_dict = arguments.get("return_dict")
    return_dict = return_dict if return_dict is not None else self.config.return_dict
    if not return_loss or not self.global_contrastive_weight > 0:
        return call_original(self, None, *args, **kwargs)
    reason = _flava_unsupported(self, return_dict, arguments.get("itm_labels"))
    if reason is not None:
        return call_original(self, reason, *args, **kwargs)
    weight = self.global_contrastive_weight
    output = call_original(_without_contrastive_term(self), None, *args, **kwargs)
    if output.image_embeddings is None or output.text_embeddings is None:
        return output  # the model computes no contrastive term for this call either
    text_embedding = F.normalize(self.flava.text_projection(output.text_embeddings[:, 0, :]), dim=-1)
    image_embedding = F.normalize(self.flava.image_projection(output.image_embeddings[:, 0, :]), dim=-1)
    if self.training:
        clamp = sys.modules[type(self).__module__]
        self.flava.logit_scale.data.clamp_(clamp.LOGIT_SCALE_CLAMP_MIN, clamp.LOGIT_SCALE_CLAMP_MAX)
    temperature = self.flava.logit_scale.exp()
    contrastive = _loss(self, clip_loss, image_embedding, text_embedding, temperature).to(
        _loss_dtype(text_embedding, temperature, cross_entropy=True)) * weight
    losses = dataclasses.replace(output.loss_info, global_contrastive=contrastive)
    total = sum(loss if loss is not None else 0 for loss in losses.values())
    per_image = per_text = None
    if patch_state(self).keep_logits:
        with torch.no_grad():
            per_image = torch.matmul(image_embedding, text_embedding.t()) * temperature
            per_text = torch.matmul(text_embedding, image_embedding.t()) * temperature
    return dataclasses.replace(output, loss=total, loss_info=losses, contrastive_logits_per_image=per_image,
                               contrastive_logits_per_text=per_text)


def _without_contrastive_term(model):
    """`model` for one call of its own forward with global_contrastive_weight = 0, so that its code
    skips its N x N term: a view whose attribute dictionary is a copy of the model's with that one
    entry changed (the parameters, submodules, config and training mode are the model's own: the
    dictionaries holding them are shared). The model itself is never written, so a call running
    meanwhile on it (another thread) or code reading it sees its weight."""
    view = object.__new__(type(model))
    object.__setattr__(view, "__dict__", {**model.__dict__, "global_contrastive_weight": 0})
    return view


@functools.cache
def _signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _flava_unsupported(model, return_dict, itm_labels) -> str | None:
    if not return_dict:
        return "return_dict=False"
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not patch_state(model).handle.global_loss:
        return "torch.distributed is initialized (FLAVA gathers the embeddings of every process)"
    if itm_labels is not None and model.itm_weight > 0:
        matching = itm_labels.ne(0)
        if bool(matching.any() & ~matching.all()):  # the one host sync
            return "itm_labels with non-matching pairs (the contrastive loss then covers the matching rows only)"
    return None


# class -> (patched forward, the forward's parameters it was written for)
LOSS_FORWARDS = {
    CLIPModel: (_clip_forward, ("self", "input_ids", "pixel_values", "attention_mask", "position_ids",
                                "return_loss", "interpolate_pos_encoding", "kwargs")),
    SiglipModel: (_siglip_forward, ("self", "input_ids", "pixel_values", "attention_mask", "position_ids",
                                    "return_loss", "interpolate_pos_encoding", "kwargs")),
    Siglip2Model: (_siglip2_forward, ("self", "input_ids", "pixel_values", "pixel_attention_mask", "spatial_shapes",
                                      "attention_mask", "position_ids", "return_loss", "kwargs")),
    BlipModel: (_blip_forward, ("self", "input_ids", "pixel_values", "attention_mask", "position_ids",
                                "return_loss", "interpolate_pos_encoding", "kwargs")),
    BridgeTowerForContrastiveLearning: (_bridgetower_forward, (
        "self", "input_ids", "attention_mask", "token_type_ids", "pixel_values", "pixel_mask", "inputs_embeds",
        "image_embeds", "return_loss", "kwargs")),
    FlavaForPreTraining: (_flava_forward, ("self", "input_ids", "input_ids_masked", "pixel_values",
                                           "codebook_pixel_values", "attention_mask", "token_type_ids",
                                           "bool_masked_pos", "position_ids", "image_attention_mask",
                                           "skip_unmasked_multimodal_encoder", "mlm_labels", "mim_labels",
                                           "itm_labels", "output_attentions", "output_hidden_states",
                                           "return_dict", "return_loss", "kwargs")),
}
_OUTPUTS = {cls: getattr(sys.modules[cls.__module__], cls.__name__.replace("Model", "Output"))
            for cls in (CLIPModel, SiglipModel, Siglip2Model, BlipModel)}
_BRIDGETOWER_OUTPUT = sys.modules[BridgeTowerForContrastiveLearning.__module__].BridgeTowerContrastiveOutput
_PIECES = {
    CLIPModel: "mmkernels.clip_loss", BlipModel: "mmkernels.clip_loss",
    SiglipModel: "mmkernels.siglip_loss", Siglip2Model: "mmkernels.siglip_loss",
    FlavaForPreTraining: "mmkernels.clip_loss for the global contrastive term",
    BridgeTowerForContrastiveLearning: "mmkernels.info_nce_loss for its three one-directional terms",
}
_FALLS_BACK = {FlavaForPreTraining: "return_dict=False, torch.distributed, itm_labels with non-matching pairs"}
_FLAVA_FALLS_BACK_GLOBAL = "return_dict=False, itm_labels with non-matching pairs"
# The upstream code each loss patch mirrors (compat): the forward it replaces, and the helpers that
# define the loss it computes.
_LOSS_HELPERS = {
    CLIPModel: ("CLIPModel.get_image_features", "CLIPModel.get_text_features", "_get_vector_norm",
                "contrastive_loss", "image_text_contrastive_loss"),
    BlipModel: ("contrastive_loss", "image_text_contrastive_loss"),
}
UPSTREAM = {
    cls: compat.declare(f"loss: {cls.__name__}", f"{cls.__module__}:{cls.__name__}.forward",
                        *(f"{cls.__module__}:{name}" for name in _LOSS_HELPERS.get(cls, ())))
    for cls in LOSS_FORWARDS
}


@register_patcher("loss")
def _patch_contrastive_loss(module, path: str, ctx: PatchContext) -> bool:
    entry = LOSS_FORWARDS.get(type(module))
    if entry is None:
        return False
    forward, parameters = entry
    reason = compat.incompatibility(f"loss: {type(module).__name__}")
    if reason is None and tuple(inspect.signature(type(module).forward).parameters) != parameters:
        reason = f"{type(module).__name__}.forward's parameters differ from those the patch was written for"
    if reason is not None:
        ctx.skip(path, "loss", reason)
        return True
    keep = "logits without autograd" if ctx.keep_logits else "no logits, no N x N tensor"
    falls_back = _FALLS_BACK.get(type(module), "")
    if ctx.global_loss and type(module) is FlavaForPreTraining:
        falls_back = _FLAVA_FALLS_BACK_GLOBAL
    ctx.replace_forward(module, path, "loss", f"{_PIECES[type(module)]} ({keep})", forward, falls_back=falls_back)
    return True
