"""The block-row API (mmkernels.ops.contrastive): blocks of rows of S with offsets compose into the
global CLIP and SigLIP losses and their gradients, on the reference path and on the kernels, under
the numerics rule (docs/design.md) against the float64 oracle of the whole batch."""
import pytest
import torch

from contrastive_oracle import NAMES, check_clip, check_siglip, random_leaves
from mmkernels.ops import contrastive
from mmkernels.ops.contrastive import plan
from mmkernels.ops._common import HAS_TRITON
from mmkernels.ops._dispatch import interpreting
from toolkit import OpTrace, assert_within_rule, fresh_seed, value_and_grads


@pytest.fixture
def path_device(kernel_path):
    """Where kernel_path's path runs: the reference on the CPU, or the kernels (the GPU, or the CPU
    under the interpreter)."""
    return kernel_path.device


def split_rows(n: int, cuts) -> list[tuple[int, int]]:
    """[(start, stop)] blocks of rows at the given cut points (an empty block where two repeat)."""
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:]))


def compose_clip(a, b, scale, blocks, normalize, smoothing, image_grad=True, text_grad=True, **kw):
    """The global CLIP loss and its gradients as a multi-GPU loss assembles them from blocks."""
    n = a.shape[0]
    stats = [contrastive.clip_block_stats(a[p0:p1], b, scale, offset=p0, normalize=normalize, **kw)
             for p0, p1 in blocks]
    col_lse = contrastive.merge_column_stats(torch.stack([s.col_max for s in stats]),
                                             torch.stack([s.col_sumexp for s in stats]))
    row_lse = torch.cat([s.row_lse for s in stats])
    targets = (1 - smoothing) * torch.cat([s.diag for s in stats]) + smoothing / n * torch.cat(
        [s.row_sum for s in stats])
    loss = (row_lse.sum() + col_lse.sum() - 2 * targets.sum()) / (2 * n)
    grads = [contrastive.clip_block_grads(a[p0:p1], b, scale, s.row_lse, col_lse, offset=p0, n_total=n,
                                          label_smoothing=smoothing, normalize=normalize, image_grad=image_grad,
                                          text_grad=text_grad, **kw)
             for (p0, p1), s in zip(blocks, stats)]
    d_image = torch.cat([g.image_grad for g in grads]) if image_grad else None
    d_text = torch.stack([g.text_grad for g in grads]).sum(0) if text_grad else None
    d_scale = torch.stack([g.scale_grad for g in grads]).sum()
    return [loss, d_image, d_text, d_scale]


def compose_siglip(a, b, scale, bias, blocks, normalize, **kw):
    n = a.shape[0]
    parts = [contrastive.siglip_block(a[p0:p1], b, scale, bias, offset=p0, n_total=n, normalize=normalize,
                                      image_grad=True, text_grad=True, **kw)
             for p0, p1 in blocks]
    return [torch.stack([p.loss for p in parts]).sum(), torch.cat([p.image_grad for p in parts]),
            torch.stack([p.text_grad for p in parts]).sum(0), torch.stack([p.scale_grad for p in parts]).sum(),
            torch.stack([p.bias_grad for p in parts]).sum()]


BLOCK_CASES = [
    # (N, D, normalize, label_smoothing, cuts): blocks of rows of unequal sizes, one empty
    (1, 5, False, 0.0, []),
    (9, 7, True, 0.1, [4]),
    (70, 24, False, 0.2, [3, 3, 40]),
    (130, 33, True, 0.0, [65, 66]),
]


@pytest.mark.parametrize("n,d,normalize,smoothing,cuts", BLOCK_CASES)
def test_clip_blocks_compose_the_global_loss(path_device, n, d, normalize, smoothing, cuts):
    fresh_seed()
    leaves = random_leaves(n, d, torch.float32, path_device, with_bias=False)
    got = compose_clip(*leaves, split_rows(n, cuts), normalize, smoothing)
    check_clip(got, leaves, torch.float32, f"CLIP blocks N={n} D={d} cuts={cuts}", normalize, smoothing)


