"""The transformers backend: attn_implementation="mmkernels" computes what "eager" computes.

Tiny random models built in code (nothing is downloaded), from a fresh seed per test. Without CUDA
the fp32 CPU tensors take the Triton kernels under the interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay tiny. Padded batches are compared with eager row by row on the
kept (non-padding) rows; negative controls show that the comparisons fail when the padding mask is
dropped or causality changes. transformers' own `test_attention_outputs` and
`test_retain_grad_hidden_states_attentions` scenarios (which failed with this backend when it
returned no weights) are reproduced for CLIP, SigLIP and SigLIP2.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    AttentionMaskInterface,
    AutoModel,
    BridgeTowerConfig,
    BridgeTowerModel,
    CLIPConfig,
    CLIPModel,
    Siglip2Config,
    Siglip2Model,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.masking_utils import (  # noqa: E402
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from mmkernels.integrations.transformers import (  # noqa: E402
    BACKEND_NAME,
    mmkernels_attention_forward,
    mmkernels_attention_mask,
    register,
)
from mmkernels.ops.attention import reference  # noqa: E402
from test_masks import op_calls  # noqa: E402,F401  (a fixture)
from toolkit import fresh_seed  # noqa: E402

TOWER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
TEXT = dict(vocab_size=99, max_position_embeddings=16, pad_token_id=1, bos_token_id=0, eos_token_id=2, **TOWER)
TEXT_LENGTHS = [7, 4, 2]
ATOL, RTOL = 2e-5, 1e-4
# A dropped mask (or a change of causality) must move the kept rows far more than the tolerance.
CONTROL_GAP = 1e-2


@pytest.fixture(autouse=True, scope="module")
def registered():
    register()


pytestmark = pytest.mark.usefixtures("seed")


@pytest.fixture
def reference_calls(monkeypatch):
    """The dtypes of the calls that took the plain-PyTorch path of `cross_attention`."""
    calls, original = [], reference.cross_attention

    def spy(q, *args, **kwargs):
        calls.append(q.dtype)
        return original(q, *args, **kwargs)

    monkeypatch.setattr(reference, "cross_attention", spy)
    return calls


def padding_mask(lengths, length, left=False, device="cpu"):
    """(B, length) long mask, 1 = token; right padding, or left padding with `left`."""
    keep = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return (keep.flip(-1) if left else keep).long().to(device)


def kept_rows(lengths, length, left=False):
    return [slice(length - n, length) if left else slice(0, n) for n in lengths]


def max_kept_diff(a, b, rows):
    return max((a[i, r] - b[i, r]).abs().max().item() for i, r in enumerate(rows))


def assert_kept_close(a, b, rows):
    for i, r in enumerate(rows):
        torch.testing.assert_close(a[i, r], b[i, r], atol=ATOL, rtol=RTOL, msg=lambda m: f"sample {i}: {m}")


def run(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs)


def text_inputs(device, left=False, lengths=TEXT_LENGTHS, length=7):
    ids = torch.randint(3, TEXT["vocab_size"], (len(lengths), length), device=device)
    return ids, padding_mask(lengths, length, left, device)


# ---------------------------------------------------------------------------------------------
# Registration


def test_register_is_idempotent_and_touches_no_other_name():
    others = {k: v for k, v in AttentionInterface._global_mapping.items() if k != BACKEND_NAME}
    other_masks = {k: v for k, v in AttentionMaskInterface._global_mapping.items() if k != BACKEND_NAME}
    register()
    register()
    assert AttentionInterface()[BACKEND_NAME] is mmkernels_attention_forward
    assert AttentionMaskInterface()[BACKEND_NAME] is mmkernels_attention_mask
    assert {k: v for k, v in AttentionInterface._global_mapping.items() if k != BACKEND_NAME} == others
    assert {k: v for k, v in AttentionMaskInterface._global_mapping.items() if k != BACKEND_NAME} == other_masks
    assert "mmkernels_unregistered" not in AttentionInterface()
    model = SiglipTextModel(SiglipTextConfig(**TEXT))
    with pytest.raises(ValueError, match="mmkernels_unregistered"):
        model.set_attn_implementation("mmkernels_unregistered")
    model.set_attn_implementation(BACKEND_NAME)
    assert model.config._attn_implementation == BACKEND_NAME


def test_from_config_reaches_every_tower():
    config = CLIPConfig(text_config=TEXT, vision_config=dict(image_size=16, patch_size=4, **TOWER))
    model = AutoModel.from_config(config, attn_implementation=BACKEND_NAME)
    assert model.config.text_config._attn_implementation == BACKEND_NAME
    assert model.config.vision_config._attn_implementation == BACKEND_NAME


# ---------------------------------------------------------------------------------------------
# The mask function, called as transformers calls it: padding stays a (B, Lk) key mask


def test_mask_function_bidirectional_padding_is_a_key_mask():
    pad = padding_mask([5, 3], 5, left=True).bool()
    geometry = dict(batch_size=2, q_length=5, kv_length=5, mask_function=bidirectional_mask_function)
    mask = mmkernels_attention_mask(attention_mask=pad, **geometry)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 1, 5)
    assert torch.equal(mask[:, 0, 0], pad)
    assert mmkernels_attention_mask(attention_mask=None, **geometry) is None
    # Keys past the end of the 2-D mask (a cache longer than the mask) are padding.
    mask = mmkernels_attention_mask(attention_mask=pad, **dict(geometry, kv_length=7))
    assert torch.equal(mask[:, 0, 0], F.pad(pad, (0, 2), value=False))


def test_mask_function_causal_padding_is_a_2d_key_mask():
    pad = padding_mask([5, 3], 5).bool()
    geometry = dict(batch_size=2, q_length=5, kv_length=5, mask_function=causal_mask_function)
    mask = mmkernels_attention_mask(attention_mask=pad, **geometry)
    assert mask.dtype == torch.bool and mask.shape == (2, 5)
    assert torch.equal(mask, pad)
    # Causality survives without padding too, for models that do not pass is_causal=True.
    mask = mmkernels_attention_mask(attention_mask=None, **geometry)
    assert mask.shape == (2, 5) and bool(mask.all())


@pytest.mark.parametrize(
    "geometry",
    [
        dict(mask_function=sliding_window_causal_mask_function(3)),
        dict(mask_function=causal_mask_function, q_offset=2, kv_offset=0, q_length=4),
    ],
    ids=["sliding_window", "cache_offset"],
)
def test_mask_function_falls_back_to_the_full_mask(geometry):
    geometry = dict(dict(batch_size=2, q_length=6, kv_length=6), **geometry)
    pad = padding_mask([6, 4], 6).bool()
    mask = mmkernels_attention_mask(attention_mask=pad, **geometry)
    expected = sdpa_mask(attention_mask=pad, allow_is_causal_skip=False, **geometry)
    assert mask.shape == (2, 1, geometry["q_length"], 6)
    assert torch.equal(mask, expected)


# ---------------------------------------------------------------------------------------------
# The attention function, called directly


class Attention(torch.nn.Module):
    """Stands for a transformers attention module: only `training` and `is_causal` are read."""

    def __init__(self, is_causal=False):
        super().__init__()
        self.is_causal = is_causal


def qkv(device, batch=2, heads=2, kv_heads=2, q_length=5, kv_length=6, head_dim=16):
    """Random q (B, H, Lq, d), k and v (B, Hkv, Lk, d), as transposed views like transformers passes."""
    q = torch.randn(batch, q_length, heads, head_dim, device=device).transpose(1, 2)
    k = torch.randn(batch, kv_length, kv_heads, head_dim, device=device).transpose(1, 2)
    v = torch.randn(batch, kv_length, kv_heads, head_dim, device=device).transpose(1, 2)
    return q, k, v


def sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, **kwargs).transpose(1, 2)


def test_forward_output_layout_and_no_weights(device):
    q, k, v = qkv(device)
    out, weights = mmkernels_attention_forward(Attention(), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 5, 2, 16) and out.is_contiguous()
    torch.testing.assert_close(out, sdpa(q, k, v, scale=0.3), atol=ATOL, rtol=RTOL)


def test_forward_causality_from_the_keyword_never_from_the_module(device):
    q, k, v = qkv(device, q_length=6)
    out, _ = mmkernels_attention_forward(Attention(is_causal=True), q, k, v, None)
    torch.testing.assert_close(out, sdpa(q, k, v), atol=ATOL, rtol=RTOL)
    out, _ = mmkernels_attention_forward(Attention(is_causal=False), q, k, v, None, is_causal=True)
    torch.testing.assert_close(out, sdpa(q, k, v, is_causal=True), atol=ATOL, rtol=RTOL)


def test_forward_grouped_query_attention_repeats_kv_heads(device):
    q, k, v = qkv(device, heads=4, kv_heads=2)
    out, _ = mmkernels_attention_forward(Attention(), q, k, v, None)
    expected = sdpa(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    q, k, v = qkv(device, heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="multiple of the key/value heads, got 3 and 2"):
        mmkernels_attention_forward(Attention(), q, k, v, None)


def test_forward_dropout_only_while_training_and_seeded(device):
    q, k, v = qkv(device)
    module = Attention().eval()
    out, _ = mmkernels_attention_forward(module, q, k, v, None, dropout=0.5)
    torch.testing.assert_close(out, sdpa(q, k, v), atol=ATOL, rtol=RTOL)
    module.train()
    seed = fresh_seed()
    first, _ = mmkernels_attention_forward(module, q, k, v, None, dropout=0.5)
    torch.manual_seed(seed)
    second, _ = mmkernels_attention_forward(module, q, k, v, None, dropout=0.5)
    assert torch.equal(first, second)
    assert (first - out).abs().max() > CONTROL_GAP


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(softcap=30.0), "soft-capping"),
        (dict(s_aux=torch.zeros(2)), "attention sinks"),
        (dict(position_bias=torch.zeros(1, 2, 5, 6)), "position bias"),
        (dict(sliding_window=3), "sliding window"),
    ],
)
def test_forward_rejects_what_it_does_not_compute(kwargs, message):
    q, k, v = qkv("cpu")
    with pytest.raises(ValueError, match=message):
        mmkernels_attention_forward(Attention(), q, k, v, None, **kwargs)


def test_forward_rejects_masks_it_cannot_read():
    q, k, v = qkv("cpu")  # B = 2, Lq = 5, Lk = 6
    with pytest.raises(TypeError, match="torch.Tensor or None, got list"):
        mmkernels_attention_forward(Attention(), q, k, v, [[1, 1]])
    with pytest.raises(TypeError, match="2-D attention mask .* got dtype torch.int64"):
        mmkernels_attention_forward(Attention(), q, k, v, torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"causal key mask \(B, Lk\).* expected \(2, 6\) \(or \(1, 6\)\), got \(2, 7\)"):
        mmkernels_attention_forward(Attention(), q, k, v, torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, 1, 1, Lk\) = \(2, 1, 1, 6\) \(or B = 1\), got \(1, 1, 1, 7\)"):
        mmkernels_attention_forward(Attention(), q, k, v, torch.ones(1, 1, 1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, 1, 1, Lk\) = \(2, 1, 1, 6\) \(or B = 1\), got \(3, 1, 1, 6\)"):
        mmkernels_attention_forward(Attention(), q, k, v, torch.ones(3, 1, 1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"2-D \(B, Lk\) or 4-D \(B, 1, Lq, Lk\) attention mask, got shape \(2, 5, 6\)"):
        mmkernels_attention_forward(Attention(), q, k, v, torch.ones(2, 5, 6, dtype=torch.bool))
    for output_attentions in (False, True):  # the kernels and the weights path alike
        with pytest.raises(ValueError, match=r"broadcastable to \(B, heads, Lq, Lk\) = \(2, 2, 5, 6\), got shape \(2, 1, 4, 6\)"):
            mmkernels_attention_forward(Attention(), q, k, v, torch.zeros(2, 1, 4, 6),
                                        output_attentions=output_attentions)


def test_forward_rejects_inputs_that_are_not_4d():
    q, k, v = qkv("cpu")
    with pytest.raises(ValueError, match=r"query of shape \(B, heads, L, head_dim\), got \(2, 5, 16\)"):
        mmkernels_attention_forward(Attention(), q[:, 0], k, v, None)
    with pytest.raises(ValueError, match=r"value of shape \(B, heads, L, head_dim\), got NoneType"):
        mmkernels_attention_forward(Attention(), q, k, None, None)


def test_forward_accepts_numpy_bools(device):
    q, k, v = qkv(device, q_length=6)
    out, _ = mmkernels_attention_forward(Attention(), q, k, v, None, is_causal=np.bool_(True))
    torch.testing.assert_close(out, sdpa(q, k, v, is_causal=True), atol=ATOL, rtol=RTOL)
    with pytest.raises(TypeError, match=r"is_causal to be a bool \(or numpy.bool_\), got str"):
        mmkernels_attention_forward(Attention(), q, k, v, None, is_causal="yes")


def test_forward_with_output_attentions_returns_eager_weights(device, op_calls):
    """Asked for weights, the call computes eager attention's formula for the masks it was given
    (causal plus left padding here, so rows 0-2 of sample 1 have no key: eager attends all keys
    uniformly there) and returns them, instead of silently returning None."""
    q, k, v = qkv(device, q_length=6, kv_length=6)
    keep = padding_mask([6, 3], 6, left=True, device=device).bool()
    module = Attention()
    out, weights = mmkernels_attention_forward(module, q, k, v, keep, output_attentions=True)
    allowed = keep[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool, device=device).tril()
    additive = torch.zeros(2, 1, 6, 6, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    scores = q @ k.transpose(-1, -2) * 16**-0.5 + additive
    expected = torch.softmax(scores, -1)
    assert weights.shape == (2, 2, 6, 6) and op_calls == []
    torch.testing.assert_close(weights, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(weights[1, :, :3], torch.full_like(weights[1, :, :3], 1 / 6))
    torch.testing.assert_close(out, (expected @ v).transpose(1, 2), atol=ATOL, rtol=RTOL)
    # Without the request: the kernels, no weights, and zeros for the rows with no key.
    out, weights = mmkernels_attention_forward(module, q, k, v, keep)
    assert weights is None and len(op_calls) == 1 and bool((out[1, :3] == 0).all())


def test_forward_sliding_window_inside_a_full_mask_is_applied(device):
    q, k, v = qkv(device, q_length=6, kv_length=6)
    window = sdpa_mask(
        batch_size=2, q_length=6, kv_length=6, mask_function=sliding_window_causal_mask_function(3),
        allow_is_causal_skip=False, device=device,
    )
    out, _ = mmkernels_attention_forward(Attention(), q, k, v, window, sliding_window=3)
    torch.testing.assert_close(out, sdpa(q, k, v, attn_mask=window), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# Whole models: padded batches, row by row against eager


def test_clip_text_and_vision_match_eager(device, op_calls):
    vision = dict(image_size=16, patch_size=4, **TOWER)
    config = CLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=16)
    model = CLIPModel(config).to(device).eval()
    ids, pad = text_inputs(device)
    inputs = dict(input_ids=ids, attention_mask=pad, pixel_values=torch.randn(3, 3, 16, 16, device=device))
    eager = run(model, "eager", **inputs)
    ours = run(model, BACKEND_NAME, **inputs)
    rows = kept_rows(TEXT_LENGTHS, 7)
    assert_kept_close(ours.text_model_output.last_hidden_state, eager.text_model_output.last_hidden_state, rows)
    torch.testing.assert_close(ours.image_embeds, eager.image_embeds, atol=ATOL, rtol=RTOL)
    # Text layers: causal plus key padding; vision layers: no mask at all.
    text_calls = [c for c in op_calls if c.get("key_padding_mask") is not None]
    assert len(text_calls) == len(op_calls) // 2 == TOWER["num_hidden_layers"]
    assert all(c["is_causal"] and c.get("attn_mask") is None for c in text_calls)
    # Negative control: the same tower made bidirectional moves the kept rows.
    model.config.text_config.is_causal = False
    bidirectional = run(model, "eager", **inputs).text_model_output.last_hidden_state
    assert max_kept_diff(bidirectional, eager.text_model_output.last_hidden_state, rows) > CONTROL_GAP


@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
def test_siglip_text_tower_keeps_the_padding_mask(left, device, op_calls, reference_calls):
    model = SiglipTextModel(SiglipTextConfig(**TEXT)).to(device).eval()
    ids, pad = text_inputs(device, left)
    eager = run(model, "eager", input_ids=ids, attention_mask=pad).last_hidden_state
    ours = run(model, BACKEND_NAME, input_ids=ids, attention_mask=pad).last_hidden_state
    rows = kept_rows(TEXT_LENGTHS, 7, left)
    assert_kept_close(ours, eager, rows)
    assert reference_calls == []  # the Triton kernels ran (under the interpreter on the CPU)
    assert len(op_calls) == TOWER["num_hidden_layers"]
    assert all(c["key_padding_mask"] is not None and c.get("attn_mask") is None for c in op_calls)
    # Negative control: what a backend that dropped the mask computes is far from eager.
    dropped = run(model, "eager", input_ids=ids).last_hidden_state
    assert max_kept_diff(dropped, eager, rows) > CONTROL_GAP


def test_siglip_text_tower_on_the_reference_path(monkeypatch, reference_calls):
    """CPU tensors without TRITON_INTERPRET take the plain-PyTorch path (a laptop without a GPU)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = SiglipTextModel(SiglipTextConfig(**TEXT)).eval()
    ids, pad = text_inputs("cpu")
    eager = run(model, "eager", input_ids=ids, attention_mask=pad).last_hidden_state
    ours = run(model, BACKEND_NAME, input_ids=ids, attention_mask=pad).last_hidden_state
    assert_kept_close(ours, eager, kept_rows(TEXT_LENGTHS, 7))
    assert reference_calls == [torch.float32] * TOWER["num_hidden_layers"]


