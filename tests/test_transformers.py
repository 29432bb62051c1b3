"""The transformers backend: attn_implementation="mmkernels" computes what "eager" computes.

Tiny random models built in code (nothing is downloaded). Without CUDA the fp32 CPU tensors take
the Triton kernels under the interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay tiny.
Padded batches are compared with eager row by row on the kept (non-padding) rows; negative
controls show that the comparisons fail when the padding mask is dropped or causality changes.
"""
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

from mmkernels.integrations import transformers as integration  # noqa: E402
from mmkernels.integrations.transformers import (  # noqa: E402
    BACKEND_NAME,
    mmkernels_attention_forward,
    mmkernels_attention_mask,
    register,
)
from mmkernels.ops import reference  # noqa: E402

TOWER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
TEXT = dict(vocab_size=99, max_position_embeddings=16, pad_token_id=1, bos_token_id=0, eos_token_id=2, **TOWER)
TEXT_LENGTHS = [7, 4, 2]
ATOL, RTOL = 2e-5, 1e-4
# A dropped mask (or a change of causality) must move the kept rows far more than the tolerance.
CONTROL_GAP = 1e-2


@pytest.fixture(autouse=True, scope="module")
def registered():
    register()


@pytest.fixture
def op_calls(monkeypatch):
    """The keyword arguments of each `cross_attention` call that the backend makes."""
    calls, original = [], integration.cross_attention

    def spy(q, k, v, **kwargs):
        calls.append(kwargs)
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(integration, "cross_attention", spy)
    return calls


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


def test_forward_mask_forms_match_sdpa(device, op_calls):
    q, k, v = qkv(device, q_length=6, kv_length=6)
    keep = padding_mask([6, 3], 6, left=True, device=device).bool()
    full_keep = keep[:, None, None, :].expand(2, 1, 6, 6)
    causal_keep = full_keep & torch.ones(6, 6, dtype=torch.bool, device=device).tril()
    additive = torch.randn(2, 1, 6, 6, device=device)
    # With causality and left padding, rows 0-2 of the second sample have no key to attend.
    every_row, rows_with_a_key = [slice(0, 6)] * 2, [slice(3, 6)] * 2
    cases = [
        (keep[:, None, None, :], full_keep, every_row, {"key_padding_mask", "kv_lens"}),
        (keep, causal_keep, rows_with_a_key, {"key_padding_mask", "kv_lens", "is_causal"}),
        (causal_keep, causal_keep, rows_with_a_key, {"attn_mask"}),
        (additive, additive, every_row, {"attn_mask"}),
    ]
    for given, expected, rows, arguments in cases:
        out, _ = mmkernels_attention_forward(Attention(), q, k, v, given)
        assert_kept_close(out, sdpa(q, k, v, attn_mask=expected), rows)
        used = {name for name, value in op_calls.pop().items() if torch.is_tensor(value) or value is True}
        assert used == arguments


def test_forward_kv_lens_end_at_the_last_kept_key(device, op_calls):
    q, k, v = qkv(device, batch=3, kv_length=6)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 0]], device=device).bool()
    out, _ = mmkernels_attention_forward(Attention(), q, k, v, keep[:, None, None, :])
    torch.testing.assert_close(out, sdpa(q, k, v, attn_mask=keep[:, None, None, :]), atol=ATOL, rtol=RTOL)
    assert op_calls[0]["kv_lens"].tolist() == [6, 3, 4]


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
    torch.manual_seed(1)
    first, _ = mmkernels_attention_forward(module, q, k, v, None, dropout=0.5)
    torch.manual_seed(1)
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
    q, k, v = qkv("cpu")
    with pytest.raises(TypeError, match="torch.Tensor or None, got list"):
        mmkernels_attention_forward(Attention(), q, k, v, [[1, 1]])
    with pytest.raises(TypeError, match="2-D attention mask .* got dtype torch.int64"):
        mmkernels_attention_forward(Attention(), q, k, v, torch.ones(2, 6, dtype=torch.long))


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
    torch.manual_seed(0)
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
    torch.manual_seed(0)
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
    torch.manual_seed(0)
    model = SiglipTextModel(SiglipTextConfig(**TEXT)).eval()
    ids, pad = text_inputs("cpu")
    eager = run(model, "eager", input_ids=ids, attention_mask=pad).last_hidden_state
    ours = run(model, BACKEND_NAME, input_ids=ids, attention_mask=pad).last_hidden_state
    assert_kept_close(ours, eager, kept_rows(TEXT_LENGTHS, 7))
    assert reference_calls == [torch.float32] * TOWER["num_hidden_layers"]


def test_siglip_vision_tower_matches_eager(device):
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(image_size=16, patch_size=4, **TOWER)).to(device).eval()
    pixels = torch.randn(2, 3, 16, 16, device=device)
    eager = run(model, "eager", pixel_values=pixels)
    ours = run(model, BACKEND_NAME, pixel_values=pixels)
    torch.testing.assert_close(ours.last_hidden_state, eager.last_hidden_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.pooler_output, eager.pooler_output, atol=ATOL, rtol=RTOL)


def test_siglip_text_gradients_match_eager(device):
    torch.manual_seed(0)
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
    torch.manual_seed(0)
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


def bridgetower():
    torch.manual_seed(0)
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
# GPU: the kernels in half precision, under DESIGN.md's numerics rule against a float64 eager run


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