@pytest.mark.parametrize("n,d,normalize,smoothing,cuts", BLOCK_CASES)
def test_siglip_blocks_compose_the_global_loss(path_device, n, d, normalize, smoothing, cuts):
    fresh_seed()
    leaves = random_leaves(n, d, torch.float32, path_device, with_bias=True)
    got = compose_siglip(*leaves, split_rows(n, cuts), normalize)
    check_siglip(got, leaves, torch.float32, f"SigLIP blocks N={n} D={d} cuts={cuts}", normalize)


def negatives_only(a, b, scale, bias, n_total, normalize):
    """-Σ_ij log σ(-S_ij) / n_total for S = scale · a @ b.T + bias: a block with no positives, in
    the inputs' dtype (float64: the oracle). Non-finite logits are NaN, as in reference.clip_logits."""
    if normalize:
        a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    logits = scale.to(a.dtype) * a @ b.T + bias.to(a.dtype)
    logits = torch.where(torch.isfinite(logits), logits, torch.nan)
    return -torch.nn.functional.logsigmoid(-logits).sum() / n_total


@pytest.mark.parametrize("m,n,d,normalize", [(5, 3, 7, False), (0, 4, 5, True), (70, 66, 24, True), (1, 1, 3, False)])
def test_siglip_block_without_positives(path_device, m, n, d, normalize):
    """offset=None: rows against columns that hold none of their positives (any M, N), value and
    every gradient under the numerics rule (docs/design.md) against the float64 sum of -log σ(-S_ij) / n_total."""
    fresh_seed()
    a = torch.randn(m, d, device=path_device)
    b = torch.randn(n, d, device=path_device)
    scale, bias = torch.tensor(2.5, device=path_device), torch.tensor(-1.5, device=path_device)
    n_total = m + n + 3
    got = contrastive.siglip_block(a, b, scale, bias, offset=None, n_total=n_total, normalize=normalize,
                                   image_grad=True, text_grad=True)
    leaves = [a, b, scale, bias]
    oracle = value_and_grads(lambda *x: negatives_only(*x, n_total, normalize), [t.double() for t in leaves])
    eager = value_and_grads(lambda *x: negatives_only(*x, n_total, normalize), leaves)
    # d scale = Σ σ(S_ij) · U_ij / n_total cancels: its floor scales with Σ |terms|
    with torch.no_grad():
        x, y = (torch.nn.functional.normalize(t.double(), dim=-1) if normalize else t.double() for t in (a, b))
        unscaled = x @ y.T
        terms = torch.sigmoid(scale.double() * unscaled + bias.double()) / n_total
    sizes = [None, None, None, (terms * unscaled.abs()).sum().item(), None]
    for name, g, e, o, size in zip(NAMES, got, eager, oracle, sizes):
        assert_within_rule(f"no positives M={m} N={n}: {name}", g, e, o, torch.float32, size=size)
    # negative control: the same rows with positives give another loss, which the rule catches
    if m and m <= n:
        with_positives = contrastive.siglip_block(a, b, scale, bias, offset=0, n_total=n_total, normalize=normalize,
                                                  image_grad=False, text_grad=False)
        with pytest.raises(AssertionError):
            assert_within_rule("with positives", with_positives.loss, eager[0], oracle[0], torch.float32)


# the NaN/Inf inputs make the interpreter's numpy arithmetic warn, where the GPU computes silently
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_siglip_block_without_positives_non_finite(path_device):
    fresh_seed()
    a, b = torch.randn(4, 3, device=path_device), torch.randn(6, 3, device=path_device)
    for bad in (float("nan"), float("inf")):
        b[2, 1] = bad
        got = contrastive.siglip_block(a, b, 2.0, -1.0, offset=None, n_total=10, normalize=False,
                                       image_grad=True, text_grad=True)
        assert torch.isnan(got.loss), (bad, got.loss)


