"""`mmkernels.patch` on transformers models: the attention of CLIP, SigLIP, SigLIP2 and BridgeTower
(the registry backend with private configs; nn.MultiheadAttention in BridgeTower's vision tower and
SigLIP's pooling heads) and the contrastive losses of CLIPModel, SiglipModel, Siglip2Model,
BlipModel, FlavaForPreTraining and BridgeTowerForContrastiveLearning.

Tiny random models built in code, nothing downloaded. Each family: padded text (and SigLIP2's
padded patches), the patched model in fp32 against the unpatched one in fp32 and in float64 under
the numerics rule (docs/design.md) (the loss, the outputs on the kept rows, every parameter's gradient), once on the
reference path and once on the Triton kernels under the interpreter; a negative control per family
fails the same comparison.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BlipConfig,
    BlipModel,
    BridgeTowerConfig,
    BridgeTowerForContrastiveLearning,
    BridgeTowerModel,
    CLIPConfig,
    CLIPModel,
    FlavaConfig,
    FlavaForPreTraining,
    Siglip2Config,
    Siglip2Model,
    SiglipConfig,
    SiglipModel,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import mmkernels  # noqa: E402
from mmkernels.integrations.patching import StrictPatchError  # noqa: E402
from mmkernels.integrations.transformers import losses  # noqa: E402
from mmkernels import clip_loss, info_nce_loss, siglip_loss  # noqa: E402
from contrastive_oracle import magnitudes  # noqa: E402
from mmkernels.ops.contrastive import reference as reference_ops  # noqa: E402
from toolkit import (  # noqa: E402
    PICKLERS,
    OpTrace,
    assert_models_within_rule,
    assert_within_rule,
    bias_sizes,
    compare_patched,
    fresh_seed,
    model_outputs_and_grads,
    needs_triton,
    pickled_copy,
    use_path,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
hf_logging.set_verbosity_error()  # tiny vocabularies make transformers warn about token ids

TOWER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
TEXT = dict(vocab_size=99, max_position_embeddings=16, pad_token_id=1, bos_token_id=0, eos_token_id=2, **TOWER)
VISION = dict(image_size=8, patch_size=4, **TOWER)
LENGTHS = [7, 4, 2, 5]
PATCH_COUNTS = [16, 12, 5, 9]
N = len(LENGTHS)


def build(name):
    if name == "clip":
        return CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    if name == "siglip":
        return SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION))
    if name == "siglip2":
        return Siglip2Model(Siglip2Config(text_config=TEXT, vision_config=dict(num_patches=16, patch_size=4, **TOWER)))
    if name.startswith("bridgetower"):
        wide = dict(hidden_size=64, intermediate_size=64)
        config = BridgeTowerConfig(
            text_config=dict(TEXT, max_position_embeddings=24, num_hidden_layers=1, **wide),
            vision_config=dict(image_size=8, patch_size=4, num_hidden_layers=1, **wide),  # 64 // 64 = 1 head
            num_attention_heads=2, num_hidden_layers=1, contrastive_hidden_size=16, logit_scale_init_value=2.6592,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **wide)
        return (BridgeTowerModel if name == "bridgetower" else BridgeTowerForContrastiveLearning)(config)
    if name == "blip":
        return BlipModel(BlipConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    if name == "flava":
        return FlavaForPreTraining(FlavaConfig(
            text_config=dict(vocab_size=99, max_position_embeddings=16, **TOWER), image_config=VISION,
            multimodal_config=TOWER, projection_dim=16, hidden_size=32, init_codebook=False,
            image_codebook_config=dict(vocab_size=64, hidden_size=8, num_groups=1, num_blocks_per_group=1)))
    raise ValueError(name)


def make(name):
    def make_model():
        return build(name).eval()

    return make_model


def kept(hidden, lengths, left=False):
    """The rows of (B, L, D) hidden states that are not padding, concatenated: (sum(lengths), D)."""
    return torch.cat([hidden[i, hidden.shape[1] - n:] if left else hidden[i, :n] for i, n in enumerate(lengths)])


def inputs_for(name, seed, n=N, lengths=LENGTHS, left=False):
    """Fresh padded inputs (float64; cast to the model's dtype by `run`); text padded on the right,
    or on the left with `left`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, 7), generator=g)
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
    mask = mask.flip(-1) if left else mask
    inputs = dict(input_ids=ids, attention_mask=mask)
    if name == "siglip2":
        counts = PATCH_COUNTS[:n]
        inputs.update(pixel_values=torch.randn(n, 16, 48, generator=g, dtype=torch.float64),
                      pixel_attention_mask=(torch.arange(16)[None, :] < torch.tensor(counts)[:, None]).long(),
                      spatial_shapes=torch.tensor([[4, 4], [3, 4], [1, 5], [3, 3]][:n]))
    else:
        inputs["pixel_values"] = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    if name == "flava":
        labels = ids.masked_fill(mask == 0, -100)
        inputs.update(input_ids_masked=ids, mlm_labels=labels, itm_labels=torch.ones(n, dtype=torch.long),
                      mim_labels=torch.randint(0, 64, (n, 4), generator=g),
                      bool_masked_pos=torch.rand(n, 4, generator=g) < 0.5)
    return inputs


