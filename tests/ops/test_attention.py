"""cross_attention, on both paths (the CPU reference and the Triton kernels, under the interpreter on
the CPU), against the float64 reference under docs/design.md's numerics rule; inputs that once
gave silent wrong answers; the work it does; compile; errors (opcheck: test_contract.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention_checks import (
    NONFINITE_WARNINGS,
    PATHS,
    check_against_reference,
    check_contract,
    dropout_keep_mask,
    keep_mask_for,
    make_inputs,
    on_path,
)
from mmkernels.ops.attention import plan, reference
from mmkernels.ops.attention import cross_attention, draw_dropout_seed
from toolkit import OpTrace, assert_no_host_sync, fresh_seed, needs_triton, seeded_generator

pytestmark = pytest.mark.usefixtures("seed")


CASES = {
    "kv_lens_Lq1": dict(Lq=1, Lk=97, d=16, kv_lens=True),
    "padding_mask": dict(Lq=7, Lk=33, d=64, kpm=True),
    "bool_mask_2d": dict(Lq=33, Lk=7, d=80, mask="bool"),
    "additive_mask_kv_lens": dict(Lq=67, Lk=33, d=16, mask="additive", kv_lens=True),
    "causal_Lq_lt_Lk": dict(Lq=33, Lk=67, d=64, causal=True, kv_lens=True),
    "causal_Lq_gt_Lk": dict(Lq=67, Lk=7, d=16, causal=True, q_lens=True),
    "lengths_and_padding": dict(Lq=7, Lk=1, d=80, kv_lens=True, q_lens=True, kpm=True),
    "everything": dict(Lq=33, Lk=67, d=80, kv_lens=True, q_lens=True, kpm=True, mask="additive_full",
                       causal=True),
    "single": dict(B=1, H=1, Lq=1, Lk=1, d=16),
}
FP16_CASES = ["padding_mask", "causal_Lq_lt_Lk", "everything"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "case_name, dtype",
    [(name, torch.float32) for name in CASES] + [(name, torch.float16) for name in FP16_CASES],
)
def test_matches_reference(case_name, dtype, path, device):
    (q, k, v), args = make_inputs(CASES[case_name], dtype, device)
    with on_path(path):
        check_against_reference(q, k, v, args, cross_attention(q, k, v, **args))


def test_blhd_layout_reads_strides_and_returns_blhd(device):
    case = dict(Lq=33, Lk=33, d=32, kv_lens=True, mask="bool")
    (q, k, v), args = make_inputs(case, torch.float32, device)
    q_blhd, k_blhd, v_blhd = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    out = cross_attention(q_blhd, k_blhd, v_blhd, layout="blhd", **args)
    assert out.shape == (3, 33, 2, 32) and out.is_contiguous()
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q_blhd, k_blhd, v_blhd), upstream)
    assert all(g.is_contiguous() for g in grads), "gradients keep the (B, L, H, d) memory order"
    out_bhld = cross_attention(q, k, v, **args)
    assert out_bhld.transpose(1, 2).is_contiguous(), "bhld output is laid out as (B, Lq, H, d)"
    check_against_reference(q, k, v, args, out_bhld, upstream=upstream.transpose(1, 2))
    torch.testing.assert_close(out, out_bhld.transpose(1, 2), rtol=0, atol=0)


def test_strided_views(device):
    """q sliced out of a wider (B, H, Lq, 2d) tensor; k and v one head expanded with stride 0 over H
    (multi-query attention's repeat as a view); their gradients sum over the expanded heads."""
    gen = seeded_generator()
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


def test_broadcast_upstream_gradient(device):
    """The incoming gradient of (out * w).sum() is w expanded with stride 0 over (B, H, Lq)."""
    (q, k, v), args = make_inputs(dict(Lq=7, Lk=33, d=16, kv_lens=True), torch.float32, device)
    out = cross_attention(q, k, v, **args)
    weight = torch.randn(16, dtype=torch.float64)
    check_against_reference(q, k, v, args, out, upstream=weight.to(out.dtype).expand_as(out))


@pytest.mark.parametrize("path", PATHS)
def test_empty_key_sequence(path, device):
    (q, k, v), _ = make_inputs(dict(B=2, Lq=5, Lk=0, d=16), torch.float32, device)
    with on_path(path):
        out = cross_attention(q, k, v)
        out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))
    assert k.grad.shape == k.shape