def test_siglip_vision_tower_matches_eager(device):
    model = SiglipVisionModel(SiglipVisionConfig(image_size=16, patch_size=4, **TOWER)).to(device).eval()
    pixels = torch.randn(2, 3, 16, 16, device=device)
    eager = run(model, "eager", pixel_values=pixels)
    ours = run(model, BACKEND_NAME, pixel_values=pixels)
    torch.testing.assert_close(ours.last_hidden_state, eager.last_hidden_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.pooler_output, eager.pooler_output, atol=ATOL, rtol=RTOL)


def test_siglip_text_gradients_match_eager(device):
    model = SiglipTextModel(SiglipTextConfig(**TEXT)).to(device)
    ids, pad = text_inputs(device)
    weight = torch.randn(len(TEXT_LENGTHS), 7, TOWER["hidden_size"], device=device)
    keep = pad[..., None].float()

    def outputs_and_grads(implementation):
        model.zero_grad()
        model.set_attn_implementation(implementation)
        hidden = model(input_ids=ids, attention_mask=pad).last_hidden_state
        (hidden * weight * keep).sum().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_hidden, eager_grads = outputs_and_grads("eager")
    ours_hidden, ours_grads = outputs_and_grads(BACKEND_NAME)
    assert_kept_close(ours_hidden, eager_hidden, kept_rows(TEXT_LENGTHS, 7))
    assert eager_grads.keys() == ours_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_siglip2_text_and_patch_padding_match_eager(device):
    config = Siglip2Config(text_config=TEXT, vision_config=dict(num_patches=16, patch_size=4, **TOWER))
    model = Siglip2Model(config).to(device).eval()
    ids, pad = text_inputs(device)
    patch_counts = [16, 12, 5]
    inputs = dict(
        input_ids=ids,
        attention_mask=pad,
        pixel_values=torch.randn(3, 16, 3 * 4 * 4, device=device),
        pixel_attention_mask=padding_mask(patch_counts, 16, device=device),
        spatial_shapes=torch.tensor([[4, 4], [3, 4], [1, 5]], device=device),
    )
    eager = run(model, "eager", **inputs)
    ours = run(model, BACKEND_NAME, **inputs)
    rows = kept_rows(TEXT_LENGTHS, 7)
    assert_kept_close(ours.text_model_output.last_hidden_state, eager.text_model_output.last_hidden_state, rows)
    patches = kept_rows(patch_counts, 16)
    ours_patches, eager_patches = ours.vision_model_output, eager.vision_model_output
    assert_kept_close(ours_patches.last_hidden_state, eager_patches.last_hidden_state, patches)
    # The pooling head reads the mask that the mask function built.
    torch.testing.assert_close(ours.image_embeds, eager.image_embeds, atol=ATOL, rtol=RTOL)


