"""CrossModalAttention (and multi_head_attention_forward, what it computes) against
nn.MultiheadAttention: same parameters, same outputs, same gradients, same checkpoints; on both
paths of the attention op (the CPU reference and the Triton kernels under the interpreter)."""
import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention_checks import PATHS, on_path
from mmkernels.nn.attention import CrossModalAttention, multi_head_attention_forward
from toolkit import assert_within_rule, fresh_seed, seeded_generator

EMBED, HEADS, BATCH, LEN_Q, LEN_K = 32, 4, 3, 7, 9


pytestmark = pytest.mark.usefixtures("seed")


CONFIGS = {
    "default": dict(),
    "batch_first": dict(batch_first=True),
    "kdim_vdim": dict(kdim=24, vdim=40, batch_first=True),
    "no_bias": dict(bias=False),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
}


def make_pair(config: dict):
    mha = nn.MultiheadAttention(EMBED, HEADS, **config)
    gen = seeded_generator()
    with torch.no_grad():  # non-zero biases, so that every parameter shows in the output
        for p in mha.parameters():
            p.normal_(0, 0.3, generator=gen)
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
        seed = fresh_seed()
        mha = nn.MultiheadAttention(EMBED, HEADS, **config)
        torch.manual_seed(seed)
        ours = CrossModalAttention(EMBED, HEADS, **config)
        assert list(ours.state_dict()) == list(mha.state_dict())
        for name, value in mha.state_dict().items():
            assert torch.equal(ours.state_dict()[name], value), name
        attrs = ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "batch_first", "dropout", "_qkv_same_embed_dim")
        for attr in attrs:
            assert getattr(ours, attr) == getattr(mha, attr), attr


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_swap_leaves_outputs_unchanged(config_name, path):
    config = CONFIGS[config_name]
    mha, ours = make_pair(config)
    gen = seeded_generator()
    query, key, value = make_inputs(config, gen)
    for mask_name, masks in mask_variants(gen).items():
        expected, _ = mha(query, key, value, need_weights=False, **masks)
        with on_path(path):
            actual, weights = ours(query, key, value, **masks)
        assert weights is None
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=f"masks: {mask_name}")


def _input_and_parameter_grads(module, x, dtype, **masks):
    inp = x.to(dtype).requires_grad_()
    kwargs = {} if isinstance(module, CrossModalAttention) else {"need_weights": False}
    out, _ = module(inp, inp, inp, **masks, **kwargs)
    return torch.autograd.grad(out.square().sum(), [inp, *module.parameters()])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("padding", ["bool", "float_finfo_min"])
def test_self_attention_gradients_match(path, padding):
    """Gradients of the input and of every parameter under the numerics rule (docs/design.md): float64
    nn.MultiheadAttention is the oracle, float32 nn.MultiheadAttention the eager baseline. The float
    padding mask puts finfo.min on every key of sample 2, whose rows then attend every key
    uniformly (a case the kernels' gradients must get right)."""
    mha, ours = make_pair(dict(batch_first=True))
    oracle = copy.deepcopy(mha).double()
    x = torch.randn(BATCH, LEN_Q, EMBED, generator=seeded_generator())
    pad = torch.zeros(BATCH, LEN_Q, dtype=torch.bool)
    pad[1, 4:] = True
    if padding == "float_finfo_min":
        pad[2] = True  # a bool mask there would leave no key: nn.MultiheadAttention returns NaN
    masks = {"key_padding_mask": pad if padding == "bool" else pad.float() * torch.finfo(torch.float32).min}
    names = ["input"] + [name for name, _ in mha.named_parameters()]
    with on_path(path):
        got = _input_and_parameter_grads(ours, x, torch.float32, **masks)
    # nn.MultiheadAttention on SDPA's math backend: PyTorch's CPU flash backend loses log(n) in the
    # backward of such rows (the bug this test guards against in our kernels; seen with torch 2.13).
    with sdpa_kernel(SDPBackend.MATH):
        eager = _input_and_parameter_grads(mha, x, torch.float32, **masks)
        exact = _input_and_parameter_grads(oracle, x, torch.float64,
                                           **{k: m.double() if m.is_floating_point() else m for k, m in masks.items()})
    for name, actual, e, o in zip(names, got, eager, exact):
        assert_within_rule(name, actual, e, o, torch.float32, metric="max")


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
    query, key, value = make_inputs(config, seeded_generator())
    with pytest.raises(error, match=message):
        CrossModalAttention(EMBED, HEADS, **config)(query, key, value, kv_lens=kv_lens)


