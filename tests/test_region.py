"""region_mask and masked_region_loss: the reference against UNITER/LXMERT-style eager formulas, the
Triton kernels (interpreter on CPU) against the reference with the same seed, statistics of the
mask, losses and gradients against float64, error paths, opcheck, and the nn modules."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmkernels.nn.region import MaskedRegionLoss, RegionMasker
from mmkernels.ops import reference
from mmkernels.ops._common import HAS_TRITON
from mmkernels.ops.region import (
    AUTO_CUDA_BACKEND,
    RegionMaskOutput,
    masked_region_loss,
    region_mask,
)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

# The absolute floor under DESIGN.md's rule, relative to the reference's norm.
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def lens_and_valid(n_samples, n_regions, device="cpu"):
    """Per-sample region counts covering 0, 1 and R, and the matching (B, R) bool mask."""
    lens = torch.randint(0, n_regions + 1, (n_samples,))
    lens[0], lens[-1] = 0, n_regions
    if n_samples > 2:
        lens[1] = 1
    valid = torch.arange(n_regions)[None, :] < lens[:, None]
    return lens.to(device), valid.to(device)


def scattered_valid(n_samples, n_regions, device="cpu"):
    """A (B, R) bool mask that is not a prefix, with an empty sample and a full one."""
    valid = torch.rand(n_samples, n_regions) < 0.7
    valid[0] = False
    valid[-1] = True
    return valid.to(device)


def plan(valid, seed, prob=0.15, min_masked=1, bert=False):
    """The (mask, source) that region_mask draws from generator seed `seed`."""
    seed0, seed1 = torch.randint(0, 2**31, (2,), generator=gen(seed), dtype=torch.int64).tolist()
    return reference.region_mask_plan(valid.cpu(), seed0, seed1, round(prob * 2**31), min_masked, bert)


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("with_embedding", [False, True])
def test_reference_zero_mode_is_uniter_masked_fill(with_embedding):
    feats = torch.randn(6, 11, 9, dtype=torch.float64)
    lens, valid = lens_and_valid(6, 11)
    emb = torch.randn(9, dtype=torch.float64) if with_embedding else None
    out = region_mask(feats, lens, prob=0.3, mask_embedding=emb, generator=gen(1), backend="torch")
    assert isinstance(out, RegionMaskOutput)
    expected_mask, _ = plan(valid, 1, prob=0.3)
    assert torch.equal(out.mask, expected_mask)
    # UNITER's _mask_img_feat: img_feat.masked_fill(img_masks.unsqueeze(-1), 0)
    fill = emb if with_embedding else 0.0
    expected = torch.where(out.mask[..., None], fill, feats)
    assert torch.equal(out.features, expected)


def test_reference_bert_mode_is_lxmert_random_feat():
    torch.manual_seed(0)
    feats = torch.randn(8, 10, 5, dtype=torch.float64)
    valid = scattered_valid(8, 10)
    emb = torch.randn(5, dtype=torch.float64)
    out = region_mask(feats, valid_mask=valid, prob=0.9, mode="bert", mask_embedding=emb,
                      generator=gen(2), backend="torch")
    mask, source = plan(valid, 2, prob=0.9, bert=True)
    assert torch.equal(out.mask, mask)
    # LXMERT's loop, given the per-region decisions: mask -> embedding, random -> another region's
    # features, keep -> unchanged; everything not selected unchanged.
    flat_feats = feats.reshape(-1, 5)
    expected = feats.clone()
    n_random = 0
    for b in range(8):
        for r in range(10):
            src = int(source[b, r])
            if src == -1:
                expected[b, r] = emb
            elif src != b * 10 + r:
                n_random += 1
                assert valid.flatten()[src], "a random replacement copies an existing region"
                expected[b, r] = flat_feats[src]
            else:
                assert not mask[b, r] or valid[b, r]
    assert n_random > 0
    assert torch.equal(out.features, expected)


def test_reference_gradients_follow_eager_indexing():
    feats = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(3, dtype=torch.float64, requires_grad=True)
    valid = scattered_valid(4, 6)
    assert torch.autograd.gradcheck(
        lambda f, e: region_mask(f, valid_mask=valid, prob=0.8, mode="bert", mask_embedding=e,
                                 generator=gen(3), backend="torch").features,
        (feats, emb),
    )


def test_same_seed_same_mask_other_seed_other_mask():
    feats = torch.randn(16, 30, 4)
    lens, _ = lens_and_valid(16, 30)
    a = region_mask(feats, lens, prob=0.3, generator=gen(5), backend="torch")
    b = region_mask(feats, lens, prob=0.3, generator=gen(5), backend="torch")
    c = region_mask(feats, lens, prob=0.3, generator=gen(6), backend="torch")
    assert torch.equal(a.mask, b.mask) and torch.equal(a.features, b.features)
    assert not torch.equal(a.mask, c.mask)
    torch.manual_seed(7)
    d = region_mask(feats, lens, prob=0.3, backend="torch")
    torch.manual_seed(7)
    e = region_mask(feats, lens, prob=0.3, backend="torch")
    assert torch.equal(d.mask, e.mask)


def test_input_is_not_modified():
    feats = torch.randn(3, 5, 4)
    before = feats.clone()
    out = region_mask(feats, torch.tensor([5, 2, 0]), prob=1.0, mode="bert", backend="torch")
    assert torch.equal(feats, before)
    assert out.features.data_ptr() != feats.data_ptr()


# --------------------------------------------------------------------------- statistics


def test_selection_rate_padding_and_min_masked():
    n_samples, n_regions, prob = 64, 50, 0.15
    lens, valid = lens_and_valid(n_samples, n_regions)
    selected = existing = 0
    for seed in range(20):
        mask, _ = plan(valid, seed, prob=prob, min_masked=0)
        assert not (mask & ~valid).any(), "padding regions are never selected"
        selected += int(mask.sum())
        existing += int(valid.sum())
    rate = selected / existing
    sigma = (prob * (1 - prob) / existing) ** 0.5
    assert abs(rate - prob) < 5 * sigma, f"selection rate {rate:.4f} vs prob {prob}"

    for min_masked in (1, 3):
        for seed in range(10):
            mask, _ = plan(valid, seed, prob=0.02, min_masked=min_masked)
            counts = mask.sum(1)
            assert (counts >= lens.clamp(max=min_masked)).all(), "min_masked honoured"
            assert (counts[lens == 0] == 0).all()


def test_min_masked_adds_the_smallest_draws_only():
    valid = torch.ones(200, 7, dtype=torch.bool)
    mask, _ = plan(valid, 11, prob=0.0, min_masked=2)
    assert (mask.sum(1) == 2).all(), "prob 0 selects exactly min_masked regions per sample"
    with_draws, _ = plan(valid, 11, prob=0.5, min_masked=2)
    counts = with_draws.sum(1)
    assert (counts >= 2).all() and (counts > 2).any()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("min_masked", [7, 2**32, 2**64])
def test_min_masked_beyond_int32_selects_every_existing_region(min_masked, backend, device):
    """min_masked >= R selects every existing region, however large the int (no 32/64-bit wrap)."""
    if backend == "torch":
        device = "cpu"
    lens, valid = lens_and_valid(4, 7, device)
    out = region_mask(torch.randn(4, 7, 5, device=device), lens, prob=0.0, min_masked=min_masked,
                      generator=gen(8), backend=backend)
    assert torch.equal(out.mask, valid)


def test_bert_split_is_80_10_10():
    n_samples, n_regions = 64, 50
    valid = torch.ones(n_samples, n_regions, dtype=torch.bool)
    counts = torch.zeros(3)
    for seed in range(10):
        mask, source = plan(valid, seed, prob=0.5, bert=True)
        own = torch.arange(n_samples * n_regions).view(n_samples, n_regions)
        counts[0] += int((source == -1).sum())
        counts[1] += int((mask & (source >= 0) & (source != own)).sum())
        counts[2] += int((mask & (source == own)).sum())
    total = counts.sum()
    for share, expected in zip(counts / total, (0.8, 0.1, 0.1)):
        sigma = (expected * (1 - expected) / total) ** 0.5
        assert abs(share - expected) < 5 * sigma, f"{counts.tolist()}"


def test_bert_with_a_single_existing_region_keeps_it():
    valid = torch.zeros(4, 5, dtype=torch.bool)
    valid[2, 3] = True
    feats = torch.randn(4, 5, 3)
    for seed in range(20):
        out = region_mask(feats, valid_mask=valid, prob=1.0, mode="bert", generator=gen(seed), backend="torch")
        assert out.mask.sum() == 1 and out.mask[2, 3]
        assert torch.equal(out.features[2, 3], feats[2, 3]) or torch.equal(out.features[2, 3], torch.zeros(3))


# --------------------------------------------------------------------------- Triton vs reference

TRITON_CASES = [
    # (mode, existing given as, with_embedding, dtype, prob, min_masked, B, R, D)
    ("zero", "lens", False, torch.float32, 0.3, 1, 4, 13, 70),
    ("zero", "valid", True, torch.float16, 0.15, 3, 3, 20, 33),
    ("bert", "lens", True, torch.float32, 1.0, 1, 4, 13, 70),
    ("bert", "valid", False, torch.float16, 0.5, 2, 3, 9, 64),
]


def _existing_args(kind, n_samples, n_regions, device):
    if kind == "lens":
        lens, _ = lens_and_valid(n_samples, n_regions, device)
        return dict(region_lens=lens)
    return dict(valid_mask=scattered_valid(n_samples, n_regions, device))


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c[:4])))
def test_triton_matches_reference_bit_for_bit(case, device):
    mode, existing, with_emb, dtype, prob, min_masked, n_samples, n_regions, dim = case
    torch.manual_seed(hash(case) % 2**31)
    # a view with non-unit strides over B and R
    feats = torch.randn(n_samples, 2 * n_regions, dim, device=device, dtype=dtype)[:, ::2]
    emb = torch.randn(dim, device=device, dtype=dtype) if with_emb else None
    args = _existing_args(existing, n_samples, n_regions, device)
    kw = dict(prob=prob, mode=mode, mask_embedding=emb, min_masked=min_masked, **args)
    got = region_mask(feats, generator=gen(9), backend="triton", **kw)
    want = region_mask(feats, generator=gen(9), backend="torch", **kw)
    assert torch.equal(got.mask, want.mask)
    assert torch.equal(got.features, want.features)


@needs_triton
@pytest.mark.parametrize("grad_from", ["sum", "dense"])
@pytest.mark.parametrize("with_embedding", [False, True])
def test_triton_gradients_match_reference(with_embedding, grad_from, device):
    torch.manual_seed(4)
    feats = torch.randn(4, 9, 40, device=device)
    emb = torch.randn(40, device=device) if with_embedding else None
    lens, _ = lens_and_valid(4, 9, device)
    grad = torch.randn(4, 9, 40, device=device)
    results = []
    for backend in ("triton", "torch"):
        f = feats.clone().requires_grad_()
        e = emb.clone().requires_grad_() if with_embedding else None
        out = region_mask(f, lens, prob=1.0, mode="bert", mask_embedding=e, generator=gen(12), backend=backend)
        # .sum() alone sends an expanded (all strides 0) gradient; a sum of two terms would not
        (out.features.sum() if grad_from == "sum" else (out.features * grad).sum()).backward()
        results.append((out.features.detach(), f.grad, e.grad if with_embedding else None))
    (out_t, gf_t, ge_t), (out_r, gf_r, ge_r) = results
    assert torch.equal(out_t, out_r)
    torch.testing.assert_close(gf_t, gf_r, rtol=1e-6, atol=1e-6)
    if with_embedding:
        torch.testing.assert_close(ge_t, ge_r, rtol=1e-5, atol=1e-5)


HASH_KERNEL = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmkernels.ops.region import _region_random


@triton.jit
def region_random_kernel(out_ptr, seed0, key, b):
    rows = tl.arange(0, 16)
    tl.store(out_ptr + rows, _region_random(seed0, key, b, rows))


source = ASTSource(region_random_kernel, dict(out_ptr="*i32", seed0="i32", key="i32", b="i32"))
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1, debug=True))
print("overflow detected" in compiled.asm["ttir"])
"""


