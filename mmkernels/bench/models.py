"""Whole-model training steps for the patched-model benchmark: the model as transformers builds it
("transformers": its default attention implementation, SDPA where the model supports it; the
contrastive loss through the N x N logits) against the same model after `mmkernels.patch(model)`.

Sizes: "base" is CLIP ViT-B/16 (vision: 224 px, patch 16, 768 wide, 12 layers, 12 heads; text: 77
tokens, 512 wide, 12 layers, 8 heads; projection 512) and LXMERT base (768 wide, 9 language, 5
object-relationship and 5 cross-modality layers; 20 tokens, up to 36 regions of 2048 features);
"tiny" is one layer per stack, 64 wide, for the CPU.
"""
from __future__ import annotations

import torch

import mmkernels
from mmkernels.bench.steps import NotRun

CLIP_SIZES = {
    "base": dict(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           image_size=224, patch_size=16),
        projection_dim=512),
    "tiny": dict(
        text_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1,
                           image_size=32, patch_size=8),
        projection_dim=32),
}
LXMERT_SIZES = {
    "base": (dict(), 20, 36),  # transformers' defaults are LXMERT base; 20 tokens, 36 regions
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, l_layers=1, x_layers=1, r_layers=1,
                  visual_feat_dim=32, vocab_size=200), 16, 10),
}


def _lengths(batch, longest, generator, device):
    """Varied lengths in [longest // 4, longest]: real padding in every batch."""
    return torch.randint(max(1, longest // 4), longest + 1, (batch,), generator=generator, device=device)


def _prefix_mask(lengths, length, device):
    return (torch.arange(length, device=device)[None, :] < lengths[:, None]).long()


def _clip(batch, size, device, dtype):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**CLIP_SIZES[size])
    model = CLIPModel(config).to(device, dtype).train()
    g = torch.Generator(device=device).manual_seed(0)
    text_length = config.text_config.max_position_embeddings
    image_size = config.vision_config.image_size
    inputs = dict(
        input_ids=torch.randint(0, config.text_config.vocab_size, (batch, text_length), generator=g, device=device),
        attention_mask=_prefix_mask(_lengths(batch, text_length, g, device), text_length, device),
        pixel_values=torch.randn(batch, 3, image_size, image_size, generator=g, device=device, dtype=dtype),
    )

    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs, return_loss=True).loss.backward()
    return model, step


def _lxmert(batch, size, device, dtype):
    from transformers import LxmertConfig, LxmertModel

    overrides, text_length, regions = LXMERT_SIZES[size]
    config = LxmertConfig(**overrides)
    model = LxmertModel(config).to(device, dtype).train()
    g = torch.Generator(device=device).manual_seed(0)
    inputs = dict(
        input_ids=torch.randint(0, config.vocab_size, (batch, text_length), generator=g, device=device),
        attention_mask=_prefix_mask(_lengths(batch, text_length, g, device), text_length, device),
        visual_feats=torch.randn(batch, regions, config.visual_feat_dim, generator=g, device=device, dtype=dtype),
        visual_pos=torch.rand(batch, regions, config.visual_pos_dim, generator=g, device=device, dtype=dtype),
        visual_attention_mask=_prefix_mask(_lengths(batch, regions, g, device), regions, device),
    )

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        loss = sum(t.float().square().mean() for t in (out.language_output, out.vision_output, out.pooled_output))
        loss.backward()
    return model, step


MODELS = {"clip_model": _clip, "lxmert_model": _lxmert}


def model_step(case, provider, device, dtype):
    """One training step of the case's model; for "mmkernels" patched first. work["patched"] says what
    the patch swapped (so that a run shows what it measured)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise NotRun("transformers is not installed") from None
    model, step = MODELS[case.kernel](case.x_value, case.settings["size"], device, dtype)
    work = dict(samples=case.x_value)
    if provider == "mmkernels":
        kinds = [record.kind for record in mmkernels.patch(model).records]
        work["patched"] = ", ".join(f"{kind}: {kinds.count(kind)} modules" for kind in sorted(set(kinds))) or "nothing"
    return step, work