@pytest.mark.parametrize("config_name", ["batch_first", "bias_kv_zero_attn"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_key_padding_mask_of_the_wrong_shape(config_name, dtype):
    """(N, S) exactly, as nn.MultiheadAttention asks: a (1, S) mask is not broadcast over the batch."""
    config = CONFIGS[config_name]
    query, key, value = make_inputs(config, seeded_generator())
    ours = CrossModalAttention(EMBED, HEADS, **config)
    for shape in [(1, LEN_K), (BATCH, LEN_K + 1), (LEN_K,)]:
        with pytest.raises(ValueError, match=rf"key_padding_mask of shape \(N, S\) = \({BATCH}, {LEN_K}\)"):
            ours(query, key, value, key_padding_mask=torch.zeros(shape, dtype=dtype))


def test_unbatched_inputs():
    mha, ours = make_pair(CONFIGS["kdim_vdim"])
    gen = seeded_generator()
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
    query, key, value = make_inputs(config, seeded_generator())
    for source in (nn.MultiheadAttention(EMBED, HEADS, **config), CrossModalAttention(EMBED, HEADS, **config)):
        gen = seeded_generator()
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
    x = torch.randn(BATCH, LEN_Q, EMBED, generator=seeded_generator())
    seed = fresh_seed()
    first, _ = ours(x, x, x)
    torch.manual_seed(seed)
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
        (lambda: CrossModalAttention(0, 4), ValueError, "embed_dim greater than 0, got 0"),
        (lambda: CrossModalAttention("32", 4), TypeError, "embed_dim to be an int, got str"),
        (lambda: CrossModalAttention(32.0, 4), TypeError, "embed_dim to be an int, got float"),
        (lambda: CrossModalAttention(32, None), TypeError, "num_heads to be an int, got NoneType"),
        (lambda: CrossModalAttention(32, 4, kdim=-8), ValueError, "kdim greater than 0, got -8"),
        (lambda: CrossModalAttention(32, 4, vdim="8"), TypeError, "vdim to be an int or None, got str"),
        (lambda: CrossModalAttention(32, 4, dropout=1.0), ValueError, r"dropout in \[0, 1\), got 1.0"),
        (lambda: CrossModalAttention(32, 4, dropout="0.1"), TypeError, "dropout to be a float, got str"),
        (lambda: CrossModalAttention(32, 4, dropout=None), TypeError, "dropout to be a float, got NoneType"),
        (lambda: CrossModalAttention(32, 4, batch_first="yes"), TypeError, "batch_first to be a bool"),
        (lambda: CrossModalAttention.from_torch(nn.Linear(4, 4)), TypeError, "MultiheadAttention"),
    ],
)
def test_invalid_construction(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_numpy_numbers_are_numbers():
    """np.int64 sizes, np.float32 dropout and np.bool_ flags (numpy bools are bools) are accepted."""
    ours = CrossModalAttention(np.int64(EMBED), np.int64(HEADS), dropout=np.float32(0.0), batch_first=np.bool_(True))
    mha, _ = make_pair(dict(batch_first=True))
    ours.load_state_dict(mha.state_dict())
    x = torch.randn(BATCH, LEN_Q, EMBED, generator=seeded_generator())
    causal = torch.ones(LEN_Q, LEN_Q, dtype=torch.bool).triu(1)
    expected, _ = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    actual, _ = ours.eval()(x, x, x, attn_mask=causal, is_causal=np.bool_(True), need_weights=np.bool_(False))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=r"is_causal to be a bool \(or numpy.bool_\), got int"):
        ours(x, x, x, is_causal=1)


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        (lambda x: (None, x, x), TypeError, "query to be a torch.Tensor, got NoneType"),
        (lambda x: (x, [1.0], x), TypeError, "key to be a torch.Tensor, got list"),
        (lambda x: (x.long(), x.long(), x.long()), TypeError, "query to be a floating-point tensor"),
        (lambda x: (x, x.double(), x), TypeError, "query, key and value to have one dtype"),
        (lambda x: (x.half(), x.half(), x.half()), TypeError,
         r"in the module's dtype torch.float32, got torch.float16: cast the inputs \(query.to\(torch.float32\)\), "
         r"or the module \(module.to\(torch.float16\)\), or run under torch.autocast"),
    ],
)
def test_invalid_call_arguments_say_what_was_expected(inputs, error, message, linear_calls):
    ours = CrossModalAttention(EMBED, HEADS)
    with pytest.raises(error, match=message):
        ours(*inputs(torch.randn(LEN_Q, BATCH, EMBED)))
    assert linear_calls == []


