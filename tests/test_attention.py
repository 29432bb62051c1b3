"""cross_attention: the Triton kernels (under the interpreter on the CPU) against the float64 reference.

Numerics rule (DESIGN.md): the kernel's error against the float64 reference is at most twice the
error of the plain eager formula in the same dtype, plus a small floor, for the output and the
gradients of q, k and v.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mmkernels.ops import attention as attention_op
from mmkernels.ops import reference
from mmkernels.ops.attention import cross_attention, draw_dropout_seed, dropout_keep_mask

# Relative floor of the rule, per dtype (× the largest reference value, at least 1).
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element they skip fails the checks."""
    real = attention_op._new_output

    def nan_filled(shape, dtype, device):
        return real(shape, dtype, device).fill_(float("nan"))

    monkeypatch.setattr(attention_op, "_new_output", nan_filled)


def random_lengths(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(batch,) lengths in [1, length], then sample 1 gets the full length and sample 0 none."""
    lens = torch.randint(1, length + 1, (batch,), generator=gen)
    lens[1], lens[0] = length, 0
    return lens


def make_inputs(case: dict, dtype, device, seed: int = 0):
    """Random q, k, v, masks and lengths for one parametrised case (bhld shapes)."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads = case.get("B", 4), case.get("H", 2)
    len_q, len_k, head_dim = case["Lq"], case["Lk"], case["d"]
    q = torch.randn(batch, heads, len_q, head_dim, generator=gen)
    k = torch.randn(batch, heads, len_k, head_dim, generator=gen)
    v = torch.randn(batch, heads, len_k, head_dim, generator=gen)
    args = {"is_causal": case.get("causal", False)}
    if case.get("kv_lens"):
        args["kv_lens"] = random_lengths(batch, len_k, gen)
    if case.get("q_lens"):  # the last sample has no query, the one before all of them
        args["q_lens"] = random_lengths(batch, len_q, gen).flip(0)
    if case.get("kpm"):
        kpm = torch.rand(batch, len_k, generator=gen) < 0.3
        kpm[0] = True  # sample 0 has every key padded
        args["key_padding_mask"] = kpm.to(device)
    mask = case.get("mask")
    if mask == "bool":  # (Lq, Lk), True = attend; row 0 attends nothing
        allowed = torch.rand(len_q, len_k, generator=gen) < 0.7
        allowed[0] = False
        args["attn_mask"] = allowed.to(device)
    elif mask == "additive":  # (B, 1, Lq, Lk) with -inf holes, the last query row all -inf
        bias = torch.randn(batch, 1, len_q, len_k, generator=gen)
        bias[torch.rand(bias.shape, generator=gen) < 0.2] = float("-inf")
        bias[:, :, -1] = float("-inf")
        args["attn_mask"] = bias.to(device)
    elif mask == "additive_full":  # (B, H, Lq, Lk), finite
        args["attn_mask"] = torch.randn(batch, heads, len_q, len_k, generator=gen).to(device)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    return tensors, args


def assert_rule(name: str, actual, eager, oracle, dtype, size: float = 0.0) -> None:
    """max |actual - oracle| <= 2·max |eager - oracle| + a floor of a few units of rounding of the
    output's size: its own, or `size`, that of the terms that cancel in it, whichever is larger."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - oracle).abs().max().item()
    eager_err = (eager.double() - oracle).abs().max().item()
    floor = FLOOR[dtype] * max(oracle.abs().max().item(), size, 1.0)
    assert err <= 2 * eager_err + floor, f"{name}: error {err:.3g} > 2 × eager error {eager_err:.3g} + {floor:.3g}"


def gradient_term_sizes(q, k, v, args, upstream, out, dropout_keep=None, dropout_p=0.0):
    """float64 sizes of the sums that make dq and dk: Σ_j P_ij·(|dP_ij| + |Δ_i|)·|k_j| (and over i
    with |q_i|), where dS = P·(dP - Δ) cancels. The kernels take Δ = rowsum(dO·O) (FlashAttention's
    identity) where the eager backward takes Σ_j P_ij·dP_ij: equal in exact arithmetic, not in
    rounding, so where dS cancels to ~0 (one key, say) the eager error is exactly 0 and ours is not."""
    batch, heads, len_k = k.shape[0], k.shape[1], k.shape[2]
    identity = torch.eye(len_k, dtype=torch.float64).expand(batch, heads, len_k, len_k)
    probs = reference.cross_attention(q, k, identity, dropout_p=dropout_p, dropout_keep=dropout_keep,
                                      compute_dtype=torch.float64, **args)  # (B, H, Lq, Lk)
    d_probs = upstream @ v.transpose(-1, -2)
    delta = (upstream * out).sum(-1, keepdim=True)
    weight = probs * (d_probs.abs() + delta.abs()) * (args.get("scale") or q.shape[-1] ** -0.5)
    return (weight @ k.abs()).max().item(), (weight.transpose(-1, -2) @ q.abs()).max().item()


def check_against_reference(q, k, v, args, out, upstream=None, dropout_keep=None, dropout_p=0.0, reference_inputs=None):
    """Compare out = cross_attention(q, k, v, **args) and its q, k, v gradients with the float64
    reference under the rule; eager = the same formula in q's dtype. Both run on q, k, v, or on
    `reference_inputs` where given."""
    dtype = q.dtype
    upstream = torch.randn_like(out) if upstream is None else upstream
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    results = {}
    for label, compute_dtype in (("oracle", torch.float64), ("eager", dtype)):
        inputs = [t.detach().to(compute_dtype).requires_grad_() for t in reference_inputs or (q, k, v)]
        ref = reference.cross_attention(
            *inputs, dropout_p=dropout_p, dropout_keep=dropout_keep, compute_dtype=compute_dtype, **args
        )
        results[label] = (ref, *torch.autograd.grad(ref, inputs, upstream.to(compute_dtype)))
    oracle_inputs = [t.detach().double() for t in reference_inputs or (q, k, v)]
    sizes = (0.0, *gradient_term_sizes(*oracle_inputs, args, upstream.double(), results["oracle"][0].detach(),
                                       dropout_keep, dropout_p), 0.0)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        actual = out if i == 0 else grads[i - 1]
        assert_rule(name, actual.detach(), results["eager"][i].detach(), results["oracle"][i].detach(), dtype,
                    sizes[i])


CASES = {
    "kv_lens_Lq1": dict(Lq=1, Lk=100, d=16, kv_lens=True),
    "padding_mask": dict(Lq=7, Lk=33, d=64, kpm=True),
    "bool_mask_2d": dict(Lq=33, Lk=7, d=80, mask="bool"),
    "additive_mask_kv_lens": dict(Lq=100, Lk=33, d=16, mask="additive", kv_lens=True),
    "causal_Lq_lt_Lk": dict(Lq=33, Lk=100, d=64, causal=True, kv_lens=True),
    "causal_Lq_gt_Lk": dict(Lq=100, Lk=7, d=16, causal=True, q_lens=True),
    "lengths_and_padding": dict(Lq=7, Lk=1, d=80, kv_lens=True, q_lens=True, kpm=True),
    "everything": dict(Lq=33, Lk=100, d=80, kv_lens=True, q_lens=True, kpm=True, mask="additive_full",
                       causal=True),
    "single": dict(B=1, H=1, Lq=1, Lk=1, d=16),
}
FP16_CASES = ["padding_mask", "causal_Lq_lt_Lk", "everything"]


@pytest.mark.parametrize(
    "case_name, dtype",
    [(name, torch.float32) for name in CASES] + [(name, torch.float16) for name in FP16_CASES],
)
def test_matches_reference(case_name, dtype, device, poisoned_outputs):
    (q, k, v), args = make_inputs(CASES[case_name], dtype, device)
    check_against_reference(q, k, v, args, cross_attention(q, k, v, **args))


def test_blhd_layout_reads_strides_and_returns_blhd(device, poisoned_outputs):
    case = dict(Lq=33, Lk=33, d=64, kv_lens=True, mask="bool")
    (q, k, v), args = make_inputs(case, torch.float32, device)
    q_blhd, k_blhd, v_blhd = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    out = cross_attention(q_blhd, k_blhd, v_blhd, layout="blhd", **args)
    assert out.shape == (4, 33, 2, 64) and out.is_contiguous()
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q_blhd, k_blhd, v_blhd), upstream)
    assert all(g.is_contiguous() for g in grads), "gradients keep the (B, L, H, d) memory order"
    out_bhld = cross_attention(q, k, v, **args)
    assert out_bhld.transpose(1, 2).is_contiguous(), "bhld output is laid out as (B, Lq, H, d)"
    check_against_reference(q, k, v, args, out_bhld, upstream=upstream.transpose(1, 2))
    torch.testing.assert_close(out, out_bhld.transpose(1, 2), rtol=0, atol=0)


def test_strided_views(device, poisoned_outputs):
    """q sliced out of a wider (B, H, Lq, 2d) tensor; k and v one head expanded with stride 0 over H
    (multi-query attention's repeat as a view); their gradients sum over the expanded heads."""
    gen = torch.Generator().manual_seed(1)
    wide_q = torch.randn(3, 2, 7, 32, generator=gen).to(device).requires_grad_()
    one_head = [torch.randn(3, 1, 33, 16, generator=gen).to(device).requires_grad_() for _ in range(2)]
    q, (k, v) = wide_q[..., 16:], (t.expand(3, 2, 33, 16) for t in one_head)
    args = dict(kv_lens=torch.tensor([0, 33, 20]), is_causal=True)
    check_against_reference(q, k, v, args, cross_attention(q, k, v, **args))
    out = cross_attention(q, k, v, **args)
    grads = torch.autograd.grad(out, [wide_q, *one_head], torch.ones_like(out))
    exact = [t.detach().double().requires_grad_() for t in (wide_q, *one_head)]
    ref = reference.cross_attention(exact[0][..., 16:], *(t.expand(3, 2, 33, 16) for t in exact[1:]), **args)
    for name, actual, expected in zip(("q", "k", "v"), grads, torch.autograd.grad(ref, exact, torch.ones_like(ref))):
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_keys_past_kv_lens_are_never_read(device):
    """Keys and values past kv_lens[b] hold NaN: a kernel that loaded them (even to mask them) would
    return NaN, since NaN · 0 is NaN. Compared with the reference on the same inputs with zeros there."""
    (q, k, v), args = make_inputs(dict(B=4, Lq=7, Lk=40, d=16), torch.float32, device)
    args["kv_lens"] = torch.tensor([0, 40, 13, 35])  # none, all, inside the first block, past it
    padded = torch.arange(40, device=device)[None, None, :, None] >= args["kv_lens"].to(device)[:, None, None, None]
    k_nan, v_nan = (t.detach().masked_fill(padded, float("nan")).requires_grad_() for t in (k, v))
    zeroed = [q, *(t.detach().masked_fill(padded, 0.0) for t in (k, v))]
    check_against_reference(q, k_nan, v_nan, args, cross_attention(q, k_nan, v_nan, **args), reference_inputs=zeroed)


def test_broadcast_upstream_gradient(device, poisoned_outputs):
    """The incoming gradient of (out * w).sum() is w expanded with stride 0 over (B, H, Lq)."""
    (q, k, v), args = make_inputs(dict(Lq=7, Lk=33, d=16, kv_lens=True), torch.float32, device)
    out = cross_attention(q, k, v, **args)
    weight = torch.randn(16, dtype=torch.float64)
    check_against_reference(q, k, v, args, out, upstream=weight.to(out.dtype).expand_as(out))


def test_rows_without_keys_are_zero_with_zero_gradients(device, poisoned_outputs):
    (q, k, v), _ = make_inputs(dict(B=2, Lq=7, Lk=9, d=16), torch.float32, device)
    kpm = torch.zeros(2, 9, dtype=torch.bool, device=device)
    kpm[1] = True
    out = cross_attention(q, k, v, kv_lens=torch.tensor([0, 9]), key_padding_mask=kpm)
    out.backward(torch.randn_like(out))
    assert torch.equal(out, torch.zeros_like(out))
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


def test_empty_key_sequence(device):
    (q, k, v), _ = make_inputs(dict(B=2, Lq=5, Lk=0, d=16), torch.float32, device)
    out = cross_attention(q, k, v)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))
    assert k.grad.shape == k.shape


