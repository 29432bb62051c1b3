"""clip_loss and siglip_loss: the Triton kernels (interpreter on CPU) and the CPU path against the
float64 reference under the numerics rule (docs/design.md), workspaces from one block to all of S,
the work a frozen tower saves, CLIP's gradient where a positive dominates, the reference against
Hugging Face's models, error paths. Opcheck, torch.compile, bf16 on the CPU and autocast:
tests/ops/test_contract.py."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from contrastive_oracle import LOSS_CASES, check_clip, check_siglip, random_leaves
from mmkernels.ops import contrastive
from mmkernels.ops.contrastive import plan, reference
from mmkernels.ops._dispatch import triton_enabled
from toolkit import (OpTrace, assert_no_host_sync, eager_siglip_loss, fresh_seed, needs_triton, seeded_generator,
                     value_and_grads)


# NaN and Inf inputs make the interpreter's numpy arithmetic warn (invalid value, overflow, all-NaN
# slice) where the GPU computes silently; the NaN result is what the test checks
NON_FINITE_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _loss_fn(loss_name, normalize, smoothing, **kw):
    if loss_name == "clip":
        return lambda a, b, s: mmkernels.clip_loss(a, b, s, normalize=normalize, label_smoothing=smoothing, **kw)
    return lambda a, b, s, bias: mmkernels.siglip_loss(a, b, s, bias, normalize=normalize, **kw)


def _run_case(loss_name, n, d, normalize, smoothing, dtype, device, **kw):
    fresh_seed()
    leaves = random_leaves(n, d, dtype, device, with_bias=loss_name == "siglip")
    before = [t.clone() for t in leaves]
    got = value_and_grads(_loss_fn(loss_name, normalize, smoothing, **kw), leaves)
    assert all(torch.equal(t, t0) for t, t0 in zip(leaves, before)), "the loss modified its inputs"
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert got[1].dtype == dtype and got[2].dtype == dtype
    what = f"{loss_name} N={n} D={d} {dtype} normalize={normalize} smoothing={smoothing} {kw}"
    if loss_name == "clip":
        check_clip(got, leaves, dtype, what, normalize, smoothing)
    else:
        check_siglip(got, leaves, dtype, what, normalize)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,d,normalize,smoothing", LOSS_CASES)
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_triton_matches_reference(loss_name, n, d, normalize, smoothing, dtype, device):
    if dtype == torch.float16 and n * d > 129 * 200 and device.type == "cpu":
        pytest.skip("the largest shapes run in fp32 only, to keep the interpreter fast")
    _run_case(loss_name, n, d, normalize, smoothing, dtype, device)


@pytest.mark.parametrize("n,d,normalize,smoothing", LOSS_CASES[:5])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_cpu_path_matches_reference(loss_name, n, d, normalize, smoothing, reference_path):
    _run_case(loss_name, n, d, normalize, smoothing, torch.float32, torch.device("cpu"))


def _workspace(kind: str, n: int, d: int, dtype, device) -> int:
    """Bytes for panels of one block of rows, of two blocks, or of all of S (both passes)."""
    block = plan.tile_config(d, dtype, device)["BLOCK_M"]
    rows = {"one block": block, "two blocks": 2 * block, "all of S": n}[kind]
    return max(plan.stats_panel_bytes(rows, n, d, dtype, device),
               plan.panel_bytes(rows, n, d, dtype, device, True, True, dtype))


@needs_triton
@pytest.mark.parametrize("kind", ["one block", "two blocks", "all of S"])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_workspace_sizes(loss_name, kind, device):
    """Exact whatever the panel height: the workspace decides how many rows of S a panel holds."""
    n, d = 300, 40
    workspace = _workspace(kind, n, d, torch.float32, device)
    block = plan.tile_config(d, torch.float32, device)["BLOCK_M"]
    expected = {"one block": block, "two blocks": 2 * block, "all of S": n}[kind]
    assert plan.panel_workspace(n, n, d, torch.float32, device, True, True, torch.float32, workspace) == expected
    assert plan.stats_workspace(n, n, d, torch.float32, device, workspace) >= expected
    _run_case(loss_name, n, d, True, 0.1, torch.float32, device, workspace_bytes=workspace)


@needs_triton
def test_statistics_split_over_columns(device, monkeypatch):
    """The forward's column splits (several programs per row block, merged in order) are exact too."""
    config = plan.tile_config

    def split_columns(d, dtype, dev):
        return {**config(d, dtype, dev), "programs": 12}

    monkeypatch.setattr(plan, "tile_config", split_columns)
    assert plan.column_splits(3, 300, split_columns(40, torch.float32, device))[0] > 1
    _run_case("clip", 300, 40, False, 0.1, torch.float32, device)


