"""Mask semantics, in one place: `AttnSpec` (mmkernels/ops/masks.py) and each of its constructors
(transformers' masks, nn.MultiheadAttention's, the BERT-style fusion models' extended masks), on
both paths of cross_attention (the CPU reference and the Triton kernels, under the interpreter on
the CPU), against the float64 eager formula; `additive_mask_kv_lens`; a spec and the mask keywords
together; a query padding mask never used as a key mask."""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from attention_checks import PATHS, on_path
from mmkernels.ops import masks
from mmkernels.ops.attention import cross_attention
from mmkernels.ops.masks import AttnSpec
from test_nn_attention import BATCH, EMBED, LEN_K, LEN_Q, make_pair
from toolkit import assert_within_rule, fresh_seed, needs_triton, seeded_generator

ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(autouse=True)
def seeded():
    """Random data drawn from torch's global generator comes from a fresh seed (printed if a test fails)."""
    return fresh_seed()


@pytest.fixture
def op_calls(monkeypatch):
    """The AttnSpec fields (and other keywords) of each `cross_attention` call of the transformers backend."""
    from mmkernels.integrations.transformers import backend as integration

    calls, original = [], integration.cross_attention

    def spy(q, k, v, **kwargs):
        calls.append(dict(kwargs, **vars(kwargs["spec"])))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(integration, "cross_attention", spy)
    return calls