def test_reference_follows_sdpa_conventions():
    """The oracle itself: causal top-left for Lq ≠ Lk, bool True = attend, additive masks, as SDPA."""
    gen = torch.Generator().manual_seed(0)
    for len_q, len_k in ((7, 33), (33, 7)):
        q = torch.randn(2, 3, len_q, 16, generator=gen, dtype=torch.float64)
        k = torch.randn(2, 3, len_k, 16, generator=gen, dtype=torch.float64)
        v = torch.randn(2, 3, len_k, 16, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(
            reference.cross_attention(q, k, v, is_causal=True),
            F.scaled_dot_product_attention(q, k, v, is_causal=True),
        )
        allowed = torch.rand(len_q, len_k, generator=gen) < 0.7
        allowed[:, 0] = True
        torch.testing.assert_close(
            reference.cross_attention(q, k, v, attn_mask=allowed),
            F.scaled_dot_product_attention(q, k, v, attn_mask=allowed),
        )
        bias = torch.randn(2, 1, len_q, len_k, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(
            reference.cross_attention(q, k, v, attn_mask=bias, scale=0.3),
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3),
        )


def test_cpu_path_uses_reference(monkeypatch):
    """Without Triton (a plain CPU run), cross_attention is the reference, laid out as promised."""
    monkeypatch.setattr(attention_op, "triton_enabled", lambda *tensors: False)
    (q, k, v), args = make_inputs(dict(Lq=7, Lk=9, d=16, kv_lens=True, kpm=True), torch.float32, "cpu")
    out = cross_attention(q, k, v, **args)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, reference.cross_attention(q, k, v, **args))
    out_blhd = cross_attention(*(t.transpose(1, 2) for t in (q, k, v)), layout="blhd", **args)
    torch.testing.assert_close(out_blhd, out.transpose(1, 2))