def test_reference_follows_sdpa_conventions():
    """The oracle itself: causal top-left for Lq ≠ Lk, bool True = attend, additive masks, as SDPA."""
    gen = seeded_generator()
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


def test_cpu_path_uses_reference():
    """On the reference path cross_attention is the reference, laid out as promised."""
    (q, k, v), args = make_inputs(dict(Lq=7, Lk=9, d=16, kv_lens=True, kpm=True), torch.float32, "cpu")
    with on_path("reference"):
        out = cross_attention(q, k, v, **args)
        out_blhd = cross_attention(*(t.transpose(1, 2) for t in (q, k, v)), layout="blhd", **args)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, reference.cross_attention(q, k, v, **args), rtol=0, atol=0)
    torch.testing.assert_close(out_blhd, out.transpose(1, 2))


# --------------------------------------------------------------------------- inputs that are easy to get silently wrong


def _qkv(shape_q, shape_k, device, dtype=torch.float32):
    gen = seeded_generator()
    q = torch.randn(shape_q, generator=gen).to(device, dtype).requires_grad_()
    k, v = (torch.randn(shape_k, generator=gen).to(device, dtype).requires_grad_() for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finfo_min_on_every_key_of_a_row_gives_exact_gradients(path, dtype, device):
    """(1) A row whose keys all carry finfo.min attends them uniformly (eager's answer), and its
    gradients are exact: the backward once rebuilt P from a log-sum-exp that had lost log(n)."""
    q, k, v = _qkv((2, 2, 4, 16), (2, 2, 3, 16), device, dtype)
    mask = torch.zeros(2, 1, 4, 3, device=device)
    mask[..., 1, :] = torch.finfo(torch.float32).min
    mask[1, :, 2, :2] = torch.finfo(torch.float32).min  # a row with one finite key too
    args = dict(attn_mask=mask)
    with on_path(path):
        out = cross_attention(q, k, v, **args)
        check_against_reference(q, k, v, args, out)
    uniform = v.detach().double().mean(-2)  # row 1 of every (sample, head): the mean of the values
    torch.testing.assert_close(out[:, :, 1].double(), uniform, rtol=1e-3 if dtype == torch.float16 else 1e-6,
                               atol=1e-3 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_float64_mask_below_float32_range_masks_nothing(path, device):
    """An fp32 q, k, v with a float64 additive mask whose values are finite but below fp32's range
    on every key of a row (-1e300, finfo(float64).min): a finite mask removes nothing, so the row
    attends its keys uniformly, as the eager formula (whose scores torch promotes to float64) and
    the reference give; its gradients too. A row with one key at 0 among -1e300 attends that key, and
    one with a key at +1e300 (past fp32's range too) attends that key alone, as float64 scores do."""
    q, k, v = _qkv((2, 2, 4, 16), (2, 2, 5, 16), device)
    mask = torch.zeros(2, 1, 4, 5, dtype=torch.float64, device=device)
    mask[..., 1, :] = -1e300
    mask[..., 2, :] = torch.finfo(torch.float64).min
    mask[..., 3, 1:] = -1e300
    mask[..., 0, 2] = 1e300
    args = dict(attn_mask=mask)
    with on_path(path):
        out = cross_attention(q, k, v, **args)
        check_against_reference(q, k, v, args, out)
    uniform = v.detach().double().mean(-2)
    for row in (1, 2):
        torch.testing.assert_close(out[:, :, row].double(), uniform, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:, :, 3].double(), v.detach().double()[:, :, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:, :, 0].double(), v.detach().double()[:, :, 2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backward", ["outside", "inside"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_autocast_changes_nothing(path, dtype, backward, device):
    """Under torch.autocast (bf16) cross_attention computes as it documents (scores and softmax in
    fp32 from the inputs' own dtype, the output in that dtype): output and gradients are those
    without autocast, bit for bit, whether the backward runs inside the autocast region or after
    it."""
    if path == "kernels" and dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("bf16 on the CPU takes the reference path")
    (q, k, v), args = make_inputs(CASES["additive_mask_kv_lens"], dtype, device)
    upstream = torch.randn(q.shape, device=device).to(dtype)

    def run(autocast: str):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with on_path(path), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast != "off"):
            out = cross_attention(*leaves, **args)
            grads = torch.autograd.grad(out, leaves, upstream) if autocast == "inside" else None
        if grads is None:
            with on_path(path):
                grads = torch.autograd.grad(out, leaves, upstream)
        return [out.detach(), *grads]

    plain, got = run("off"), run(backward)
    for name, g, p in zip(("out", "dq", "dk", "dv"), got, plain):
        assert g.dtype == p.dtype == dtype and torch.equal(g, p), f"{name}: differs under autocast"
    with on_path(path):
        check_against_reference(q, k, v, args, cross_attention(q, k, v, **args), upstream)


@NONFINITE_WARNINGS
@pytest.mark.parametrize("path", PATHS)
def test_nan_in_one_query_row_propagates_to_that_row(path, device):
    """(2) NaN in → NaN out: a NaN query row returns NaN (it once returned zeros on the CPU path),
    passes NaN to its query gradient, and leaves every other row exact."""
    q, k, v = _qkv((2, 2, 7, 16), (2, 2, 9, 16), device)
    with torch.no_grad():
        q[1, 0, 3, 5] = float("nan")
    with on_path(path):
        out = cross_attention(q, k, v)
        check_contract(q, k, v, {}, out, label=path)
    nonfinite_rows = (~torch.isfinite(out)).all(-1)
    expected = torch.zeros_like(nonfinite_rows)
    expected[1, 0, 3] = True
    assert torch.equal(nonfinite_rows, expected)
    assert torch.isfinite(out).sum() == out.numel() - out.shape[-1]


@NONFINITE_WARNINGS
@pytest.mark.parametrize("path", PATHS)
def test_nan_past_kv_lens_and_past_q_lens_changes_nothing(path, device):
    """(3) keys past kv_lens do not exist, and (4) rows past q_lens are zeros with zero gradients,
    whatever those positions hold (q, k, v and the additive mask's entries there): with NaN and Inf
    there, the results are those of the same inputs with zeros there, exactly. (The dk/dv pass
    must keep a NaN or +inf mask entry of a row past q_lens out of dk and dv.)"""
    q, k, v = _qkv((4, 2, 7, 16), (4, 2, 40, 16), device)
    args = dict(kv_lens=torch.tensor([0, 40, 13, 35]), q_lens=torch.tensor([7, 0, 3, 5]), is_causal=False)
    key_gone = (torch.arange(40, device=device)[:, None] >= args["kv_lens"].to(device)[:, None, None, None])
    row_gone = (torch.arange(7, device=device)[:, None] >= args["q_lens"].to(device)[:, None, None, None])
    bias = torch.randn(4, 1, 7, 40, device=device)
    pair_gone = row_gone | key_gone.transpose(-1, -2)  # (4, 1, 7, 40)

    def run(fill):
        inputs = [q.detach().masked_fill(row_gone, fill).requires_grad_(),
                  *(t.detach().masked_fill(key_gone, fill).requires_grad_() for t in (k, v))]
        with on_path(path):
            out = cross_attention(*inputs, attn_mask=bias.masked_fill(pair_gone, fill), **args)
        upstream = torch.ones_like(out)
        return [out, *torch.autograd.grad(out, inputs, upstream)], inputs

    clean, _ = run(0.0)
    for fill in (float("nan"), float("inf")):
        dirty, inputs = run(fill)
        for name, a, b in zip(("out", "dq", "dk", "dv"), dirty, clean):
            assert torch.equal(a, b), f"{name} changed with {fill} past the lengths"
    args["attn_mask"] = bias.masked_fill(pair_gone, float("inf"))
    with on_path(path):
        out = cross_attention(*inputs, **args)
    check_contract(*inputs, args, out, label=path)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@NONFINITE_WARNINGS
@pytest.mark.parametrize("path", PATHS)
def test_rows_past_q_lens_stay_zero_when_keys_hold_nan(path, device):
    """(4) Keys that exist hold NaN (so every row that attends them is NaN): rows past q_lens are
    still exactly zero, with zero query gradients."""
    q, k, v = _qkv((2, 2, 7, 16), (2, 2, 9, 16), device)
    with torch.no_grad():
        k[:, :, 2, 0] = float("nan")
        v[:, :, 4, 1] = float("nan")
    args = dict(q_lens=torch.tensor([3, 6]))
    with on_path(path):
        out = cross_attention(q, k, v, **args)
        check_contract(q, k, v, args, out, label=path)
    assert torch.isnan(out[0, :, :3]).all() and torch.isnan(out[1, :, :6]).all()
    assert bool((out[0, :, 3:] == 0).all()) and bool((out[1, :, 6:] == 0).all())


@NONFINITE_WARNINGS
@pytest.mark.parametrize("path", PATHS)
def test_dropout_never_hides_a_nan(path, device):
    """(5) A NaN key makes its rows NaN for every dropout draw, also when dropout drops that key
    (the kernels once returned 0 there: `l > 0` is false for NaN)."""
    q, k, v = _qkv((1, 1, 32, 16), (1, 1, 8, 16), device)
    with torch.no_grad():
        k[0, 0, 3, 2] = float("nan")
    with on_path(path):
        for _ in range(6):
            seed = fresh_seed()
            out = cross_attention(q, k, v, dropout_p=0.5, generator=torch.Generator(device=device).manual_seed(seed))
            assert torch.isnan(out).all(), "dropout hid a NaN score"
        keep = keep_mask_for(path, seed, (1, 1, 32, 8), 0.5, device)
        assert not keep[..., 3].all(), "the draw never dropped the NaN key: the check could not fail"
        check_contract(q, k, v, {}, out, dropout_keep=keep, dropout_p=0.5, label=path)


@NONFINITE_WARNINGS
@pytest.mark.parametrize("path", PATHS)
def test_row_with_no_key_versus_row_whose_scores_are_nan(path, device):
    """The two definitions side by side. Row 0: every key masked (no key) → 0, zero gradient, even
    with NaN in its query and in the masked keys' k. Row 1: a NaN additive mask entry on an attended
    key → NaN. Row 2: its one attended key scores -inf from the data (an Inf in q) → 0/0 = NaN, as
    in eager attention, not "no key". Row 3: attends keys fine → exact."""
    q, k, v = _qkv((1, 1, 4, 16), (1, 1, 5, 16), device)
    allowed = torch.ones(1, 1, 4, 5, dtype=torch.bool, device=device)
    allowed[..., 0, :] = False
    allowed[..., 2, 1:] = False
    bias = torch.zeros(1, 1, 4, 5, device=device)
    bias[..., 1, 3] = float("nan")
    with torch.no_grad():
        q[0, 0, 0] = float("nan")
        k[0, 0, 0] = torch.where(k[0, 0, 0] == 0, 1.0, k[0, 0, 0])
        q[0, 0, 2] = float("inf") * -k[0, 0, 0].sign()  # q_2 · k_0 = -inf
    bias = bias.masked_fill(~allowed, float("-inf"))
    args = dict(attn_mask=bias)
    with on_path(path):
        out = cross_attention(q, k, v, **args)
        check_contract(q, k, v, args, out, label=path)
    assert torch.equal(out[0, 0, 0], torch.zeros_like(out[0, 0, 0]))
    assert torch.isnan(out[0, 0, 1]).all() and torch.isnan(out[0, 0, 2]).all()
    assert torch.isfinite(out[0, 0, 3]).all()


# --------------------------------------------------------------------------- dropout


@needs_triton
def test_dropout_keep_rate_within_statistical_bounds(device):
    p, shape = 0.3, (2, 3, 64, 96)
    seed = draw_dropout_seed(seeded_generator(device), device)
    keep = dropout_keep_mask(seed, *shape, p)
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    for head in range(1, 6):  # heads and samples draw different masks
        assert not torch.equal(keep.view(6, 64, 96)[0], keep.view(6, 64, 96)[head])
    assert torch.equal(keep, dropout_keep_mask(seed, *shape, p))
    assert not torch.equal(keep, dropout_keep_mask(draw_dropout_seed(seeded_generator(device), device), *shape, p))


@pytest.mark.parametrize("path", PATHS)
def test_dropout_is_deterministic_under_a_seed(path, device):
    (q, k, v), args = make_inputs(dict(B=2, Lq=20, Lk=40, d=16, kv_lens=True), torch.float32, device)
    first_seed, other_seed = fresh_seed(), fresh_seed()

    def run(seed):
        out = cross_attention(q, k, v, dropout_p=0.4, generator=torch.Generator(device=device).manual_seed(seed),
                              **args)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    with on_path(path):
        first, again, other = run(first_seed), run(first_seed), run(other_seed)
        torch.manual_seed(first_seed)
        default_a = cross_attention(q, k, v, dropout_p=0.4, **args)
        torch.manual_seed(first_seed)
        default_b = cross_attention(q, k, v, dropout_p=0.4, **args)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    assert torch.equal(default_a, default_b)


@pytest.mark.parametrize("path", PATHS)
def test_dropout_gradient_uses_the_forward_mask(path, device):
    """Forward and backward both equal the reference run with the mask the path draws."""
    p = 0.3
    (q, k, v), args = make_inputs(dict(B=2, Lq=33, Lk=40, d=16, kv_lens=True, causal=True), torch.float32,
                                  device)
    seed = fresh_seed()
    with on_path(path):
        out = cross_attention(q, k, v, dropout_p=p, generator=torch.Generator(device=device).manual_seed(seed), **args)
    keep = keep_mask_for(path, seed, (2, 2, 33, 40), p, device)
    check_against_reference(q, k, v, args, out, dropout_keep=keep, dropout_p=p)


# --------------------------------------------------------------------------- work


@needs_triton
@pytest.mark.parametrize(
    "needs, dots",
    [
        ("qkv", 2 * 2 * 3 + 2 * 2 * 4),  # dq pass 3 products per tile, dk/dv pass 4
        ("q", 2 * 2 * 3),                # no dk/dv pass at all
        ("kv", 2 * 2 * 4),               # the dq pass computes delta only: no products
        ("v", 2 * 2 * 2),                # k·qᵀ and pᵀ·dO; no delta
        ("k", 2 * 2 * 3),                # k·qᵀ, v·dOᵀ, dSᵀ·q
    ],
)
def test_backward_runs_only_the_work_the_needed_gradients_take(needs, dots, device):
    """cross_attention's backward honours needs_input_grad: counted as the tl.dot calls that the
    interpreter executes (frozen k and v, as a frozen image tower gives, pay no dk/dv pass)."""
    if device.type != "cpu":
        pytest.skip("counts interpreted tl.dot calls")
    q, k, v = _qkv((1, 1, 64, 16), (1, 1, 64, 16), device)  # 2 × 2 tiles of the interpreter's 32 × 32 blocks
    leaves = {"q": q, "k": k, "v": v}
    for name, t in leaves.items():
        t.requires_grad_(name in needs)
    out = cross_attention(q, k, v)
    wanted = [leaves[name] for name in needs]
    with OpTrace() as trace:
        grads = torch.autograd.grad(out, wanted, torch.ones_like(out))
    assert trace.dot_calls == dots
    assert trace.dot_flops == dots * 2 * 32 * 32 * 16
    exact = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    ref = reference.cross_attention(exact["q"], exact["k"], exact["v"])
    expected = torch.autograd.grad(ref, [exact[n] for n in needs], torch.ones_like(ref))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@needs_triton
def test_forward_skips_key_blocks_past_kv_lens_and_the_causal_diagonal(device):
    """Work budget of the forward: 2 products per visited tile; a key block past kv_lens[b] or past
    a query block's causal diagonal is never visited."""
    if device.type != "cpu":
        pytest.skip("counts interpreted tl.dot calls")
    q, k, v = _qkv((2, 1, 96, 16), (2, 1, 96, 16), device)
    cases = [
        (dict(), 2 * 3 * 3 * 2),                                  # 2 samples × 3 × 3 tiles
        (dict(kv_lens=torch.tensor([10, 40])), (3 * 1 + 3 * 2) * 2),  # 1 and 2 key blocks per query block
        (dict(is_causal=True), 2 * (1 + 2 + 3) * 2),              # tiles on or below the diagonal
        (dict(kv_lens=torch.tensor([0, 96]), q_lens=torch.tensor([96, 20])), (0 + 1 * 3) * 2),
    ]
    for args, dots in cases:
        with torch.no_grad(), OpTrace() as trace:
            cross_attention(q, k, v, **args)
        assert trace.dot_calls == dots, args


def test_grid_keeps_batch_times_heads_off_the_capped_axes():
    """CUDA caps grid axes 1 and 2 at 65535: B · H (here 70000 · 2) and the row blocks share axis 0."""
    grid = plan._grid(1000, "BLOCK_M", 70000, 2)({"BLOCK_M": 64})
    assert len(grid) == 1 and grid[0] == 16 * 70000 * 2 <= 2**31 - 1


# --------------------------------------------------------------------------- registration


@needs_triton
def test_compiles_without_graph_breaks(device):
    (q, k, v), args = make_inputs(dict(B=2, Lq=7, Lk=9, d=16, kv_lens=True, kpm=True), torch.float32, device)

    def loss(q, k, v, kv_lens, key_padding_mask):
        out = cross_attention(q, k, v, kv_lens=kv_lens, key_padding_mask=key_padding_mask, is_causal=True)
        return (out * out).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
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
        (dict(q=None), TypeError, "q to be a torch.Tensor, got NoneType"),
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
        (dict(dropout_p="0.1"), TypeError, "dropout_p to be a float, got str"),
        (dict(is_causal=1), TypeError, r"is_causal to be a bool \(or numpy.bool_\), got int"),
        (dict(is_causal=np.int64(1)), TypeError, "got numpy.int64"),
        (dict(is_causal=torch.tensor(True)), TypeError, "got torch.Tensor"),
        (dict(scale=torch.tensor(0.1)), TypeError, "scale to be a float or None, got torch.Tensor"),
        (dict(generator=0), TypeError, "generator"),
    ],
)
def test_invalid_inputs_raise_before_launch(change, error, message):
    q, k, v = _base_inputs()
    tensors = {name: change.pop(name) if name in change else t for name, t in (("q", q), ("k", k), ("v", v))}
    with pytest.raises(error, match=message):
        cross_attention(tensors["q"], tensors["k"], tensors["v"], **change)