def qkv(device, batch=2, heads=2, q_length=5, kv_length=6, head_dim=16, dtype=torch.float32):
    """Random q (B, H, Lq, d), k and v (B, H, Lk, d), as transposed views like transformers passes."""
    q = torch.randn(batch, q_length, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, kv_length, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(batch, kv_length, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    return q, k, v


def eager(q, k, v, key_keep=None, causal=False, additive=None, dtype=torch.float64):
    """The eager formula softmax(q·kᵀ/√d + mask)·v in `dtype`: key_keep (B, Lk) True = attend;
    additive broadcastable to (B, H, Lq, Lk)."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if additive is not None:
        scores = scores + additive.to(dtype)
    if key_keep is not None:
        scores = scores.masked_fill(~key_keep[:, None, None, :], float("-inf"))
    if causal:
        len_q, len_k = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(len_q, len_k, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(scores, -1) @ v


def sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, **kwargs).transpose(1, 2)


def padding_keep(lengths, length, left=False, device="cpu"):
    """(B, length) bool, True = a real token; right padding, or left padding with `left`."""
    keep = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return (keep.flip(-1) if left else keep).to(device)


def assert_kept_close(a, b, rows):
    for i, r in enumerate(rows):
        torch.testing.assert_close(a[i, r], b[i, r], atol=ATOL, rtol=RTOL, msg=lambda m: f"sample {i}: {m}")


# --------------------------------------------------------------------------- AttnSpec itself


def test_attn_spec_is_public_keyword_only_and_frozen():
    assert mmkernels.AttnSpec is AttnSpec and "AttnSpec" in mmkernels.__all__
    spec = AttnSpec(kv_lens=torch.tensor([1, 2]))
    with pytest.raises(TypeError):
        AttnSpec(torch.tensor([1, 2]))  # a mask by position could land in the wrong field
    with pytest.raises(AttributeError):
        spec.q_lens = torch.tensor([1, 2])


@pytest.mark.parametrize("path", PATHS)
def test_spec_computes_what_its_keywords_compute(path, device):
    q, k, v = qkv(device, q_length=7, kv_length=9)
    gen = seeded_generator()
    fields = dict(kv_lens=torch.tensor([9, 4]), q_lens=torch.tensor([6, 7]),
                  key_padding_mask=torch.rand(2, 9, generator=gen).to(device) < 0.3,
                  attn_mask=torch.randn(1, 2, 7, 9, generator=gen).to(device), is_causal=True)
    with on_path(path):
        assert torch.equal(cross_attention(q, k, v, spec=AttnSpec(**fields)), cross_attention(q, k, v, **fields))


@needs_triton
def test_a_spec_passed_into_a_compiled_function_breaks_no_graph(device):
    q, k, v = (t.detach().requires_grad_() for t in qkv(device, q_length=7, kv_length=9))
    spec = AttnSpec(kv_lens=torch.tensor([9, 4], device=device), is_causal=True,
                    key_padding_mask=torch.rand(2, 9, device=device) < 0.3)

    def loss(q, k, v, spec):
        out = cross_attention(q, k, v, spec=spec)
        return (out * out).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_loss = loss(q, k, v, spec)
    compiled_loss = compiled(q, k, v, spec)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(torch.autograd.grad(compiled_loss, (q, k, v)), torch.autograd.grad(eager_loss, (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("keyword, value", [
    ("kv_lens", torch.tensor([2, 2])),
    ("q_lens", torch.tensor([2, 2])),
    ("key_padding_mask", torch.zeros(2, 6, dtype=torch.bool)),
    ("attn_mask", torch.zeros(5, 6)),
    ("is_causal", True),
])
def test_spec_and_a_mask_keyword_together_raise_naming_both(keyword, value):
    q, k, v = qkv("cpu")
    with pytest.raises(ValueError, match=f"spec and {keyword}"):
        cross_attention(q, k, v, spec=AttnSpec(), **{keyword: value})
    with pytest.raises(TypeError, match="expected spec to be an AttnSpec or None, got dict"):
        cross_attention(q, k, v, spec={"kv_lens": None})


@pytest.mark.parametrize("spec, error, message", [
    (AttnSpec(kv_lens=torch.tensor([7, 1])), ValueError, r"kv_lens in \[0, Lk=6\]"),
    (AttnSpec(q_lens=torch.tensor([6, 1])), ValueError, r"q_lens in \[0, Lq=5\]"),
    (AttnSpec(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError,
     r"key_padding_mask of shape \(B, Lk\) = \(2, 6\)"),
    (AttnSpec(key_padding_mask=torch.zeros(2, 6)), TypeError, "key_padding_mask to be a bool tensor"),
    (AttnSpec(attn_mask=torch.zeros(5, 5)), ValueError, r"attn_mask broadcastable to \(B, H, Lq, Lk\) = \(2, 2, 5, 6\)"),
    (AttnSpec(attn_mask=torch.zeros(5, 6, dtype=torch.long)), TypeError, "attn_mask to be bool"),
    (AttnSpec(is_causal="yes"), TypeError, "is_causal"),
])
def test_checked_names_the_field_and_the_values_seen(spec, error, message):
    with pytest.raises(error, match=message):
        spec.checked(2, 2, 5, 6, torch.device("cpu"))
    q, k, v = qkv("cpu")
    with pytest.raises(error, match=message):
        cross_attention(q, k, v, spec=spec)


# --------------------------------------------------------------------------- a query mask is not a key mask


def _constructors(q, key_keep, query_keep, heads):
    """{name: (spec, the key keep mask (B, Lk) the spec must apply, causal)} from each constructor,
    given a key keep mask and a query keep mask (both (B, L), True = real token, Lq == Lk)."""
    batch, len_q, len_k = q.shape[0], q.shape[2], key_keep.shape[1]
    low = torch.finfo(q.dtype).min
    extended = torch.zeros(batch, 1, 1, len_k, dtype=q.dtype, device=q.device).masked_fill(
        ~key_keep[:, None, None, :], low)
    return {
        "transformers 4-D key mask": (AttnSpec.from_transformers(
            key_keep[:, None, None, :], batch=batch, q_length=len_q, kv_length=len_k, query_mask=query_keep),
            False),
        "transformers causal key mask": (AttnSpec.from_transformers(
            key_keep, batch=batch, q_length=len_q, kv_length=len_k, query_mask=query_keep), True),
        "nn.MultiheadAttention": (AttnSpec.from_multihead_attention(
            key_padding_mask=~key_keep, attn_mask=None, kv_lens=None, is_causal=False, num_heads=heads,
            batch=batch, len_q=len_q, len_k=len_k, extra_keys=0, like=q), False),
        "extended mask": (AttnSpec.from_extended_mask(extended, batch=batch, len_k=len_k, like=q,
                                                      query_mask=query_keep), False),
    }


@pytest.mark.parametrize("path", PATHS)
def test_a_query_padding_mask_never_masks_keys(path, device):
    """A cross-attention with Lq == Lk (so shapes cannot tell the masks apart) whose queries and
    keys are padded differently: every constructor's spec masks exactly the key padding (and, with
    a query mask, drops only the query rows past the last real one), on both paths, within the rule
    of the float64 eager formula. Passing the query mask as the key mask must fail the comparison."""
    length, heads = 8, 2
    q, k, v = qkv(device, batch=3, heads=heads, q_length=length, kv_length=length)
    key_keep = padding_keep([8, 5, 3], length, device=device)
    query_keep = padding_keep([2, 8, 6], length, device=device)  # sample 0: 2 queries, 8 keys
    for name, (spec, causal) in _constructors(q, key_keep, query_keep, heads).items():
        with on_path(path):
            out = cross_attention(q, k, v, spec=spec)
        oracle = eager(q, k, v, key_keep, causal)
        reference_eager = eager(q, k, v, key_keep, causal, dtype=q.dtype)
        q_lens = spec.q_lens.tolist() if spec.q_lens is not None else [length] * 3
        for b, n in enumerate(q_lens):
            assert_within_rule(f"{name} sample {b}", out[b, :, :n], reference_eager[b, :, :n], oracle[b, :, :n],
                               q.dtype)
            assert bool((out[b, :, n:] == 0).all()), f"{name}: rows past the query mask"
        confused = eager(q, k, v, query_keep, causal)  # sample 2: 3 keys, 6 queries
        assert (out[2, :, 3:6].double() - confused[2, :, 3:6]).abs().max() > 1e-2, f"{name}: the control passes"


def test_query_mask_of_the_wrong_shape_is_refused():
    q, _, _ = qkv("cpu", q_length=5, kv_length=6)
    with pytest.raises(ValueError, match=r"query_mask of shape \(B, Lq\) = \(2, 5\), got \(2, 6\)"):
        AttnSpec.from_transformers(None, batch=2, q_length=5, kv_length=6, query_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"query_mask of shape \(B, Lq\) = \(2, 5\), got \(2, 6\)"):
        AttnSpec.from_extended_mask(None, batch=2, len_k=6, like=q, query_mask=torch.ones(2, 6))


# --------------------------------------------------------------------------- transformers' masks


@pytest.fixture
def transformers_backend():
    pytest.importorskip("transformers")
    from mmkernels.integrations.transformers import backend as integration

    class Attention(torch.nn.Module):
        """Stands for a transformers attention module: only `training` and `is_causal` are read."""

    return integration.mmkernels_attention_forward, Attention()


def test_transformers_mask_forms_match_sdpa(device, transformers_backend, op_calls):
    forward, module = transformers_backend
    q, k, v = qkv(device, q_length=6, kv_length=6)
    keep = padding_keep([6, 3], 6, left=True, device=device)
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
        out, _ = forward(module, q, k, v, given)
        assert_kept_close(out, sdpa(q, k, v, attn_mask=expected), rows)
        call = op_calls.pop()
        used = {name for name in vars(call["spec"]) if torch.is_tensor(call[name]) or call[name] is True}
        assert used == arguments


def test_transformers_kv_lens_end_at_the_last_kept_key(device, transformers_backend, op_calls):
    forward, module = transformers_backend
    q, k, v = qkv(device, batch=3, kv_length=6)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 0]], device=device).bool()
    out, _ = forward(module, q, k, v, keep[:, None, None, :])
    torch.testing.assert_close(out, sdpa(q, k, v, attn_mask=keep[:, None, None, :]), atol=ATOL, rtol=RTOL)
    assert op_calls[0]["kv_lens"].tolist() == [6, 3, 4]


def test_transformers_no_mask_is_causal_only_past_one_query():
    assert AttnSpec.from_transformers(None, batch=2, q_length=5, kv_length=6, is_causal=True).is_causal
    assert not AttnSpec.from_transformers(None, batch=2, q_length=1, kv_length=6, is_causal=True).is_causal
    with pytest.raises(TypeError, match="2-D attention mask .* got dtype torch.int64"):
        AttnSpec.from_transformers(torch.ones(2, 6, dtype=torch.long), batch=2, q_length=5, kv_length=6)


# --------------------------------------------------------------------------- nn.MultiheadAttention's masks

MHA_CONFIGS = {
    "batch_first": dict(batch_first=True),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
}


def test_multihead_kv_lens_equals_suffix_padding_mask():
    gen = seeded_generator()
    for config in MHA_CONFIGS.values():
        mha, ours = make_pair(config)
        query = torch.randn(BATCH, LEN_Q, EMBED, generator=gen)
        key, value = (torch.randn(BATCH, LEN_K, EMBED, generator=gen) for _ in range(2))
        kv_lens = torch.tensor([LEN_K, 1, 5])
        pad = torch.arange(LEN_K) >= kv_lens[:, None]
        expected, _ = mha(query, key, value, key_padding_mask=pad, need_weights=False)
        actual, _ = ours(query, key, value, kv_lens=kv_lens)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config_name", list(MHA_CONFIGS))
def test_multihead_is_causal_matches_the_causal_mask(config_name):
    """With the appended bias_kv / zero-attention keys, nn.MultiheadAttention runs is_causal over the
    extended keys when there is no padding mask, and the given attn_mask (appended keys attended)
    when there is one: both must be matched, kv_lens standing for a suffix padding mask."""
    mha, ours = make_pair(MHA_CONFIGS[config_name])
    x = torch.randn(BATCH, LEN_Q, EMBED, generator=seeded_generator())
    causal = torch.ones(LEN_Q, LEN_Q, dtype=torch.bool).triu(1)  # True = not allowed, as the padding mask
    kv_lens = torch.tensor([LEN_Q, 3, 5])
    pad = torch.arange(LEN_Q) >= kv_lens[:, None]
    for mha_masks, our_masks in [({}, {}), (dict(key_padding_mask=pad), dict(key_padding_mask=pad)),
                                 (dict(key_padding_mask=pad), dict(kv_lens=kv_lens))]:
        expected, _ = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False, **mha_masks)
        actual, _ = ours(x, x, x, attn_mask=causal, is_causal=True, **our_masks)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{our_masks}: {m}")


def test_multihead_masks_in_cross_attentions_conventions():
    """bool attn_mask True = NOT allowed becomes True = attend; a 3-D (B·H, L, S) one becomes
    (B, H, L, S); an additive key_padding_mask joins the attn_mask (a bool one as -inf); appended
    keys are attended by every query and past every length (kv_lens becomes a padding mask)."""
    like = torch.zeros(2, 2, 3, 4)
    blocked = torch.rand(2 * 2, 3, 4) < 0.5
    spec = AttnSpec.from_multihead_attention(key_padding_mask=None, attn_mask=blocked, kv_lens=None, is_causal=False,
                                             num_heads=2, batch=2, len_q=3, len_k=4, extra_keys=0, like=like)
    assert torch.equal(spec.attn_mask, ~blocked.view(2, 2, 3, 4)) and spec.key_padding_mask is None
    additive_pad = torch.tensor([[0.0, 0.0, -1e9, -1e9], [0.0, 0.0, 0.0, -1e9]])
    spec = AttnSpec.from_multihead_attention(key_padding_mask=additive_pad, attn_mask=blocked[0], kv_lens=None,
                                             is_causal=False, num_heads=2, batch=2, len_q=3, len_k=4, extra_keys=0,
                                             like=like)
    expected = torch.zeros(3, 4).masked_fill(blocked[0], float("-inf")) + additive_pad.view(2, 1, 1, 4)
    assert spec.key_padding_mask is None and torch.equal(spec.attn_mask, expected)
    spec = AttnSpec.from_multihead_attention(key_padding_mask=None, attn_mask=None, kv_lens=torch.tensor([4, 2]),
                                             is_causal=False, num_heads=2, batch=2, len_q=3, len_k=4, extra_keys=2,
                                             like=like)
    assert spec.kv_lens is None
    assert spec.key_padding_mask.tolist() == [[False] * 6, [False, False, True, True, False, False]]


# --------------------------------------------------------------------------- the fusion models' extended masks


def brute_force_kv_lens(mask, batch, len_k):
    """One past the last key some query of the sample attends; Lk if one of its rows attends none."""
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(batch, -1, -1, len_k)
    live = m4 > torch.finfo(mask.dtype).min
    lens = []
    for b in range(batch):
        if not bool(live[b].any(-1).all()):
            lens.append(len_k)
        else:
            lens.append(max((j + 1 for j in range(len_k) if bool(live[b, ..., j].any())), default=0))
    return lens


def test_additive_mask_kv_lens():
    low = torch.finfo(torch.float32).min
    # (B, 1, 1, Lk) padding: trailing, a hole, an all-masked sample, none; -inf counts as masked.
    pad = torch.zeros(4, 1, 1, 6)
    pad[0, ..., 4:] = low
    pad[1, ..., 1:3] = low
    pad[2] = low
    pad[3, ..., 5] = float("-inf")
    assert masks.additive_mask_kv_lens(pad, 4, 6).tolist() == [4, 6, 6, 5]
    # (B, 1, Lq, Lk) causal plus right padding; left padding leaves row 0 with no key: Lk.
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    right = causal & (torch.arange(5) < torch.tensor([5, 3])[:, None, None])
    left = causal & (torch.arange(5) >= torch.tensor([0, 2])[:, None, None])
    for keep, expected in ((right, [5, 3]), (left, [5, 5])):
        mask = torch.where(keep, 0.0, low)[:, None]
        assert masks.additive_mask_kv_lens(mask, 2, 5).tolist() == expected
    # One mask for the whole batch (1, 1, Lq, Lk); a 2-D (Lq, Lk) one.
    shared = torch.where(right[1], 0.0, low)
    assert masks.additive_mask_kv_lens(shared[None, None], 3, 5).tolist() == [3, 3, 3]
    assert masks.additive_mask_kv_lens(shared, 3, 5).tolist() == [3, 3, 3]
    # Numbers added as eager adds them (bool / int masks, finite negative values) skip nothing.
    assert masks.additive_mask_kv_lens(right[:, None].long(), 2, 5) is None
    assert masks.additive_mask_kv_lens(torch.full((2, 1, 1, 5), -1e30), 2, 5).tolist() == [5, 5]
    # Random masks, half their entries finfo.min, in fp32 and fp16, against the brute force.
    for dtype in (torch.float32, torch.float16):
        for shape in ((5, 1, 1, 7), (5, 2, 3, 7), (1, 1, 4, 7), (5, 1, 4, 7)):
            dead = torch.rand(shape) < 0.5
            mask = torch.where(dead, torch.finfo(dtype).min, torch.randn(shape)).to(dtype)
            lens = masks.additive_mask_kv_lens(mask, 5, 7)
            assert lens.dtype == torch.int32 and lens.is_contiguous()
            assert lens.tolist() == brute_force_kv_lens(mask, 5, 7), (shape, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_extended_mask_spec_computes_eagers_function(path, device):
    """The extended mask goes to the kernels as it is (an all-masked sample averages all keys, as
    eager does) with kv_lens beside it; a bool or integer mask is added as numbers, as eager adds it."""
    q, k, v = qkv(device, batch=3, q_length=4, kv_length=6)
    low = torch.finfo(torch.float32).min
    mask = torch.zeros(3, 1, 1, 6, device=device)
    mask[0, ..., 4:] = low
    mask[2] = low
    spec = AttnSpec.from_extended_mask(mask, batch=3, len_k=6, like=q)
    assert spec.attn_mask is mask and spec.kv_lens.tolist() == [4, 6, 6]
    with on_path(path):
        out = cross_attention(q, k, v, spec=spec)
    assert_within_rule("extended", out, eager(q, k, v, additive=mask, dtype=q.dtype), eager(q, k, v, additive=mask),
                       q.dtype)
    integer = torch.tensor([[1, 1, 0, 0, 0, 1]] * 3, device=device)[:, None, None, :]
    spec = AttnSpec.from_extended_mask(integer, batch=3, len_k=6, like=q)
    assert spec.attn_mask.dtype == q.dtype and spec.kv_lens is None
    with on_path(path):
        out = cross_attention(q, k, v, spec=spec)
    assert_within_rule("integer", out, eager(q, k, v, additive=integer, dtype=q.dtype),
                       eager(q, k, v, additive=integer), q.dtype)


def test_attn_mask_problem_says_why():
    assert masks.attn_mask_problem(torch.zeros(2, 1, 1, 6), 2, 2, 5, 6) is None
    assert "broadcastable to (B, H, Lq, Lk) = (2, 2, 5, 6), got shape (3, 1, 1, 6)" in \
        masks.attn_mask_problem(torch.zeros(3, 1, 1, 6), 2, 2, 5, 6)
    assert "requires grad" in masks.attn_mask_problem(torch.zeros(6, requires_grad=True), 2, 2, 5, 6)