# --------------------------------------------------------------------------- dropout


def test_dropout_keep_rate_within_statistical_bounds(device):
    p, shape = 0.3, (2, 3, 64, 96)
    seed = draw_dropout_seed(torch.Generator(device=device).manual_seed(0), device)
    keep = dropout_keep_mask(seed, *shape, p)
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    for head in range(1, 6):  # heads and samples draw different masks
        assert not torch.equal(keep.view(6, 64, 96)[0], keep.view(6, 64, 96)[head])
    assert torch.equal(keep, dropout_keep_mask(seed, *shape, p))
    other = dropout_keep_mask(draw_dropout_seed(torch.Generator(device=device).manual_seed(1), device), *shape, p)
    assert not torch.equal(keep, other)


def test_dropout_is_deterministic_under_a_seed(device):
    (q, k, v), args = make_inputs(dict(B=2, Lq=33, Lk=40, d=16, kv_lens=True), torch.float32, device)

    def run(seed):
        out = cross_attention(q, k, v, dropout_p=0.4, generator=torch.Generator(device=device).manual_seed(seed),
                              **args)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(3)
    default_a = cross_attention(q, k, v, dropout_p=0.4, **args)
    torch.manual_seed(3)
    assert torch.equal(default_a, cross_attention(q, k, v, dropout_p=0.4, **args))


