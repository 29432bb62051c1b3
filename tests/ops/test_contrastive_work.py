"""The contrastive losses' work budget and memory, counted by what really runs (tests/toolkit.py's
OpTrace: every interpreted tl.dot and every aten matmul; every tensor allocated).

- Matrix FLOPs of forward + backward with the GPU's tiles (run under the interpreter), against the
  6·N²·D that the loss's three products need: CLIP ≤ 1.34× (8·N²·D), SigLIP ≤ 1.01× (6·N²·D).
- Allocations at a workspace that forces several panels: the workspace and O(N·D) buffers, nothing
  that grows with N².
- Group ids cost no matrix work (exactly 8·N²·D for CLIP and InfoNCE, 6·N²·D for SigLIP, as without
  them); K extra columns cost exactly their own 8·N·K·D (8·N·(N + K)·D in all).
"""
import pytest
import torch

import mmkernels
from contrastive_oracle import check_clip, check_siglip, random_leaves
from mmkernels.ops.contrastive import plan
from toolkit import OpTrace, eager_clip_loss, eager_siglip_loss, fresh_seed, needs_triton

pytestmark = needs_triton

BUDGET = {"clip": 1.34, "siglip": 1.01}  # × 6·N²·D, forward + backward


def _loss(loss_name, leaves, **kw):
    if loss_name == "clip":
        return mmkernels.clip_loss(*leaves[:3], normalize=True, label_smoothing=0.1, **kw)
    return mmkernels.siglip_loss(*leaves, normalize=True, **kw)


@pytest.fixture
def gpu_tiles(monkeypatch, device):
    """The GPU's tile configuration (bf16's, the training dtype's) for every launch, under the interpreter."""
    if device.type != "cpu":
        pytest.skip("counts interpreted tl.dot")
    monkeypatch.setattr(plan, "tile_config", lambda d, dtype, dev: plan.gpu_tile_config(d, torch.bfloat16))


@pytest.mark.parametrize("d", [512, 768, 1152])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_matrix_work_at_the_floor(loss_name, d, gpu_tiles, device):
    n = 256  # a multiple of the GPU's 64-row tiles: no padding in the count
    fresh_seed()
    leaves = random_leaves(n, d, torch.float32, device, with_bias=True)
    inputs = [t.clone().requires_grad_() for t in leaves]
    with OpTrace() as trace:
        loss = _loss(loss_name, inputs)
        loss.backward()
    ratio = trace.matmul_flops / (6 * n * n * d)
    print(f"{loss_name} N={n} D={d}: {ratio:.4f} × 6·N²·D ({trace.dot_flops / (n * n * d):.1f} N²D in tl.dot, "
          f"{trace.aten_flops / (n * n * d):.1f} N²D in aten matmuls)")
    assert ratio <= BUDGET[loss_name], f"{loss_name}: {ratio:.4f} × 6·N²·D, budget {BUDGET[loss_name]}"
    assert trace.dot_flops == 2 * n * n * d * (2 if loss_name == "clip" else 1), "each logit computed once a pass"
    got = [loss, inputs[0].grad, inputs[1].grad, inputs[2].grad, inputs[3].grad]
    if loss_name == "clip":
        check_clip(got[:4], leaves[:3], torch.float32, f"GPU tiles D={d}", True, 0.1)
    else:
        check_siglip(got, leaves, torch.float32, f"GPU tiles D={d}", True)


def test_the_counter_sees_the_eager_products(device):
    """Negative control: the counter is not blind. The eager formulas run the three products of the
    loss (6·N²·D) plus nothing else, and the count says so."""
    n, d = 64, 32
    fresh_seed()
    leaves = [t.requires_grad_() for t in random_leaves(n, d, torch.float32, device, with_bias=True)]
    for fn, args in ((eager_clip_loss, leaves[:3]), (eager_siglip_loss, leaves)):
        with OpTrace() as trace:
            fn(*args).backward()
        assert trace.matmul_flops == 6 * n * n * d