@needs_triton
def test_triton_hash_has_no_overflow_for_debug_mode_to_trip_on(tmp_path):
    """The hash wraps uint32 products on purpose; compiled with debug=True (TRITON_DEBUG=1), Triton
    asserts that no 32-bit product overflows, so the kernels would abort on the GPU. Compiled for
    sm_90 (no GPU needed) in a process without the interpreter."""
    script = tmp_path / "compile_hash.py"
    script.write_text(HASH_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False", "the hash has overflow checks"


@needs_triton
@pytest.mark.parametrize("mode", ["zero", "bert"])
def test_triton_reads_strided_lens_and_mask_embedding(mode, device):
    """region_lens (B,) and mask_embedding (D,) given as views with a stride other than 1."""
    torch.manual_seed(21)
    feats = torch.randn(3, 6, 20, device=device)
    lens = torch.tensor([[6, 0], [3, 0], [2, 0]], device=device)[:, 0]
    emb = torch.randn(20, 2, device=device)[:, 0]
    kw = dict(prob=0.5, mode=mode, mask_embedding=emb)
    got = region_mask(feats, lens, generator=gen(1), backend="triton", **kw)
    want = region_mask(feats, lens.contiguous(), generator=gen(1), backend="torch", **kw)
    assert torch.equal(got.mask, want.mask)
    assert torch.equal(got.features, want.features)


@needs_triton
def test_triton_auto_backend_under_the_interpreter(device):
    feats = torch.randn(2, 5, 16, device=device)
    lens = torch.tensor([5, 3], device=device)
    out = region_mask(feats, lens, generator=gen(0))
    want = region_mask(feats, lens, generator=gen(0), backend="torch")
    assert torch.equal(out.features, want.features)


def test_auto_backend_table_is_explicit():
    assert set(AUTO_CUDA_BACKEND) == {"region_mask", "masked_region_loss"}
    assert set(AUTO_CUDA_BACKEND.values()) <= {"triton", "cuda"}


def test_empty_inputs():
    out = region_mask(torch.randn(2, 0, 4), torch.tensor([0, 0]))
    assert out.features.shape == (2, 0, 4) and out.mask.shape == (2, 0)
    out = region_mask(torch.randn(3, 4, 0), torch.tensor([4, 1, 0]), prob=1.0)
    assert out.mask.sum(1).tolist() == [4, 1, 0]
    loss = masked_region_loss(torch.randn(2, 0, 3), torch.randn(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool))
    assert loss.item() == 0.0


# --------------------------------------------------------------------------- losses


def eager_gather_loss(pred, target, mask, kind, beta=1.0):
    """What UNITER/LXMERT run: gather the selected rows, then the loss, in the inputs' dtype."""
    p, t = pred[mask], target[mask]
    if kind == "mse":
        return F.mse_loss(p, t)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(p, t, beta=beta)
    return F.kl_div(F.log_softmax(p, dim=-1), t, reduction="batchmean")


def loss_inputs(kind, n_samples, n_regions, dim, dtype, device, prob=0.3, zero_targets=False):
    pred = torch.randn(n_samples, n_regions, dim, device=device, dtype=dtype)
    if kind == "kl":
        target = torch.softmax(torch.randn(n_samples, n_regions, dim, device=device) * 2, -1)
        if zero_targets:
            target[0, 0, : dim // 2] = 0.0  # exact zeros, as detector class distributions have
        target = target.to(dtype)
    else:
        target = torch.randn(n_samples, n_regions, dim, device=device, dtype=dtype)
    mask = torch.rand(n_samples, n_regions, device=device) < prob
    mask[0, 0] = True
    mask[-1] = False
    return pred, target, mask


@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "kl"])
def test_reference_loss_is_eager_gather_then_loss(kind):
    pred, target, mask = loss_inputs(kind, 5, 7, 12, torch.float64, "cpu", zero_targets=True)
    got = masked_region_loss(pred, target, mask, kind, beta=0.5, backend="torch")
    want = eager_gather_loss(pred, target, mask, kind, beta=0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    per_region = masked_region_loss(pred, target, mask, kind, "none", beta=0.5, backend="torch")
    assert per_region.shape == (5, 7) and (per_region[~mask] == 0).all()
    total = masked_region_loss(pred, target, mask, kind, "sum", beta=0.5, backend="torch")
    torch.testing.assert_close(total, per_region.sum())


@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "kl"])
def test_reference_loss_gradcheck(kind):
    pred, target, mask = loss_inputs(kind, 3, 4, 5, torch.float64, "cpu")
    pred.requires_grad_()
    target.requires_grad_(kind != "kl")  # KL's target gradient has a kink at 0
    assert torch.autograd.gradcheck(
        lambda p, t: masked_region_loss(p, t, mask, kind, beta=0.7, backend="torch"), (pred, target)
    )