@pytest.mark.parametrize("n,d,normalize,cuts", [(9, 7, True, [4]), (70, 24, False, [3, 3, 40])])
def test_siglip_ring_blocks_compose_the_global_loss(path_device, n, d, normalize, cuts):
    """The ring's decomposition in one process: each rank's rows against its own texts (offset 0)
    and against every other rank's texts (offset=None); image gradients summed over a rank's
    blocks, text gradients over the blocks that saw them: the global loss and its gradients."""
    fresh_seed()
    leaves = random_leaves(n, d, torch.float32, path_device, with_bias=True)
    a, b, scale, bias = leaves
    ranks = split_rows(n, cuts)
    loss, d_image, d_text = 0.0, torch.zeros_like(a), torch.zeros_like(b)
    d_scale, d_bias = torch.zeros((), device=path_device), torch.zeros((), device=path_device)
    for r0, r1 in ranks:
        for q0, q1 in ranks:
            if q0 == q1:
                continue
            part = contrastive.siglip_block(a[r0:r1], b[q0:q1], scale, bias, offset=0 if q0 == r0 else None,
                                            n_total=n, normalize=normalize, image_grad=True, text_grad=True)
            loss = loss + part.loss
            d_image[r0:r1] += part.image_grad
            d_text[q0:q1] += part.text_grad
            d_scale, d_bias = d_scale + part.scale_grad, d_bias + part.bias_grad
    check_siglip([loss, d_image, d_text, d_scale, d_bias], leaves, torch.float32,
                 f"SigLIP ring blocks N={n} D={d} cuts={cuts}", normalize)


@pytest.mark.parametrize("offset", [0, None])
def test_siglip_block_work_with_and_without_positives(device, offset):
    """A block without positives costs what one with them does: 2·M·N·D per product (whole 64-row
    tiles, so the interpreter's tl.dot count has no padding in it)."""
    if device.type == "cpu" and not (HAS_TRITON and interpreting()):
        pytest.skip("counts the kernels' products: needs triton under TRITON_INTERPRET=1")
    fresh_seed()
    m, n, d = 64, 128, 64
    a, b = torch.randn(m, d, device=device), torch.randn(n, d, device=device)
    for sides, products in (((True, True), 3), ((True, False), 2), ((False, False), 1)):
        with OpTrace() as trace:
            contrastive.siglip_block(a, b, 2.0, -1.0, offset=offset, n_total=n, normalize=False,
                                     image_grad=sides[0], text_grad=sides[1])
        assert trace.matmul_flops == products * 2 * m * n * d, (sides, trace.matmul_flops / (2 * m * n * d))


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_blocks_with_a_workspace_of_one_block(loss_name, device):
    """Block rows with offsets, each processed in panels of one block of rows (the kernels' path)."""
    if not HAS_TRITON:
        pytest.skip("needs triton")
    n, d, cuts = 200, 24, [70, 130]
    fresh_seed()
    block = plan.tile_config(d, torch.float32, device)["BLOCK_M"]
    workspace = max(plan.stats_panel_bytes(block, n, d, torch.float32, device),
                    plan.panel_bytes(block, n, d, torch.float32, device, True, True, torch.float32))
    assert plan.panel_workspace(70, n, d, torch.float32, device, True, True, torch.float32, workspace) == block
    leaves = random_leaves(n, d, torch.float32, device, with_bias=loss_name == "siglip")
    if loss_name == "clip":
        got = compose_clip(*leaves, split_rows(n, cuts), True, 0.1, workspace_bytes=workspace)
        check_clip(got, leaves, torch.float32, "CLIP blocks, one-block workspace", True, 0.1)
    else:
        got = compose_siglip(*leaves, split_rows(n, cuts), True, workspace_bytes=workspace)
        check_siglip(got, leaves, torch.float32, "SigLIP blocks, one-block workspace", True)


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_blocks_under_autocast_compute_as_without(loss_name, path_device):
    """Under torch.autocast (bf16) the block functions compute as their contract says (the logits
    from fp32 inputs in fp32): every statistic, share and gradient is what it is without autocast,
    bit for bit, and the composition meets the rule."""
    n, d, cuts = 70, 24, [3, 3, 40]
    fresh_seed()
    leaves = random_leaves(n, d, torch.float32, path_device, with_bias=loss_name == "siglip")
    compose = (lambda: compose_clip(*leaves, split_rows(n, cuts), True, 0.1)) if loss_name == "clip" else (
        lambda: compose_siglip(*leaves, split_rows(n, cuts), True))
    plain = compose()
    with torch.autocast(path_device.type, dtype=torch.bfloat16):
        got = compose()
    for name, g, p in zip(NAMES, got, plain):
        assert g.dtype == p.dtype and torch.equal(g, p), f"{name}: differs under autocast"
    if loss_name == "clip":
        check_clip(got, leaves, torch.float32, "CLIP blocks under autocast", True, 0.1)
    else:
        check_siglip(got, leaves, torch.float32, "SigLIP blocks under autocast", True)


