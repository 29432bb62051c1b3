"""mmkernels.distributed over gloo: every rank's loss and gradients against the loss one process
computes on the concatenated batch (the numerics rule (docs/design.md)), on the reference path and with the Triton
kernels under the interpreter, both losses in both modes (all_gather, and the point-to-point ring),
with group ids and (CLIP) extra text rows; the work and memory of each rank; errors raised on every
rank.

One spawned job per world size runs every check on one process group (spawning is the slow part);
each check's outcome is then its own test. Local batch sizes differ between ranks.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mmkernels.distributed as mmd
from mmkernels.distributed.ring import ring_schedule
from mmkernels.ops import contrastive
from mmkernels.ops.contrastive import plan
from mmkernels.ops._common import HAS_TRITON
from mmkernels.ops._dispatch import interpreting
from toolkit import CUDA, OpTrace, assert_within_rule, fresh_seed, run_ranks

SIZES = {2: (5, 2), 3: (1, 0, 6)}   # M_r per rank: unequal, a rank with one pair, a rank with none
D = 8
JOB_TIMEOUT_S = 240.0


# --------------------------------------------------------------------------- the single-process oracle


def clip_from_logits(logits, eps):
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=eps)
            + F.cross_entropy(logits.T, labels, label_smoothing=eps)) / 2


def siglip_from_logits(logits):
    signs = 2 * torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def grouped_clip(logits, n, ids, eps):
    """CLIP with group targets and extra columns, the float64 N × (N + K) formula: row i's target
    (1-eps)·[g_i = g_j]/c_i (0 on the K extra columns) + eps/(N + K), over all N + K columns; column
    j's (1-eps)·[g_i = g_j]/c_j + eps/N over the N paired columns only. Returns (loss, the rows'
    targets (N, N + K), the columns' targets (N, N))."""
    k = logits.shape[1] - n
    same = (ids[:, None] == ids[None, :] if ids is not None else torch.eye(n, dtype=torch.bool, device=logits.device))
    same = same.to(logits.dtype)
    count = same.sum(1)
    row_targets = F.pad((1 - eps) * same / count[:, None], (0, k)) + eps / (n + k)
    col_targets = (1 - eps) * same / count[None, :] + eps / n
    rows = -(row_targets * torch.log_softmax(logits, 1)).sum(1).mean()
    cols = -(col_targets * torch.log_softmax(logits[:, :n], 0)).sum(0).mean()
    return (rows + cols) / 2, row_targets, col_targets


def single_process(kind, A, B, scale, bias, rows: slice, *, normalize=False, eps=0.0, dtype=None, ids=None, E=None,
                   extra_rows: slice | None = None):
    """What one process computes on the global batch (A, B) (N, D), in `dtype` (float64: the oracle;
    the inputs' dtype: the eager formula): the loss, dL/dA and dL/dB for `rows`, and the shares of
    dL/dscale and dL/dbias that come from those rows of S, each gradient with the size of its
    summands (the floor of the numerics rule (docs/design.md) scales with it). With group ids `ids`
    (N,) and (CLIP) extra text rows E (K, D): their targets, and dL/dE for `extra_rows`."""
    dtype = dtype or A.dtype
    n = A.shape[0]
    A, B = (t.detach().to(dtype).requires_grad_() for t in (A, B))
    E = None if E is None else E.detach().to(dtype).requires_grad_()
    scale, bias = (torch.as_tensor(t, dtype=dtype).detach().requires_grad_() for t in (scale, bias))
    columns = B if E is None else torch.cat([B, E])
    a, b = (F.normalize(A, dim=-1), F.normalize(columns, dim=-1)) if normalize else (A, columns)
    products = a @ b.T
    logits = scale * products + (bias if kind == "siglip" else 0)
    logits.retain_grad()
    if kind == "clip":
        grouped = ids is not None or E is not None
        loss = grouped_clip(logits, n, ids, eps)[0] if grouped else clip_from_logits(logits, eps)
    elif ids is None:
        loss = siglip_from_logits(logits)
    else:
        labels = torch.where(ids[:, None] == ids[None, :], 1.0, -1.0).to(dtype)
        loss = -F.logsigmoid(labels * logits).sum() / n
    loss.backward()
    g = logits.grad[rows]
    with torch.no_grad():
        # Every gradient is a sum over logits of dL/dS_ij times something, and CLIP's
        # dL/dS_ij = (P^row_ij - t_ij + P^col_ij - t_ij) / (2N) itself cancels where a positive
        # dominates its row or column: the rule's floor scales with the terms' size, not the result's.
        if kind == "clip":
            _, row_targets, col_targets = grouped_clip(logits, n, ids, eps)
            terms = (torch.softmax(logits, 1) + F.pad(torch.softmax(logits[:, :n], 0) + col_targets,
                                                      (0, logits.shape[1] - n)) + row_targets) / (2 * n)
        else:
            terms = logits.grad.abs()
        image_terms, text_terms = scale * terms @ b.abs(), scale * terms.T @ a.abs()
        if normalize:  # the normalisation's Jacobian divides by the row's norm
            image_terms = image_terms / A.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            text_terms = text_terms / columns.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = dict(loss=loss.detach(), image=A.grad[rows], text=B.grad[rows],
               scale=(g * products[rows]).sum().detach(), bias=g.sum(),
               image_size=image_terms[rows].norm().item(), text_size=text_terms[rows].norm().item(),
               scale_size=(terms[rows] * products[rows].abs()).sum().item(), bias_size=terms[rows].sum().item())
    if E is not None and extra_rows is not None:
        out.update(extra=E.grad[extra_rows], extra_size=text_terms[n:][extra_rows].norm().item())
    return out


# --------------------------------------------------------------------------- one rank's view