def _loss_and_grads(fn, pred, target):
    p = pred.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_()
    loss = fn(p, t)
    loss.backward()
    return [loss.detach(), p.grad, t.grad]


def _assert_within_rule(got, eager, ref, dtype, what):
    """DESIGN.md: ||got - ref|| <= 2·||eager - ref|| + floor·||ref|| for every output."""
    for name, g, e, r in zip(["loss", "d pred", "d target"], got, eager, ref):
        assert torch.isfinite(g).all(), f"{what}: {name} has non-finite values"
        r = r.double()
        err = (g.double() - r).norm().item()
        bound = 2 * (e.double() - r).norm().item() + FLOOR[dtype] * r.norm().item() + 1e-12
        assert err <= bound, f"{what}: {name} error {err:.3e} > bound {bound:.3e}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "kl"])
def test_triton_loss_within_rule(kind, dtype, device):
    torch.manual_seed(hash((kind, str(dtype))) % 2**31)
    pred, target, mask = loss_inputs(kind, 3, 7, 129, dtype, device)
    if kind == "kl":
        pred = pred * 4  # spread logits: the softmax is not flat
    got = _loss_and_grads(lambda p, t: masked_region_loss(p, t, mask, kind, beta=0.5, backend="triton"), pred, target)
    eager = _loss_and_grads(lambda p, t: eager_gather_loss(p, t, mask, kind, beta=0.5), pred, target)
    ref = _loss_and_grads(
        lambda p, t: masked_region_loss(p.double(), t.double(), mask, kind, beta=0.5, backend="torch"),
        pred, target,
    )
    assert got[0].dtype == torch.float32
    for g in got[1:]:
        assert g.dtype == dtype and (g[~mask] == 0).all()
    _assert_within_rule(got, eager, ref, dtype, f"{kind} {dtype}")


