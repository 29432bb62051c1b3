"""The models the loop trains, built from transformers' own classes and a size preset.

    model = build_model(spec, vocab_size=len(tok), pad_id=..., end_id=..., seed=0)

- task "clip": `CLIPModel` (loss "clip") or `SiglipModel` (loss "siglip"). Presets: tiny (32 px
  images, 2 + 2 layers of width 64: the CPU default), small (64 px, 4 + 4 layers of 256),
  base (ViT-B/16 at 224 px with a 12-layer text tower, as CLIP ViT-B/16 and SigLIP base).
- task "fusion": `FusionPretrainer`, transformers' `LxmertModel` (language, object-relationship and
  cross-modality encoders over padded regions) with three pre-training heads: masked region feature
  regression, masked region classification (a distribution over region classes) and image-text
  matching. Presets: tiny, small, base (LXMERT's 9/5/5 layers of 768 over 36 regions of 2048).

Dropout is 0 everywhere (CLIP's configs have none): with dropout the two variants of the A/B would
draw different masks, and their loss curves could not be compared step by step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

PRESETS = ("tiny", "small", "base")

# vision: image px, patch px, width, layers, heads; text: width, layers, heads, context length
_DUAL = {
    "tiny": dict(image=32, patch=8, v_width=64, v_layers=2, v_heads=2, t_width=64, t_layers=2, t_heads=2,
                 context=32, proj=64),
    "small": dict(image=64, patch=8, v_width=256, v_layers=4, v_heads=4, t_width=256, t_layers=4, t_heads=4,
                  context=32, proj=256),
    "base": dict(image=224, patch=16, v_width=768, v_layers=12, v_heads=12, t_width=512, t_layers=12, t_heads=8,
                 context=77, proj=512),
}
# LXMERT: width, heads, language / cross / region layers, region feature dim, regions, context length
_FUSION = {
    "tiny": dict(width=64, heads=2, l_layers=2, x_layers=1, r_layers=1, region_dim=32, max_regions=8, context=32),
    "small": dict(width=256, heads=4, l_layers=4, x_layers=2, r_layers=2, region_dim=256, max_regions=16,
                  context=32),
    "base": dict(width=768, heads=12, l_layers=9, x_layers=5, r_layers=5, region_dim=2048, max_regions=36,
                 context=32),
}


@dataclass(frozen=True)
class ModelSpec:
    """What the data pipeline must produce for a (task, loss, preset)."""

    task: str
    loss: str
    preset: str

    @property
    def image_size(self) -> int:
        return _DUAL[self.preset]["image"]

    @property
    def context_length(self) -> int:
        table = _FUSION if self.task == "fusion" else _DUAL
        return table[self.preset]["context"]

    @property
    def max_regions(self) -> int:
        return _FUSION[self.preset]["max_regions"]

    @property
    def region_dim(self) -> int:
        return _FUSION[self.preset]["region_dim"]


def _dual_encoder(spec: ModelSpec, vocab_size: int, pad_id: int, end_id: int) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    p = _DUAL[spec.preset]
    vision = dict(image_size=p["image"], patch_size=p["patch"], hidden_size=p["v_width"],
                  intermediate_size=4 * p["v_width"], num_hidden_layers=p["v_layers"],
                  num_attention_heads=p["v_heads"])
    text = dict(vocab_size=vocab_size, hidden_size=p["t_width"], intermediate_size=4 * p["t_width"],
                num_hidden_layers=p["t_layers"], num_attention_heads=p["t_heads"],
                max_position_embeddings=p["context"], pad_token_id=pad_id, eos_token_id=end_id,
                bos_token_id=None)
    if spec.loss == "clip":
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=p["proj"])
        return CLIPModel(config)
    # SigLIP: the text head projects to the vision width (the image embedding is the pooled vision state)
    text.update(hidden_size=p["v_width"], intermediate_size=4 * p["v_width"], num_attention_heads=p["v_heads"],
                projection_size=p["v_width"])
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # the paper's initialisation (transformers zeroes both for loading checkpoints)
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model


class FusionPretrainer(nn.Module):
    """LXMERT with masked-region-modeling and image-text-matching heads.

    forward(input_ids (B, L), attention_mask (B, L), region_feats (B, R, D), region_boxes (B, R, 4),
    region_valid (B, R) bool) -> (feature_pred (B, R, D), class_logits (B, R, K), itm_logits (B, 2)).
    """

    def __init__(self, config, num_region_classes: int):
        super().__init__()
        from transformers import LxmertModel

        self.lxmert = LxmertModel(config)
        width, region_dim = config.hidden_size, config.visual_feat_dim
        self.region_transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12))
        self.feature_head = nn.Linear(width, region_dim)
        self.class_head = nn.Linear(width, num_region_classes)
        self.itm_head = nn.Linear(width, 2)

    def forward(self, input_ids, attention_mask, region_feats, region_boxes, region_valid):
        out = self.lxmert(
            input_ids=input_ids, attention_mask=attention_mask, visual_feats=region_feats,
            visual_pos=region_boxes, visual_attention_mask=region_valid.to(region_feats.dtype),
        )
        regions = self.region_transform(out.vision_output)
        return self.feature_head(regions), self.class_head(regions), self.itm_head(out.pooled_output)


def _fusion(spec: ModelSpec, vocab_size: int, pad_id: int, region_dim: int, num_region_classes: int) -> nn.Module:
    from transformers import LxmertConfig

    p = _FUSION[spec.preset]
    config = LxmertConfig(
        vocab_size=vocab_size, hidden_size=p["width"], num_attention_heads=p["heads"],
        intermediate_size=4 * p["width"], l_layers=p["l_layers"], x_layers=p["x_layers"], r_layers=p["r_layers"],
        visual_feat_dim=region_dim, visual_pos_dim=4, max_position_embeddings=p["context"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=pad_id,
        num_qa_labels=2, num_object_labels=num_region_classes, num_attr_labels=1,
    )
    # a data set without class distributions still gets a (then unused) one-class head
    return FusionPretrainer(config, max(1, num_region_classes))


def build_model(spec: ModelSpec, vocab_size: int, pad_id: int, end_id: int, seed: int,
                region_dim: int = 0, num_region_classes: int = 0) -> nn.Module:
    """The model for `spec`, initialised from `seed` alone (both variants start from the same weights).

    vocab_size, pad_id, end_id: the tokenizer's; region_dim (D) and num_region_classes (K, 0 when the
    data has no class distributions): the fusion task's regions.
    """
    if spec.task == "clip" and spec.loss == "clip" and end_id == 2:
        # CLIPTextTransformer treats eos_token_id == 2 as a legacy config and pools at the largest token id
        raise ValueError("the tokenizer's end token has id 2, which CLIPModel does not pool at; use another tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.task == "fusion":
            return _fusion(spec, vocab_size, pad_id, region_dim, num_region_classes)
        return _dual_encoder(spec, vocab_size, pad_id, end_id)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
