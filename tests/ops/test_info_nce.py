"""mmkernels.info_nce_loss, the one-directional InfoNCE: the Triton kernels (interpreter on CPU) and
the CPU path against the float64 reference under the numerics rule (docs/design.md), workspaces from one block to all
of S, the work it does (OpTrace: the GPU's tiles, frozen sides), its allocations, NaN/Inf, errors,
the module (opcheck, bf16 on the CPU, autocast and torch.compile: test_contract.py)."""
import pytest
import torch

import mmkernels
from contrastive_oracle import LOSS_CASES, check_clip, check_info_nce, random_leaves
from mmkernels.ops.contrastive import plan, reference
from test_contrastive_work import _bounded, gpu_tiles  # noqa: F401  (gpu_tiles: a fixture)
from toolkit import OpTrace, eager_info_nce_loss, fresh_seed, needs_triton, value_and_grads

CASES = LOSS_CASES[:6]


def _loss(normalize=False, smoothing=0.0, **kw):
    return lambda q, k, s: mmkernels.info_nce_loss(q, k, s, normalize=normalize, label_smoothing=smoothing, **kw)


def _run_case(n, d, normalize, smoothing, dtype, device, **kw):
    fresh_seed()
    leaves = random_leaves(n, d, dtype, device, with_bias=False)
    before = [t.clone() for t in leaves]
    got = value_and_grads(_loss(normalize, smoothing, **kw), leaves)
    assert all(torch.equal(t, t0) for t, t0 in zip(leaves, before)), "the loss modified its inputs"
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert got[1].dtype == dtype and got[2].dtype == dtype
    check_info_nce(got, leaves, dtype, f"InfoNCE N={n} D={d} {dtype} normalize={normalize} eps={smoothing} {kw}",
                   normalize, smoothing)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,d,normalize,smoothing", CASES)
def test_kernels_match_reference(n, d, normalize, smoothing, dtype, device):
    if dtype == torch.float16 and n * d > 129 * 16 and device.type == "cpu":
        pytest.skip("the largest shapes run in fp32 only, to keep the interpreter fast")
    _run_case(n, d, normalize, smoothing, dtype, device)


@pytest.mark.parametrize("n,d,normalize,smoothing", CASES)
def test_cpu_path_matches_reference(n, d, normalize, smoothing, reference_path):
    _run_case(n, d, normalize, smoothing, torch.float32, torch.device("cpu"))


@needs_triton
@pytest.mark.parametrize("kind", ["one block", "two blocks", "all of S"])
def test_workspace_sizes(kind, device, monkeypatch):
    """Exact whatever the panel height; the row statistics also split over columns (several programs
    per row block, merged in order) where a panel has few row blocks."""
    n, d = 300, 40
    config = plan.tile_config
    monkeypatch.setattr(plan, "tile_config", lambda *args: {**config(*args), "programs": 12})
    assert plan.column_splits(1, n, plan.tile_config(d, torch.float32, device))[0] > 1
    block = plan.tile_config(d, torch.float32, device)["BLOCK_M"]
    rows = {"one block": block, "two blocks": 2 * block, "all of S": n}[kind]
    workspace = max(plan.stats_panel_bytes(rows, n, d, torch.float32, device, columns=False),
                    plan.panel_bytes(rows, n, d, torch.float32, device, True, True, torch.float32))
    assert plan.panel_workspace(n, n, d, torch.float32, device, True, True, torch.float32, workspace) == rows
    _run_case(n, d, True, 0.1, torch.float32, device, workspace_bytes=workspace)


@needs_triton
def test_row_statistics_need_no_column_workspace(device):
    """InfoNCE's statistics pass keeps no column statistics: its workspace is CLIP's minus the (row
    blocks, N) partials, and a workspace too small for CLIP's suffices."""
    n, d = 300, 40
    block = plan.tile_config(d, torch.float32, device)["BLOCK_M"]
    rows_only = plan.stats_panel_bytes(block, n, d, torch.float32, device, columns=False)
    assert rows_only < plan.stats_panel_bytes(block, n, d, torch.float32, device)
    a, b = torch.randn(n, d, device=device), torch.randn(n, d, device=device)
    with pytest.raises(ValueError, match=f"expected workspace_bytes >= {rows_only} .*the row statistics"):
        mmkernels.info_nce_loss(a, b, 2.0, workspace_bytes=rows_only - 1)
    with pytest.raises(ValueError, match="the CLIP statistics"):
        mmkernels.clip_loss(a, b, 2.0, workspace_bytes=rows_only)
    loss = mmkernels.info_nce_loss(a, b, 2.0, workspace_bytes=rows_only)
    torch.testing.assert_close(loss.double(), reference.info_nce_loss(a.double(), b.double(), torch.tensor(
        2.0, dtype=torch.float64)), rtol=1e-5, atol=1e-6)


