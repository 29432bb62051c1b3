"""mmkernels.patch on the fusion models whose attention transformers writes by hand: LXMERT,
VisualBERT, ViLT, FLAVA and BLIP (vision, text encoder with cross-attention, caption decoder).

Tiny random models built in code (nothing is downloaded), padded batches (text padding, LXMERT's and
VisualBERT's region padding, ViLT's pixel_mask), patched against unpatched under the numerics rule (docs/design.md):
the error of the patched fp32 model against the unpatched model run in float64 is at most twice the
error of the unpatched fp32 model, on the outputs' kept (non-padded) rows, the loss, and the gradient
of every parameter. Once on the reference path (TRITON_INTERPRET=0: CPU tensors take
`reference.cross_attention`) and once with the Triton kernels (the interpreter on the CPU, CUDA where
there is one). Every comparison has a negative control (the mask dropped) that fails it. Dropout is
off (eval mode) in every comparison: mmkernels' dropout draws from Philox, torch's from its own
stream, so only the distribution is the same (checked on its own below).
"""
import copy
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    FlavaConfig,
    FlavaModel,
    LxmertConfig,
    LxmertModel,
    ViltConfig,
    ViltModel,
    VisualBertConfig,
    VisualBertModel,
)
from transformers.models.lxmert.modeling_lxmert import LxmertAttention  # noqa: E402

import mmkernels  # noqa: E402
from mmkernels.integrations.patching import StrictPatchError  # noqa: E402
from mmkernels.integrations.transformers import fusion  # noqa: E402
from mmkernels.ops import masks  # noqa: E402
from toolkit import (  # noqa: E402
    assert_models_within_rule,
    assert_within_rule,
    bias_sizes,
    fresh_seed,
    PICKLERS,
    model_outputs_and_grads,
    pickled_copy,
    use_path,
)

VOCAB = 40
TOWER = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, initializer_range=0.2)
TEXT_LENGTHS = [7, 4, 2]
TEXT_LEN = 7


# --------------------------------------------------------------------------- the families


@dataclass
class Case:
    """A tiny model and a padded batch. `kept(output)` gives {name: (tensor, keep)}, keep a (B, L)
    bool mask of the rows that are not padding (None: every row); `attention_calls` is how many
    attention calls one forward makes (all of them patched)."""

    model: torch.nn.Module
    inputs: dict
    kept: Callable
    attention_calls: int
    seed: int


def lengths_mask(lengths, length):
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()


def text_batch():
    return torch.randint(3, VOCAB, (len(TEXT_LENGTHS), TEXT_LEN)), lengths_mask(TEXT_LENGTHS, TEXT_LEN)


def lxmert(region_lengths=(3, 5, 1)):
    seed = fresh_seed()
    config = LxmertConfig(vocab_size=VOCAB, l_layers=1, x_layers=1, r_layers=1, visual_feat_dim=12, visual_pos_dim=4,
                          max_position_embeddings=16, **TOWER)
    ids, text = text_batch()
    regions = lengths_mask(list(region_lengths), 5)
    inputs = dict(input_ids=ids, attention_mask=text, visual_feats=torch.randn(3, 5, 12),
                  visual_pos=torch.rand(3, 5, 4), visual_attention_mask=regions)

    def kept(out):
        return {"language_output": (out.language_output, text.bool()),
                "vision_output": (out.vision_output, regions.bool()),
                "pooled_output": (out.pooled_output, None)}

    # language and relational self-attention, both cross-attention directions, both x-layer self-attentions
    return Case(LxmertModel(config).eval(), inputs, kept, attention_calls=6, seed=seed)


def visual_bert():
    seed = fresh_seed()
    config = VisualBertConfig(vocab_size=VOCAB, num_hidden_layers=2, visual_embedding_dim=12,
                              max_position_embeddings=16, **TOWER)
    ids, text = text_batch()
    regions = lengths_mask([3, 5, 1], 5)
    inputs = dict(input_ids=ids, attention_mask=text, visual_embeds=torch.randn(3, 5, 12),
                  visual_attention_mask=regions)

    def kept(out):
        return {"last_hidden_state": (out.last_hidden_state, torch.cat([text, regions], 1).bool()),
                "pooler_output": (out.pooler_output, None)}

    return Case(VisualBertModel(config).eval(), inputs, kept, attention_calls=2, seed=seed)