def cast(inputs, dtype, device="cpu"):
    """The inputs for one run: float tensors in `dtype`, the rest cloned (FLAVA writes into its labels)."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device, copy=True) for k, v in inputs.items()}


def make_run(name, seed, left=False, **overrides):
    """run(model) -> (loss, {output name: tensor on the kept rows}) for `name`'s model."""
    inputs = inputs_for(name, seed, left=left)

    def run(model):
        parameter = next(model.parameters())
        args = {**cast(inputs, parameter.dtype, parameter.device), **overrides}
        dtype = parameter.dtype
        if name == "bridgetower":
            out = model(**args)
            text = kept(out.text_features, LENGTHS, left)
            outputs = {"text_features": text, "image_features": out.image_features, "pooler_output": out.pooler_output}
            weights = torch.Generator().manual_seed(seed)
            loss = sum((t * t * torch.rand(t.shape, generator=weights, dtype=torch.float64).to(t.device, dtype)).sum()
                       for t in outputs.values())
            return loss, outputs
        out = model(**args, return_loss=True)
        if name == "bridgetower-contrastive":
            return out.loss, {"text_embeds": out.text_embeds, "image_embeds": out.image_embeds,
                              "cross_embeds": out.cross_embeds,
                              "text_hidden": kept(out.hidden_states[0][-1], LENGTHS, left)}
        if name == "flava":
            return out.loss, {"text_embeddings": kept(out.text_embeddings, LENGTHS, left), "image_embeddings":
                              out.image_embeddings, "global_contrastive": out.loss_info.global_contrastive}
        outputs = {"text_embeds": out.text_embeds, "image_embeds": out.image_embeds,
                   "text_hidden": kept(out.text_model_output.last_hidden_state, LENGTHS, left)}
        if name == "siglip2":
            outputs["vision_hidden"] = kept(out.vision_model_output.last_hidden_state, PATCH_COUNTS)
        else:
            outputs["vision_hidden"] = out.vision_model_output.last_hidden_state
        return out.loss, outputs

    return run


def floor_sizes(model):
    """Floors for the gradients that are sums which cancel: dL/d logit_scale = Σ G_ij·S_ij and
    dL/d logit_bias = Σ G_ij with G = dL/dS. CLIP on normalised embeddings: Σ|G| <= 2, |S_ij| <= scale;
    SigLIP: Σ|G| <= N."""
    holder = model.flava if isinstance(model, FlavaForPreTraining) else model
    if not hasattr(holder, "logit_scale"):
        return {}
    scale = holder.logit_scale.detach().exp().max().item()
    if hasattr(holder, "logit_bias"):
        return {"grad logit_scale": N * scale, "grad logit_bias": float(N)}
    name = "grad flava.logit_scale" if holder is not model else "grad logit_scale"
    return {name: 2 * scale * getattr(model, "global_contrastive_weight", 1.0)}


# What each family's patch covers: attention records (registry or nn.MultiheadAttention) and the loss;
# "negative": what the negative control breaks (default: the padding mask where attention is patched).
FAMILIES = {
    "clip": dict(attention=2, mha=0, loss="mmkernels.clip_loss"),
    "siglip": dict(attention=2, mha=1, loss="mmkernels.siglip_loss"),
    "siglip2": dict(attention=2, mha=1, loss="mmkernels.siglip_loss"),
    "bridgetower": dict(attention=5, mha=1, loss=None),
    "bridgetower-contrastive": dict(attention=5, mha=1, negative="loss",
                                    loss="mmkernels.info_nce_loss for its three one-directional terms"),
    "blip": dict(attention=None, mha=0, loss="mmkernels.clip_loss"),  # BLIP's attention: hand-written
    "flava": dict(attention=None, mha=0, loss="mmkernels.clip_loss for the global contrastive term"),
}