def test_dropout_gradient_uses_the_forward_mask(device, poisoned_outputs):
    """Forward and backward both equal the reference run with the mask the kernels draw."""
    p = 0.3
    (q, k, v), args = make_inputs(dict(B=2, Lq=33, Lk=40, d=16, kv_lens=True, causal=True), torch.float32,
                                  device)
    out = cross_attention(q, k, v, dropout_p=p, generator=torch.Generator(device=device).manual_seed(5), **args)
    seed = draw_dropout_seed(torch.Generator(device=device).manual_seed(5), device)
    keep = dropout_keep_mask(seed, 2, 2, 33, 40, p)
    check_against_reference(q, k, v, args, out, dropout_keep=keep, dropout_p=p)


# --------------------------------------------------------------------------- registration


def test_opcheck(device):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 7, 16, generator=gen).to(device).requires_grad_()
    k = torch.randn(2, 1, 9, 16, generator=gen).to(device).requires_grad_()
    v = torch.randn(2, 1, 9, 16, generator=gen).to(device).requires_grad_()
    kv_lens, q_lens = torch.tensor([3, 9], device=device), torch.tensor([7, 2], device=device)
    kpm = torch.rand(2, 9, generator=gen).to(device) < 0.3
    bias = torch.randn(7, 9, generator=gen).to(device)
    seed = draw_dropout_seed(None, device)
    fwd_args = (q, k, v, kv_lens, q_lens, kpm, bias, seed, True, 0.2, 0.25)
    torch.library.opcheck(torch.ops.mmkernels.cross_attention_fwd, fwd_args)
    out, lse = torch.ops.mmkernels.cross_attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, kv_lens, q_lens, kpm,
                bias, seed, True, 0.2, 0.25)
    torch.library.opcheck(torch.ops.mmkernels.cross_attention_bwd, bwd_args)