def test_blocks_are_not_the_whole_batch(path_device):
    """Negative control: a block computed as if it were the whole batch (offset 0, n_total = M) is
    not a share of the global loss, and the composition above notices."""
    fresh_seed()
    a, b, scale = random_leaves(12, 8, torch.float32, path_device, with_bias=False)
    whole = compose_clip(a, b, scale, split_rows(12, [5]), False, 0.0)
    wrong = contrastive.clip_block_stats(a[5:], b, scale, offset=0, normalize=False)
    right = contrastive.clip_block_stats(a[5:], b, scale, offset=5, normalize=False)
    assert not torch.allclose(wrong.diag, right.diag)
    with pytest.raises(AssertionError):
        check_clip([whole[0] + 1e-3, *whole[1:]], [a, b, scale], torch.float32, "shifted loss")


def test_merge_column_stats_edge_cases(path_device):
    fresh_seed()
    logits = torch.randn(7, 5, device=path_device) * 30
    parts = [logits[:3], logits[3:]]
    col_max = torch.stack([p.max(0).values for p in parts])
    col_sumexp = torch.stack([torch.exp(p - m).sum(0) for p, m in zip(parts, col_max)])
    merged = contrastive.merge_column_stats(col_max, col_sumexp)
    assert merged.dtype == torch.float64, "the merged log-sum-exps keep their low bits (float64)"
    torch.testing.assert_close(merged, torch.logsumexp(logits.double(), 0))
    assert torch.equal(merged, contrastive.merge_column_stats(col_max, col_sumexp)), "not deterministic"
    # an empty block (-inf, 0) adds nothing; only empty blocks give -inf; NaN or +inf give NaN
    empty_max = torch.full((1, 5), float("-inf"), device=path_device)
    empty_sum = torch.zeros(1, 5, device=path_device)
    torch.testing.assert_close(
        contrastive.merge_column_stats(torch.cat([empty_max, col_max]), torch.cat([empty_sum, col_sumexp])), merged)
    assert torch.equal(contrastive.merge_column_stats(empty_max, empty_sum), empty_max[0].double())
    bad_max, bad_sum = col_max.clone(), col_sumexp.clone()
    bad_max[0, 1], bad_sum[1, 3], bad_max[1, 4] = float("nan"), float("nan"), float("inf")
    merged_bad = contrastive.merge_column_stats(bad_max, bad_sum)
    assert torch.isnan(merged_bad[[1, 3, 4]]).all() and torch.isfinite(merged_bad[[0, 2]]).all()


def test_block_stats_of_an_empty_block(path_device):
    b = torch.randn(6, 4, device=path_device)
    stats = contrastive.clip_block_stats(b[:0], b, 2.0, offset=6, normalize=True)
    assert stats.row_lse.shape == (0,) and stats.diag.shape == (0,)
    assert torch.equal(stats.col_max, torch.full((6,), float("-inf"), device=path_device))
    assert torch.equal(stats.col_sumexp, torch.zeros(6, device=path_device))


def test_sides_not_asked_are_none(path_device):
    fresh_seed()
    a, b, scale = random_leaves(10, 6, torch.float32, path_device, with_bias=False)
    stats = contrastive.clip_block_stats(a[2:7], b, scale, offset=2, normalize=False)
    col_lse = contrastive.merge_column_stats(stats.col_max[None], stats.col_sumexp[None])
    grads = contrastive.clip_block_grads(a[2:7], b, scale, stats.row_lse, col_lse, offset=2, n_total=10,
                                         label_smoothing=0.0, normalize=False, image_grad=False, text_grad=True)
    assert grads.image_grad is None and grads.text_grad.shape == (10, 6) and grads.scale_grad.shape == ()
    part = contrastive.siglip_block(a[2:7], b, scale, -1.0, offset=2, n_total=10, normalize=False,
                                    image_grad=True, text_grad=False, scalar_grads=False)
    assert part.text_grad is None and part.scale_grad is None and part.bias_grad is None
    assert part.image_grad.shape == (5, 6) and part.loss.shape == ()