def patch_kwargs(name):
    # BLIP's and FLAVA's attention is hand-written (not a patch of this module): compare their losses alone.
    return dict(attention=False) if FAMILIES[name]["attention"] is None else {}


@pytest.fixture
def path(kernel_path, monkeypatch):
    """(path name, reference-op calls): kernel_path's path for CPU fp32 tensors, each reference-op call recorded."""
    return kernel_path.name, use_path(monkeypatch, kernel_path.name)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_unpatched(name, path):
    fresh_seed()
    seed = fresh_seed()
    handle = compare_patched(make(name), make_run(name, seed), lambda m: mmkernels.patch(m, **patch_kwargs(name)),
                             *path, sizes=floor_sizes)
    expected = FAMILIES[name]
    registry = [r for r in handle.records if r.kind == "attention" and "AttentionInterface" in r.piece]
    mha = [r for r in handle.records if "CrossModalAttention" in r.piece]
    assert len(registry) == (expected["attention"] or 0) and len(mha) == expected["mha"]
    assert [r.piece.split(" (")[0] for r in handle.records if r.kind == "loss"] == (
        [expected["loss"]] if expected["loss"] else [])
    assert not handle.fallbacks
    if expected["attention"] is not None:
        assert not handle.skipped


@pytest.mark.gpu
@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_unpatched_on_the_gpu_in_bf16(name, monkeypatch):
    fresh_seed()
    seed = fresh_seed()
    handle = compare_patched(lambda: make(name)().to("cuda", torch.bfloat16), make_run(name, seed),
                             lambda m: mmkernels.patch(m, **patch_kwargs(name)), "cuda",
                             use_path(monkeypatch, "cuda"), sizes=floor_sizes)
    assert handle.records and not handle.fallbacks


def broken_losses(monkeypatch):
    """A loss patch with the classic bug: image i paired with text i + 1 (query i with key i + 1)."""
    monkeypatch.setattr(losses, "clip_loss", lambda a, b, s: clip_loss(a, b.roll(1, 0), s))
    monkeypatch.setattr(losses, "siglip_loss", lambda a, b, s, t: siglip_loss(a, b.roll(1, 0), s, t))
    monkeypatch.setattr(losses, "info_nce_loss", lambda q, k, s: info_nce_loss(q, k.roll(1, 0), s))


@pytest.mark.parametrize("name", FAMILIES)
def test_family_negative_control(name, monkeypatch):
    """Attention families: the patched model runs without its padding mask (text; SigLIP2: patches;
    CLIP's causal text tower, left-padded: right padding comes after every kept token);
    loss-only families and BridgeTower's contrastive head: a loss patch that misaligns the pairs. The
    same comparison then fails."""
    fresh_seed()
    seed = fresh_seed()
    left = name == "clip"
    overrides = {"pixel_attention_mask": None} if name == "siglip2" else {"attention_mask": None}
    got_run = make_run(name, seed, left, **overrides)
    if FAMILIES[name]["attention"] is None or FAMILIES[name].get("negative") == "loss":
        broken_losses(monkeypatch)
        got_run = make_run(name, seed)
    with pytest.raises(AssertionError, match="eager error"):
        compare_patched(make(name), make_run(name, seed, left), lambda m: mmkernels.patch(m, **patch_kwargs(name)),
                        "reference", use_path(monkeypatch, "reference"), got_run=got_run, sizes=floor_sizes)