class Rank:
    """What a check sees: this rank, the sizes, and a generator all ranks seed alike."""

    def __init__(self, rank, world_size, sizes, seed):
        self.rank, self.world_size, self.sizes, self.seed = rank, world_size, sizes, seed
        self.rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, dtype=torch.float32, d=D):
        """The global batch (same on every rank): A, B (N, D) in dtype, scale and bias floats."""
        n = sum(self.sizes)
        A = torch.randn(n, d, generator=self.gen, dtype=torch.float64).to(dtype)
        B = torch.randn(n, d, generator=self.gen, dtype=torch.float64).to(dtype)
        scale = float(torch.empty(()).uniform_(1.0, 4.0, generator=self.gen))
        bias = float(torch.empty(()).uniform_(-3.0, 0.0, generator=self.gen))
        return A, B, scale, bias

    def group_ids(self, groups: int):
        """(N,) ids drawn from `groups` values (same on every rank; groups span ranks), int32."""
        return torch.randint(0, groups, (sum(self.sizes),), generator=self.gen, dtype=torch.int32) * 7 - 5

    def extras(self, extra_sizes, dtype=torch.float32, d=D):
        """(E (K, D) every rank's extra text rows in rank order, this rank's slice of them)."""
        E = torch.randn(sum(extra_sizes), d, generator=self.gen, dtype=torch.float64).to(dtype)
        return E, slice(sum(extra_sizes[: self.rank]), sum(extra_sizes[: self.rank + 1]))


def run_loss(kind, A, B, scale, bias, rows, *, image_grad=True, text_grad=True, scale_grad=True, bias_grad=True,
             ids=None, E=None, extra_rows=None, extra_grad=True, **kw):
    """This rank's loss and the gradients of the inputs that require them ({name: grad}); `ids`,
    the global group ids, and (CLIP) E[extra_rows], this rank's extra text rows (None when the
    slice is empty and extra_grad is False: a rank without extras may pass None)."""
    leaves = {"image": A[rows].clone().requires_grad_(image_grad), "text": B[rows].clone().requires_grad_(text_grad)}
    s = torch.tensor(scale, requires_grad=True) if scale_grad else scale
    if scale_grad:
        leaves["scale"] = s
    if ids is not None:
        kw["group_ids_local"] = ids[rows]
    if E is not None:
        extra = E[extra_rows].clone().requires_grad_(extra_grad)
        if extra_grad:
            leaves["extra"] = extra
        kw["extra_text_local"] = extra if extra_grad or extra.shape[0] else None
    if kind == "clip":
        loss = mmd.clip_loss(leaves["image"], leaves["text"], s, **kw)
    else:
        leaves["bias"] = torch.tensor(bias, requires_grad=bias_grad)
        loss = mmd.siglip_loss(leaves["image"], leaves["text"], s, leaves["bias"], **kw)
    needed = {k: v for k, v in leaves.items() if v.requires_grad}
    grads = dict(zip(needed, torch.autograd.grad(loss, list(needed.values())))) if needed else {}
    return loss.detach(), grads


def assert_matches_single_process(env, kind, loss, grads, batch, *, factor, dtype, normalize=False, eps=0.0,
                                  ids=None, E=None, extra_rows=None):
    """Rank env.rank's loss is the global one; its gradients / factor are the single-process
    gradients of its rows, its scalars' gradients / factor the shares of its block row of S."""
    A, B, scale, bias = batch
    kw = dict(normalize=normalize, eps=eps, ids=ids, E=E, extra_rows=extra_rows)
    oracle = single_process(kind, A, B, scale, bias, env.rows, dtype=torch.float64, **kw)
    eager = single_process(kind, A, B, scale, bias, env.rows, dtype=dtype, **kw)
    whole = single_process(kind, A, B, scale, bias, slice(None), dtype=torch.float64, **kw)
    # Rounding each logit by a relative u moves the loss by Σ|dL/dS · S| · u.
    loss_size = max(abs(whole["loss"].item()), scale * whole["scale_size"])
    assert_within_rule("loss", loss, eager["loss"], oracle["loss"], dtype, size=loss_size)
    for name, grad in grads.items():
        size = oracle.get(f"{name}_size")
        assert_within_rule(f"d {name} (rank {env.rank})", grad.double() / factor, eager[name], oracle[name], dtype,
                           size=size)


# --------------------------------------------------------------------------- the checks


def check_clip(env, mode="gather"):
    batch = env.batch()
    loss, grads = run_loss("clip", *batch, env.rows, mode=mode)
    assert set(grads) == {"image", "text", "scale"}
    assert_matches_single_process(env, "clip", loss, grads, batch, factor=env.world_size, dtype=torch.float32)


def check_clip_normalize_smoothing_unscaled(env, mode="gather"):
    batch = env.batch()
    loss, grads = run_loss("clip", *batch, env.rows, normalize=True, label_smoothing=0.1, grad_scaling="none",
                           mode=mode)
    assert_matches_single_process(env, "clip", loss, grads, batch, factor=1, dtype=torch.float32,
                                  normalize=True, eps=0.1)


def check_clip_frozen_towers(env, mode="gather"):
    # Image tower frozen everywhere; the text needs its gradient on rank 0 only, so the other ranks
    # must still send their partial text gradients; logit_scale a Python float.
    batch = env.batch()
    loss, grads = run_loss("clip", *batch, env.rows, image_grad=False, text_grad=env.rank == 0, scale_grad=False,
                           mode=mode)
    assert set(grads) == ({"text"} if env.rank == 0 else set())
    assert_matches_single_process(env, "clip", loss, grads, batch, factor=env.world_size, dtype=torch.float32)
    loss, grads = run_loss("clip", *batch, env.rows, text_grad=False, label_smoothing=0.2, mode=mode)
    assert set(grads) == {"image", "scale"}
    assert_matches_single_process(env, "clip", loss, grads, batch, factor=env.world_size, dtype=torch.float32,
                                  eps=0.2)


def check_clip_fp16(env, mode="gather"):
    batch = env.batch(torch.float16)
    loss, grads = run_loss("clip", *batch, env.rows, normalize=True, mode=mode)
    assert_matches_single_process(env, "clip", loss, grads, batch, factor=env.world_size, dtype=torch.float16,
                                  normalize=True)


EXTRA_SIZES = {2: (3, 0), 3: (2, 1, 0)}  # K_r per rank: unequal, a rank with none, the empty rank with one