@needs_triton
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_triton_loss_reductions(reduction, device):
    pred, target, mask = loss_inputs("smooth_l1", 2, 5, 70, torch.float32, device)
    grad = torch.randn(2, 5, device=device) if reduction == "none" else None
    outs = []
    for backend in ("triton", "torch"):
        p = pred.clone().requires_grad_()
        loss = masked_region_loss(p, target, mask, "smooth_l1", reduction, backend=backend)
        loss.backward(grad)
        outs.append((loss.detach(), p.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_kl_target_gradient_is_zero_where_target_is_zero(backend, device):
    if backend == "torch":
        device = "cpu"
    pred, target, mask = loss_inputs("kl", 2, 3, 8, torch.float32, device, zero_targets=True)
    p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
    masked_region_loss(p, t, mask, "kl", backend=backend).backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(t.grad).all()
    assert (t.grad[0, 0, :4] == 0).all() and (t.grad[0, 0, 4:] != 0).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_loss_with_nothing_selected_is_zero_not_nan(kind, backend, device):
    if backend == "torch":
        device = "cpu"
    pred, target, _ = loss_inputs(kind, 2, 3, 8, torch.float32, device)
    mask = torch.zeros(2, 3, dtype=torch.bool, device=device)
    p = pred.clone().requires_grad_()
    loss = masked_region_loss(p, target, mask, kind, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(p.grad, torch.zeros_like(p))


# --------------------------------------------------------------------------- errors


def _region_call(**overrides):
    feats = torch.randn(2, 4, 3)
    kw = dict(feats=feats, region_lens=torch.tensor([4, 1]), prob=0.15, backend="torch")
    kw.update(overrides)
    return region_mask(**kw)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(feats=torch.randn(4, 3)), ValueError, "feats to be 3-D"),
        (dict(feats=torch.ones(2, 4, 3, dtype=torch.long)), TypeError, "floating-point"),
        (dict(region_lens=None), ValueError, "neither"),
        (dict(valid_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "both"),
        (dict(region_lens=torch.tensor([4, 5])), ValueError, r"region_lens in \[0, R\] = \[0, 4\], got \[5\]"),
        (dict(region_lens=torch.tensor([-1, 2])), ValueError, "got \\[-1\\]"),
        (dict(region_lens=torch.tensor([4, 1, 2])), ValueError, r"shape \(B,\) = \(2,\)"),
        (dict(region_lens=torch.tensor([4.0, 1.0])), TypeError, "integer tensor"),
        (dict(region_lens=None, valid_mask=torch.ones(2, 4)), TypeError, "bool tensor"),
        (dict(region_lens=None, valid_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"\(2, 4\)"),
        (dict(prob=1.5), ValueError, r"prob in \[0, 1\], got 1.5"),
        (dict(prob=-0.1), ValueError, "prob in"),
        (dict(prob="0.1"), TypeError, "prob"),
        (dict(mode="random"), ValueError, "mode to be one of 'zero', 'bert', got 'random'"),
        (dict(mask_embedding=torch.randn(4)), ValueError, r"mask_embedding of shape \(D,\) = \(3,\), got \(4,\)"),
        (dict(mask_embedding=torch.randn(1, 3)), ValueError, "mask_embedding"),
        (dict(min_masked=-1), ValueError, "min_masked"),
        (dict(generator=123), TypeError, "torch.Generator"),
        (dict(backend="cudnn"), ValueError, "backend to be one of"),
        (dict(backend="triton", feats=torch.randn(2, 4, 3, dtype=torch.float64)), TypeError, "float64"),
        (dict(backend="cuda"), ValueError, "backend='cuda' needs CUDA tensors"),
    ],
)
def test_region_mask_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        _region_call(**overrides)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        _region_call(backend="triton")


def _loss_call(**overrides):
    kw = dict(pred=torch.randn(2, 3, 4), target=torch.randn(2, 3, 4),
              mask=torch.ones(2, 3, dtype=torch.bool), kind="mse", backend="torch")
    kw.update(overrides)
    return masked_region_loss(**kw)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(pred=torch.randn(2, 3)), ValueError, "pred to be 3-D"),
        (dict(target=torch.randn(2, 3, 5)), ValueError, r"same shape .* got \(2, 3, 4\) and \(2, 3, 5\)"),
        (dict(target=torch.randn(2, 3, 4, dtype=torch.float64)), TypeError, "share a dtype"),
        (dict(mask=torch.ones(2, 3)), TypeError, "mask to be a bool tensor"),
        (dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, r"mask of shape \(B, R\) = \(2, 3\)"),
        (dict(kind="ce"), ValueError, "kind to be one of 'mse', 'smooth_l1', 'kl', got 'ce'"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(beta=-1.0), ValueError, "beta"),
        (dict(backend="cuda"), ValueError, "CUDA tensors"),
    ],
)
def test_loss_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        _loss_call(**overrides)