def _under_autocast(run):
    def autocast_run(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run(model)
    return autocast_run


@pytest.mark.parametrize("name", ["siglip2", "siglip"])
def test_loss_under_cpu_bf16_autocast(name, path):
    """Under torch.autocast("cpu", torch.bfloat16) (the towers run in bf16, the embeddings come out
    bf16, both paths then take the reference path for them) the patched loss computes as the op's
    contract says: fp32 logits from those embeddings, an fp32 loss, as accurate as fp32 allows.

    (1) The loss alone patched: both models give the same embeddings, and the float64 loss of those
    embeddings is the oracle; the patched loss and the gradients of logit_scale and logit_bias meet
    the rule against the unpatched model's (whose logits are bf16) with fp32's floor. The patched
    loss once came back quantised to bf16: 2.5-11x further from the float64 value than the
    unpatched model's. (2) The whole patch (attention too): every output and parameter gradient
    meets the rule against the unpatched model under autocast, the float64 model (without autocast)
    the oracle, with bf16's floor: the towers' bf16 rounding dominates both."""
    fresh_seed()
    plain_run = make_run(name, fresh_seed())
    run = _under_autocast(plain_run)
    eager = make(name)()
    patched = copy.deepcopy(eager)
    handle = mmkernels.patch(patched, attention=False)
    assert [r.kind for r in handle.records] == ["loss"]
    (eager_values, eager_grads), (values, grads) = (model_outputs_and_grads(m, run) for m in (eager, patched))
    assert values["loss"].dtype == eager_values["loss"].dtype == torch.float32
    image, text = values["image_embeds"], values["text_embeds"]
    assert image.dtype == torch.bfloat16
    assert torch.equal(image, eager_values["image_embeds"]) and torch.equal(text, eager_values["text_embeds"])
    log_scale, bias = (p.detach().double().reshape(()).requires_grad_() for p in (eager.logit_scale, eager.logit_bias))
    oracle = reference_ops.siglip_loss(image.double(), text.double(), log_scale.exp(), bias)
    oracle_grads = torch.autograd.grad(oracle, (log_scale, bias))
    scale = log_scale.exp().item()
    sizes = magnitudes("siglip", [image.double(), text.double(), log_scale.detach().exp(), bias.detach()], False)
    assert_within_rule("loss", values["loss"], eager_values["loss"], oracle, torch.float32, size=sizes["loss"])
    for param, oracle_grad, size in (("logit_scale", oracle_grads[0], scale * sizes["d logit_scale"]),
                                     ("logit_bias", oracle_grads[1], sizes["d logit_bias"])):
        assert_within_rule(f"d {param}", grads[param].reshape(()), eager_grads[param].reshape(()), oracle_grad,
                           torch.float32, size=size)

    patched = copy.deepcopy(eager)
    handle = mmkernels.patch(patched)
    assert "loss" in [r.kind for r in handle.records] and not handle.fallbacks
    oracle_model = copy.deepcopy(eager).double()
    assert_models_within_rule(model_outputs_and_grads(patched, run), (eager_values, eager_grads),
                              model_outputs_and_grads(oracle_model, plain_run), torch.bfloat16, name,
                              sizes={**bias_sizes(eager), **floor_sizes(eager)})


# --------------------------------------------------------------------------- the loss outputs


def square_allocations(trace, n):
    return [a for a in trace.allocations if len(a.shape) >= 2 and a.shape[-2:] == (n, n)]


@needs_triton
@pytest.mark.parametrize("name", ["clip", "siglip", "bridgetower-contrastive"])
def test_keep_logits_false_builds_no_n_by_n_tensor(name, monkeypatch):
    use_path(monkeypatch, "kernels")
    fresh_seed()
    n, lengths = 6, [7, 4, 2, 5, 7, 1]  # 6 is no other dimension of these models (text 7, vision 5 tokens)
    model = build(name).eval()
    inputs = cast(inputs_for(name, fresh_seed(), n=n, lengths=lengths), torch.float32)
    with OpTrace() as unpatched:
        model(**inputs, return_loss=True).loss.backward()
    assert square_allocations(unpatched, n), "negative control: the model's own loss builds N x N logits"
    handle = mmkernels.patch(model, keep_logits=False)
    with OpTrace() as patched:
        out = model(**inputs, return_loss=True)
        out.loss.backward()
    fields = ("logits",) if name.startswith("bridgetower") else ("logits_per_image", "logits_per_text")
    assert all(getattr(out, field) is None for field in fields)
    assert not square_allocations(patched, n), square_allocations(patched, n)
    assert "no logits, no N x N tensor" in str(handle)


@pytest.mark.parametrize("name", ["clip", "siglip", "siglip2", "blip"])
def test_output_same_class_fields_and_logits(name, monkeypatch):
    use_path(monkeypatch, "reference")
    fresh_seed()
    model = build(name).eval()
    inputs = cast(inputs_for(name, fresh_seed()), torch.float32)
    reference = model(**inputs, return_loss=True)
    handle = mmkernels.patch(model, attention=False)
    out = model(**inputs, return_loss=True)
    assert type(out) is type(reference) and list(out.keys()) == list(reference.keys())
    assert out.loss.dtype == reference.loss.dtype and out.loss.shape == reference.loss.shape
    torch.testing.assert_close(out.loss, reference.loss)
    for field in ("logits_per_image", "logits_per_text"):
        assert not out[field].requires_grad and reference[field].requires_grad
        torch.testing.assert_close(out[field], reference[field])
    as_tuple = model(**inputs, return_loss=True, return_dict=False)
    assert [t.shape for t in as_tuple if isinstance(t, torch.Tensor)] == [
        t.shape for t in reference.to_tuple() if isinstance(t, torch.Tensor)]
    # Without return_loss the patch has nothing to do: the model's own forward, logits with autograd.
    no_loss = model(**inputs)
    assert no_loss.loss is None and no_loss.logits_per_image.requires_grad
    assert not handle.fallbacks


@pytest.mark.parametrize("name", ["siglip", "siglip2", "blip"])
def test_return_dict_against_the_config_matches_the_model(name, monkeypatch):
    """config.return_dict=False, overridden per call: each call returns what the unpatched model returns
    (ModelOutput or tuple), with and without return_loss. (CLIP's and BridgeTower's own forwards fail
    under config.return_dict=False.)"""
    use_path(monkeypatch, "reference")
    fresh_seed()
    model = build(name).eval()
    model.config.return_dict = False
    inputs = cast(inputs_for(name, fresh_seed()), torch.float32)
    calls = [dict(return_loss=loss, **({} if flag is None else {"return_dict": flag}))
             for loss in (None, True) for flag in (None, True, False)]
    expected = [type(model(**inputs, **call)) for call in calls]
    assert len(set(expected)) == 2  # negative control: the flags decide the type
    mmkernels.patch(model, attention=False)
    assert [type(model(**inputs, **call)) for call in calls] == expected


def test_flava_falls_back_where_the_loss_is_not_square(monkeypatch):
    use_path(monkeypatch, "reference")
    fresh_seed()
    model = build("flava").eval()
    inputs = inputs_for("flava", fresh_seed())
    reference = model(**cast(inputs, torch.float32))
    mixed = dict(inputs, itm_labels=torch.tensor([1, 0, 1, 1]))
    reference_mixed = model(**cast(mixed, torch.float32))
    handle = mmkernels.patch(model, attention=False)
    out = model(**cast(inputs, torch.float32))
    assert type(out) is type(reference) and list(out.keys()) == list(reference.keys())
    torch.testing.assert_close(out.loss_info.global_contrastive, reference.loss_info.global_contrastive)
    torch.testing.assert_close(out.contrastive_logits_per_text, reference.contrastive_logits_per_text)
    assert not handle.fallbacks
    out_mixed = model(**cast(mixed, torch.float32))
    assert torch.equal(out_mixed.loss, reference_mixed.loss)
    model(**cast(inputs, torch.float32), return_dict=False)
    assert set(reason for _, reason in handle.fallbacks) == {
        "itm_labels with non-matching pairs (the contrastive loss then covers the matching rows only)",
        "return_dict=False"}
    handle.undo()
    mmkernels.patch(model, attention=False, strict=True)
    with pytest.raises(StrictPatchError, match="non-matching pairs"):
        model(**cast(mixed, torch.float32))


def test_flava_weight_stays_on_the_model_during_a_call(monkeypatch):
    """The patched forward runs FLAVA's own code with the contrastive weight at 0 for that call only,
    without writing it on the model: code that reads the model meanwhile (a hook here; another
    thread's call on the same model) sees the model's weight."""
    use_path(monkeypatch, "reference")
    fresh_seed()
    model = build("flava").eval()
    seen = []
    model.flava.register_forward_hook(lambda *_: seen.append(model.global_contrastive_weight))
    inputs = cast(inputs_for("flava", fresh_seed()), torch.float32)
    model(**inputs)
    weight = model.global_contrastive_weight
    assert weight > 0 and seen == [weight, weight]  # FLAVA's forward runs its encoders twice
    seen.clear()
    handle = mmkernels.patch(model, attention=False)
    assert model(**inputs).loss_info.global_contrastive is not None and not handle.fallbacks
    assert seen == [weight, weight] and model.global_contrastive_weight == weight


def test_bridgetower_contrastive_output(monkeypatch):
    """The model's own output class and fields; `logits` (the (N, 3, D) stack of the three embeddings)
    the model's values without autograd; return_dict=False; no return_loss: the model's own forward."""
    use_path(monkeypatch, "reference")
    fresh_seed()
    model = build("bridgetower-contrastive").eval()
    inputs = cast(inputs_for("bridgetower", fresh_seed()), torch.float32)
    reference = model(**inputs, return_loss=True)
    handle = mmkernels.patch(model)
    assert not handle.skipped and [r.kind for r in handle.records].count("loss") == 1
    out = model(**inputs, return_loss=True)
    assert type(out) is type(reference) and list(out.keys()) == list(reference.keys())
    assert out.loss.dtype == reference.loss.dtype and out.loss.shape == reference.loss.shape
    torch.testing.assert_close(out.loss, reference.loss)
    assert not out.logits.requires_grad and reference.logits.requires_grad
    torch.testing.assert_close(out.logits, reference.logits)
    as_tuple = model(**inputs, return_loss=True, return_dict=False)
    assert [t.shape for t in as_tuple if isinstance(t, torch.Tensor)] == [
        t.shape for t in reference.to_tuple() if isinstance(t, torch.Tensor)]
    no_loss = model(**inputs)
    assert no_loss.loss is None and no_loss.logits.requires_grad
    assert not handle.fallbacks
    handle.undo()
    assert not mmkernels.patch(model, strict=True).skipped


@pytest.mark.parametrize("name", ["bridgetower", "bridgetower-contrastive"])
def test_bridgetower_attentions_keep_eagers_structure_without_the_weights(name, monkeypatch):
    """BridgeTowerModel returns its cross-modal layers' self-attention weights from every call: eager
    attention always forms them, and the model passes no output_attentions to its layers. Patched,
    `attentions` keeps that structure (one (text, image) pair per cross-modal layer) with None for
    each weight, in every call (output_attentions=True too, which the model ignores), for
    BridgeTowerModel and BridgeTowerForContrastiveLearning alike, with and without the loss; the
    rest of the output is the unpatched model's."""
    use_path(monkeypatch, "reference")
    fresh_seed()
    model = build(name).eval()
    inputs = cast(inputs_for("bridgetower", fresh_seed()), torch.float32)
    calls = [{}, {"output_attentions": True}] + ([{"return_loss": True}] if name != "bridgetower" else [])
    expected = [model(**inputs, **call) for call in calls]
    handle = mmkernels.patch(model)
    got = [model(**inputs, **call) for call in calls]
    layers = model.config.num_hidden_layers
    for call, want, out in zip(calls, expected, got):
        assert len(want.attentions) == len(out.attentions) == layers, call
        for (text, image), weights in zip(want.attentions, out.attentions):
            assert text.shape == (N, 2, 7, 7) and image.shape[:2] == (N, 2), call  # eager: (B, H, L, L)
            assert weights == (None, None), call
        first = "text_features" if name == "bridgetower" else "text_embeds"
        torch.testing.assert_close(out[first], want[first])
    assert not handle.fallbacks


# --------------------------------------------------------------------------- instances only, exact undo


def test_teacher_and_student_from_one_config_stay_independent(monkeypatch):
    use_path(monkeypatch, "reference")
    fresh_seed()
    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    student, teacher = CLIPModel(config).eval(), CLIPModel(config).eval()
    assert student.text_model.config is teacher.text_model.config  # transformers shares them
    inputs = cast(inputs_for("clip", fresh_seed()), torch.float32)
    teacher_before = teacher(**inputs, return_loss=True)
    implementation = config.text_config._attn_implementation
    handle = mmkernels.patch(student)
    assert student.config is not config and student.config._attn_implementation == "mmkernels"
    assert student.text_model.config is student.config.text_config  # structure kept in the copy
    assert student.text_model.encoder.layers[0].self_attn.config._attn_implementation == "mmkernels"
    assert config._attn_implementation == config.text_config._attn_implementation == implementation
    assert teacher.text_model.encoder.layers[0].self_attn.config is config.text_config
    teacher_after = teacher(**inputs, return_loss=True)
    assert torch.equal(teacher_after.loss, teacher_before.loss) and teacher_after.logits_per_text.requires_grad
    student(**inputs, return_loss=True)
    handle.undo()
    assert student.config is config and student.text_model.encoder.layers[0].self_attn.config is config.text_config


@pytest.mark.parametrize("inner_first", [True, False])
def test_a_tower_and_its_model_patched_one_after_the_other(inner_first, monkeypatch):
    """A tower patched on its own, then its model (or the other way round): the model's patch covers
    the rest and leaves the tower's patch as it is (the model after the tower: nothing left to do);
    the two handles undo in either order, restoring every config object."""
    use_path(monkeypatch, "reference")
    fresh_seed()
    model = build("clip").eval()
    inputs = cast(inputs_for("clip", fresh_seed()), torch.float32)
    reference = model(**inputs, return_loss=True)
    configs = {path: m.__dict__.get("config") for path, m in model.named_modules()}
    if inner_first:
        tower, whole = mmkernels.patch(model.text_model), mmkernels.patch(model)
        assert [r.path for r in whole.records if r.kind == "attention"] == [
            "", "vision_model.encoder.layers.0.self_attn"]
    else:
        whole, tower = mmkernels.patch(model), mmkernels.patch(model.text_model)
        assert not tower.records
    assert not whole.skipped and not tower.skipped
    for path, m in model.named_modules():
        if type(m).__name__ == "CLIPAttention":
            assert m.config._attn_implementation == "mmkernels", path
    torch.testing.assert_close(model(**inputs, return_loss=True).loss, reference.loss)
    for handle in ((tower, whole) if inner_first else (whole, tower)):  # the one patched first, undone first
        handle.undo()
    assert {path: m.__dict__.get("config") for path, m in model.named_modules()} == configs
    assert torch.equal(model(**inputs, return_loss=True).loss, reference.loss)


def test_state_untouched_undo_bit_identical_and_optimizer(monkeypatch):
    use_path(monkeypatch, "reference")
    fresh_seed()
    model = build("siglip").eval()
    inputs = cast(inputs_for("siglip", fresh_seed()), torch.float32)
    before = {k: (t.data_ptr(), t.clone()) for k, t in model.state_dict().items()}
    reference = model(**inputs, return_loss=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = mmkernels.patch(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k].data_ptr() == ptr and torch.equal(after[k], value) for k, (ptr, value) in before.items())
    model(**inputs, return_loss=True).loss.backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n][1])}
    assert {"logit_scale", "logit_bias", "text_model.encoder.layers.0.self_attn.q_proj.weight",
            "vision_model.head.attention.in_proj_weight"} <= moved
    handle.undo()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(before[name][1])  # the weights before the step, in the same tensors
    undone = model(**inputs, return_loss=True)
    for field in ("loss", "logits_per_image", "text_embeds", "image_embeds"):
        assert torch.equal(undone[field], reference[field]), field