def check_clip_groups_and_extras(env, mode="gather"):
    """Group ids whose groups span ranks, and extra text rows (every rank's are negatives of every
    rank's rows, the image→text direction only): the single-process loss on the concatenated batch
    with extra_text = the ranks' extras in rank order, and every gradient, the extras' included.
    A rank without extras passes a (0, D) tensor, or None when they are frozen."""
    batch = env.batch()
    ids = env.group_ids(3)
    E, extra_rows = env.extras(EXTRA_SIZES[env.world_size])
    extras = dict(E=E, extra_rows=extra_rows)
    for kw, oracle_kw, factor in (
        (dict(ids=ids), dict(ids=ids), env.world_size),
        (dict(extras, label_smoothing=0.1, grad_scaling="none"), dict(extras, eps=0.1), 1),
        (dict(extras, ids=ids, normalize=True), dict(extras, ids=ids, normalize=True), env.world_size),
        (dict(extras, ids=ids, extra_grad=False, text_grad=False), dict(extras, ids=ids), env.world_size),
    ):
        loss, grads = run_loss("clip", *batch, env.rows, mode=mode, **kw)
        expected = {"image", "scale"} | ({"text", "extra"} if kw.get("extra_grad", True) else set())
        assert set(grads) == expected - ({"extra"} if "E" not in kw else set()), (kw, set(grads))
        assert_matches_single_process(env, "clip", loss, grads, batch, factor=factor, dtype=torch.float32,
                                      **oracle_kw)


def check_siglip_groups(env, mode="gather"):
    """Group ids whose groups span ranks: label +1 for every same-id pair of the global batch."""
    batch = env.batch()
    ids = env.group_ids(3)
    loss, grads = run_loss("siglip", *batch, env.rows, mode=mode, ids=ids)
    assert_matches_single_process(env, "siglip", loss, grads, batch, factor=env.world_size, dtype=torch.float32,
                                  ids=ids)


def check_siglip(env, mode="gather"):
    batch = env.batch()
    loss, grads = run_loss("siglip", *batch, env.rows, mode=mode)
    assert set(grads) == {"image", "text", "scale", "bias"}
    assert_matches_single_process(env, "siglip", loss, grads, batch, factor=env.world_size, dtype=torch.float32)


def check_siglip_normalize_unscaled(env, mode="gather"):
    batch = env.batch()
    loss, grads = run_loss("siglip", *batch, env.rows, normalize=True, grad_scaling="none", mode=mode)
    assert_matches_single_process(env, "siglip", loss, grads, batch, factor=1, dtype=torch.float32, normalize=True)


def check_siglip_frozen_towers(env, mode="gather"):
    batch = env.batch()
    loss, grads = run_loss("siglip", *batch, env.rows, text_grad=False, scale_grad=False, mode=mode)
    assert set(grads) == {"image", "bias"}
    assert_matches_single_process(env, "siglip", loss, grads, batch, factor=env.world_size, dtype=torch.float32)
    loss, grads = run_loss("siglip", *batch, env.rows, image_grad=False, mode=mode)
    assert set(grads) == {"text", "scale", "bias"}
    assert_matches_single_process(env, "siglip", loss, grads, batch, factor=env.world_size, dtype=torch.float32)
    # Only the last rank's text needs its gradient: the others still send their contributions to it.
    loss, grads = run_loss("siglip", *batch, env.rows, image_grad=False, text_grad=env.rank == env.world_size - 1,
                           scale_grad=False, bias_grad=False, mode=mode)
    assert set(grads) == ({"text"} if env.rank == env.world_size - 1 else set())
    assert_matches_single_process(env, "siglip", loss, grads, batch, factor=env.world_size, dtype=torch.float32)


def check_siglip_fp16(env, mode="gather"):
    batch = env.batch(torch.float16)
    loss, grads = run_loss("siglip", *batch, env.rows, normalize=True, mode=mode)
    assert_matches_single_process(env, "siglip", loss, grads, batch, factor=env.world_size, dtype=torch.float16,
                                  normalize=True)


def check_float64_is_exact(env, kind, mode="gather"):
    """float64 in, float64-exact out, as single-process: the loss (float64) and every gradient within
    1e-12 of the float64 single-process ones, relative to the size of their summands. The column
    statistics, loss shares and gradient blocks travel and merge in float64 (in fp32 they cost ~1e-8;
    the ring's float64 gradient blocks once met an fp32 receive buffer and aborted both ranks)."""
    A, B, scale, bias = env.batch(torch.float64)
    leaves = {"image": A[env.rows].clone().requires_grad_(), "text": B[env.rows].clone().requires_grad_(),
              "scale": torch.tensor(scale, dtype=torch.float64, requires_grad=True)}
    if kind == "clip":
        loss = mmd.clip_loss(leaves["image"], leaves["text"], leaves["scale"], label_smoothing=0.1, mode=mode)
    else:
        leaves["bias"] = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
        loss = mmd.siglip_loss(*leaves.values(), mode=mode)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    oracle = single_process(kind, A, B, scale, bias, env.rows, dtype=torch.float64, eps=0.1 if kind == "clip" else 0.0)
    assert loss.dtype == torch.float64, loss.dtype
    whole = single_process(kind, A, B, scale, bias, slice(None), dtype=torch.float64,
                           eps=0.1 if kind == "clip" else 0.0)
    errors = {"loss": (abs(loss.item() - oracle["loss"].item()), max(abs(whole["loss"].item()),
                                                                     scale * whole["scale_size"]))}
    for name, grad in grads.items():
        assert grad.dtype == torch.float64, (name, grad.dtype)
        size = max(oracle[name].norm().item(), oracle[f"{name}_size"])
        errors[f"d {name}"] = ((grad / env.world_size - oracle[name]).norm().item(), size)
    bad = {name: f"{err:.2e} of {size:.2e}" for name, (err, size) in errors.items() if err > 1e-12 * size}
    assert not bad, f"{kind} ({mode}), rank {env.rank}: {bad}"