def _exactly_rounded_log_probabilities(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) fp32 x in [log 0.55, log 0.97) whose fp32 exp p is exact: the float64 exp lies within 0.05 ulp
    of p, torch's and numpy's (the interpreter's) fp32 exp both return p, and p's last bit (2^-24) is 1."""
    x = torch.empty(4000).uniform_(math.log(0.55), math.log(0.97), generator=gen)
    e = torch.exp(x.double())
    p = e.float()
    keep = ((e - p.double()).abs() < 0.05 * 2.0**-24) & ((p.double() * 2**24).round().long() % 2 == 1)
    keep &= (torch.exp(x) == p) & (torch.from_numpy(np.exp(x.numpy())) == p)
    assert keep.sum() >= n, "too few candidates: widen the draw"
    return x[keep][:n]


@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_clip_gradient_keeps_the_low_bits_where_a_positive_dominates(kernel_path, smoothing):
    """W = (P^row - t) + (P^col - t), each target off its own softmax as the eager backward does: where a
    positive dominates one direction (P = 1) and not quite the other (P = p in [0.55, 0.97)), W_ii =
    p - 1 keeps p's last bit. Summing P^row + P^col ≈ 2 first rounds that bit away (2^-24, half of a
    grid of 2^-23): the one-row ranks of mmkernels.distributed saw 5x eager's error from it.

    Inputs that leave the assembly of W as the only rounding: text_emb = I, so S = image_emb and the
    image gradient is W / (2N) itself (products with I and a power-of-two N are exact); S_ii = 0 and
    the negatives -30; the statistics chosen so that each P_ii is exactly 1 or an exactly rounded p
    (even rows: the row's P is p, the column's 1; odd rows the reverse). Block rows of M = 1 at every
    offset (clip_block_grads), and the whole batch as one block, against the float64 reference on
    the same inputs. CPU only: the GPU's tl.exp is an approximation, so P would not be exact there.
    """
    path, device = kernel_path
    if device.type == "cuda":
        pytest.skip("the exact-P premise holds for the CPU's exp (the kernels: the interpreter's numpy)")
    n = 16
    x = _exactly_rounded_log_probabilities(n, seeded_generator())
    a = torch.full((n, n), -30.0).fill_diagonal_(0.0)
    b = torch.eye(n)
    row_side = torch.arange(n) % 2 == 0
    row_lse, col_lse = torch.where(row_side, -x, 0.0), torch.where(row_side, 0.0, -x)
    oracle = reference.clip_block_grads(a.double(), b.double(), torch.tensor(1.0, dtype=torch.float64),
                                        row_lse.double(), col_lse.double(), 0, n, smoothing, False, True, False)[0]
    bound = 0.25 * 2.0**-24 / (2 * n)  # a quarter of P's last bit, in the gradient's units
    for p0, p1 in [(i, i + 1) for i in range(n)] + [(0, n)]:
        got = contrastive.clip_block_grads(a[p0:p1], b, 1.0, row_lse[p0:p1], col_lse, offset=p0, n_total=n,
                                           label_smoothing=smoothing, normalize=False, image_grad=True,
                                           text_grad=False).image_grad
        error = (got.double() - oracle[p0:p1]).abs().max().item()
        assert error <= bound, f"rows {p0}..{p1 - 1}: error {error:.3e} > {bound:.3e}"
    # negative control: the old order, P^row + P^col - 2(1-eps)·[positive] - 2·eps/N, on the same P's
    old = torch.exp(a - row_lse[:, None]) + torch.exp(a - col_lse[None, :])
    old.diagonal().sub_(2 * (1 - smoothing))
    old = (old - 2 * smoothing / n) / (2 * n)
    assert (old.double() - oracle).abs().max().item() > 3 * bound


@pytest.mark.parametrize("api", ["clip_loss", "clip blocks", "info_nce"])
def test_softmax_gradients_keep_their_precision_at_large_logits(api, kernel_path):
    """P = exp(S - lse) needs the log-sum-exp's low bits where S_ij dominates its row or column: an fp32
    lse is off by up to u·|lse|/2, and so is every P, where the eager softmax's P ≈ 1 is exact to u
    (CLIP N = 2 at logits 17.5 and -46.6: an fp32 lse gives d image_emb 17x eager's error).
    The statistics carry lse in float64; the gradient pass splits it as hi + lo and forms (S - hi) - lo.

    Inputs where S is exact: text_emb = I and logit_scale 1, so S = image_emb and d image_emb = dL/dS
    exactly; every logit near 400, each positive 4..12 above its negatives (P_ii in (0.78, 1), none
    saturated). Each entry against the float64 oracle within a few ulps of its P's and targets (and
    of P·|S - lse|, the GPU's exp2 argument rounding); a negative control: clip_block_grads given the
    same log-sum-exps rounded to fp32 misses that bound.
    """
    path, device = kernel_path
    gen = seeded_generator()
    n, eps, u = 16, 0.1, 2.0**-24
    # multiples of 1/64 near 400: exact in fp32, and so are their differences
    a = 400.0 - torch.randint(4 * 64, 12 * 64, (n, n), generator=gen).double() / 64
    a.diagonal().copy_(400.0 + torch.randint(0, 2 * 64, (n,), generator=gen).double() / 64)
    b = torch.eye(n, dtype=torch.float64)
    scale = torch.tensor(1.0, dtype=torch.float64)
    leaves = [t.float().to(device) for t in (a, b, scale)]
    targets = (1 - eps) * torch.eye(n, dtype=torch.float64) + eps / n
    slack = {}
    for dim in ((1, 0) if api != "info_nce" else (1,)):
        p = torch.softmax(a, dim)
        slack[dim] = 8 * (p + targets) + 2 * p * (a - torch.logsumexp(a, dim, keepdim=True)).abs()
    if api == "info_nce":
        oracle = value_and_grads(lambda x, y, s: reference.info_nce_loss(x, y, s, label_smoothing=eps), [a, b, scale])
        got = value_and_grads(lambda x, y, s: mmkernels.info_nce_loss(x, y, s, label_smoothing=eps), leaves)[1]
        bound = u * slack[1] / n
    else:
        oracle = value_and_grads(lambda x, y, s: reference.clip_loss(x, y, s, label_smoothing=eps), [a, b, scale])
        bound = u * (slack[1] + slack[0]) / (2 * n)
        if api == "clip_loss":
            got = value_and_grads(lambda x, y, s: mmkernels.clip_loss(x, y, s, label_smoothing=eps), leaves)[1]
        else:
            x, y, s = leaves
            cuts = [(0, 5), (5, n)]
            stats = [contrastive.clip_block_stats(x[p0:p1], y, s, offset=p0, normalize=False) for p0, p1 in cuts]
            col_lse = contrastive.merge_column_stats(torch.stack([t.col_max for t in stats]),
                                                     torch.stack([t.col_sumexp for t in stats]))
            assert stats[0].row_lse.dtype == col_lse.dtype == torch.float64

            def image_grads(rounding):
                return torch.cat([contrastive.clip_block_grads(
                    x[p0:p1], y, s, rounding(t.row_lse), rounding(col_lse), offset=p0, n_total=n,
                    label_smoothing=eps, normalize=False, image_grad=True, text_grad=False).image_grad
                    for (p0, p1), t in zip(cuts, stats)])

            got = image_grads(lambda t: t)
            rounded = (image_grads(lambda t: t.float()).double().cpu() - oracle[1]).abs()
            assert (rounded > bound).any(), "the negative control (fp32 log-sum-exps) passed: the test is blind"
    error = (got.double().cpu() - oracle[1]).abs()
    worst = (error / bound).argmax().item()
    assert (error <= bound).all(), (
        f"{api} {path}: d image_emb{divmod(worst, n)} off by {error.view(-1)[worst]:.3e} > {bound.view(-1)[worst]:.3e}")


def _finite_despite_inf():
    """Inputs where the eager SigLIP formula is finite although an input is -inf: every logit of
    row 1 is ±inf on the side that a label calls right (the loss is 77.85 here, not NaN)."""
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    b[:, 5] = b[:, 5].abs() + 0.1
    b[1, 5] = -b[1, 5]
    a[1, 5] = float("-inf")  # S[1, 1] = +inf (positive), S[1, j] = -inf for j != 1 (negatives)
    return a, b


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("interpret", ["1", "0"])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_non_finite_inputs_give_nan(loss_name, interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    fresh_seed()
    cases = []
    for bad in (float("nan"), float("inf"), float("-inf")):
        for normalize in (False, True):
            a, b = torch.randn(70, 16), torch.randn(70, 16)
            a[3, 5] = bad
            cases.append((a, b, normalize))
    cases.append((*_finite_despite_inf(), False))
    for a, b, normalize in cases:
        if loss_name == "clip":
            loss = mmkernels.clip_loss(a, b, 2.0, normalize=normalize)
        else:
            loss = mmkernels.siglip_loss(a, b, 2.0, -1.0, normalize=normalize)
        assert torch.isnan(loss), f"non-finite input (normalize={normalize}) gave {loss}"
    # the last case is one that a rule on the loss alone misses: the eager formula is finite there
    assert torch.isfinite(eager_siglip_loss(*cases[-1][:2], torch.tensor(2.0), torch.tensor(-1.0)))


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("interpret", ["1", "0"])
def test_float_scale_past_float32_range_gives_nan(interpret, monkeypatch):
    """A Python-float logit_scale or logit_bias past float32's range is ±inf, as torch.tensor rounds
    it (not an error, as torch.full would give): the loss of an Inf input is NaN."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    fresh_seed()
    a, b = torch.randn(9, 8), torch.randn(9, 8)
    assert torch.isnan(mmkernels.clip_loss(a, b, 1e300))
    assert torch.isnan(mmkernels.siglip_loss(a, b, 2.0, -1e300))
    assert torch.isnan(mmkernels.info_nce_loss(a, b, 1e300))


@needs_triton
def test_strided_inputs(device):
    fresh_seed()
    base = torch.randn(40, 64, device=device)
    a = base[::2, :48]               # rows strided, last dimension contiguous
    b = torch.randn(48, 20, device=device).T   # last dimension not contiguous
    leaves = [a, b, torch.tensor(4.0, device=device)]
    check_clip(value_and_grads(lambda x, y, s: mmkernels.clip_loss(x, y, s), leaves), leaves, torch.float32,
               "strided CLIP")
    got = mmkernels.siglip_loss(a, b, 4.0, -4.0)
    expected = reference.siglip_loss(a.double(), b.double(), torch.tensor(4.0).double(), torch.tensor(-4.0).double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_python_float_scale_and_scale_without_grad(loss_name, device):
    """A float scale is the same as a tensor scale; a scale that does not require grad still gives
    the embeddings their exact gradients; one that does gets its own."""
    fresh_seed()
    leaves = random_leaves(9, 8, torch.float32, device, with_bias=True)
    a, b, scale, bias = leaves
    fn = _loss_fn(loss_name, False, 0.0)
    extra = [] if loss_name == "clip" else [bias]
    loss_float, grad_float = value_and_grads(lambda x: fn(x, b, scale.item(), *extra), [a])
    loss_tensor, grad_tensor = value_and_grads(lambda x: fn(x, b, scale, *extra), [a])
    assert torch.equal(loss_float, loss_tensor) and torch.equal(grad_float, grad_tensor)
    got = [loss_tensor, grad_tensor, None] + value_and_grads(lambda s: fn(a, b, s, *extra), [scale])[1:]
    check = check_clip if loss_name == "clip" else check_siglip
    check(got, leaves[:3] + extra, torch.float32, f"{loss_name} scale grad")


FROZEN_WORK = {  # matrix FLOPs of forward + backward, in units of N²·D
    ("clip", "none"): 8, ("clip", "image"): 6, ("clip", "text"): 6, ("clip", "both"): 4,
    ("siglip", "none"): 6, ("siglip", "image"): 4, ("siglip", "text"): 4, ("siglip", "both"): 2,
}


@needs_triton
@pytest.mark.parametrize("frozen", ["none", "image", "text", "both"])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_frozen_tower_saves_its_product(loss_name, frozen, device):
    """A locked tower (LiT) gets no gradient and costs no product (2·N²·D less), counted by OpTrace;
    the gradients that remain are exact."""
    if device.type != "cpu":
        pytest.skip("counts interpreted tl.dot")
    fresh_seed()
    n = d = plan.tile_config(64, torch.float32, device)["BLOCK_M"]  # one tile: no padding in the count
    leaves = random_leaves(n, d, torch.float32, device, with_bias=True)
    a, b, scale, bias = (t.clone().requires_grad_() for t in leaves)
    a.requires_grad_(frozen in ("none", "text"))
    b.requires_grad_(frozen in ("none", "image"))
    with OpTrace() as trace:
        if loss_name == "clip":
            loss = mmkernels.clip_loss(a, b, scale, normalize=True, label_smoothing=0.1)
        else:
            loss = mmkernels.siglip_loss(a, b, scale, bias, normalize=True)
        loss.backward()
    assert trace.matmul_flops == FROZEN_WORK[loss_name, frozen] * n * n * d
    assert (a.grad is None) == (frozen in ("image", "both")) and (b.grad is None) == (frozen in ("text", "both"))
    got = [loss, a.grad, b.grad, scale.grad]
    if loss_name == "clip":
        check_clip(got, leaves[:3], torch.float32, f"frozen {frozen}", True, 0.1)
    else:
        check_siglip(got + [bias.grad], leaves, torch.float32, f"frozen {frozen}", True)


def test_modules_match_reference(device):
    fresh_seed()
    leaves = random_leaves(11, 8, torch.float32, device, with_bias=True)
    clip = mmkernels.nn.ClipLoss(normalize=True, label_smoothing=0.1)
    check_clip(value_and_grads(clip, leaves[:3]), leaves[:3], torch.float32, "ClipLoss", True, 0.1)
    sig = mmkernels.nn.SigLipLoss(normalize=True)
    check_siglip(value_and_grads(sig, leaves), leaves, torch.float32, "SigLipLoss", True)
    assert "normalize=True" in repr(clip)


# --------------------------------------------------------------------------- the reference itself


def _tiny_text_vision(text_cls, vision_cls):
    return dict(
        text_config=text_cls(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=12).to_dict(),
        vision_config=vision_cls(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, image_size=8, patch_size=4).to_dict(),
    )


def test_reference_matches_hugging_face_clip_model():
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    fresh_seed()
    config = CLIPConfig(projection_dim=8, **_tiny_text_vision(CLIPTextConfig, CLIPVisionConfig))
    model = CLIPModel(config).double().eval()
    out = model(input_ids=torch.randint(0, 50, (5, 6)), pixel_values=torch.randn(5, 3, 8, 8, dtype=torch.float64),
                return_loss=True)
    scale = model.logit_scale.exp()
    torch.testing.assert_close(reference.clip_loss(out.image_embeds, out.text_embeds, scale), out.loss)


def test_reference_matches_hugging_face_siglip_model():
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig

    fresh_seed()
    config = SiglipConfig(**_tiny_text_vision(SiglipTextConfig, SiglipVisionConfig))
    model = SiglipModel(config).double().eval()
    out = model(input_ids=torch.randint(0, 50, (5, 6)), pixel_values=torch.randn(5, 3, 8, 8, dtype=torch.float64),
                return_loss=True)
    scale, bias = model.logit_scale.exp(), model.logit_bias.reshape(())
    torch.testing.assert_close(reference.siglip_loss(out.image_embeds, out.text_embeds, scale, bias), out.loss)


def test_reference_label_smoothing_matches_cross_entropy():
    fresh_seed()
    a, b = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64)
    logits = scale * a @ b.T
    labels = torch.arange(9)
    expected = (F.cross_entropy(logits, labels, label_smoothing=0.3)
                + F.cross_entropy(logits.T, labels, label_smoothing=0.3)) / 2
    torch.testing.assert_close(reference.clip_loss(a, b, scale, label_smoothing=0.3), expected)


@pytest.mark.parametrize("normalize", [False, True])
def test_reference_gradcheck(normalize):
    fresh_seed()
    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: reference.clip_loss(a, b, s, normalize, 0.1), (a, b, s))
    assert torch.autograd.gradcheck(
        lambda a, b, s, c: reference.siglip_loss(a, b, s, c, normalize), (a, b, s, bias)
    )