@pytest.mark.parametrize("how", PICKLERS)
@pytest.mark.parametrize("name", ["clip", "blip"])
def test_a_pickled_patched_model_loads_patched_with_its_own_handle(name, how, monkeypatch):
    """pickle / torch.save of a patched CLIPModel (config copies, registry attention, loss forward)
    or BlipModel (hand-written attention, loss forward), loaded: the copy runs mmkernels with its own
    weights, its config copies keep their structure, its own handle undoes it to the unpatched
    model's outputs bit for bit; the saved model stays patched."""
    reference_calls = use_path(monkeypatch, "reference")
    fresh_seed()
    model = build(name).eval()
    inputs = cast(inputs_for(name, fresh_seed()), torch.float32)
    fields = ("loss", "logits_per_image", "text_embeds", "image_embeds")
    unpatched = model(**inputs, return_loss=True)
    implementation = model.config._attn_implementation
    handle = mmkernels.patch(model)
    patched_implementation = model.config._attn_implementation
    patched = model(**inputs, return_loss=True)
    loaded = pickled_copy(model, how)
    loaded_handle = loaded._mmkernels_handle
    assert loaded_handle is not handle and loaded_handle.active and loaded_handle.model is loaded
    assert loaded_handle.records == handle.records and not loaded_handle.skipped
    assert loaded.config._attn_implementation == model.config._attn_implementation
    assert loaded.text_model.config is loaded.config.text_config
    assert loaded.forward.__self__ is loaded
    reference_calls.clear()
    got = loaded(**inputs, return_loss=True)
    assert reference_calls.count("clip_loss") == 1 and reference_calls.count("cross_attention") >= 2
    for field in fields:
        assert torch.equal(got[field], patched[field]), field
    assert not got.logits_per_image.requires_grad and not loaded_handle.fallbacks
    assert mmkernels.unpatch(loaded)
    assert loaded.config._attn_implementation == implementation
    assert loaded.text_model.config is loaded.config.text_config
    undone = loaded(**inputs, return_loss=True)
    for field in fields:
        assert torch.equal(undone[field], unpatched[field]), field
    assert handle.active and model.config._attn_implementation == patched_implementation