def check_autocast_changes_nothing(env):
    """Under torch.autocast (bf16) the losses compute as their contract says (the block functions
    they are built from turn it off): the same fp32 loss and gradients as without it, bit for bit."""
    batch = env.batch()
    for kind, kw in (("clip", {}), ("clip", {"mode": "ring"}), ("siglip", {}), ("siglip", {"mode": "ring"})):
        loss, grads = run_loss(kind, *batch, env.rows, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_loss, got_grads = run_loss(kind, *batch, env.rows, **kw)
        assert got_loss.dtype == torch.float32 and torch.equal(got_loss, loss), (kind, kw, got_loss, loss)
        for name, grad in grads.items():
            assert torch.equal(got_grads[name], grad), (kind, kw, name)


def check_non_finite(env):
    # A NaN in the last rank's image rows, an Inf in the first rank's text rows: NaN on every rank.
    runs = (("clip", {}), ("clip", {"mode": "ring"}), ("siglip", {}), ("siglip", {"mode": "ring"}))
    A, B, scale, bias = env.batch()
    A[sum(env.sizes[:-1]), 0] = float("nan")
    losses = [run_loss(kind, A, B, scale, bias, env.rows, **kw)[0] for kind, kw in runs]
    A, B, scale, bias = env.batch()
    B[0, 1] = float("inf")
    losses += [run_loss(kind, A, B, scale, bias, env.rows, **kw)[0] for kind, kw in runs]
    assert all(torch.isnan(x) for x in losses), losses



# Whole 64-row tiles of the interpreter's 64×64×64 tiling (an M_r = 0 rank too), so that the count
# of interpreted tl.dot has no padding in it.
WORK_SIZES = {2: (64, 128), 3: (64, 0, 128)}
WORK = {  # (loss, what needs a gradient): the block row's matrix products (2·M_r·N·D each)
    ("clip", "all"): 4, ("clip", "text frozen"): 3, ("clip", "image frozen"): 3, ("clip", "none"): 1,
    ("siglip", "all"): 3, ("siglip", "text frozen"): 2, ("siglip", "image frozen"): 2, ("siglip", "none"): 1,
}
MODES = {"clip": ("gather", "ring"), "siglip": ("gather", "ring")}  # the ring: W blocks of 2·M_r·M_q·D, the same sum
NEEDS = {"all": {}, "text frozen": {"text_grad": False}, "image frozen": {"image_grad": False},
         "none": {"image_grad": False, "text_grad": False, "scale_grad": False, "bias_grad": False}}


def check_work_per_rank(env):
    """Each rank's matrix work is its block row's: CLIP 8·M_r·N·D (2 for the statistics, 6 for the
    gradients), SigLIP 6·M_r·N·D, in either mode (the ring's W blocks of M_r × M_q add up to it),
    2·M_r·N·D less per frozen tower (the reference path computes both sides whatever is frozen),
    2·M_r·N·D without gradients; with K extra text rows CLIP's 8·M_r·(N + K)·D."""
    env = Rank(env.rank, env.world_size, WORK_SIZES[env.world_size], env.seed)
    d = 64
    A, B, scale, bias = env.batch(d=d)
    unit = 2 * env.sizes[env.rank] * sum(env.sizes) * d
    wrong = []
    for (kind, needs), products in WORK.items():
        if not interpreting() and needs in ("text frozen", "image frozen"):
            continue
        for mode in MODES[kind]:
            with OpTrace() as trace:
                run_loss(kind, A, B, scale, bias, env.rows, **NEEDS[needs], mode=mode)
            if trace.matmul_flops != products * unit:
                wrong.append(f"{kind} ({mode}), {needs}: {trace.matmul_flops / unit} products, expected {products}")
    # Extra text rows (64 on rank 0, whole tiles in either mode) and group ids: CLIP's 4 products of
    # 2·M_r·(N + K)·D, the extra columns' own work and no more.
    E, extra_rows = env.extras((64,) + (0,) * (env.world_size - 1), d=d)
    wide = 2 * env.sizes[env.rank] * (sum(env.sizes) + E.shape[0]) * d
    for mode in MODES["clip"]:
        with OpTrace() as trace:
            run_loss("clip", A, B, scale, bias, env.rows, mode=mode, ids=env.group_ids(9), E=E, extra_rows=extra_rows)
        if trace.matmul_flops != 4 * wide:
            wrong.append(f"clip ({mode}) with extra rows and group ids: {trace.matmul_flops / wide} products, "
                         "expected 4")
    assert not wrong, f"rank {env.rank} (M = {env.sizes[env.rank]}): " + "; ".join(wrong)


MEMORY_SIZES = {2: (64, 256), 3: (64, 0, 256)}


def check_memory_per_rank(env):
    """Beyond O(N·D) buffers and the kernels' workspace, nothing: with a workspace that holds one
    64-row panel, no allocation (and not all of them alive at once) reaches a block row of S."""
    env = Rank(env.rank, env.world_size, MEMORY_SIZES[env.world_size], env.seed)
    A, B, scale, bias = env.batch(d=4)
    n, m = A.shape[0], env.sizes[env.rank]
    workspace = plan.panel_bytes(64, n, 4, torch.float32, A.device, True, True, torch.float32)
    block_row = m * n * 4
    for kind in ("clip", "siglip"):
        with OpTrace() as trace:
            loss, grads = run_loss(kind, A, B, scale, bias, env.rows, workspace_bytes=workspace)
        assert_matches_single_process(env, kind, loss, grads, (A, B, scale, bias), factor=env.world_size,
                                      dtype=torch.float32)
        if m > 64:
            assert trace.largest_allocation <= workspace < block_row, (kind, trace.largest_allocation, block_row)
            assert trace.peak_bytes < block_row, (kind, trace.peak_bytes, block_row)


RING_MEMORY_SIZES = {2: (128, 64), 3: (64, 0, 128)}
# Blocks of the widest ring block alive at once, at most (see check_ring_memory_per_rank).
RING_BLOCKS_ALIVE = 10


def check_ring_memory_per_rank(env):
    """mode="ring" holds nothing of the text's size N·D: every allocation but the kernels' workspace
    is at most one block (the widest, max_r M_r + K_r rows), no (N, D) tensor exists, the workspace
    is sized against the widest block's columns, and all of it alive at once stays under the
    workspace + 10 blocks (SigLIP: the inputs' two copies, the current and the incoming text block,
    the image gradient's sum and one block's share, the text gradient blocks in flight: own,
    received or sent, fresh, scaled; CLIP, with group ids and extra text rows, in its second pass
    the same, its first pass less: two blocks and O(M) statistics), whatever W. With group ids,
    the ids and their counts are O(N) int64 (W·max M_r for the padded all_gather, 3 of those alive
    at most). The interpreter's launches free
    their buffers at once (collect_cycles), as a GPU's do. Negative control: mode="gather" allocates
    the (N, D) gathered text, and that workspace is too small for its blocks."""
    env = Rank(env.rank, env.world_size, RING_MEMORY_SIZES[env.world_size], env.seed)
    d = 4
    A, B, scale, bias = env.batch(d=d)
    ids = env.group_ids(5)
    E, extra_rows = env.extras(EXTRA_SIZES[env.world_size], d=d)
    n = A.shape[0]
    for kind, kw in (("siglip", {}), ("clip", dict(ids=ids, E=E, extra_rows=extra_rows))):
        extra_sizes = EXTRA_SIZES[env.world_size] if "E" in kw else (0,) * env.world_size
        widest = max(m + k for m, k in zip(env.sizes, extra_sizes))
        workspace = max(plan.panel_bytes(64, widest, d, torch.float32, A.device, True, True, torch.float32),
                        plan.stats_panel_bytes(64, widest, d, torch.float32, A.device))
        block = widest * d * 4
        with OpTrace(collect_cycles=True) as trace:
            loss, grads = run_loss(kind, A, B, scale, bias, env.rows, mode="ring", workspace_bytes=workspace, **kw)
        oracle_kw = {k: v for k, v in kw.items() if k in ("ids", "E", "extra_rows")}
        assert_matches_single_process(env, kind, loss, grads, (A, B, scale, bias), factor=env.world_size,
                                      dtype=torch.float32, **oracle_kw)
        ids_bytes = env.world_size * max(env.sizes) * 8  # the ids' all_gather (padded when the M_r differ)
        too_big = [a for a in trace.allocations if a.nbytes > (
            workspace if a.dtype == torch.uint8 else ids_bytes if (a.dtype, len(a.shape)) == (torch.int64, 1)
            else block)]
        assert not too_big, f"{kind}, rank {env.rank}: allocations over one block of {block} bytes: {too_big}"
        assert not [a for a in trace.allocations if a.shape[:1] == (n,) and len(a.shape) == 2], kind
        ids_alive = 3 * ids_bytes if "ids" in kw else 0  # the padded all_gather, the ids, their counts
        assert trace.peak_bytes <= workspace + RING_BLOCKS_ALIVE * block + ids_alive, \
            (kind, trace.peak_bytes, workspace, block, ids_alive)
        with OpTrace() as trace:
            run_loss(kind, A, B, scale, bias, env.rows, **kw)
        assert any(a.shape[0] >= n and a.shape[1:] == (d,) for a in trace.allocations), \
            f"{kind}: the gather mode's (N, D) text was not seen"
        err = _raised(lambda: run_loss(kind, A, B, scale, bias, env.rows, workspace_bytes=workspace, **kw))
        assert isinstance(err, ValueError) and "expected workspace_bytes >=" in str(err), repr(err)


def check_ring_overlaps_exchange_with_compute(env, kind="siglip"):
    """Each step of the ring posts its messages (the next block's rows among them) before it
    computes on the current block and waits for them after: the exchange runs during the compute
    (CLIP: in both passes, the statistics' and the gradients'). Seen by wrapping
    batch_isend_irecv, the works' wait and the block functions."""
    A, B, scale, bias = env.batch()
    names = {"siglip": ("siglip_block_unchecked",),
             "clip": ("clip_block_stats_unchecked", "clip_block_grads_unchecked")}[kind]
    events, real_batch, real_blocks = [], dist.batch_isend_irecv, {name: getattr(contrastive, name) for name in names}

    class Work:
        def __init__(self, work):
            self.work = work

        def wait(self):
            events.append("wait")
            return self.work.wait()

    def batch(ops):
        kinds = [("recv" if op.op is dist.irecv else "send", tuple(op.tensor.shape), op.tensor.dtype) for op in ops]
        events.append(("post", kinds))
        return [Work(w) for w in real_batch(ops)]

    def counted(real):
        def block(*args, **kwargs):
            events.append("compute")
            return real(*args, **kwargs)
        return block

    dist.batch_isend_irecv = batch
    for name, real in real_blocks.items():
        setattr(contrastive, name, counted(real))
    try:
        loss, grads = run_loss(kind, A, B, scale, bias, env.rows, mode="ring")
    finally:
        dist.batch_isend_irecv = real_batch
        for name, real in real_blocks.items():
            setattr(contrastive, name, real)
    assert_matches_single_process(env, kind, loss, grads, (A, B, scale, bias), factor=env.world_size,
                                  dtype=torch.float32)
    w, r = env.world_size, env.rank
    computes = [i for i, e in enumerate(events) if e == "compute"]
    # The steps that compute: nonempty blocks, in each pass.
    steps = [k for k in range(w) if env.sizes[(r - k) % w]] * len(names)
    assert len(computes) == len(steps), events
    for k, i in zip(steps, computes):
        post = events[i - 1] if i and isinstance(events[i - 1], tuple) else ("post", [])
        assert events[i + 1: i + 1 + len(post[1])] == ["wait"] * len(post[1]), (k, events)
        q_next = (r - k - 1) % w  # the block whose rows arrive during this compute
        if k < w - 1 and env.sizes[q_next]:
            assert ("recv", (env.sizes[q_next], D), torch.float32) in post[1], (k, events)


def _raised(fn):
    try:
        fn()
    except Exception as err:  # the check below says which
        return err
    return None


def check_errors_raise_on_every_rank(env):
    """Each mismatch raises on every rank (no rank left in a collective), and the group still works."""
    A, B, scale, bias = env.batch()
    a, b, ids = A[env.rows], B[env.rows], env.group_ids(3)[env.rows]
    first, last = env.rank == 0, env.rank == env.world_size - 1
    cases = {
        "D": (lambda: mmd.clip_loss(a[:, : 4 if first else D], b[:, : 4 if first else D], scale),
              ValueError, "same embedding dimension D on every rank, got D = 4 on rank 0"),
        "dtype": (lambda: mmd.siglip_loss(a.double() if first else a, b.double() if first else b, scale, bias),
                  TypeError, "same dtype on every rank"),
        "device": (lambda: mmd.clip_loss(a.to("meta") if first else a, b.to("meta") if first else b, scale),
                   ValueError, "got meta on rank 0, cpu on rank"),
        "op": (lambda: mmd.clip_loss(a, b, scale) if first else mmd.siglip_loss(a, b, scale, bias),
               ValueError, "same distributed loss"),
        "normalize": (lambda: mmd.clip_loss(a, b, scale, normalize=first), ValueError, "same normalize on every rank"),
        "label_smoothing": (lambda: mmd.clip_loss(a, b, scale, label_smoothing=0.1 if first else 0.0),
                            ValueError, "same label_smoothing"),
        "grad_scaling": (lambda: mmd.clip_loss(a, b, scale, grad_scaling="mean"), ValueError, "grad_scaling"),
        "local shape": (lambda: mmd.clip_loss(a[None] if last else a, b, scale),
                        ValueError, "expected image_local to be 2-D" if last else "rejected"),
        "empty batch": (lambda: mmd.siglip_loss(a[:0], b[:0], scale, bias), ValueError,
                        "at least one pair in the global batch"),
        "mode": (lambda: mmd.siglip_loss(a, b, scale, bias, mode="ring" if last else "gather"), ValueError,
                 "same mode on every rank, got mode='gather' on rank"),
        "mode value": (lambda: mmd.siglip_loss(a, b, scale, bias, mode="bidir"), ValueError,
                       "expected mode to be one of ('gather', 'ring'), got 'bidir'"),
        "clip mode": (lambda: mmd.clip_loss(a, b, scale, mode="ring" if first else "gather"), ValueError,
                      "same mode on every rank, got mode='ring' on rank 0"),
        "group ids on one rank": (lambda: mmd.clip_loss(a, b, scale, group_ids_local=ids if first else None),
                                  ValueError, "same group_ids on every rank, got group ids on rank 0, "
                                  "group_ids=None on rank"),
        "group ids dtype": (lambda: mmd.siglip_loss(a, b, scale, bias, group_ids_local=ids.float() if last else ids),
                            TypeError if last else ValueError,
                            "group_ids_local to be an integer tensor" if last else "rejected"),
        "group ids shape": (lambda: mmd.clip_loss(a, b, scale, group_ids_local=ids[:0] if len(ids) else ids[None],
                                                  mode="ring"),
                            ValueError, "expected group_ids_local of shape"),
        "extra dtype": (lambda: mmd.clip_loss(a, b, scale, extra_text_local=b[:1].double() if first else None),
                        TypeError if first else ValueError, "dtype" if first else "rejected"),
        "scale shape": (lambda: mmd.clip_loss(a, b, torch.ones(2) if first else scale),
                        ValueError, "logit_scale to be a scalar" if first else "rejected"),
    }
    failures = []
    for name, (call, exc, match) in cases.items():
        err = _raised(call)
        if not isinstance(err, exc) or match not in str(err):
            failures.append(f"{name}: expected {exc.__name__} matching {match!r}, got {err!r}")
    # The ranks stayed in step: valid calls after all of that are right.
    for kind, kw in (("clip", {}), ("clip", {"mode": "ring"}), ("siglip", {"mode": "ring"})):
        loss, grads = run_loss(kind, A, B, scale, bias, env.rows, **kw)
        assert_matches_single_process(env, kind, loss, grads, (A, B, scale, bias), factor=env.world_size,
                                      dtype=torch.float32)
    assert not failures, "\n".join(failures)


def check_small_workspace_raises_on_every_rank(env):
    """A workspace that holds the smallest rank's block but not the largest's: every rank raises
    (naming the rank and the minimum) before the heavy collectives, none waits for the others."""
    env = Rank(env.rank, env.world_size, {2: (8, 64), 3: (8, 0, 64)}[env.world_size], env.seed)
    A, B, scale, bias = env.batch()
    n, small = A.shape[0], min(m for m in env.sizes if m)
    big = env.sizes.index(max(env.sizes))
    workspace = max(plan.stats_panel_bytes(small, n, D, torch.float32, A.device),
                    plan.panel_bytes(small, n, D, torch.float32, A.device, True, True, torch.float32))
    for kind in ("clip", "siglip"):
        err = _raised(lambda: run_loss(kind, A, B, scale, bias, env.rows, workspace_bytes=workspace))
        assert isinstance(err, ValueError) and f"rank {big} (M = {max(env.sizes)} rows" in str(err) \
            and "expected workspace_bytes >=" in str(err), repr(err)
    enough = max(plan.stats_panel_bytes(max(env.sizes), n, D, torch.float32, A.device),
                 plan.panel_bytes(max(env.sizes), n, D, torch.float32, A.device, True, True, torch.float32))
    loss, grads = run_loss("siglip", A, B, scale, bias, env.rows, workspace_bytes=enough)
    assert_matches_single_process(env, "siglip", loss, grads, (A, B, scale, bias), factor=env.world_size,
                                  dtype=torch.float32)
    # The ring's blocks are M_r rows against at most max M_r columns: so is the check.
    widest = max(env.sizes)
    workspace = plan.panel_bytes(small, widest, D, torch.float32, A.device, True, True, torch.float32)
    err = _raised(lambda: run_loss("siglip", A, B, scale, bias, env.rows, workspace_bytes=workspace, mode="ring"))
    assert isinstance(err, ValueError) and f"rank {big} (M = {widest} rows against {widest} columns (the widest " \
        "ring block))" in str(err) and "expected workspace_bytes >=" in str(err), repr(err)
    enough = plan.panel_bytes(widest, widest, D, torch.float32, A.device, True, True, torch.float32)
    loss, grads = run_loss("siglip", A, B, scale, bias, env.rows, workspace_bytes=enough, mode="ring")
    assert_matches_single_process(env, "siglip", loss, grads, (A, B, scale, bias), factor=env.world_size,
                                  dtype=torch.float32)


# (check, paths it runs on): "reference" is the CPU path, "triton" the kernels under the interpreter.
CHECKS = {
    "clip": (check_clip, ("reference", "triton")),
    "clip_normalize_smoothing_unscaled": (check_clip_normalize_smoothing_unscaled, ("reference", "triton")),
    "clip_frozen_towers": (check_clip_frozen_towers, ("reference", "triton")),
    "clip_fp16": (check_clip_fp16, ("triton",)),
    "clip_ring": (functools.partial(check_clip, mode="ring"), ("reference", "triton")),
    "clip_ring_normalize_smoothing_unscaled": (functools.partial(check_clip_normalize_smoothing_unscaled, mode="ring"),
                                               ("reference", "triton")),
    "clip_ring_frozen_towers": (functools.partial(check_clip_frozen_towers, mode="ring"), ("reference",)),
    "clip_ring_fp16": (functools.partial(check_clip_fp16, mode="ring"), ("triton",)),
    "clip_groups_and_extras": (check_clip_groups_and_extras, ("reference", "triton")),
    "clip_ring_groups_and_extras": (functools.partial(check_clip_groups_and_extras, mode="ring"),
                                    ("reference", "triton")),
    "siglip_groups": (check_siglip_groups, ("reference", "triton")),
    "siglip_ring_groups": (functools.partial(check_siglip_groups, mode="ring"), ("reference", "triton")),
    "siglip": (check_siglip, ("reference", "triton")),
    "siglip_normalize_unscaled": (check_siglip_normalize_unscaled, ("reference", "triton")),
    "siglip_frozen_towers": (check_siglip_frozen_towers, ("reference", "triton")),
    "siglip_fp16": (check_siglip_fp16, ("triton",)),
    "siglip_ring": (functools.partial(check_siglip, mode="ring"), ("reference", "triton")),
    "siglip_ring_normalize_unscaled": (functools.partial(check_siglip_normalize_unscaled, mode="ring"),
                                       ("reference", "triton")),
    "siglip_ring_frozen_towers": (functools.partial(check_siglip_frozen_towers, mode="ring"), ("reference", "triton")),
    "siglip_ring_fp16": (functools.partial(check_siglip_fp16, mode="ring"), ("triton",)),
    "clip_float64": (functools.partial(check_float64_is_exact, kind="clip"), ("reference",)),
    "clip_ring_float64": (functools.partial(check_float64_is_exact, kind="clip", mode="ring"), ("reference",)),
    "siglip_float64": (functools.partial(check_float64_is_exact, kind="siglip"), ("reference",)),
    "siglip_ring_float64": (functools.partial(check_float64_is_exact, kind="siglip", mode="ring"), ("reference",)),
    "autocast_changes_nothing": (check_autocast_changes_nothing, ("reference", "triton")),
    "non_finite": (check_non_finite, ("reference", "triton")),
    "work_per_rank": (check_work_per_rank, ("reference", "triton")),
    "memory_per_rank": (check_memory_per_rank, ("triton",)),
    "ring_memory_per_rank": (check_ring_memory_per_rank, ("triton",)),
    "ring_overlaps_exchange_with_compute": (check_ring_overlaps_exchange_with_compute, ("reference",)),
    "clip_ring_overlaps_exchange_with_compute": (functools.partial(check_ring_overlaps_exchange_with_compute,
                                                                   kind="clip"), ("reference",)),
    "errors_raise_on_every_rank": (check_errors_raise_on_every_rank, ("reference",)),
    "small_workspace_raises_on_every_rank": (check_small_workspace_raises_on_every_rank, ("triton",)),
}
CASES = [(name, path) for name, (_, paths) in CHECKS.items() for path in paths]


@contextlib.contextmanager
def on_path(path):
    """CPU tensors take the reference path unless TRITON_INTERPRET=1 (tests/conftest.py sets it)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if path == "triton" else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def job(rank, world_size, sizes, seed, cases):
    """Every case on one process group: {(check, path): None or the failure's traceback}."""
    outcomes = {}
    for index, (name, path) in enumerate(cases):
        env = Rank(rank, world_size, sizes, seed + index)
        try:
            with on_path(path):
                CHECKS[name][0](env)
            outcomes[name, path] = None
        except Exception:
            outcomes[name, path] = traceback.format_exc()
    return outcomes


TRITON_CPU = HAS_TRITON and interpreting() and not CUDA


def _runnable(cases):
    return [(name, path) for name, path in cases if path == "reference" or TRITON_CPU]


@pytest.fixture(scope="module")
def job_outcomes():
    """world_size -> (seed, per-rank outcomes); each job runs once per module, its failure is kept."""
    done = {}

    def get(world_size):
        if world_size not in done:
            seed = fresh_seed()
            try:
                done[world_size] = (seed, run_ranks(job, world_size, SIZES[world_size], seed, _runnable(CASES),
                                                    timeout_s=JOB_TIMEOUT_S))
            except Exception as err:
                done[world_size] = (seed, err)
        return done[world_size]

    return get


@pytest.mark.parametrize("world_size", sorted(SIZES))
@pytest.mark.parametrize("check,path", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_distributed_matches_single_process(job_outcomes, world_size, check, path):
    if path == "triton" and not TRITON_CPU:
        pytest.skip("the Triton path on CPU needs triton and TRITON_INTERPRET=1 (the GPU test covers CUDA)")
    seed, outcome = job_outcomes(world_size)
    if isinstance(outcome, Exception):
        raise AssertionError(f"the {world_size}-rank job failed (seed {seed})") from outcome
    failures = [f"rank {r}:\n{res[check, path]}" for r, res in enumerate(outcome) if res[check, path]]
    assert not failures, f"seed {seed} (+{_runnable(CASES).index((check, path))}):\n" + "\n".join(failures)


def test_missing_process_group_raises():
    assert not dist.is_initialized()
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        mmd.clip_loss(a, b, 1.0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        mmd.siglip_loss(a, b, 1.0, 0.0)


def simulate_ring(sizes, gradients):
    """Run every rank's ring_schedule in lockstep on symbols: which block each rank holds and
    computes on, and which ranks' contributions each gradient sum holds. Asserts at every step
    that rank r's sends to r+1 are, in order, the receives r+1 posts from r (gloo matches them by
    tag, NCCL by order: either way no rank waits for a message that never comes). Returns
    (blocks computed per rank, contributors summed into each rank's own gradient)."""
    world = len(sizes)
    schedules = [ring_schedule(r, sizes, gradients) for r in range(world)]
    assert len({len(s) for s in schedules}) == 1
    holding = list(range(world))              # the rows each rank computes on at the current step
    computed = [[] for _ in range(world)]
    own, outgoing = [None] * world, [None] * world
    for t in range(len(schedules[0])):
        steps = [s[t] for s in schedules]
        for r, step in enumerate(steps):
            sent = [(m.kind, m.block) for m in step.messages if m.send]
            received = [(m.kind, m.block) for m in steps[(r + 1) % world].messages if not m.send]
            assert sent == received, f"step {t}: rank {r} sends {sent}, rank {(r + 1) % world} receives {received}"
        arriving_rows = [holding[(r - 1) % world] for r in range(world)]
        arriving_sums = [outgoing[(r - 1) % world] for r in range(world)]
        for r, step in enumerate(steps):
            if step.block is not None:
                assert holding[r] == step.block, f"rank {r} computes on {step.block} holding {holding[r]}'s rows"
                computed[r].append(step.block)
            mine = [r] if step.block is not None else []
            received = next((arriving_sums[r] for m in step.messages if m.kind == "grad" and not m.send), None)
            if step.fold == "own":
                own[r] = mine
            elif step.fold == "start":
                outgoing[r] = mine
            elif step.fold == "add":
                outgoing[r] = received + mine
            elif step.fold == "home":
                own[r] = own[r] + received
            else:
                outgoing[r] = None
        holding = [arriving_rows[r] if any(m.kind == "rows" and not m.send for m in steps[r].messages) else None
                   for r in range(world)]
    return computed, own


def test_ring_schedule_pairs_every_message_and_brings_every_gradient_home():
    """Worlds of 1 to 8 ranks, empty ranks among them (no process spawned): every rank computes on
    every nonempty block exactly once, holding its rows; every message has its match; every
    rank's gradient sums the contributions of all ranks, each once. Negative control: a schedule
    with one receive dropped fails the pairing."""
    rng = random.Random(fresh_seed())
    worlds = [(3,), (2, 5), (0, 4), (1, 0, 6), (0, 0, 2)] + [
        tuple(rng.choice([0, 1, 3]) for _ in range(w)) for w in range(2, 9) for _ in range(3)]
    for sizes in worlds:
        if not any(sizes):
            continue
        for gradients in (True, False):
            computed, own = simulate_ring(sizes, gradients)
            blocks = sorted(q for q, m in enumerate(sizes) if m)
            for r in range(len(sizes)):
                assert sorted(computed[r]) == blocks, (sizes, r, computed[r])
                if gradients and sizes[r]:
                    assert sorted(own[r]) == list(range(len(sizes))), (sizes, r, own[r])
    real = ring_schedule
    try:
        globals()["ring_schedule"] = lambda r, sizes, g: [
            s._replace(messages=tuple(m for m in s.messages if m.send or r != 1)) for s in real(r, sizes, g)]
        with pytest.raises(AssertionError, match="receives"):
            simulate_ring((2, 3, 1), True)
    finally:
        globals()["ring_schedule"] = real


# --------------------------------------------------------------------------- GPU (NCCL)


def gpu_job(rank, world_size, seed):
    """On each GPU of an NCCL group: both losses in fp32 and bf16 in both modes (the ring also with
    group ids, and CLIP's with extra text rows), sizes off the tiles, a small workspace (several
    panels), against the single-process loss of the concatenated batch."""
    failures = []
    for index, (n_per_rank, d, dtype, workspace) in enumerate([
        (1000, 256, torch.float32, None), (1031, 768, torch.bfloat16, None), (4096, 512, torch.bfloat16, 2**22),
    ]):
        sizes = tuple(n_per_rank + 37 * r for r in range(world_size))  # unequal where there are several GPUs
        env = Rank(rank, world_size, sizes, seed + index)
        A, B, scale, bias = env.batch(dtype, d=d)
        A, B = A.cuda(), B.cuda()
        ids = env.group_ids(sum(sizes) // 2).cuda()
        E, extra_rows = env.extras(tuple(5 + r for r in range(world_size)), dtype, d)
        grouped = dict(ids=ids, E=E.cuda(), extra_rows=extra_rows)
        for kind, kw in (("clip", {}), ("clip", {"mode": "ring"}), ("clip", dict(grouped, mode="ring")),
                         ("siglip", {}), ("siglip", {"mode": "ring"}), ("siglip", {"mode": "ring", "ids": ids})):
            try:
                loss, grads = run_loss(kind, A, B, scale, bias, env.rows, normalize=True, workspace_bytes=workspace,
                                       **kw)
                assert loss.is_cuda and all(g.is_cuda for g in grads.values())
                oracle_kw = {k: v for k, v in kw.items() if k in ("ids", "E", "extra_rows")}
                assert_matches_single_process(env, kind, loss, grads, (A, B, scale, bias), factor=world_size,
                                              dtype=dtype, normalize=True, **oracle_kw)
            except Exception:
                failures.append(f"{kind} {sorted(kw)} N/rank={n_per_rank} D={d} {dtype}:\n{traceback.format_exc()}")
    return failures


@pytest.mark.gpu
def test_nccl_every_gpu_matches_single_process():
    """World size 1 on a one-GPU machine (all a single GPU can show), every GPU where there are more."""
    seed = fresh_seed()
    world_size = torch.cuda.device_count()
    per_rank = run_ranks(gpu_job, world_size, seed, backend="nccl", timeout_s=300.0)
    failures = [f"rank {r}: {f}" for r, fs in enumerate(per_rank) for f in fs]
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)