def test_compiles_without_graph_breaks(device):
    (q, k, v), args = make_inputs(dict(B=2, Lq=7, Lk=9, d=16, kv_lens=True, kpm=True), torch.float32, device)

    def loss(q, k, v, kv_lens, key_padding_mask):
        out = cross_attention(q, k, v, kv_lens=kv_lens, key_padding_mask=key_padding_mask, is_causal=True)
        return (out * out).sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager_loss = loss(q, k, v, args["kv_lens"], args["key_padding_mask"])
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    compiled_loss = compiled(q, k, v, args["kv_lens"], args["key_padding_mask"])
    compiled_grads = torch.autograd.grad(compiled_loss, (q, k, v))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- errors


def _base_inputs():
    q = torch.randn(2, 3, 5, 16)
    k = torch.randn(2, 3, 7, 16)
    return q, k, k.clone()


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(layout="bshd"), ValueError, "layout"),
        (dict(q=torch.randn(2, 3, 5)), ValueError, "q to be 4-D"),
        (dict(q=torch.randn(2, 3, 5, 16, dtype=torch.float64)), TypeError, "one dtype"),
        (dict(q=torch.randint(0, 3, (2, 3, 5, 16))), TypeError, "floating-point"),
        (dict(q=torch.randn(2, 3, 5, 32)), ValueError, "same head dim"),
        (dict(q=torch.randn(2, 4, 5, 16)), ValueError, "number of heads"),
        (dict(q=torch.randn(2, 3, 5, 512), k=torch.randn(2, 3, 7, 512), v=torch.randn(2, 3, 7, 512)), ValueError,
         "head dim in"),
        (dict(v=torch.randn(2, 3, 6, 16)), ValueError, "k and v to have the same shape"),
        (dict(kv_lens=torch.tensor([1.0, 2.0])), TypeError, "kv_lens to have dtype int32 or int64"),
        (dict(kv_lens=torch.tensor([1, 2, 3])), ValueError, r"kv_lens to have shape \(2,\)"),
        (dict(kv_lens=torch.tensor([1, 8])), ValueError, r"kv_lens in \[0, Lk=7\]"),
        (dict(kv_lens=torch.tensor([-1, 3])), ValueError, "kv_lens in"),
        (dict(q_lens=torch.tensor([6, 0])), ValueError, r"q_lens in \[0, Lq=5\]"),
        (dict(kv_lens=[1, 2]), TypeError, "kv_lens to be a torch.Tensor"),
        (dict(key_padding_mask=torch.zeros(2, 7)), TypeError, "key_padding_mask to be a bool tensor"),
        (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, r"key_padding_mask of shape"),
        (dict(attn_mask=torch.zeros(5, 6, dtype=torch.bool)), ValueError, "attn_mask broadcastable"),
        (dict(attn_mask=torch.zeros(5, 7, dtype=torch.int32)), TypeError, "attn_mask to be bool"),
        (dict(attn_mask=torch.zeros(5, 7, requires_grad=True)), ValueError, "attn_mask requires grad"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p in"),
        (dict(is_causal=1), TypeError, "is_causal"),
        (dict(scale=torch.tensor(0.1)), TypeError, "scale"),
        (dict(generator=0), TypeError, "generator"),
    ],
)
def test_invalid_inputs_raise_before_launch(change, error, message):
    q, k, v = _base_inputs()
    tensors = {"q": change.pop("q", q), "k": change.pop("k", k), "v": change.pop("v", v)}
    with pytest.raises(error, match=message):
        cross_attention(tensors["q"], tensors["k"], tensors["v"], **change)