def _model_with_padded_inputs(name, device):
    """A tiny CLIP, SigLIP (text) or SigLIP2 model and a padded batch for it."""
    ids, pad = text_inputs(device)
    if name == "clip":
        config = CLIPConfig(text_config=TEXT, vision_config=dict(image_size=16, patch_size=4, **TOWER))
        inputs = dict(input_ids=ids, attention_mask=pad, pixel_values=torch.randn(3, 3, 16, 16, device=device))
        return CLIPModel(config).to(device), inputs, ("text_model_output", "vision_model_output")
    if name == "siglip":
        return SiglipTextModel(SiglipTextConfig(**TEXT)).to(device), dict(input_ids=ids, attention_mask=pad), (None,)
    config = Siglip2Config(text_config=TEXT, vision_config=dict(num_patches=16, patch_size=4, **TOWER))
    inputs = dict(
        input_ids=ids, attention_mask=pad, pixel_values=torch.randn(3, 16, 3 * 4 * 4, device=device),
        pixel_attention_mask=padding_mask([16, 12, 5], 16, device=device),
        spatial_shapes=torch.tensor([[4, 4], [3, 4], [1, 5]], device=device),
    )
    return Siglip2Model(config).to(device), inputs, ("text_model_output", "vision_model_output")


@pytest.mark.parametrize("name", ["clip", "siglip", "siglip2"])
def test_attention_outputs_are_returned_when_requested(name, device, op_calls):
    """transformers' test_attention_outputs scenario: output_attentions=True returns one (B, H, L, L)
    attention tensor per layer (it returned none), equal to eager's, and the same hidden states."""
    model, inputs, towers = _model_with_padded_inputs(name, device)
    model.eval()
    eager = run(model, "eager", output_attentions=True, **inputs)
    ours = run(model, BACKEND_NAME, output_attentions=True, **inputs)
    assert op_calls == []  # every call asked for weights: eager's formula, not the kernels
    for tower in towers:
        eager_out, ours_out = (eager, ours) if tower is None else (getattr(eager, tower), getattr(ours, tower))
        assert len(ours_out.attentions) == TOWER["num_hidden_layers"]
        for got, expected in zip(ours_out.attentions, eager_out.attentions):
            assert got.shape == expected.shape and got.shape[1] == TOWER["num_attention_heads"]
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ours_out.last_hidden_state, eager_out.last_hidden_state, atol=ATOL, rtol=RTOL)
    run(model, BACKEND_NAME, output_hidden_states=True, **inputs)
    assert op_calls, "a forward that records hidden states only still runs the kernels"