def test_both_directions_average_to_clip(kernel_path):
    """CLIP's loss is the mean of InfoNCE in both directions, and so are its gradients."""
    path, device = kernel_path
    fresh_seed()
    leaves = random_leaves(70, 24, torch.float32, device, with_bias=False)
    both = value_and_grads(lambda a, b, s: (_loss(True, 0.1)(a, b, s) + _loss(True, 0.1)(b, a, s)) / 2, leaves)
    check_clip(both, leaves, torch.float32, f"InfoNCE both ways ({path})", True, 0.1)


# NaN and Inf inputs make the interpreter's numpy arithmetic warn (invalid value, all-NaN slice)
# where the GPU computes silently; the NaN result is what the test checks
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("interpret", ["1", "0"])
def test_non_finite_inputs_give_nan(interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    fresh_seed()
    for bad in (float("nan"), float("inf"), float("-inf")):
        for normalize in (False, True):
            for side in (0, 1):
                q, k = torch.randn(70, 16), torch.randn(70, 16)
                (q, k)[side][3, 5] = bad
                loss = mmkernels.info_nce_loss(q, k, 2.0, normalize=normalize)
                assert torch.isnan(loss), f"{bad} in {('query', 'keys')[side]} (normalize={normalize}) gave {loss}"


FROZEN_WORK = {"none": 8, "query": 6, "keys": 6, "both": 4}  # forward + backward, units of N²·D


@needs_triton
@pytest.mark.parametrize("frozen", FROZEN_WORK)
def test_frozen_side_saves_its_product(frozen, device):
    """A side that needs no gradient costs no product (2·N²·D less), counted by OpTrace; the
    gradients that remain are exact."""
    if device.type != "cpu":
        pytest.skip("counts interpreted tl.dot")
    fresh_seed()
    n = d = plan.tile_config(64, torch.float32, device)["BLOCK_M"]  # one tile: no padding in the count
    leaves = random_leaves(n, d, torch.float32, device, with_bias=False)
    q, k, scale = (t.clone().requires_grad_() for t in leaves)
    q.requires_grad_(frozen in ("none", "keys"))
    k.requires_grad_(frozen in ("none", "query"))
    with OpTrace() as trace:
        loss = mmkernels.info_nce_loss(q, k, scale, normalize=True, label_smoothing=0.1)
        loss.backward()
    assert trace.matmul_flops == FROZEN_WORK[frozen] * n * n * d
    assert (q.grad is None) == (frozen in ("query", "both")) and (k.grad is None) == (frozen in ("keys", "both"))
    check_info_nce([loss, q.grad, k.grad, scale.grad], leaves, torch.float32, f"frozen {frozen}", True, 0.1)


@needs_triton
@pytest.mark.parametrize("d", [512, 1152])
def test_matrix_work_at_the_floor(d, gpu_tiles, device):  # noqa: F811
    """With the GPU's tiles: 8·N²·D, each logit computed once per pass (≤ 1.34 × 6·N²·D, as CLIP)."""
    n = 256  # a multiple of the GPU's 64-row tiles: no padding in the count
    fresh_seed()
    leaves = random_leaves(n, d, torch.float32, device, with_bias=False)
    inputs = [t.clone().requires_grad_() for t in leaves]
    with OpTrace() as trace:
        loss = mmkernels.info_nce_loss(*inputs, normalize=True, label_smoothing=0.1)
        loss.backward()
    ratio = trace.matmul_flops / (6 * n * n * d)
    assert ratio <= 1.34, f"{ratio:.4f} × 6·N²·D, budget 1.34"
    assert trace.dot_flops == 2 * 2 * n * n * d, "each logit computed once a pass"
    check_info_nce([loss] + [t.grad for t in inputs], leaves, torch.float32, f"GPU tiles D={d}", True, 0.1)


@needs_triton
def test_allocations_are_the_workspace_and_o_of_n_d(device):
    n, d = 256, 4  # S in fp32 (256 KiB) dwarfs N·D (4 KiB): anything N² would show
    block = plan.tile_config(d, torch.float32, device)["BLOCK_M"]
    workspace = max(plan.panel_bytes(block, n, d, torch.float32, device, True, True, torch.float32),
                    plan.stats_panel_bytes(block, n, d, torch.float32, device, columns=False))
    assert plan.panel_workspace(n, n, d, torch.float32, device, True, True, torch.float32, workspace) <= n / 4
    fresh_seed()
    leaves = random_leaves(n, d, torch.float32, device, with_bias=False)
    inputs = [t.clone().requires_grad_() for t in leaves]
    with OpTrace() as trace:
        loss = mmkernels.info_nce_loss(*inputs, normalize=True, label_smoothing=0.1, workspace_bytes=workspace)
        loss.backward()
    assert any(a.dtype == torch.uint8 for a in trace.allocations), "no workspace seen: the trace is blind"
    assert not _bounded(trace, workspace, n, d)
    check_info_nce([loss] + [t.grad for t in inputs], leaves, torch.float32, "small workspace", True, 0.1)
    # negative control: the eager formula, which holds S and its gradient, breaks the same rule
    eager = [t.clone().requires_grad_() for t in leaves]
    with OpTrace() as eager_trace:
        eager_info_nce_loss(*eager).backward()
    assert _bounded(eager_trace, workspace, n, d)


R = torch.randn


@pytest.mark.parametrize(
    "q,k,scale,kw,exc,match",
    [
        (R(4, 8), R(4, 6), 2.0, {}, ValueError, "query and keys to have the same last dimension, got 8 and 6"),
        (R(4, 8), R(5, 8), 2.0, {}, ValueError, "same number of rows N .*got 4 and 5"),
        (R(0, 8), R(0, 8), 2.0, {}, ValueError, "N = 0"),
        (R(4, 0), R(4, 0), 2.0, {}, ValueError, "D = 0"),
        (torch.randint(0, 3, (4, 8)), R(4, 8), 2.0, {}, TypeError, "query to be a floating-point"),
        (R(4, 8), torch.randint(0, 3, (4, 8)), 2.0, {}, TypeError, "keys to be a floating-point"),
        (R(4, 8, 2), R(4, 8), 2.0, {}, ValueError, r"query to be 2-D \(N, D\), got shape \(4, 8, 2\)"),
        ([[1.0]], R(4, 8), 2.0, {}, TypeError, "query to be a torch.Tensor"),
        (R(4, 8), R(4, 8).half(), 2.0, {}, TypeError, "query and keys to share a dtype"),
        (R(4, 8), R(4, 8, device="meta"), 2.0, {}, ValueError, "query on cpu, keys on meta"),
        (R(4, 8), R(4, 8), torch.ones(2), {}, ValueError, "logit_scale to be a scalar"),
        (R(4, 8), R(4, 8), "2", {}, TypeError, "logit_scale to be a float"),
        (R(4, 8), R(4, 8), 2.0, {"label_smoothing": 1.5}, ValueError, r"label_smoothing in \[0, 1\], got 1.5"),
        (R(4, 8), R(4, 8), 2.0, {"normalize": "yes"}, TypeError, "normalize to be a bool \\(or numpy.bool_\\), got str"),
        (R(4, 8), R(4, 8), 2.0, {"workspace_bytes": 1e6}, TypeError, "workspace_bytes to be an int"),
    ],
)
def test_bad_inputs_raise(q, k, scale, kw, exc, match):
    with pytest.raises(exc, match=match):
        mmkernels.info_nce_loss(q, k, scale, **kw)


def test_module_matches_reference(device):
    fresh_seed()
    leaves = random_leaves(11, 8, torch.float32, device, with_bias=False)
    module = mmkernels.nn.InfoNCELoss(normalize=True, label_smoothing=0.1)
    check_info_nce(value_and_grads(module, leaves), leaves, torch.float32, "InfoNCELoss", True, 0.1)
    assert "normalize=True, label_smoothing=0.1" in repr(module)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(4096, 512), (16384, 768), (1023, 1152)])
def test_gpu_matches_reference(n, d, dtype):
    _run_case(n, d, n % 2 == 1, 0.1 if n % 2 else 0.0, dtype, torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_memory_above_inputs():
    """As CLIP's goal: N = 32768, D = 768, bf16, forward + backward within 400 MiB above the inputs."""
    n, d = 32768, 768
    q = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scale = torch.tensor(14.0, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = mmkernels.info_nce_loss(q, k, scale, normalize=True)
    loss.backward()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert peak_mib <= 400, f"peak {peak_mib:.0f} MiB above the inputs, budget 400 MiB"