def _bounded(trace: OpTrace, workspace_bytes: int, rows: int, d: int) -> list[str]:
    """What breaks the memory rule: an allocation other than the workspace with more than rows·D
    elements, a workspace above workspace_bytes, or a peak above the workspace + 6 (rows, D) fp32."""
    problems = []
    for a in trace.allocations:
        numel = a.nbytes // a.dtype.itemsize
        if a.dtype == torch.uint8 and a.nbytes > workspace_bytes:
            problems.append(f"workspace of {a.nbytes} bytes from {a.op}")
        elif a.dtype != torch.uint8 and numel > rows * d:
            problems.append(f"{a.op} {a.shape} {a.dtype}")
    if trace.peak_bytes > workspace_bytes + 6 * rows * d * 4 + 64 * rows * 4:
        problems.append(f"peak {trace.peak_bytes} bytes")
    return problems


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_allocations_are_the_workspace_and_o_of_n_d(loss_name, device):
    n, d = 256, 4  # S in fp32 (256 KiB) dwarfs N·D (4 KiB): anything N² would show
    block = plan.tile_config(d, torch.float32, device)["BLOCK_M"]
    workspace = max(plan.panel_bytes(block, n, d, torch.float32, device, True, True, torch.float32),
                    plan.stats_panel_bytes(block, n, d, torch.float32, device))
    assert plan.panel_workspace(n, n, d, torch.float32, device, True, True, torch.float32, workspace) <= n / 4
    fresh_seed()
    leaves = random_leaves(n, d, torch.float32, device, with_bias=True)
    inputs = [t.clone().requires_grad_() for t in leaves]
    with OpTrace() as trace:
        loss = _loss(loss_name, inputs, workspace_bytes=workspace)
        loss.backward()
    assert any(a.dtype == torch.uint8 for a in trace.allocations), "no workspace seen: the trace is blind"
    assert not _bounded(trace, workspace, n, d)
    got = [loss] + [t.grad for t in inputs]
    if loss_name == "clip":
        check_clip(got[:4], leaves[:3], torch.float32, "small workspace", True, 0.1)
    else:
        check_siglip(got, leaves, torch.float32, "small workspace", True)
    # negative control: the eager formula, which holds S and its gradient, breaks the same rule
    eager = [t.clone().requires_grad_() for t in leaves]
    with OpTrace() as eager_trace:
        (eager_clip_loss(*eager[:3]) if loss_name == "clip" else eager_siglip_loss(*eager)).backward()
    assert _bounded(eager_trace, workspace, n, d)


GROUP_WORK = {"clip": 8, "info_nce": 8, "siglip": 6}  # forward + backward, units of N²·D


def _grouped_loss(loss_name, leaves, ids, extra=None):
    if loss_name == "clip":
        return mmkernels.clip_loss(*leaves[:3], normalize=True, label_smoothing=0.1, group_ids=ids,
                                   **({} if extra is None else {"extra_text": extra}))
    if loss_name == "info_nce":
        return mmkernels.info_nce_loss(*leaves[:3], normalize=True, label_smoothing=0.1, group_ids=ids,
                                       **({} if extra is None else {"extra_keys": extra}))
    return mmkernels.siglip_loss(*leaves, normalize=True, group_ids=ids)


@pytest.mark.parametrize("loss_name", ["clip", "info_nce", "siglip"])
def test_group_ids_cost_no_matrix_work(loss_name, device):
    """Group ids are read per tile: forward + backward count exactly today's matrix FLOPs (8·N²·D for
    CLIP and InfoNCE, 6·N²·D for SigLIP; whole 64-wide tiles, so no padding in the count), and the
    loss and gradients meet the rule against the float64 oracle."""
    if device.type != "cpu":
        pytest.skip("counts interpreted tl.dot")
    from contrastive_oracle import check_grouped

    n, d = 128, 64
    fresh_seed()
    leaves = random_leaves(n, d, torch.float32, device, with_bias=loss_name == "siglip")
    ids = torch.randint(0, n // 3, (n,), device=device)
    inputs = [t.clone().requires_grad_() for t in leaves]
    with OpTrace() as trace:
        loss = _grouped_loss(loss_name, inputs, ids)
        loss.backward()
    assert trace.dot_calls > 0, "no kernel ran: the count is blind"
    assert trace.matmul_flops == GROUP_WORK[loss_name] * n * n * d, trace.matmul_flops / (n * n * d)
    got = [loss] + [t.grad for t in inputs]
    check_grouped(loss_name, got, leaves, torch.float32, f"{loss_name} groups, counted", ids, True,
                  0.0 if loss_name == "siglip" else 0.1)


@pytest.mark.parametrize("loss_name", ["clip", "info_nce"])
def test_extra_negatives_cost_their_own_columns(loss_name, device):
    """K extra columns cost their own 8·N·K·D and no more: forward + backward count exactly
    8·N·(N + K)·D with group ids (each of the N·(N + K) logits computed once a pass and two products
    in the backward); the gradients, the extras' included, meet the rule."""
    if device.type != "cpu":
        pytest.skip("counts interpreted tl.dot")
    from contrastive_oracle import check_grouped

    n, k, d = 128, 64, 64
    fresh_seed()
    leaves = random_leaves(n, d, torch.float32, device, with_bias=False) + [torch.randn(k, d, device=device)]
    ids = torch.randint(0, n // 3, (n,), device=device)
    inputs = [t.clone().requires_grad_() for t in leaves]
    with OpTrace() as trace:
        loss = _grouped_loss(loss_name, inputs[:3], ids, extra=inputs[3])
        loss.backward()
    assert trace.dot_calls > 0, "no kernel ran: the count is blind"
    assert trace.matmul_flops == 8 * n * (n + k) * d, trace.matmul_flops / (n * (n + k) * d)
    got = [loss] + [t.grad for t in inputs]
    check_grouped(loss_name, got, leaves, torch.float32, f"{loss_name} extras, counted", ids, True, 0.1)