@pytest.mark.parametrize("name", ["clip", "siglip", "siglip2"])
def test_attentions_retain_their_gradient(name, device):
    """transformers' test_retain_grad_hidden_states_attentions scenario (it raised IndexError): the
    returned attentions are part of the graph and receive a gradient."""
    model, inputs, towers = _model_with_padded_inputs(name, device)
    model.set_attn_implementation(BACKEND_NAME)
    outputs = model(**inputs, output_attentions=True, output_hidden_states=True)
    tower = outputs if towers[0] is None else getattr(outputs, towers[0])
    hidden_states, attentions = tower.hidden_states[0], tower.attentions[0]
    hidden_states.retain_grad()
    attentions.retain_grad()
    tower.last_hidden_state.flatten()[0].backward(retain_graph=True)
    assert hidden_states.grad is not None and attentions.grad is not None


def test_attention_weights_keep_eager_dropout(device):
    """In training, the weights path applies eager attention's dropout to the weights: under one seed
    it draws what eager draws, so the outputs and weights are eager's."""
    model = SiglipTextModel(SiglipTextConfig(attention_dropout=0.5, **TEXT)).to(device).train()
    ids, pad = text_inputs(device)
    seed = fresh_seed()
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids, attention_mask=pad, output_attentions=True)
    model.set_attn_implementation(BACKEND_NAME)
    torch.manual_seed(seed)
    ours = model(input_ids=ids, attention_mask=pad, output_attentions=True)
    # The dropout did run: about half of the weights of the keys that exist are zero (padded keys'
    # weights are zero with or without dropout, so they are not counted).
    existing = pad[:, None, None, :].bool().expand_as(ours.attentions[0])
    dropped = ours.attentions[0][existing] == 0
    assert 0.3 < dropped.float().mean().item() < 0.7
    for got, expected in zip(ours.attentions, eager.attentions):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.last_hidden_state, eager.last_hidden_state, atol=ATOL, rtol=RTOL)