def test_deepcopy_and_save_pretrained_of_a_patched_model(tmp_path, monkeypatch):
    """copy.deepcopy of a patched CLIPModel is patched, with its own handle and config copies;
    save_pretrained writes the model's own config (no "mmkernels" in it) and from_pretrained loads
    it unpatched, computing what the unpatched model computed."""
    reference_calls = use_path(monkeypatch, "reference")
    fresh_seed()
    model = build("clip").eval()
    inputs = cast(inputs_for("clip", fresh_seed()), torch.float32)
    unpatched = model(**inputs, return_loss=True).loss
    handle = mmkernels.patch(model)
    patched = model(**inputs, return_loss=True).loss
    clone = copy.deepcopy(model)
    assert clone._mmkernels_handle is not handle and clone._mmkernels_handle.active
    assert clone.config is not model.config and clone.config._attn_implementation == "mmkernels"
    assert clone.text_model.config is clone.config.text_config
    reference_calls.clear()
    assert torch.equal(clone(**inputs, return_loss=True).loss, patched) and "clip_loss" in reference_calls
    assert mmkernels.unpatch(clone) and torch.equal(clone(**inputs, return_loss=True).loss, unpatched)
    model.save_pretrained(tmp_path)
    assert "mmkernels" not in (tmp_path / "config.json").read_text()
    loaded = CLIPModel.from_pretrained(tmp_path).eval()
    assert "_mmkernels_handle" not in loaded.__dict__ and loaded.config._attn_implementation != "mmkernels"
    assert torch.equal(loaded(**inputs, return_loss=True).loss, unpatched)
    assert handle.active