# --------------------------------------------------------------------------- errors


def _call(fn, a, b, scale=2.0, **kw):
    if fn == "clip":
        return mmkernels.clip_loss(a, b, scale, **kw)
    if fn == "info_nce":
        return mmkernels.info_nce_loss(a, b, scale, **kw)
    return mmkernels.siglip_loss(a, b, scale, -1.0, **kw)


@pytest.mark.parametrize("fn", ["clip", "siglip"])
@pytest.mark.parametrize(
    "a,b,scale,exc,match",
    [
        (torch.randn(4, 8), torch.randn(4, 6), 2.0, ValueError, "same last dimension, got 8 and 6"),
        (torch.randn(4, 8), torch.randn(5, 8), 2.0, ValueError, "same number of pairs N, got 4 and 5"),
        (torch.randn(0, 8), torch.randn(0, 8), 2.0, ValueError, "N = 0"),
        (torch.randint(0, 3, (4, 8)), torch.randn(4, 8), 2.0, TypeError, "image_emb to be a floating-point"),
        (torch.randn(4, 8), torch.randint(0, 3, (4, 8)), 2.0, TypeError, "text_emb to be a floating-point"),
        (torch.randn(4, 8, 2), torch.randn(4, 8), 2.0, ValueError, r"image_emb to be 2-D \(N, D\), got shape \(4, 8, 2\)"),
        (torch.randn(8), torch.randn(8), 2.0, ValueError, "to be 2-D"),
        (torch.randn(4, 8), torch.randn(4, 8), torch.ones(2), ValueError, "logit_scale to be a scalar"),
        (torch.randn(4, 8), torch.randn(4, 8), "2", TypeError, "logit_scale to be a float"),
        (torch.randn(4, 8), torch.randn(4, 8).half(), 2.0, TypeError, "share a dtype"),
        ([[1.0]], torch.randn(4, 8), 2.0, TypeError, "image_emb to be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise(fn, a, b, scale, exc, match):
    with pytest.raises(exc, match=match):
        _call(fn, a, b, scale)


@pytest.mark.parametrize(
    "value,exc,match",
    [
        (None, TypeError, "label_smoothing to be a float in \\[0, 1\\], got NoneType"),
        ("abc", TypeError, "label_smoothing to be a float in \\[0, 1\\], got str"),
        (torch.tensor([0.1, 0.2]), TypeError, "label_smoothing to be a float in \\[0, 1\\], got Tensor"),
        (True, TypeError, "label_smoothing to be a float in \\[0, 1\\], got bool"),
        (1.5, ValueError, "label_smoothing in \\[0, 1\\], got 1.5"),
        (float("nan"), ValueError, "label_smoothing in \\[0, 1\\], got nan"),
    ],
)
def test_bad_label_smoothing_raises(value, exc, match):
    with pytest.raises(exc, match=match):
        mmkernels.clip_loss(torch.randn(4, 8), torch.randn(4, 8), 2.0, label_smoothing=value)


@pytest.mark.parametrize("fn", ["clip", "siglip"])
def test_bad_workspace_raises(fn, device):
    a, b = torch.randn(300, 40, device=device), torch.randn(300, 40, device=device)
    with pytest.raises(TypeError, match="workspace_bytes to be an int \\(bytes\\), got float"):
        _call(fn, a, b, workspace_bytes=1e6)
    with pytest.raises(ValueError, match="workspace_bytes > 0, got -1"):
        _call(fn, a, b, workspace_bytes=-1)
    if not triton_enabled(a):
        return  # the reference path materialises S and uses no workspace
    block = plan.tile_config(40, torch.float32, device)["BLOCK_M"]
    if fn == "clip":  # without gradients: the statistics pass only
        needed = plan.stats_panel_bytes(block, 300, 40, torch.float32, device)
    else:
        needed = plan.panel_bytes(block, 300, 40, torch.float32, device, False, False, torch.float32)
    with pytest.raises(ValueError, match=f"expected workspace_bytes >= {needed} .*got {needed - 1}"):
        _call(fn, a, b, workspace_bytes=needed - 1)
    _call(fn, a, b, workspace_bytes=needed)
    # needing gradients needs W's rows too, and the error comes at the forward call
    a.requires_grad_()
    grad_needed = plan.panel_bytes(block, 300, 40, torch.float32, device, True, False, torch.float32)
    with pytest.raises(ValueError, match=f"expected workspace_bytes >= {grad_needed} "):
        _call(fn, a, b, workspace_bytes=grad_needed - 1)


@needs_triton
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("fn", ["clip", "siglip", "info_nce"])
def test_workspace_minimum_named_is_enough_for_the_whole_call(fn, grad, device):
    """The minimum that a too-small workspace's error names covers every pass of the call (the
    statistics and the gradient pass): that many bytes run forward and backward, one byte fewer
    raises, naming the same minimum."""
    fresh_seed()
    a, b = torch.randn(70, 24, device=device), torch.randn(70, 24, device=device)
    a.requires_grad_(grad)
    with pytest.raises(ValueError, match="expected workspace_bytes >= ") as raised:
        _call(fn, a, b, workspace_bytes=1)
    needed = int(re.search(r"expected workspace_bytes >= (\d+) ", str(raised.value)).group(1))
    with pytest.raises(ValueError, match=f"expected workspace_bytes >= {needed} .*got {needed - 1}"):
        _call(fn, a, b, workspace_bytes=needed - 1)
    loss = _call(fn, a, b, workspace_bytes=needed)
    if grad:
        (d_image,) = torch.autograd.grad(loss, a)
        assert torch.isfinite(d_image).all()
    assert torch.isfinite(loss)


def test_bad_bias_raises():
    with pytest.raises(ValueError, match="logit_bias to be a scalar"):
        mmkernels.siglip_loss(torch.randn(4, 8), torch.randn(4, 8), 2.0, torch.zeros(3))
    with pytest.raises(TypeError, match="normalize to be a bool \\(or numpy.bool_\\), got str"):
        mmkernels.siglip_loss(torch.randn(4, 8), torch.randn(4, 8), 2.0, 0.0, normalize="yes")


def test_inputs_on_different_devices_raise():
    a = torch.randn(4, 8)
    b = torch.randn(4, 8, device="meta")
    with pytest.raises(ValueError, match="expected all inputs on one device, got image_emb on cpu, text_emb on meta"):
        mmkernels.clip_loss(a, b, 2.0)
    with pytest.raises(ValueError, match="logit_scale on the inputs' device"):
        mmkernels.clip_loss(a, a, torch.tensor(2.0, device="meta"))


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(4096, 512), (16384, 768), (20000, 256), (2048, 2048), (1023, 1152)])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_gpu_matches_reference(loss_name, n, d, dtype):
    _run_case(loss_name, n, d, n % 2 == 1, 0.0, dtype, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_gpu_small_workspace(loss_name):
    """Many panels on the GPU: 8 MiB for N = 8192 (bf16 W rows of 16 KiB: ~500 rows a panel)."""
    _run_case(loss_name, 8192, 768, True, 0.1 if loss_name == "clip" else 0.0, torch.bfloat16, torch.device("cuda"),
              workspace_bytes=8 << 20)


@pytest.mark.gpu
@pytest.mark.parametrize("n,d,budget_mib", [(32768, 768, 400), (65536, 768, 1024)])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_gpu_memory_above_inputs(loss_name, n, d, budget_mib):
    """The issue's memory goal: forward + backward, gradients included, within the budget above the inputs."""
    a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scale = torch.tensor(14.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if loss_name == "clip":
        loss = mmkernels.clip_loss(a, b, scale, normalize=True)
    else:
        loss = mmkernels.siglip_loss(a, b, scale, bias, normalize=True)
    loss.backward()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert peak_mib <= budget_mib, f"peak {peak_mib:.0f} MiB above the inputs, budget {budget_mib} MiB"


@pytest.mark.gpu
def test_gpu_forward_and_backward_do_not_sync():
    """Python-float logit_scale and logit_bias (nn.SigLipLoss passes 0.0 for a None bias) reach the
    kernels without a host sync: torch.tensor(value, device="cuda") waited for the GPU."""
    a = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        loss = (mmkernels.clip_loss(a, b, 14.0, normalize=True, label_smoothing=0.1)
                + mmkernels.siglip_loss(a, b, 10.0, -10.0, normalize=True)
                + mmkernels.info_nce_loss(a, b, 14.0, normalize=True))
        torch.autograd.grad(loss, (a, b))
        contrastive.siglip_block(a, b, 10.0, -10.0, offset=None, n_total=1024, normalize=True, image_grad=True,
                                 text_grad=True)

    assert_no_host_sync(step)