def vilt():
    seed = fresh_seed()
    config = ViltConfig(vocab_size=VOCAB, num_hidden_layers=2, image_size=16, patch_size=4,
                        max_position_embeddings=16, **TOWER)
    ids, text = text_batch()
    pixel_mask = torch.ones(3, 16, 16, dtype=torch.long)
    pixel_mask[1, :, 8:] = 0  # the right half of image 1 and the bottom of image 2 are padding
    pixel_mask[2, 4:, :] = 0
    inputs = dict(input_ids=ids, attention_mask=text, pixel_values=torch.randn(3, 3, 16, 16), pixel_mask=pixel_mask)
    # ViLT puts an image's valid patches first (after its [CLS]), then padding patches.
    valid = F.interpolate(pixel_mask[:, None].float(), size=(4, 4)).long().flatten(1).sum(1)
    image = lengths_mask((valid + 1).tolist(), 17)

    def kept(out):
        return {"last_hidden_state": (out.last_hidden_state, torch.cat([text, image], 1).bool()),
                "pooler_output": (out.pooler_output, None)}

    return Case(ViltModel(config).eval(), inputs, kept, attention_calls=2, seed=seed)


def flava():
    seed = fresh_seed()
    layers = dict(num_hidden_layers=1, **TOWER)
    config = FlavaConfig(image_config=dict(image_size=16, patch_size=8, **layers),
                         text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, **layers),
                         multimodal_config=layers, hidden_size=32, projection_dim=32)
    ids, text = text_batch()
    inputs = dict(input_ids=ids, attention_mask=text, pixel_values=torch.randn(3, 3, 16, 16))

    def kept(out):
        multimodal = torch.cat([torch.ones(3, 1 + 5, dtype=torch.long), text], 1)  # [CLS], image tokens, text
        return {"image_embeddings": (out.image_embeddings, None),
                "text_embeddings": (out.text_embeddings, text.bool()),
                "multimodal_embeddings": (out.multimodal_embeddings, multimodal.bool())}

    return Case(FlavaModel(config).eval(), inputs, kept, attention_calls=3, seed=seed)


def blip_config():
    layers = dict(num_hidden_layers=1, **TOWER)
    return BlipConfig(vision_config=dict(image_size=16, patch_size=8, **layers),
                      text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, encoder_hidden_size=32,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0, sep_token_id=2, **layers),
                      projection_dim=32)


def blip_itm():
    seed = fresh_seed()
    ids, text = text_batch()
    inputs = dict(input_ids=ids, attention_mask=text, pixel_values=torch.randn(3, 3, 16, 16))

    def kept(out):
        return {"itm_score": (out.itm_score, None),
                "vision": (out.last_hidden_state, None),
                "question_embeds": (out.question_embeds, text.bool())}

    # vision self-attention, text self-attention, text cross-attention to the image
    return Case(BlipForImageTextRetrieval(blip_config()).eval(), inputs, kept, attention_calls=3, seed=seed)


def blip_caption():
    seed = fresh_seed()
    ids, text = text_batch()
    labels = ids.masked_fill(text == 0, -100)
    inputs = dict(input_ids=ids, attention_mask=text, pixel_values=torch.randn(3, 3, 16, 16), labels=labels)

    def kept(out):
        return {"loss": (out.loss, None), "logits": (out.logits, text.bool())}

    # vision self-attention, causal decoder self-attention (through its cache), cross-attention
    return Case(BlipForConditionalGeneration(blip_config()).eval(), inputs, kept, attention_calls=3, seed=seed)


FAMILIES = {"lxmert": lxmert, "visual_bert": visual_bert, "vilt": vilt, "flava": flava, "blip_itm": blip_itm,
            "blip_caption": blip_caption}


# --------------------------------------------------------------------------- running and comparing