def test_more_than_2_pow_31_regions_is_refused_before_any_work():
    """The kernels index regions with int32: B·R >= 2^31 raises (expanded views: no memory)."""
    n_samples, n_regions = 2**16, 2**15
    feats = torch.zeros(1, 1, 1).expand(n_samples, n_regions, 1)
    with pytest.raises(ValueError, match=r"B·R < 2\^31 regions, got 65536·32768"):
        region_mask(feats, valid_mask=torch.ones(1, 1, dtype=torch.bool).expand(n_samples, n_regions))
    mask = torch.ones(1, 1, dtype=torch.bool).expand(n_samples, n_regions)
    # backend "cuda" on CPU tensors would raise a different error if the size went unchecked
    with pytest.raises(ValueError, match=r"B·R < 2\^31 regions, got 65536·32768"):
        masked_region_loss(feats, feats, mask, "mse", backend="cuda")


# --------------------------------------------------------------------------- opcheck


@needs_triton
@pytest.mark.parametrize("bert", [False, True])
def test_opcheck_region_mask(bert, device):
    feats = torch.randn(2, 5, 8, device=device, requires_grad=True)
    emb = torch.randn(8, device=device, requires_grad=True)
    seed = torch.tensor([3, 4])
    lens = torch.tensor([5, 2], device=device)
    torch.library.opcheck(
        torch.ops.mmkernels.region_mask_fwd.default,
        (feats, lens, None, emb, seed, round(0.5 * 2**31), 1, bert, "triton"),
    )
    source = torch.ops.mmkernels.region_mask_fwd(feats, lens, None, emb, seed, 2**30, 1, bert, "triton")[2]
    torch.library.opcheck(
        torch.ops.mmkernels.region_mask_bwd.default,
        (torch.randn(2, 5, 8, device=device), source, True, bert, "triton"),
    )