def test_block_grads_scale_with_grad_output(path_device):
    fresh_seed()
    a, b, scale = random_leaves(8, 5, torch.float32, path_device, with_bias=False)
    stats = contrastive.clip_block_stats(a, b, scale, offset=0, normalize=True)
    col_lse = contrastive.merge_column_stats(stats.col_max[None], stats.col_sumexp[None])
    kw = dict(offset=0, n_total=8, label_smoothing=0.1, normalize=True, image_grad=True, text_grad=True)
    one = contrastive.clip_block_grads(a, b, scale, stats.row_lse, col_lse, **kw)
    three = contrastive.clip_block_grads(a, b, scale, stats.row_lse, col_lse, grad_output=torch.tensor(
        -3.0, device=path_device), **kw)
    for x, y in zip(one, three):
        torch.testing.assert_close(y, -3 * x)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(offset=-1), ValueError, "offset >= 0, got -1"),
        (dict(offset=True), TypeError, "offset to be an int, got bool"),
        (dict(offset=None), TypeError, "offset to be an int, got NoneType"),  # only SigLIP blocks go without positives
        (dict(offset=3), ValueError, "offset \\+ M <= N.*offset 3, M 4, N 6"),
        (dict(offset=0, normalize=1), TypeError, "normalize to be a bool \\(or numpy.bool_\\), got int"),
        (dict(offset=0, workspace_bytes=0), ValueError, "workspace_bytes > 0, got 0"),
        (dict(offset=0, workspace_bytes="1"), TypeError, "workspace_bytes to be an int"),
    ],
)
def test_block_stats_bad_arguments_raise(kwargs, exc, match):
    kwargs = {"normalize": False, **kwargs}
    with pytest.raises(exc, match=match):
        contrastive.clip_block_stats(torch.randn(4, 3), torch.randn(6, 3), 2.0, **kwargs)


def test_block_grads_bad_arguments_raise():
    a, b = torch.randn(4, 3), torch.randn(6, 3)
    kw = dict(offset=0, n_total=6, label_smoothing=0.0, normalize=False, image_grad=True, text_grad=True)
    with pytest.raises(ValueError, match=r"row_lse of shape \(4,\), got \(6,\)"):
        contrastive.clip_block_grads(a, b, 2.0, torch.zeros(6), torch.zeros(6), **kw)
    with pytest.raises(ValueError, match=r"col_lse of shape \(6,\), got \(4,\)"):
        contrastive.clip_block_grads(a, b, 2.0, torch.zeros(4), torch.zeros(4), **kw)
    with pytest.raises(ValueError, match="n_total >= 1, got 0"):
        contrastive.clip_block_grads(a, b, 2.0, torch.zeros(4), torch.zeros(6), **{**kw, "n_total": 0})
    with pytest.raises(TypeError, match="label_smoothing to be a float"):
        contrastive.clip_block_grads(a, b, 2.0, torch.zeros(4), torch.zeros(6), **{**kw, "label_smoothing": None})
    with pytest.raises(ValueError, match="same shape|one shape"):
        contrastive.merge_column_stats(torch.zeros(2, 3), torch.zeros(3, 3))


def test_workspace_env_default(monkeypatch):
    monkeypatch.delenv(contrastive.WORKSPACE_ENV, raising=False)
    assert contrastive.resolve_workspace_bytes(None) == 256 * 2**20
    monkeypatch.setenv(contrastive.WORKSPACE_ENV, "12345")
    assert contrastive.resolve_workspace_bytes(None) == 12345
    assert contrastive.resolve_workspace_bytes(999) == 999
    monkeypatch.setenv(contrastive.WORKSPACE_ENV, "lots")
    with pytest.raises(ValueError, match="MMKERNELS_WORKSPACE_BYTES to be a whole number of bytes, got 'lots'"):
        contrastive.resolve_workspace_bytes(None)