@pytest.mark.parametrize("path", PATHS)
def test_numpy_scalars_are_accepted(path, device):
    """numpy bools are bools, numpy floats are floats: is_causal=np.bool_(True) is is_causal=True."""
    (q, k, v), _ = make_inputs(dict(B=2, Lq=7, Lk=9, d=16), torch.float32, device)
    with torch.no_grad(), on_path(path):
        expected = cross_attention(q, k, v, is_causal=True, scale=0.25)
        got = cross_attention(q, k, v, is_causal=np.bool_(True), scale=np.float32(0.25))
        not_causal = cross_attention(q, k, v, is_causal=np.bool_(False), scale=0.25)
    assert torch.equal(got, expected) and not torch.equal(not_causal, expected)


# --------------------------------------------------------------------------- GPU


GPU_HEAD_DIMS = [16, 32, 64, 80, 96, 128, 256]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", GPU_HEAD_DIMS)
def test_gpu_matches_reference_at_realistic_shapes(head_dim, dtype):
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
def test_gpu_masks_and_lengths(case, dtype):
    (q, k, v), args = make_inputs(case, dtype, "cuda")
    check_against_reference(q, k, v, args, cross_attention(q, k, v, **args))


@pytest.mark.gpu
@NONFINITE_WARNINGS
def test_gpu_nan_inf_contract():
    """The non-finite contract on the GPU, where tl.max ignores NaN (the interpreter's propagates)."""
    (q, k, v), args = make_inputs(dict(B=4, H=2, Lq=77, Lk=100, d=64, kv_lens=True, mask="additive"),
                                  torch.float16, "cuda")
    with torch.no_grad():
        q[2, 1, 5, 3] = float("nan")
        k[3, 0, 7, 1] = float("inf")
        args["attn_mask"][1, 0, 9, 4] = float("nan")
    check_contract(q, k, v, args, cross_attention(q, k, v, **args), label="gpu")


