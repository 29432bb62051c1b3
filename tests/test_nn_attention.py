"""CrossModalAttention against nn.MultiheadAttention: same parameters, same outputs, same checkpoints."""
import copy
import io

import pytest
import torch
from torch import nn

from mmkernels.nn.attention import CrossModalAttention

EMBED, HEADS, BATCH, LEN_Q, LEN_K = 32, 4, 3, 7, 9

CONFIGS = {
    "default": dict(),
    "batch_first": dict(batch_first=True),
    "kdim_vdim": dict(kdim=24, vdim=40, batch_first=True),
    "no_bias": dict(bias=False),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
}


def make_pair(config: dict, seed: int = 0):
    mha = nn.MultiheadAttention(EMBED, HEADS, **config)
    with torch.no_grad():  # non-zero biases, so that every parameter shows in the output
        for p in mha.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
            seed += 1
    return mha.eval(), CrossModalAttention.from_torch(mha.eval())


def make_inputs(config: dict, gen: torch.Generator):
    def sequence(length, features):
        shape = (BATCH, length, features) if config.get("batch_first") else (length, BATCH, features)
        return torch.randn(shape, generator=gen)

    return (sequence(LEN_Q, EMBED), sequence(LEN_K, config.get("kdim", EMBED)),
            sequence(LEN_K, config.get("vdim", EMBED)))


def padding_mask(gen):
    """(N, S) bool, True = padding, with at least one kept key per sample."""
    pad = torch.rand(BATCH, LEN_K, generator=gen) < 0.4
    pad[:, 0] = False
    return pad


def mask_variants(gen):
    blocked = torch.rand(LEN_Q, LEN_K, generator=gen) < 0.3  # True = NOT allowed (MHA's convention)
    blocked[:, 1] = False
    pad = padding_mask(gen)
    return {
        "none": {},
        "bool_padding": dict(key_padding_mask=pad),
        "float_padding": dict(key_padding_mask=pad.float() * -1e9),
        "bool_attn_mask": dict(attn_mask=blocked),
        "float_attn_mask_2d": dict(attn_mask=torch.randn(LEN_Q, LEN_K, generator=gen)),
        "float_attn_mask_3d": dict(attn_mask=torch.randn(BATCH * HEADS, LEN_Q, LEN_K, generator=gen)),
        "bool_attn_mask_3d": dict(attn_mask=blocked.repeat(BATCH * HEADS, 1, 1)),
        "both": dict(key_padding_mask=pad, attn_mask=blocked),
    }


@pytest.fixture
def linear_calls(monkeypatch):
    """One entry per F.linear call (the in-projections and out_proj)."""
    calls, linear = [], torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *args: calls.append(1) or linear(*args))
    return calls


def test_parameters_and_initialisation_match_multihead_attention():
    for config in CONFIGS.values():
        torch.manual_seed(0)
        mha = nn.MultiheadAttention(EMBED, HEADS, **config)
        torch.manual_seed(0)
        ours = CrossModalAttention(EMBED, HEADS, **config)
        assert list(ours.state_dict()) == list(mha.state_dict())
        for name, value in mha.state_dict().items():
            assert torch.equal(ours.state_dict()[name], value), name
        attrs = ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "batch_first", "dropout", "_qkv_same_embed_dim")
        for attr in attrs:
            assert getattr(ours, attr) == getattr(mha, attr), attr


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_swap_leaves_outputs_unchanged(config_name):
    config = CONFIGS[config_name]
    mha, ours = make_pair(config)
    gen = torch.Generator().manual_seed(1)
    query, key, value = make_inputs(config, gen)
    for mask_name, masks in mask_variants(gen).items():
        expected, _ = mha(query, key, value, need_weights=False, **masks)
        actual, weights = ours(query, key, value, **masks)
        assert weights is None
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=f"masks: {mask_name}")