@needs_triton
@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_opcheck_masked_region_loss(kind, device):
    pred, target, mask = loss_inputs(kind, 2, 3, 8, torch.float32, device, prob=0.5)
    torch.library.opcheck(
        torch.ops.mmkernels.masked_region_loss_fwd.default,
        (pred.requires_grad_(), target, mask, kind, 1.0, "triton"),
    )
    _, stats = torch.ops.mmkernels.masked_region_loss_fwd(pred, target, mask, kind, 1.0, "triton")
    torch.library.opcheck(
        torch.ops.mmkernels.masked_region_loss_bwd.default,
        (torch.randn(2, 3, device=device), pred.detach(), target, mask, stats, kind, 1.0, True, "triton"),
    )


@needs_triton
def test_masking_and_loss_compile_with_fullgraph(device):
    feats = torch.randn(3, 7, 16, device=device, requires_grad=True)
    emb = torch.randn(16, device=device, requires_grad=True)
    lens = torch.tensor([7, 2, 0], device=device)
    target = torch.randn(3, 7, 16, device=device)

    def step(feats, emb):
        out = region_mask(feats, lens, prob=0.5, mode="bert", mask_embedding=emb)
        return masked_region_loss(out.features, target, out.mask, "mse")

    loss = torch.compile(step, fullgraph=True)(feats, emb)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()