@pytest.mark.gpu
def test_gpu_more_than_65535_samples():
    """CUDA caps the grid's axes 1 and 2 at 65535: B = 66000 (B · H = 132000) must launch all the
    same (it did not when B had an axis of its own)."""
    (q, k, v), args = make_inputs(dict(B=66000, H=2, Lq=3, Lk=5, d=16, kv_lens=True), torch.float16, "cuda")
    check_against_reference(q, k, v, args, cross_attention(q, k, v, **args))


@pytest.mark.gpu
def test_gpu_dropout_gradient_uses_the_forward_mask():
    p = 0.2
    (q, k, v), args = make_inputs(dict(B=4, H=4, Lq=77, Lk=100, d=64, kv_lens=True), torch.bfloat16, "cuda")
    seed = fresh_seed()
    out = cross_attention(q, k, v, dropout_p=p, generator=torch.Generator("cuda").manual_seed(seed), **args)
    keep = keep_mask_for("kernels", seed, (4, 4, 77, 100), p, "cuda")
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    check_against_reference(q, k, v, args, out, dropout_keep=keep, dropout_p=p)


@pytest.mark.gpu
def test_gpu_forward_and_backward_do_not_sync():
    (q, k, v), args = make_inputs(dict(B=4, H=4, Lq=64, Lk=100, d=64, kv_lens=True), torch.bfloat16, "cuda")
    kv_lens = args["kv_lens"].cuda()

    def step():
        out = cross_attention(q, k, v, kv_lens=kv_lens, dropout_p=0.1)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    assert_no_host_sync(step)


@pytest.mark.gpu
def test_gpu_lengths_on_the_device_are_clamped():
    (q, k, v), _ = make_inputs(dict(B=2, Lq=33, Lk=40, d=64), torch.float16, "cuda")
    clamped = cross_attention(q, k, v, kv_lens=torch.tensor([-5, 100], device="cuda"))
    expected = cross_attention(q, k, v, kv_lens=torch.tensor([0, 40], device="cuda"))
    torch.testing.assert_close(clamped, expected, rtol=0, atol=0)