def test_autocast_runs_the_module_in_half_precision():
    """Under torch.autocast the fp32 module takes bf16 inputs, as nn.MultiheadAttention does
    (appended bias_k / bias_v keys included): the dtype check does not get in the way."""
    mha, ours = make_pair(dict(batch_first=True, add_bias_kv=True))
    x = torch.randn(BATCH, LEN_Q, EMBED, generator=seeded_generator()).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, _ = ours(x, x, x)
        eager, _ = mha(x, x, x, need_weights=False)
    assert actual.dtype == eager.dtype == torch.bfloat16
    oracle, _ = copy.deepcopy(mha).double()(*(x.double(),) * 3, need_weights=False)
    assert_within_rule("output", actual, eager, oracle, torch.bfloat16, metric="max")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("config_name", ["default", "kdim_vdim", "bias_kv_zero_attn"])
def test_functional_form_computes_a_multihead_attention_with_its_own_parameters(config_name, path):
    """multi_head_attention_forward with an nn.MultiheadAttention's parameters gives that module's
    output and its parameters' gradients (what the patch layer relies on), masks included."""
    config = CONFIGS[config_name]
    mha, _ = make_pair(config)
    gen = seeded_generator()
    query, key, value = make_inputs(config, gen)
    pad = padding_mask(gen)

    def functional(module, q, k, v):
        return multi_head_attention_forward(
            q, k, v, num_heads=module.num_heads, in_proj_weight=module.in_proj_weight,
            in_proj_bias=module.in_proj_bias, out_proj_weight=module.out_proj.weight,
            out_proj_bias=module.out_proj.bias, q_proj_weight=module.q_proj_weight,
            k_proj_weight=module.k_proj_weight, v_proj_weight=module.v_proj_weight, bias_k=module.bias_k,
            bias_v=module.bias_v, add_zero_attn=module.add_zero_attn, batch_first=module.batch_first,
            key_padding_mask=pad)

    with on_path(path):
        actual = functional(mha, query, key, value)
        got = torch.autograd.grad(actual.square().sum(), list(mha.parameters()))
    expected, _ = mha(query, key, value, key_padding_mask=pad, need_weights=False)
    eager = torch.autograd.grad(expected.square().sum(), list(mha.parameters()))
    oracle_module = copy.deepcopy(mha).double()
    exact, _ = oracle_module(query.double(), key.double(), value.double(), key_padding_mask=pad, need_weights=False)
    exact_grads = torch.autograd.grad(exact.square().sum(), list(oracle_module.parameters()))
    assert_within_rule("output", actual, expected, exact, torch.float32, metric="max")
    for (name, _), g, e, o in zip(mha.named_parameters(), got, eager, exact_grads):
        assert_within_rule(name, g, e, o, torch.float32, metric="max")


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
    gen = seeded_generator("cuda")
    text = torch.randn(16, 32, 768, device="cuda", dtype=dtype, generator=gen)
    regions = torch.randn(16, 100, 2048, device="cuda", dtype=dtype, generator=gen)
    kv_lens = torch.randint(10, 101, (16,), device="cuda", generator=gen)
    pad = torch.arange(100, device="cuda") >= kv_lens[:, None]
    expected, _ = mha(text, regions, regions, key_padding_mask=pad, need_weights=False)
    actual, _ = ours(text, regions, regions, kv_lens=kv_lens)
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)