LOAD_IN_A_FRESH_PROCESS = """
import sys, torch
saved = torch.load(sys.argv[1], weights_only=False)
model, inputs = saved["model"], saved["inputs"]
out = model(**inputs, return_loss=True)
handle = model._mmkernels_handle
result = dict(loss=out.loss.detach(), text_embeds=out.text_embeds.detach(), active=handle.active,
              fallbacks=dict(handle.fallbacks), implementation=model.config._attn_implementation)
handle.undo()
result["undone_loss"] = model(**inputs, return_loss=True).loss.detach()
torch.save(result, sys.argv[2])
"""


def test_a_patched_model_saved_whole_loads_patched_in_a_fresh_process(tmp_path, monkeypatch):
    """torch.save of a patched CLIPModel, loaded in a process that never called mmkernels.patch:
    the "mmkernels" attention backend is registered on load, and the copy computes what the saved
    model computed."""
    use_path(monkeypatch, "reference")
    fresh_seed()
    model = build("clip").eval()
    inputs = cast(inputs_for("clip", fresh_seed()), torch.float32)
    unpatched = model(**inputs, return_loss=True).loss
    mmkernels.patch(model)
    patched = model(**inputs, return_loss=True)
    torch.save(dict(model=model, inputs=inputs), tmp_path / "model.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), TRITON_INTERPRET="0")
    env.pop("MMKERNELS_PATCH_UNTESTED_TRANSFORMERS", None)  # loading never asks the version gate
    script = [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(tmp_path / "model.pt"), str(tmp_path / "result.pt")]
    run = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["active"] and result["implementation"] == "mmkernels" and not result["fallbacks"]
    assert torch.equal(result["loss"], patched.loss) and torch.equal(result["text_embeds"], patched.text_embeds)
    assert torch.equal(result["undone_loss"], unpatched)


def test_signature_gate(monkeypatch):
    forward, parameters = losses.LOSS_FORWARDS[CLIPModel]
    monkeypatch.setitem(losses.LOSS_FORWARDS, CLIPModel, (forward, parameters + ("new_argument",)))
    handle = mmkernels.patch(build("clip"), attention=False)
    assert [(s.path, s.kind) for s in handle.skipped] == [("", "loss")]
    assert "parameters differ" in handle.skipped[0].reason


@needs_triton
def test_torch_compile_of_a_patched_clip_matches(monkeypatch):
    """torch.compile (AOTAutograd: dynamo capture, the fake kernels, the joint forward + backward
    graph) of a patched CLIP's forward and backward, against the same patched model run eagerly."""
    use_path(monkeypatch, "kernels")
    torch._dynamo.reset()
    fresh_seed()
    model = build("clip").eval()
    mmkernels.patch(model)
    compiled = torch.compile(model, backend="aot_eager")
    run = make_run("clip", fresh_seed())
    results = []
    for m in (compiled, model):
        model.zero_grad(set_to_none=True)
        loss, outputs = run(m)
        loss.backward()
        results.append((loss.detach(), {k: v.detach() for k, v in outputs.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_c, out_c, grads_c), (loss_e, out_e, grads_e) = results
    torch.testing.assert_close(loss_c, loss_e)
    for k in out_e:
        torch.testing.assert_close(out_c[k], out_e[k])
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == len(list(model.parameters()))
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k], msg=lambda m: f"{k}: {m}")