# --------------------------------------------------------------------------- modules


def test_region_masker_module():
    masker = RegionMasker(6, prob=1.0, mode="zero", backend="torch")
    assert [name for name, _ in masker.named_parameters()] == ["mask_embedding"]
    feats = torch.randn(2, 3, 6)
    out = masker(feats, torch.tensor([3, 1]))
    assert torch.equal(out.features[0], masker.mask_embedding.detach().expand(3, 6))
    assert torch.equal(out.features[1, 1:], feats[1, 1:])
    out.features.sum().backward()
    torch.testing.assert_close(masker.mask_embedding.grad, torch.full((6,), 4.0))
    plain = RegionMasker(6, learned_mask_embedding=False, prob=1.0, backend="torch")
    assert list(plain.parameters()) == []
    assert (plain(feats, valid_mask=torch.ones(2, 3, dtype=torch.bool)).features == 0).all()
    assert "feat_dim=6" in repr(masker)


def test_masked_region_loss_module():
    pred, target, mask = loss_inputs("smooth_l1", 2, 4, 5, torch.float32, "cpu")
    module = MaskedRegionLoss("smooth_l1", beta=0.5, backend="torch")
    torch.testing.assert_close(
        module(pred, target, mask), masked_region_loss(pred, target, mask, "smooth_l1", beta=0.5, backend="torch")
    )


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["zero", "bert"])
def test_gpu_triton_matches_reference_at_scale(mode, dtype):
    torch.manual_seed(0)
    feats = torch.randn(256, 100, 2048, device="cuda", dtype=dtype)
    lens = torch.randint(0, 101, (256,), device="cuda")
    emb = torch.randn(2048, device="cuda", dtype=dtype)
    kw = dict(prob=0.15, mode=mode, mask_embedding=emb)
    got = region_mask(feats, lens, generator=gen(1), backend="triton", **kw)
    want = region_mask(feats, lens, generator=gen(1), backend="torch", **kw)
    assert torch.equal(got.mask, want.mask)
    assert torch.equal(got.features, want.features)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "kl"])
def test_gpu_triton_loss_within_rule_at_scale(kind, dtype):
    torch.manual_seed(1)
    pred, target, mask = loss_inputs(kind, 256, 100, 2048, dtype, "cuda", prob=0.15)
    got = _loss_and_grads(lambda p, t: masked_region_loss(p, t, mask, kind, backend="triton"), pred, target)
    eager = _loss_and_grads(lambda p, t: eager_gather_loss(p, t, mask, kind), pred, target)
    ref = _loss_and_grads(
        lambda p, t: masked_region_loss(p.double(), t.double(), mask, kind, backend="torch"), pred, target
    )
    _assert_within_rule(got, eager, ref, dtype, f"{kind} {dtype}")