def to(inputs, device, dtype=None):
    return {k: v.to(device, dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in inputs.items()}


def compare(case: Case, device, dtype=torch.float32):
    """Run the case unpatched in float64 (the oracle) and in `dtype`, and patched (plain
    `mmkernels.patch(model)`) in `dtype`; the loss is Σ random weights · the outputs' kept rows (its
    floor scales with Σ |weight · output|, since the ± terms cancel).
    Assert the numerics rule (docs/design.md) on the kept rows, the loss and every parameter's gradient. Returns the
    patch handle."""
    probe = case.kept(case.model(**case.inputs))
    weights = {name: torch.randn_like(t if keep is None else t[keep]).double() for name, (t, keep) in probe.items()}

    def run(model):
        # Reseeded: ViLT draws the padding patches it appends at random.
        torch.manual_seed(case.seed)
        parameter = next(model.parameters())
        out = model(**to(case.inputs, parameter.device, parameter.dtype))
        rows, loss = {}, 0
        for name, (tensor, keep) in case.kept(out).items():
            rows[name] = tensor if keep is None else tensor[keep.to(tensor.device)]
            loss = loss + (rows[name] * weights[name].to(rows[name])).sum()
        return loss, rows

    def on_cpu(result):
        return tuple({name: t.cpu() for name, t in values.items()} for values in result)

    oracle = model_outputs_and_grads(copy.deepcopy(case.model).double(), run)
    # The loss is a sum of ± terms that cancel: its floor scales with the size of the terms.
    loss_size = sum((oracle[0][name] * weights[name]).abs().sum().item() for name in weights)
    eager = on_cpu(model_outputs_and_grads(copy.deepcopy(case.model).to(device, dtype), run))
    patched_model = copy.deepcopy(case.model).to(device, dtype)
    handle = mmkernels.patch(patched_model)
    got = on_cpu(model_outputs_and_grads(patched_model, run))
    assert_models_within_rule(got, eager, oracle, dtype, what=type(case.model).__name__,
                              sizes={**bias_sizes(case.model), "loss": loss_size})
    return handle


@pytest.fixture
def op_calls(monkeypatch):
    """The keyword arguments (its AttnSpec's fields among them, and q, k) of every `cross_attention`
    call the patched modules make."""
    calls, original = [], fusion.cross_attention

    def spy(q, k, v, **kwargs):
        calls.append(dict(kwargs, **vars(kwargs["spec"]), q=q, k=k))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(fusion, "cross_attention", spy)
    return calls


@pytest.fixture
def path(kernel_path, monkeypatch):
    """(name, device, reference-op calls): kernel_path's path ("reference": CPU tensors on the PyTorch
    reference; "kernels": the Triton kernels, on CUDA where there is one, else on the CPU under the
    interpreter). The list records every reference-op call."""
    if kernel_path.device.type == "cuda":
        return kernel_path.name, "cuda", use_path(monkeypatch, "cuda")
    return kernel_path.name, "cpu", use_path(monkeypatch, kernel_path.name)


# --------------------------------------------------------------------------- patched = eager


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_eager(family, path, op_calls):
    name, device, reference_calls = path
    case = FAMILIES[family]()
    handle = compare(case, device)
    patched = [r for r in handle.records if r.kind == "attention"]
    assert len(patched) >= 1 and not handle.fallbacks, str(handle)
    assert not [s for s in handle.skipped if s.kind == "attention"], str(handle)
    # Every attention call of the patched forward went through mmkernels, on the path asked for.
    assert len(op_calls) == case.attention_calls
    assert reference_calls.count("cross_attention") == (case.attention_calls if name == "reference" else 0)
    # Padding reached the kernels as lengths wherever the model has a mask.
    masked = [c for c in op_calls if c.get("attn_mask") is not None]
    assert all(c["kv_lens"] is not None for c in masked)
    if family in ("lxmert", "visual_bert", "vilt"):
        assert any(int(c["kv_lens"].min()) < c["k"].shape[2] for c in masked), "no key was skipped"


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_control_dropped_mask_fails(family, monkeypatch, reference_path):
    """The same comparison with the mask dropped on its way to the kernels must fail."""
    original = fusion._attend
    monkeypatch.setattr(fusion, "_attend", lambda q, k, v, mask, scale, p: original(q, k, v, None, scale, p))
    with pytest.raises(AssertionError):
        compare(FAMILIES[family](), "cpu")


def test_lxmert_sample_without_regions_gets_eagers_uniform_average(path, op_calls):
    """A sample with no region: eager adds finfo.min to every visual score of its text queries and
    returns the plain average of all (padded) regions. Skipping those keys through kv_lens would
    return zeros; the patch keeps them (and the kernels' backward gets such rows right)."""
    _, device, _ = path
    case = lxmert(region_lengths=(3, 0, 5))
    compare(case, device)
    to_regions = [c for c in op_calls if c["k"].shape[2] == 5 and c["q"].shape[2] == TEXT_LEN]
    assert to_regions and all(c["kv_lens"].tolist() == [3, 5, 5] for c in to_regions)


def test_negative_control_skipping_an_all_masked_sample_fails(monkeypatch, reference_path):
    """The same comparison with lengths that skip the padded regions of the sample that has none
    (which gives its text zeros where eager gives the regions' average) must fail."""

    def naive_lengths(mask, batch, len_k):  # one past the last live key, even for a sample with none
        live = (mask > torch.finfo(mask.dtype).min).reshape(mask.shape[0], -1, len_k).any(1)
        return (live * torch.arange(1, len_k + 1)).amax(-1).to(torch.int32).expand(batch).contiguous()

    monkeypatch.setattr(masks, "additive_mask_kv_lens", naive_lengths)
    with pytest.raises(AssertionError):
        compare(lxmert(region_lengths=(3, 0, 5)), "cpu")


# --------------------------------------------------------------------------- per-call fallbacks


def tensors(x):
    """Every tensor in a model output (ModelOutput, tuple, list, dict), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in tensors(item)]
    return []


WEIGHTS_REQUESTED = "attention weights requested"


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_requested_run_the_models_own_code(family, reference_path):
    """output_attentions=True: the attention calls asked for weights run the module's own forward
    and return its weights; where every call asks (all but LXMERT, whose x-layer self-attentions
    never return weights), the whole output is bit-identical to the unpatched model's."""
    case = FAMILIES[family]()
    torch.manual_seed(case.seed)
    expected = case.model(**case.inputs, output_attentions=True)
    handle = mmkernels.patch(case.model)
    torch.manual_seed(case.seed)
    got = case.model(**case.inputs, output_attentions=True)
    assert handle.fallbacks and all(WEIGHTS_REQUESTED in reason for _, reason in handle.fallbacks), str(handle)
    if family == "lxmert":
        attentions = ("language_attentions", "vision_attentions", "cross_encoder_attentions")
        expected, got = [getattr(expected, a) for a in attentions], [getattr(got, a) for a in attentions]
        assert sum(handle.fallbacks.values()) == 3  # l-layer, r-layer, language-to-vision cross-attention
    expected, got = tensors(expected), tensors(got)
    assert len(got) == len(expected) and any(t.dim() == 4 for t in got)  # the weights are there
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("family", FAMILIES)
def test_strict_raises_naming_the_module_and_the_reason(family, reference_path):
    case = FAMILIES[family]()
    handle = mmkernels.patch(case.model, strict=True, losses=False)
    torch.manual_seed(case.seed)
    case.model(**case.inputs)  # nothing falls back
    with pytest.raises(StrictPatchError, match=WEIGHTS_REQUESTED) as error:
        case.model(**case.inputs, output_attentions=True)
    paths = [r.path for r in handle.records if r.kind == "attention"]
    assert any(f"{path} (" in str(error.value) for path in paths), str(error.value)


def test_unknown_keyword_reaches_the_modules_own_forward(reference_path):
    fresh_seed()
    module = LxmertAttention(LxmertConfig(**TOWER))
    handle = mmkernels.patch(module)
    hidden = torch.randn(2, 3, 32)
    with pytest.raises(TypeError, match="head_mask"):
        module(hidden, hidden, None, head_mask=torch.ones(2))
    assert [reason for _, reason in handle.fallbacks] == [
        "keyword arguments ['head_mask'] that LxmertAttention.forward does not take"]


def test_visual_bert_region_to_phrase_scores_are_left_as_they_are():
    from transformers import VisualBertForRegionToPhraseAlignment

    fresh_seed()
    config = VisualBertConfig(vocab_size=VOCAB, num_hidden_layers=1, visual_embedding_dim=12,
                              max_position_embeddings=16, **TOWER)
    model = VisualBertForRegionToPhraseAlignment(config)
    handle = mmkernels.patch(model, losses=False)
    assert [s.path for s in handle.skipped] == ["attention"]
    assert "scores" in handle.skipped[0].reason
    handle.undo()
    with pytest.raises(StrictPatchError, match="attention"):
        mmkernels.patch(model, strict=True, losses=False)


# --------------------------------------------------------------------------- undo, caches, dropout


@pytest.mark.parametrize("family", FAMILIES)
def test_undo_is_bit_identical(family, reference_path, op_calls):
    case = FAMILIES[family]()
    state = {k: v.data_ptr() for k, v in case.model.state_dict().items()}

    def outputs():
        torch.manual_seed(case.seed)
        with torch.no_grad():
            return tensors(case.model(**case.inputs))

    before = outputs()
    handle = mmkernels.patch(case.model)
    outputs()
    assert len(op_calls) == case.attention_calls
    assert {k: v.data_ptr() for k, v in case.model.state_dict().items()} == state
    handle.undo()
    after = outputs()
    assert len(op_calls) == case.attention_calls
    assert {k: v.data_ptr() for k, v in case.model.state_dict().items()} == state
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("how", PICKLERS)
@pytest.mark.parametrize("family", ["lxmert", "visual_bert"])
def test_a_pickled_patched_model_loads_patched_with_its_own_handle(family, how, reference_path, op_calls):
    """pickle / torch.save of a patched fusion model, loaded: every attention call of the copy runs
    the kernels (bit-identical to the model it was saved from), a call asking for the weights falls
    back and is counted by the copy's own handle, and undo restores the unpatched outputs bit for bit."""
    case = FAMILIES[family]()

    def outputs(model, **kwargs):
        with torch.no_grad():
            return tensors(model(**case.inputs, **kwargs))

    unpatched = outputs(case.model)
    handle = mmkernels.patch(case.model)
    patched = outputs(case.model)
    loaded = pickled_copy(case.model, how)
    loaded_handle = loaded._mmkernels_handle
    assert loaded_handle is not handle and loaded_handle.active and loaded_handle.records == handle.records
    op_calls.clear()
    got = outputs(loaded)
    assert len(op_calls) == case.attention_calls and not loaded_handle.fallbacks
    assert all(torch.equal(a, b) for a, b in zip(got, patched))
    outputs(loaded, output_attentions=True)
    assert loaded_handle.fallbacks and all(WEIGHTS_REQUESTED in reason for _, reason in loaded_handle.fallbacks)
    assert not handle.fallbacks
    assert mmkernels.unpatch(loaded)
    op_calls.clear()
    assert all(torch.equal(a, b) for a, b in zip(outputs(loaded), unpatched)) and not op_calls
    assert handle.active and outputs(case.model) and len(op_calls) == case.attention_calls


def test_blip_decoder_steps_through_its_cache(path, op_calls):
    """Generation-style decoding: a prefix, then one token attending the cached keys and values
    (the cross-attention reuses its cached image keys), patched against eager under the rule."""
    _, device, _ = path
    fresh_seed()
    decoder = BlipForConditionalGeneration(blip_config()).text_decoder.eval()
    ids, text = text_batch()
    ids, text, image = ids.to(device), text.to(device), torch.randn(3, 5, 32)

    # The cache's name: `past_key_values` until transformers 5.24, `cache` since.
    cache = "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"

    def decode(model, dtype):
        model = model.to(device, dtype)
        first = model(input_ids=ids[:, :-1], attention_mask=text[:, :-1],
                      encoder_hidden_states=image.to(device, dtype), use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=text, encoder_hidden_states=image.to(device, dtype),
                     use_cache=True, **{cache: getattr(first, cache)})
        return first.logits.detach(), step.logits.detach()

    oracle = decode(copy.deepcopy(decoder), torch.float64)
    eager = decode(copy.deepcopy(decoder), torch.float32)
    handle = mmkernels.patch(decoder)
    patched = decode(decoder, torch.float32)
    assert not handle.fallbacks, str(handle)
    assert len(op_calls) == 4  # self- and cross-attention, twice
    keep = text.bool()
    for name, i, rows in (("prefix", 0, keep[:, :-1]), ("step", 1, keep[:, -1:])):
        assert_within_rule(name, patched[i][rows], eager[i][rows], oracle[i][rows], torch.float32)


def test_training_dropout_has_eagers_expectation(reference_path, op_calls):
    """In training mode the patched attention drops probabilities with mmkernels' dropout (p from the
    module's nn.Dropout); its draws differ from torch's, its expectation is eager's output without
    dropout (each kept probability scaled by 1 / (1 - p))."""
    fresh_seed()
    module = LxmertAttention(LxmertConfig(attention_probs_dropout_prob=0.3, **TOWER))
    hidden, context = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    expected = module.eval()(hidden, context)[0]
    mmkernels.patch(module)
    with torch.no_grad():
        assert torch.equal(module(hidden, context)[0], module(hidden, context)[0])
        assert op_calls[-1]["dropout_p"] == 0.0
        module.train()
        draws = torch.stack([module(hidden, context)[0] for _ in range(400)])
    assert op_calls[-1]["dropout_p"] == pytest.approx(0.3)
    assert not torch.equal(draws[0], draws[1])
    error = draws.mean(0) - expected
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert bool((error.abs() <= 6 * standard_error + 1e-6).all()), (error.abs() / standard_error).max()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["lxmert", "blip_itm", "vilt"])
def test_patched_matches_eager_on_the_gpu(family, dtype, op_calls):
    case = FAMILIES[family]()
    handle = compare(case, "cuda", dtype)
    assert handle.records and not handle.fallbacks, str(handle)
    assert len(op_calls) == case.attention_calls