# --------------------------------------------------------------------------- GPU


GPU_HEAD_DIMS = [16, 32, 64, 80, 96, 128, 256]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", GPU_HEAD_DIMS)
def test_gpu_matches_reference_at_realistic_shapes(head_dim, dtype, poisoned_outputs):
    case = dict(B=8, H=4, Lq=77, Lk=257, d=head_dim, kv_lens=True, kpm=True)
    (q, k, v), args = make_inputs(case, dtype, "cuda")
    args["kv_lens"] = args["kv_lens"].cuda()
    check_against_reference(q, k, v, args, cross_attention(q, k, v, **args))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "case",
    [
        dict(B=4, H=8, Lq=512, Lk=1024, d=128, kv_lens=True, causal=True),
        dict(B=16, H=12, Lq=32, Lk=100, d=64, kv_lens=True, q_lens=True, mask="additive"),
        dict(B=2, H=4, Lq=1000, Lk=1023, d=64, mask="bool", kpm=True, causal=True),
        dict(B=4, H=2, Lq=129, Lk=129, d=96, kv_lens=True, q_lens=True, kpm=True, mask="additive_full"),
    ],
)
def test_gpu_masks_and_lengths(case, dtype, poisoned_outputs):
    (q, k, v), args = make_inputs(case, dtype, "cuda")
    check_against_reference(q, k, v, args, cross_attention(q, k, v, **args))


@pytest.mark.gpu
def test_gpu_more_than_65535_batch_heads():
    """CUDA caps the grid's y and z sizes at 65535: B · H = 80000 must launch all the same."""
    (q, k, v), args = make_inputs(dict(B=5000, H=16, Lq=3, Lk=5, d=16, kv_lens=True), torch.float16, "cuda")
    check_against_reference(q, k, v, args, cross_attention(q, k, v, **args))


@pytest.mark.gpu
def test_gpu_dropout_gradient_uses_the_forward_mask():
    p = 0.2
    (q, k, v), args = make_inputs(dict(B=4, H=4, Lq=77, Lk=100, d=64, kv_lens=True), torch.bfloat16, "cuda")
    out = cross_attention(q, k, v, dropout_p=p, generator=torch.Generator("cuda").manual_seed(1), **args)
    keep = dropout_keep_mask(draw_dropout_seed(torch.Generator("cuda").manual_seed(1), q.device), 4, 4, 77, 100, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    check_against_reference(q, k, v, args, out, dropout_keep=keep, dropout_p=p)


@pytest.mark.gpu
def test_gpu_forward_and_backward_do_not_sync():
    (q, k, v), args = make_inputs(dict(B=4, H=4, Lq=64, Lk=100, d=64, kv_lens=True), torch.bfloat16, "cuda")
    kv_lens = args["kv_lens"].cuda()
    cross_attention(q, k, v, kv_lens=kv_lens, dropout_p=0.1).sum().backward()  # autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = cross_attention(q, k, v, kv_lens=kv_lens, dropout_p=0.1)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_lengths_on_the_device_are_clamped():
    (q, k, v), _ = make_inputs(dict(B=2, Lq=33, Lk=40, d=64), torch.float16, "cuda")
    clamped = cross_attention(q, k, v, kv_lens=torch.tensor([-5, 100], device="cuda"))
    expected = cross_attention(q, k, v, kv_lens=torch.tensor([0, 40], device="cuda"))
    torch.testing.assert_close(clamped, expected, rtol=0, atol=0)
