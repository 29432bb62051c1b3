"""masked_region_loss: the reference against UNITER's and LXMERT's gather-then-loss formulas; every
path (the torch reference, the Triton kernels, under the interpreter on the CPU, and the CUDA C++
kernels on a GPU) against the float64 reference under the numerics rule (docs/design.md), for every reduction; NaN and
Inf in regions that are not selected; the "kl" contract for any target; error paths;
MaskedRegionLoss (opcheck and bf16 on the CPU: test_contract.py)."""
import pytest
import torch
import torch.nn.functional as F

from mmkernels.nn.region import MaskedRegionLoss
from mmkernels.ops.region import masked_region_loss
from test_region import PATHS, path_device
from toolkit import CUDA, assert_within_rule, eager_masked_region_loss, value_and_grads

KINDS = ["mse", "smooth_l1", "kl"]


pytestmark = pytest.mark.usefixtures("seed")


def loss_inputs(kind, n_samples, n_regions, dim, dtype, device, prob=0.3, zero_targets=False):
    """pred, target (B, R, K) and a mask with region (0, 0) selected and the last sample not."""
    pred = torch.randn(n_samples, n_regions, dim, device=device, dtype=dtype)
    if kind == "kl":
        pred = pred * 4  # spread logits: the softmax is not flat
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


def oracle(pred, target, mask, kind, reduction="mean", beta=1.0, upstream=None):
    """[loss, d pred, d target] of the reference in float64 (inputs and gradients alike)."""
    return value_and_grads(
        lambda p, t: masked_region_loss(p, t, mask, kind, reduction, beta=beta, backend="torch"),
        [pred.double(), target.double()], upstream if upstream is None else upstream.double(),
    )


def run(backend, pred, target, mask, kind, reduction="mean", beta=1.0, upstream=None):
    """[loss, d pred, d target] of one path."""
    return value_and_grads(
        lambda p, t: masked_region_loss(p, t, mask, kind, reduction, beta=beta, backend=backend),
        [pred, target], upstream,
    )


def eager(pred, target, mask, kind, reduction="mean", beta=1.0, upstream=None):
    """[loss, d pred, d target] of what UNITER / LXMERT run, in the inputs' dtype."""
    return value_and_grads(
        lambda p, t: eager_masked_region_loss(p, t, mask, kind, beta=beta, reduction=reduction),
        [pred, target], upstream,
    )


def assert_all_within_rule(what, got, eager_result, oracle_result, dtype, allow_nonfinite=False):
    for name, g, e, o in zip(["loss", "d pred", "d target"], got, eager_result, oracle_result):
        assert_within_rule(f"{what}: {name}", g, e, o, dtype, allow_nonfinite=allow_nonfinite)


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_is_eager_gather_then_loss(kind, reduction):
    pred, target, mask = loss_inputs(kind, 5, 7, 12, torch.float64, "cpu", zero_targets=True)
    upstream = torch.randn(5, 7, dtype=torch.float64) if reduction == "none" else None
    got = run("torch", pred, target, mask, kind, reduction, beta=0.5, upstream=upstream)
    want = eager(pred, target, mask, kind, reduction, beta=0.5, upstream=upstream)
    if kind == "kl":
        # F.kl_div's target gradient is NaN where target is 0 (xlogy's 0/0); the contract says 0
        assert torch.isnan(want[2][0, 0, :6]).all() and (got[2][0, 0, :6] == 0).all()
        got[2], want[2] = got[2][target != 0], want[2][target != 0]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert (got[1][~mask] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_reference_gradcheck(kind):
    pred, target, mask = loss_inputs(kind, 3, 4, 5, torch.float64, "cpu")
    pred.requires_grad_()
    target.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, t: masked_region_loss(p, t, mask, kind, beta=0.7, backend="torch"), (pred, target)
    )


# --------------------------------------------------------------------------- every path vs float64


