"""`mmkernels.patch` on whole models, forward + backward: the model's own code against the same model
patched, side by side in one run.

    pytest benchmarks/bench_patch.py --benchmark-only --benchmark-columns=median,rounds

Providers, each timed on one training step (forward with the loss, backward into every parameter):
- unpatched: the model as transformers builds it (its default attention implementation, SDPA
  where the model supports it; the contrastive loss through the N x N logits);
- mmkernels: the same model after `mmkernels.patch(model)` (whatever the registered patchers
  cover: for LXMERT, the fusion-model patches once they are installed; the handle's summary is
  stored in extra_info["patched"], so that a run says what was patched).

Models:
- CLIP at ViT-B/16 size (vision: 224 px, patch 16, 768 wide, 12 layers, 12 heads; text: 77 tokens,
  512 wide, 12 layers, 8 heads; projection 512), `CLIPModel(return_loss=True)`, captions of varied
  lengths (padded). On CUDA: bf16, batch 256 and 1024, and batch 4096 with gradient checkpointing
  (its activations do not fit in one GPU's memory without it).
- LXMERT at its base size (768 wide, 9 language, 5 object-relationship and 5 cross-modality layers),
  20 tokens and up to 36 regions of 2048 features per sample with varied counts (padded regions),
  trained on the language, vision and pooled outputs. On CUDA: bf16, batch 256.
Without CUDA both run tiny configurations in fp32 on the CPU (mmkernels' reference path), so the
suite runs everywhere; CPU times say nothing about GPU speed.

extra_info: samples/s, and on CUDA the peak memory of one step above what was allocated before it
(`peak_memory_mib`). A provider that runs out of GPU memory is reported as skipped.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
from timing import CUDA, time_step  # noqa: E402
from transformers import CLIPConfig, CLIPModel, LxmertConfig, LxmertModel  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32

if CUDA:
    CLIP_SIZE = dict(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           image_size=224, patch_size=16),
        projection_dim=512)
    LXMERT_SIZE = dict()  # transformers' defaults are LXMERT base
    CLIP_CASES = [(256, False), (1024, False), (4096, True)]
    LXMERT_CASES = [256]
    TEXT_LENGTH, REGIONS = 77, 36
else:
    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
    CLIP_SIZE = dict(text_config=dict(max_position_embeddings=16, **tiny),
                     vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=32)
    LXMERT_SIZE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, l_layers=2, x_layers=1,
                       r_layers=1, visual_feat_dim=32, vocab_size=200)
    CLIP_CASES = [(16, False)]
    LXMERT_CASES = [8]
    TEXT_LENGTH, REGIONS = 16, 10
PROVIDERS = ["unpatched", "mmkernels"]


def _lengths(batch, longest, generator):
    """Varied lengths in [longest // 4, longest]: real padding in every batch."""
    return torch.randint(max(1, longest // 4), longest + 1, (batch,), generator=generator, device=DEVICE)


def _prefix_mask(lengths, length):
    return (torch.arange(length, device=DEVICE)[None, :] < lengths[:, None]).long()


def clip_step(batch, checkpointing):
    config = CLIPConfig(**CLIP_SIZE)
    model = CLIPModel(config).to(DEVICE, DTYPE).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    text_length = config.text_config.max_position_embeddings
    inputs = dict(
        input_ids=torch.randint(0, config.text_config.vocab_size, (batch, text_length), generator=g, device=DEVICE),
        attention_mask=_prefix_mask(_lengths(batch, text_length, g), text_length),
        pixel_values=torch.randn(batch, 3, config.vision_config.image_size, config.vision_config.image_size,
                                 generator=g, device=DEVICE, dtype=DTYPE),
    )

    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs, return_loss=True).loss.backward()

    return model, step


def lxmert_step(batch, _checkpointing):
    config = LxmertConfig(**LXMERT_SIZE)
    model = LxmertModel(config).to(DEVICE, DTYPE).train()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    inputs = dict(
        input_ids=torch.randint(0, config.vocab_size, (batch, TEXT_LENGTH), generator=g, device=DEVICE),
        attention_mask=_prefix_mask(_lengths(batch, TEXT_LENGTH, g), TEXT_LENGTH),
        visual_feats=torch.randn(batch, REGIONS, config.visual_feat_dim, generator=g, device=DEVICE, dtype=DTYPE),
        visual_pos=torch.rand(batch, REGIONS, config.visual_pos_dim, generator=g, device=DEVICE, dtype=DTYPE),
        visual_attention_mask=_prefix_mask(_lengths(batch, REGIONS, g), REGIONS),
    )

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        loss = sum(t.float().square().mean() for t in (out.language_output, out.vision_output, out.pooled_output))
        loss.backward()

    return model, step


CASES = [("clip", batch, ckpt) for batch, ckpt in CLIP_CASES] + [("lxmert", batch, False) for batch in LXMERT_CASES]
STEPS = {"clip": clip_step, "lxmert": lxmert_step}


@pytest.mark.parametrize("model_name,batch,checkpointing", CASES,
                         ids=[f"{m}-B{b}" + ("-checkpointed" if c else "") for m, b, c in CASES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_patched_model_fwd_bwd(benchmark, provider, model_name, batch, checkpointing):
    try:
        model, step = STEPS[model_name](batch, checkpointing)
        patched = ""
        if provider == "mmkernels":
            handle = mmkernels.patch(model)
            kinds = [r.kind for r in handle.records]
            patched = ", ".join(f"{kind}: {kinds.count(kind)} modules" for kind in sorted(set(kinds))) or "nothing"
        seconds = time_step(benchmark, step, f"{model_name}-B{batch}" + ("-checkpointed" if checkpointing else ""),
                            rounds=5)
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} {model_name} ran out of GPU memory at batch {batch}")
    benchmark.extra_info.update(provider=provider, dtype=str(DTYPE), samples_per_s=batch / seconds,
                                patched=patched)