def test_self_attention_gradients_match():
    """Gradients of the input and of every parameter: error against nn.MultiheadAttention in float64
    at most twice nn.MultiheadAttention's own float32 error, plus a small floor."""
    mha, ours = make_pair(dict(batch_first=True))
    oracle = copy.deepcopy(mha).double()
    x = torch.randn(BATCH, LEN_Q, EMBED, generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(BATCH, LEN_Q, dtype=torch.bool)
    pad[1, 4:] = True

    def gradients(module, dtype):
        inp = x.to(dtype).requires_grad_()
        kwargs = {} if isinstance(module, CrossModalAttention) else {"need_weights": False}
        out, _ = module(inp, inp, inp, key_padding_mask=pad, **kwargs)
        return torch.autograd.grad(out.square().sum(), [inp, *module.parameters()])

    names = ["input"] + [name for name, _ in mha.named_parameters()]
    for name, actual, eager, exact in zip(names, gradients(ours, torch.float32), gradients(mha, torch.float32),
                                          gradients(oracle, torch.float64)):
        err = (actual.double() - exact).abs().max().item()
        eager_err = (eager.double() - exact).abs().max().item()
        assert err <= 2 * eager_err + 2e-6 * exact.abs().max().item(), name


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_self_attention_projects_once(batch_first, batched, linear_calls):
    """query is key is value: one packed in-projection (plus out_proj), whatever the input layout;
    key is value: one for q and one packed for k and v."""
    ours = CrossModalAttention(EMBED, HEADS, batch_first=batch_first)
    x = torch.randn((BATCH, LEN_Q, EMBED) if batch_first else (LEN_Q, BATCH, EMBED))
    x = x if batched else x[0]
    ours(x, x, x)
    assert len(linear_calls) == 2
    memory = torch.randn_like(x)
    ours(x, memory, memory)
    assert len(linear_calls) == 2 + 3


def test_kv_lens_equals_suffix_padding_mask():
    for config in (CONFIGS["batch_first"], CONFIGS["bias_kv_zero_attn"]):
        mha, ours = make_pair(config)
        query, key, value = make_inputs(config, torch.Generator().manual_seed(3))
        kv_lens = torch.tensor([LEN_K, 1, 5])
        pad = torch.arange(LEN_K) >= kv_lens[:, None]
        expected, _ = mha(query, key, value, key_padding_mask=pad, need_weights=False)
        actual, _ = ours(query, key, value, kv_lens=kv_lens)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config_name", ["batch_first", "bias_kv_zero_attn"])
@pytest.mark.parametrize(
    "kv_lens, error, message",
    [
        (torch.tensor([LEN_K + 1, 1, 5]), ValueError, rf"kv_lens in \[0, Lk={LEN_K}\], got values from 1 to {LEN_K + 1}"),
        (torch.tensor([-1, 1, 5]), ValueError, "kv_lens in"),
        (torch.tensor([9.0, 1.0, 5.0]), TypeError, "kv_lens to have dtype int32 or int64"),
        (torch.tensor([9, 1]), ValueError, r"kv_lens to have shape \(3,\)"),
    ],
)
def test_invalid_kv_lens(config_name, kv_lens, error, message):
    """Checked alike whether kv_lens goes to the op or becomes a padding mask (appended keys)."""
    config = CONFIGS[config_name]
    query, key, value = make_inputs(config, torch.Generator().manual_seed(3))
    with pytest.raises(error, match=message):
        CrossModalAttention(EMBED, HEADS, **config)(query, key, value, kv_lens=kv_lens)


@pytest.mark.parametrize("config_name", ["batch_first", "bias_kv_zero_attn"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_key_padding_mask_of_the_wrong_shape(config_name, dtype):
    """(N, S) exactly, as nn.MultiheadAttention asks: a (1, S) mask is not broadcast over the batch."""
    config = CONFIGS[config_name]
    query, key, value = make_inputs(config, torch.Generator().manual_seed(3))
    ours = CrossModalAttention(EMBED, HEADS, **config)
    for shape in [(1, LEN_K), (BATCH, LEN_K + 1), (LEN_K,)]:
        with pytest.raises(ValueError, match=rf"key_padding_mask of shape \(N, S\) = \({BATCH}, {LEN_K}\)"):
            ours(query, key, value, key_padding_mask=torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("config_name", ["batch_first", "bias_kv_zero_attn"])
def test_is_causal_matches_the_causal_mask(config_name):
    """With the appended bias_kv / zero-attention keys, nn.MultiheadAttention runs is_causal over the
    extended keys when there is no padding mask, and the given attn_mask (appended keys attended)
    when there is one: both must be matched, kv_lens standing for a suffix padding mask."""
    mha, ours = make_pair(CONFIGS[config_name])
    x = torch.randn(BATCH, LEN_Q, EMBED, generator=torch.Generator().manual_seed(4))
    causal = torch.ones(LEN_Q, LEN_Q, dtype=torch.bool).triu(1)  # True = not allowed, as the padding mask
    kv_lens = torch.tensor([LEN_Q, 3, 5])
    pad = torch.arange(LEN_Q) >= kv_lens[:, None]
    for mha_masks, our_masks in [({}, {}), (dict(key_padding_mask=pad), dict(key_padding_mask=pad)),
                                 (dict(key_padding_mask=pad), dict(kv_lens=kv_lens))]:
        expected, _ = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False, **mha_masks)
        actual, _ = ours(x, x, x, attn_mask=causal, is_causal=True, **our_masks)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{our_masks}: {m}")


def test_unbatched_inputs():
    mha, ours = make_pair(CONFIGS["kdim_vdim"])
    gen = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(n, e, generator=gen) for n, e in ((LEN_Q, EMBED), (LEN_K, 24), (LEN_K, 40)))
    pad = torch.zeros(LEN_K, dtype=torch.bool)
    pad[6:] = True
    expected, _ = mha(query, key, value, key_padding_mask=pad, need_weights=False)
    actual, _ = ours(query, key, value, key_padding_mask=pad)
    assert actual.shape == (LEN_Q, EMBED)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config_name", ["kdim_vdim", "bias_kv_zero_attn"])
def test_checkpoints_load_both_ways(config_name):
    """An nn.MultiheadAttention checkpoint into CrossModalAttention, and back, through torch.save."""
    config = CONFIGS[config_name]
    query, key, value = make_inputs(config, torch.Generator().manual_seed(6))
    for source in (nn.MultiheadAttention(EMBED, HEADS, **config), CrossModalAttention(EMBED, HEADS, **config)):
        gen = torch.Generator().manual_seed(10)
        with torch.no_grad():
            for p in source.parameters():
                p.normal_(0, 0.3, generator=gen)
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        target_type = CrossModalAttention if isinstance(source, nn.MultiheadAttention) else nn.MultiheadAttention
        target = target_type(EMBED, HEADS, **config).eval()
        target.load_state_dict(torch.load(buffer))
        mha, ours = (source.eval(), target) if target_type is CrossModalAttention else (target, source.eval())
        torch.testing.assert_close(ours(query, key, value)[0], mha(query, key, value, need_weights=False)[0],
                                   rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training_and_seeded():
    mha = nn.MultiheadAttention(EMBED, HEADS, dropout=0.5, batch_first=True)
    ours = CrossModalAttention.from_torch(mha)
    assert ours.training and ours.dropout == 0.5
    x = torch.randn(BATCH, LEN_Q, EMBED, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    first, _ = ours(x, x, x)
    torch.manual_seed(0)
    again, _ = ours(x, x, x)
    assert torch.equal(first, again)
    evaluated, _ = ours.eval()(x, x, x)
    assert not torch.allclose(first, evaluated)
    torch.testing.assert_close(evaluated, mha.eval()(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_need_weights_raises_with_the_reason():
    ours = CrossModalAttention(EMBED, HEADS)
    x = torch.randn(LEN_Q, BATCH, EMBED)
    with pytest.raises(ValueError, match="need_weights=False"):
        ours(x, x, x, need_weights=True)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: CrossModalAttention(30, 4), ValueError, "divisible"),
        (lambda: CrossModalAttention(0, 4), ValueError, "greater than 0"),
        (lambda: CrossModalAttention(32, 4, dropout=1.0), ValueError, "dropout"),
        (lambda: CrossModalAttention.from_torch(nn.Linear(4, 4)), TypeError, "MultiheadAttention"),
    ],
)
def test_invalid_construction(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize("mask_name", ["key_padding_mask", "attn_mask"])
def test_integer_masks_raise_as_multihead_attention_does(mask_name):
    """An int mask (say 1 = token, as a tokenizer gives) is neither bool nor additive: adding it to the
    scores would silently compute something else. nn.MultiheadAttention refuses it too."""
    ours = CrossModalAttention(EMBED, HEADS)
    x = torch.randn(LEN_Q, BATCH, EMBED)
    shape, meaning = ((BATCH, LEN_Q), "padding") if mask_name == "key_padding_mask" else ((LEN_Q, LEN_Q), "not allowed")
    with pytest.raises(TypeError, match=rf"{mask_name} to be bool \(True = {meaning}\) .* got torch.int64"):
        ours(x, x, x, **{mask_name: torch.ones(shape, dtype=torch.long)})


def test_invalid_forward_inputs():
    ours = CrossModalAttention(EMBED, HEADS, kdim=24)
    x = torch.randn(LEN_Q, BATCH, EMBED)
    with pytest.raises(ValueError, match="features"):
        ours(x, x, x)
    key, value = torch.randn(LEN_K, BATCH, 24), torch.randn(LEN_K, BATCH, EMBED)
    with pytest.raises(ValueError, match="attn_mask of shape"):
        ours(x, key, value, attn_mask=torch.zeros(1, 1, LEN_Q, LEN_K))
    # nn.MultiheadAttention's shapes exactly: (L, S), or (N * num_heads, L, S) with N = 3 here.
    for shape in [(LEN_Q, LEN_K + 1), (1, LEN_K), (HEADS, LEN_Q, LEN_K)]:
        with pytest.raises(ValueError, match=rf"attn_mask of shape .* got \({', '.join(map(str, shape))}\)"):
            ours(x, key, value, attn_mask=torch.zeros(shape))


def test_invalid_masks_raise_before_any_projection(linear_calls):
    ours = CrossModalAttention(EMBED, HEADS, add_bias_kv=True)
    x = torch.randn(LEN_Q, BATCH, EMBED)
    for masks in [dict(attn_mask=torch.zeros(LEN_Q, LEN_Q + 1)), dict(key_padding_mask=torch.zeros(1, LEN_Q)),
                  dict(kv_lens=torch.tensor([LEN_Q + 1, 1, 1])), dict(attn_mask=torch.ones(LEN_Q, LEN_Q).long())]:
        with pytest.raises((TypeError, ValueError)):
            ours(x, x, x, **masks)
    assert linear_calls == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_swap_in_half_precision(dtype):
    mha = nn.MultiheadAttention(768, 12, kdim=2048, vdim=2048, batch_first=True).to("cuda", dtype).eval()
    ours = CrossModalAttention.from_torch(mha)
    gen = torch.Generator("cuda").manual_seed(0)
    text = torch.randn(16, 32, 768, device="cuda", dtype=dtype, generator=gen)
    regions = torch.randn(16, 100, 2048, device="cuda", dtype=dtype, generator=gen)
    kv_lens = torch.randint(10, 101, (16,), device="cuda", generator=gen)
    pad = torch.arange(100, device="cuda") >= kv_lens[:, None]
    expected, _ = mha(text, regions, regions, key_padding_mask=pad, need_weights=False)
    actual, _ = ours(text, regions, regions, kv_lens=kv_lens)
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)