def bridgetower():
    config = BridgeTowerConfig(
        text_config=dict(TEXT, max_position_embeddings=24),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2),
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
    )
    return BridgeTowerModel(config).eval()


def test_bridgetower_matches_eager(device):
    """The cross-modal image layers' self-attention has `module.is_causal = True` but gets no mask
    and runs bidirectionally in eager: reading causality from the module would fail this test."""
    model = bridgetower().to(device)
    ids, pad = text_inputs(device)
    inputs = dict(input_ids=ids, attention_mask=pad, pixel_values=torch.randn(3, 3, 16, 16, device=device))
    eager = run(model, "eager", **inputs)
    ours = run(model, BACKEND_NAME, **inputs)
    rows = kept_rows(TEXT_LENGTHS, 7)
    assert_kept_close(ours.text_features, eager.text_features, rows)
    torch.testing.assert_close(ours.image_features, eager.image_features, atol=ATOL, rtol=RTOL)
    # Negative control: with the padding mask dropped the kept text rows move.
    dropped = run(model, "eager", input_ids=ids, pixel_values=inputs["pixel_values"])
    assert max_kept_diff(dropped.text_features, eager.text_features, rows) > CONTROL_GAP


# ---------------------------------------------------------------------------------------------
# GPU: the kernels in half precision, under the numerics rule (docs/design.md) against a float64 eager run


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision_within_twice_the_eager_error(dtype):
    ids, pad = text_inputs("cuda", lengths=[64, 40, 9, 1], length=64)
    pixels = torch.randn(4, 3, 16, 16, device="cuda")
    cases = [
        (
            SiglipTextModel(SiglipTextConfig(**dict(TEXT, max_position_embeddings=64))),
            dict(input_ids=ids, attention_mask=pad),
            lambda output: output.last_hidden_state,
            pad,
        ),
        (
            bridgetower(),
            dict(input_ids=ids[:, :16], attention_mask=pad[:, :16], pixel_values=pixels),
            lambda output: output.text_features,
            pad[:, :16],
        ),
    ]
    for model, inputs, output, mask in cases:
        model = model.cuda().eval()

        def features(implementation, float_dtype):
            model.to(float_dtype)
            cast = {k: v.to(float_dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            return output(run(model, implementation, **cast)).double()

        oracle = features("eager", torch.float64)
        rows = kept_rows(mask.sum(-1).tolist(), mask.shape[1])
        eager_error = max_kept_diff(features("eager", dtype), oracle, rows)
        ours_error = max_kept_diff(features(BACKEND_NAME, dtype), oracle, rows)
        assert ours_error <= 2 * eager_error + 1e-3, (type(model).__name__, ours_error, eager_error)


def test_reachable_from_the_top_level_package_without_importing_transformers_first():
    import subprocess
    import sys

    code = (
        "import sys, mmkernels; assert 'transformers' not in sys.modules; "
        "mmkernels.integrations.transformers.register(); "
        "from transformers import AttentionInterface; assert 'mmkernels' in AttentionInterface()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