def dtypes_here():
    """fp32 and fp16 everywhere; bf16 on a GPU (the interpreter has none: the sweep runs CPU bf16)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("dtype", dtypes_here())
@pytest.mark.parametrize("kind", KINDS)
def test_paths_within_rule(kind, dtype, backend):
    device = path_device(backend)
    pred, target, mask = loss_inputs(kind, 3, 7, 129, dtype, device)
    got = run(backend, pred, target, mask, kind, beta=0.5)
    assert got[0].dtype == torch.float32
    for g in got[1:]:
        assert g.dtype == dtype and (g[~mask] == 0).all()
    assert_all_within_rule(f"{backend} {kind} {dtype}", got, eager(pred, target, mask, kind, beta=0.5),
                           oracle(pred, target, mask, kind, beta=0.5), dtype)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_reductions_within_rule(kind, reduction, backend):
    device = path_device(backend)
    pred, target, mask = loss_inputs(kind, 2, 5, 70, torch.float32, device)
    upstream = torch.randn(2, 5, device=device) if reduction == "none" else None
    got = run(backend, pred, target, mask, kind, reduction, upstream=upstream)
    assert got[0].shape == ((2, 5) if reduction == "none" else ())
    assert_all_within_rule(f"{backend} {kind} {reduction}", got,
                           eager(pred, target, mask, kind, reduction, upstream=upstream),
                           oracle(pred, target, mask, kind, reduction, upstream=upstream), torch.float32)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf_in_unselected_regions_never_reach_the_loss(kind, reduction, backend):
    """Regions that are not selected are not in the loss: NaN/Inf there leave the
    loss finite and their gradient exactly 0 (the CPU path sent 0 · NaN = NaN back to them)."""
    device = path_device(backend)
    pred, target, mask = loss_inputs(kind, 3, 6, 40, torch.float32, device, prob=0.5)
    unselected = (~mask).nonzero()
    assert len(unselected) >= 3 and mask.any()
    for i, value in enumerate([float("nan"), float("inf"), -float("inf")]):
        b, r = unselected[i].tolist()
        pred[b, r, i::7] = value
        target[b, r, (i + 3)::5] = value
    upstream = torch.randn(3, 6, device=device) if reduction == "none" else None
    got = run(backend, pred, target, mask, kind, reduction, upstream=upstream)
    for name, t in zip(["loss", "d pred", "d target"], got):
        assert torch.isfinite(t).all(), f"{backend}: {name} is not finite"
    assert (got[1][~mask] == 0).all() and (got[2][~mask] == 0).all()
    # the gather-then-loss baseline never reads those rows: it is the function to match
    assert_all_within_rule(f"{backend} {kind}", got, eager(pred, target, mask, kind, reduction, upstream=upstream),
                           oracle(pred, target, mask, kind, reduction, upstream=upstream), torch.float32)


def kl_by_kl_div(pred, target, mask):
    """Per selected region Σ_k of F.kl_div's pointwise terms, with the terms whose target is 0 set to 0,
    in float64: the "kl" contract written independently of reference.py."""
    terms = F.kl_div(F.log_softmax(pred.double(), -1), target.double(), reduction="none")
    terms = torch.where(target == 0, 0.0, terms)
    return torch.where(mask, terms.sum(-1), 0.0)


# the negative target's log is NaN on purpose: the interpreter's numpy warns where the GPU does not
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", PATHS)
def test_kl_is_defined_for_any_target_on_every_path(backend):
    """"kl" on a target that is not a distribution. Each region's value is Σ_k
    F.kl_div's pointwise term, 0 where target is 0 (even under a -inf logit): a target that does not
    sum to 1 is taken as it is, a negative one gives NaN, on every backend alike (torch and Triton
    gave 3.3786 and 3.2678 for one negative target)."""
    device = path_device(backend)
    pred, target, mask = loss_inputs("kl", 4, 5, 37, torch.float32, device, prob=1.0)
    mask[:] = True
    target = target * torch.rand(4, 5, 1, device=device) * 3  # rows summing to anything in [0, 3)
    target[0, 1, 3] = -0.25  # a negative entry: NaN for this region
    target[1, 2, :10] = 0.0
    pred[1, 2, :10] = -float("inf")  # a class masked out with -inf that the target also excludes
    pred[2, 3, 5] = -float("inf")  # ... and one that the target does not: an infinite loss
    upstream = torch.randn(4, 5, device=device)
    got = run(backend, pred, target, mask, "kl", "none", upstream=upstream)
    want = oracle(pred, target, mask, "kl", "none", upstream=upstream)
    expected = kl_by_kl_div(pred, target, mask)
    assert torch.isnan(expected[0, 1]) and torch.isinf(expected[2, 3]) and torch.isfinite(expected[1, 2])
    torch.testing.assert_close(want[0], expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    # the pred gradient is (Σ target)·softmax(pred) - target, finite even for the negative target
    q = torch.softmax(pred.double(), -1)
    finite_rows = torch.isfinite(expected)
    d_pred = (target.double().sum(-1, keepdim=True) * q - target.double()) * upstream.double()[..., None]
    torch.testing.assert_close(want[1][finite_rows], d_pred[finite_rows], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(got[1][0, 1]).all() and torch.isnan(got[2][0, 1, 3])
    # The rule's eager baseline is the contract's formula run in fp32 (the torch path): UNITER's
    # gather-then-F.kl_div gives NaN where target and softmax(pred) are both 0. The torch path itself
    # is held to the float64 result and the floor alone.
    eager_result = want if backend == "torch" else run("torch", pred, target, mask, "kl", "none", upstream=upstream)
    assert_all_within_rule(f"{backend} kl", got, eager_result, want, torch.float32, allow_nonfinite=True)


@pytest.mark.parametrize("backend", PATHS)
def test_kl_target_gradient_is_zero_where_target_is_zero(backend):
    device = path_device(backend)
    pred, target, mask = loss_inputs("kl", 2, 3, 8, torch.float32, device, zero_targets=True)
    _, d_pred, d_target = run(backend, pred, target, mask, "kl")
    assert torch.isfinite(d_pred).all() and torch.isfinite(d_target).all()
    assert (d_target[0, 0, :4] == 0).all() and (d_target[0, 0, 4:] != 0).all()


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_nothing_selected_gives_zero_not_nan(kind, backend):
    device = path_device(backend)
    pred, target, _ = loss_inputs(kind, 2, 3, 8, torch.float32, device)
    loss, d_pred, _ = run(backend, pred, target, torch.zeros(2, 3, dtype=torch.bool, device=device), kind)
    assert loss.item() == 0.0
    assert torch.equal(d_pred, torch.zeros_like(pred))


def test_empty_inputs():
    loss = masked_region_loss(torch.randn(2, 0, 3), torch.randn(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool))
    assert loss.item() == 0.0


# --------------------------------------------------------------------------- errors


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
        (dict(backend=None), ValueError, "backend to be one of"),
    ],
)
def test_loss_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        _loss_call(**overrides)


def test_more_than_2_pow_31_regions_is_refused_before_any_work():
    feats = torch.zeros(1, 1, 1).expand(2**16, 2**15, 1)
    mask = torch.ones(1, 1, dtype=torch.bool).expand(2**16, 2**15)
    # backend "cuda" on CPU tensors would raise a different error if the size went unchecked
    with pytest.raises(ValueError, match=r"B·R < 2\^31 regions, got 65536·32768"):
        masked_region_loss(feats, feats, mask, "mse", backend="cuda")


# --------------------------------------------------------------------------- the module


def test_masked_region_loss_module():
    pred, target, mask = loss_inputs("smooth_l1", 2, 4, 5, torch.float32, "cpu")
    module = MaskedRegionLoss("smooth_l1", beta=0.5, backend="torch")
    assert "kind='smooth_l1'" in repr(module)
    torch.testing.assert_close(
        module(pred, target, mask), eager_masked_region_loss(pred, target, mask, "smooth_l1", beta=0.5)
    )


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [p for p in PATHS if p.id != "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_paths_within_rule_at_scale(kind, dtype, backend):
    pred, target, mask = loss_inputs(kind, 256, 100, 2048, dtype, "cuda", prob=0.15)
    assert_all_within_rule(f"{backend} {kind} {dtype}", run(backend, pred, target, mask, kind),
                           eager(pred, target, mask, kind), oracle(pred, target, mask, kind), dtype)
