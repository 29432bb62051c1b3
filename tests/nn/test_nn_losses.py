"""mmkernels.nn.ClipLoss / SigLipLoss with open_clip's constructor arguments: single-process, and over
a 2-rank gloo group against open_clip's own formulas for the same flags (written here from
open_clip's documented behaviour: its feature gathering with or without gradients, its local loss,
its SigLIP exchange), value and gradients on every rank; the flags it refuses, and why.
"""
from __future__ import annotations

import contextlib
import itertools
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

import mmkernels
from mmkernels.distributed import ring as distributed_ring
from test_distributed import Rank, assert_matches_single_process, on_path, single_process
from toolkit import assert_within_rule, fresh_seed, run_ranks

# --------------------------------------------------------------------------- open_clip's formulas


def all_gather_with_grad(t):
    """All ranks' rows, concatenated; the backward sums the gradients back to their owners (as
    open_clip's gather_with_grad does it, with the functional collectives' autograd all_gather)."""
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd  # torch < 2.13
    return gather(t.contiguous(), gather_dim=0, group=dist.group.WORLD)


def open_clip_clip_loss(image, text, scale, bias, *, local_loss, gather_with_grad, rank, world_size):
    """open_clip's ClipLoss.forward on one rank (world_size > 1, equal local batches): gather every
    rank's features (gather_with_grad: an all_gather whose backward sums the gradients back to their
    owners; else a detached all_gather in which, without local_loss, the rank's own slot keeps its
    gradient); logits of the local rows (local_loss) or of the whole batch; labels offset by
    M · rank with local_loss; the mean of the two cross-entropies."""
    if gather_with_grad:
        all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
    else:
        gathered = []
        for t in (image, text):
            parts = [torch.empty_like(t) for _ in range(world_size)]
            dist.all_gather(parts, t.detach())
            if not local_loss:
                parts[rank] = t
            gathered.append(torch.cat(parts))
        all_image, all_text = gathered
    if local_loss:
        per_image, per_text = scale * image @ all_text.T, scale * text @ all_image.T
    else:
        per_image = scale * all_image @ all_text.T
        per_text = per_image.T
    if bias is not None:
        per_image, per_text = per_image + bias, per_text + bias
    labels = torch.arange(per_image.shape[0]) + (per_image.shape[0] * rank if local_loss else 0)
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def open_clip_siglip_loss(image, text, scale, bias, *, rank, world_size):
    """open_clip's SigLipLoss.forward on one rank (its "gather" exchange; the others compute the same
    function): the local rows against the local texts with their positives, plus against every
    other rank's texts as negatives only, each sum divided by the local batch size. The texts come
    from an all_gather whose backward returns their gradients to their owners."""
    def part(other_text, negatives_only):
        logits = scale * image @ other_text.T + bias
        labels = -torch.ones_like(logits)
        if not negatives_only:
            labels = labels + 2 * torch.eye(logits.shape[0], dtype=logits.dtype)
        return -F.logsigmoid(labels * logits).sum() / image.shape[0]

    loss = part(text, False)
    for r, other in enumerate(all_gather_with_grad(text).chunk(world_size)):
        if r != rank:
            loss = loss + part(other, True)
    return loss


def local_siglip_loss_unequal(A, B, scale, bias, sizes, rank, ids=None):
    """open_clip's SigLIP formula where the local batch sizes differ (open_clip itself needs them
    equal): rank r's value Σ_{i local, all j} -log σ(label_ij · S_ij) / M_r, and the gradients of
    Σ_r value_r (what open_clip's exchanges of text features with gradients add up to). Computed in
    one process on the global batch: (value of `rank`, d/dA, d/dB, d value_rank/dscale, .../dbias).
    With group ids (N,), label +1 for every same-id pair."""
    A, B = A.detach().requires_grad_(), B.detach().requires_grad_()
    scale, bias = (torch.as_tensor(t, dtype=A.dtype).requires_grad_() for t in (scale, bias))
    logits = scale * A @ B.T + bias
    same = torch.eye(A.shape[0], dtype=torch.bool) if ids is None else ids[:, None] == ids[None, :]
    signs = same.to(A.dtype) * 2 - 1
    per_row = -F.logsigmoid(signs * logits).sum(1)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    values = [per_row[s: s + m].sum() / m for s, m in zip(starts, sizes)]
    d_a, d_b = torch.autograd.grad(sum(values), (A, B), retain_graph=True)
    d_scale, d_bias = torch.autograd.grad(values[rank], (scale, bias))
    return values[rank].detach(), d_a, d_b, d_scale, d_bias


# --------------------------------------------------------------------------- the checks (2 ranks)


def _leaves(A, B, scale, bias, rows, dtype, bias_grad=True):
    return (A[rows].to(dtype).requires_grad_(), B[rows].to(dtype).requires_grad_(),
            torch.tensor(scale, dtype=dtype, requires_grad=True),
            torch.tensor(bias, dtype=dtype, requires_grad=bias_grad))


def _open_clip_values(fn, A, B, scale, bias, rows, dtype, **kw):
    """open_clip's value and the gradients of (image, text, scale, bias) on this rank, in dtype."""
    leaves = _leaves(A, B, scale, bias, rows, dtype)
    loss = fn(*leaves, **kw)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves, allow_unused=True))


def _sum_over_ranks(t):
    t = t.detach().double().clone()
    dist.all_reduce(t)
    return t


NAMES = ("loss", "d image", "d text", "d logit_scale", "d logit_bias")


def floors(kind, A, B, scale, bias, rows, factor):
    """The size each output's rounding scales with (see test_distributed.single_process), for
    values and gradients up to `factor` times the single-process ones."""
    mine = single_process(kind, A, B, scale, bias, rows, dtype=torch.float64)
    whole = single_process(kind, A, B, scale, bias, slice(None), dtype=torch.float64)
    return {"loss": factor * max(abs(whole["loss"].item()), scale * whole["scale_size"]),
            "d image": factor * mine["image_size"], "d text": factor * mine["text_size"],
            "d logit_scale": factor * whole["scale_size"], "d logit_bias": factor * whole["bias_size"]}


def check_clip_loss_flags(env):
    """Each flag combination in both modes: the ring (mmkernels.distributed's two ring passes, the
    statistics' and the gradients') by default with gather_with_grad=True, the all_gather without."""
    A, B, scale, bias = env.batch()
    sizes = floors("clip", A, B, scale, bias, env.rows, env.world_size)
    for (local_loss, gather_with_grad), mode in itertools.product(((False, False), (False, True), (True, True)),
                                                                  (None, "gather", "ring")):
        flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad)
        criterion = mmkernels.nn.ClipLoss(**flags, cache_labels=True, rank=env.rank, world_size=env.world_size,
                                          mode=mode)
        ring = mode == "ring" or (mode is None and gather_with_grad)
        assert criterion.mode == ("ring" if ring else "gather"), (flags, mode, criterion.mode)
        leaves = _leaves(A, B, scale, bias, env.rows, torch.float32)
        with _counting_ring_passes() as passes:
            loss = criterion(*leaves)
        assert passes == [1, 1] * ring, f"{flags}, mode={mode}: {len(passes)} ring passes, expected {2 * ring}"
        got = [loss.detach()] + list(torch.autograd.grad(loss, leaves))
        kw = dict(flags, rank=env.rank, world_size=env.world_size)
        oracle = _open_clip_values(open_clip_clip_loss, A, B, scale, bias, env.rows, torch.float64, **kw)
        eager = _open_clip_values(open_clip_clip_loss, A, B, scale, bias, env.rows, torch.float32, **kw)
        # logit_bias shifts every logit alike: open_clip's gradient of it is 0 up to rounding, ours exactly 0.
        assert float(got[4]) == 0.0, got[4]
        if local_loss:
            # The ranks split dL/dlogit_scale by rows of S, open_clip by rows and columns: the sums agree.
            got[3], oracle[3], eager[3] = (_sum_over_ranks(x[3]) for x in (got, oracle, eager))
        for name, g, o, e in list(zip(NAMES, got, oracle, eager))[:4]:
            assert_within_rule(f"{flags} mode={mode} {name} (rank {env.rank})", g, e, o, torch.float32,
                               size=sizes[name])


@contextlib.contextmanager
def _counting_ring_passes():
    """A list that gets one entry per run of mmkernels.distributed's point-to-point ring."""
    calls, real = [], distributed_ring.ring_pass

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    distributed_ring.ring_pass = counted
    try:
        yield calls
    finally:
        distributed_ring.ring_pass = real


def check_siglip_loss_equal_batches(env):
    A, B, scale, bias = env.batch()
    sizes = floors("siglip", A, B, scale, bias, env.rows, env.world_size)
    for dist_impl, ring in (("bidir", True), ("shift", True), ("reduce", False), ("gather", False)):
        criterion = mmkernels.nn.SigLipLoss(rank=env.rank, world_size=env.world_size, dist_impl=dist_impl)
        leaves = _leaves(A, B, scale, bias, env.rows, torch.float32)
        with _counting_ring_passes() as passes:
            loss = criterion(*leaves)
        assert passes == [1] * ring, f"{dist_impl}: {len(passes)} ring passes, expected {int(ring)}"
        got = [loss.detach()] + list(torch.autograd.grad(loss, leaves))
        kw = dict(rank=env.rank, world_size=env.world_size)
        oracle = _open_clip_values(open_clip_siglip_loss, A, B, scale, bias, env.rows, torch.float64, **kw)
        eager = _open_clip_values(open_clip_siglip_loss, A, B, scale, bias, env.rows, torch.float32, **kw)
        for name, g, o, e in zip(NAMES, got, oracle, eager):
            assert_within_rule(f"{dist_impl} {name} (rank {env.rank})", g, e, o, torch.float32, size=sizes[name])


def check_siglip_loss_unequal_batches(env):
    env = Rank(env.rank, env.world_size, (3, 5), env.seed + 1)
    A, B, scale, bias = env.batch()
    criterion = mmkernels.nn.SigLipLoss(rank=env.rank, world_size=env.world_size)
    leaves = _leaves(A, B, scale, bias, env.rows, torch.float32)
    loss = criterion(*leaves)
    got = [loss.detach()] + list(torch.autograd.grad(loss, leaves))
    oracle = local_siglip_loss_unequal(A.double(), B.double(), scale, bias, env.sizes, env.rank)
    eager = local_siglip_loss_unequal(A, B, scale, bias, env.sizes, env.rank)
    sizes = floors("siglip", A, B, scale, bias, env.rows, sum(env.sizes) / min(env.sizes))
    for k, (name, g, o, e) in enumerate(zip(NAMES, got, oracle, eager)):
        if k in (1, 2):
            o, e = o[env.rows], e[env.rows]
        assert_within_rule(f"{name} (rank {env.rank})", g, e, o, torch.float32, size=sizes[name])


def check_ranks_needing_different_gradients(env):
    """Ranks that need different gradients (a tower frozen on one rank only, logit_scale a float)
    still meet in the same collectives: every rank returns, with open_clip's gradients."""
    A, B, scale, bias = env.batch()
    sizes = floors("clip", A, B, scale, bias, env.rows, env.world_size)
    for local_loss, gather_with_grad in ((False, False), (False, True), (True, True)):
        flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad)
        criterion = mmkernels.nn.ClipLoss(**flags, rank=env.rank, world_size=env.world_size)
        image = A[env.rows].clone().requires_grad_(env.rank == 0)
        text = B[env.rows].clone().requires_grad_(env.rank == 1)
        loss = criterion(image, text, scale)
        (grad,) = torch.autograd.grad(loss, image if env.rank == 0 else text)
        oracle = _open_clip_values(open_clip_clip_loss, A, B, scale, bias, env.rows, torch.float64,
                                   rank=env.rank, world_size=env.world_size, **flags)
        eager = _open_clip_values(open_clip_clip_loss, A, B, scale, bias, env.rows, torch.float32,
                                  rank=env.rank, world_size=env.world_size, **flags)
        k = 1 if env.rank == 0 else 2
        assert_within_rule(f"{flags} loss", loss, eager[0], oracle[0], torch.float32, size=sizes["loss"])
        assert_within_rule(f"{flags} {NAMES[k]}", grad, eager[k], oracle[k], torch.float32, size=sizes[NAMES[k]])


def check_group_ids(env):
    """forward(..., group_ids=) with ids whose groups span the ranks (and ClipLoss's extra_text=,
    unequal per rank): ClipLoss (global loss, both modes) gives the single-process loss with those
    ids and extra rows and its gradients (W · dL/d(rows), dL/ds); SigLipLoss open_clip's per-rank
    value with every same-id pair labelled +1, and its gradients; ClipLoss(local_loss=True) refuses
    them on every rank."""
    A, B, scale, bias = env.batch()
    ids = env.group_ids(3)
    E, extra_rows = env.extras((2, 3))
    for mode in ("gather", "ring"):
        criterion = mmkernels.nn.ClipLoss(gather_with_grad=True, rank=env.rank, world_size=env.world_size, mode=mode)
        image, text, extra = (t.clone().requires_grad_() for t in (A[env.rows], B[env.rows], E[extra_rows]))
        loss = criterion(image, text, scale, group_ids=ids[env.rows], extra_text=extra)
        grads = dict(zip(("image", "text", "extra"), torch.autograd.grad(loss, (image, text, extra))))
        assert_matches_single_process(env, "clip", loss.detach(), grads, (A, B, scale, bias), factor=env.world_size,
                                      dtype=torch.float32, ids=ids, E=E, extra_rows=extra_rows)
    criterion = mmkernels.nn.SigLipLoss(rank=env.rank, world_size=env.world_size)
    leaves = _leaves(A, B, scale, bias, env.rows, torch.float32)
    loss = criterion(*leaves, group_ids=ids[env.rows])
    got = [loss.detach()] + list(torch.autograd.grad(loss, leaves))
    oracle = local_siglip_loss_unequal(A.double(), B.double(), scale, bias, env.sizes, env.rank, ids)
    eager = local_siglip_loss_unequal(A, B, scale, bias, env.sizes, env.rank, ids)
    sizes = floors("siglip", A, B, scale, bias, env.rows, env.world_size)
    for k, (name, g, o, e) in enumerate(zip(NAMES, got, oracle, eager)):
        if k in (1, 2):
            o, e = o[env.rows], e[env.rows]
        assert_within_rule(f"siglip {name} (rank {env.rank})", g, e, o, torch.float32, size=sizes[name])
    local = mmkernels.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=env.rank, world_size=env.world_size)
    _expect(lambda: local(A[env.rows], B[env.rows], scale, group_ids=ids[env.rows]), "diagonal targets")


def _expect(call, match):
    try:
        call()
    except ValueError as err:
        assert match in str(err), f"expected {match!r} in {err}"
        return
    raise AssertionError(f"expected ValueError matching {match!r}, nothing raised")


def check_refusals_raise_on_every_rank(env):
    A, B, scale, bias = env.batch()
    a, b = A[env.rows], B[env.rows]
    # A node-local rank passed for the global one: rank 1 sees its mistake, rank 0 hears of it.
    wrong = mmkernels.nn.ClipLoss(rank=0, world_size=env.world_size)
    _expect(lambda: wrong(a, b, scale), "built with rank=0" if env.rank else "rejected")
    wrong = mmkernels.nn.SigLipLoss(rank=0, world_size=env.world_size)
    _expect(lambda: wrong(a, b, scale, bias), "built with rank=0" if env.rank else "rejected")
    # open_clip's local loss needs equal local batches; its SigLIP divides by the local batch size.
    local = mmkernels.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=env.rank, world_size=env.world_size)
    _expect(lambda: local(a[: 1 + env.rank], b[: 1 + env.rank], scale), "needs the same local batch size")
    siglip = mmkernels.nn.SigLipLoss(rank=env.rank, world_size=env.world_size)
    _expect(lambda: siglip(a[: env.rank], b[: env.rank], scale, bias), "divides each rank's loss")


CHECKS = {
    "clip_loss_flags": check_clip_loss_flags,
    "siglip_loss_equal_batches": check_siglip_loss_equal_batches,
    "siglip_loss_unequal_batches": check_siglip_loss_unequal_batches,
    "refusals_raise_on_every_rank": check_refusals_raise_on_every_rank,
    "ranks_needing_different_gradients": check_ranks_needing_different_gradients,
    "group_ids": check_group_ids,
}


def job(rank, world_size, seed):
    outcomes = {}
    for index, name in enumerate(CHECKS):
        env = Rank(rank, world_size, (4, 4), seed + index)
        try:
            with on_path("reference"):
                CHECKS[name](env)
            outcomes[name] = None
        except Exception:
            outcomes[name] = traceback.format_exc()
    return outcomes


@pytest.fixture(scope="module")
def two_rank_outcomes():
    seed = fresh_seed()
    try:
        return seed, run_ranks(job, 2, seed, timeout_s=180.0)
    except Exception as err:
        return seed, err


@pytest.mark.parametrize("check", list(CHECKS))
def test_modules_match_open_clip_on_two_ranks(two_rank_outcomes, check):
    seed, outcome = two_rank_outcomes
    if isinstance(outcome, Exception):
        raise AssertionError(f"the 2-rank job failed (seed {seed})") from outcome
    failures = [f"rank {r}:\n{res[check]}" for r, res in enumerate(outcome) if res[check]]
    assert not failures, f"seed {seed} (+{list(CHECKS).index(check)}):\n" + "\n".join(failures)


# --------------------------------------------------------------------------- one process


def test_single_process_matches_the_functions_and_open_clip():
    fresh_seed()
    a, b = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    with on_path("reference"):
        got = mmkernels.nn.ClipLoss(cache_labels=True)(a, b, scale, bias, output_dict=True)["contrastive_loss"]
        assert torch.equal(got, mmkernels.clip_loss(a, b, scale))
        ref = (F.cross_entropy(scale * a @ b.T + bias, torch.arange(6))
               + F.cross_entropy(scale * b @ a.T + bias, torch.arange(6))) / 2
        torch.testing.assert_close(got, ref)
        (d_bias,) = torch.autograd.grad(got, bias)
        assert d_bias.item() == 0.0
        got = mmkernels.nn.SigLipLoss(dist_impl="shift")(a, b, scale, bias)
        assert torch.equal(got, mmkernels.siglip_loss(a, b, scale, bias))
        assert torch.equal(mmkernels.nn.SigLipLoss()(a, b, scale, None), mmkernels.siglip_loss(a, b, scale, 0.0))
        # The mmkernels options keep working, and open_clip's positional order is accepted.
        got = mmkernels.nn.ClipLoss(normalize=True, label_smoothing=0.1)(a, b, scale)
        assert torch.equal(got, mmkernels.clip_loss(a, b, scale, normalize=True, label_smoothing=0.1))
        assert torch.equal(mmkernels.nn.ClipLoss(True, True, True, 0, 1)(a, b, scale), mmkernels.clip_loss(a, b, scale))
        # group_ids, ClipLoss's extra_text and InfoNCELoss's extra_keys reach the functions.
        ids, extra = torch.tensor([3, 1, 3, 0, 1, 3]), torch.randn(2, 8, dtype=torch.float64)
        assert torch.equal(mmkernels.nn.ClipLoss()(a, b, scale, group_ids=ids),
                           mmkernels.clip_loss(a, b, scale, group_ids=ids))
        assert torch.equal(mmkernels.nn.SigLipLoss()(a, b, scale, bias, group_ids=ids),
                           mmkernels.siglip_loss(a, b, scale, bias, group_ids=ids))
        assert torch.equal(mmkernels.nn.InfoNCELoss(label_smoothing=0.1)(a, b, scale, group_ids=ids, extra_keys=extra),
                           mmkernels.info_nce_loss(a, b, scale, label_smoothing=0.1, group_ids=ids, extra_keys=extra))
        assert torch.equal(mmkernels.nn.ClipLoss(label_smoothing=0.1)(a, b, scale, group_ids=ids, extra_text=extra),
                           mmkernels.clip_loss(a, b, scale, label_smoothing=0.1, group_ids=ids, extra_text=extra))
        assert not torch.equal(mmkernels.nn.ClipLoss()(a, b, scale, group_ids=ids), mmkernels.clip_loss(a, b, scale))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: mmkernels.nn.ClipLoss(use_horovod=True), ValueError, "not Horovod"),
    (lambda: mmkernels.nn.SigLipLoss(use_horovod=True), ValueError, "not Horovod"),
    (lambda: mmkernels.nn.ClipLoss(local_loss=True, rank=0, world_size=2), ValueError, "gather_with_grad=True"),
    (lambda: mmkernels.nn.ClipLoss(local_loss=True, gather_with_grad=True, world_size=2, label_smoothing=0.1),
     ValueError, "no label smoothing"),
    (lambda: mmkernels.nn.ClipLoss(rank=2, world_size=2), ValueError, "0 <= rank < world_size"),
    (lambda: mmkernels.nn.ClipLoss(world_size=0), ValueError, "world_size >= 1"),
    (lambda: mmkernels.nn.ClipLoss(rank=0.5), TypeError, "rank to be an int"),
    (lambda: mmkernels.nn.SigLipLoss(dist_impl="ring"), ValueError, "dist_impl"),
    (lambda: mmkernels.nn.ClipLoss(mode="bidir"), ValueError,
     "expected mode to be one of .*gather.*ring.* or None, got 'bidir'"),
    (lambda: mmkernels.nn.SigLipLoss(dist_impl="gather", bidir=True), ValueError, "pass one"),
    (lambda: mmkernels.nn.SigLipLoss(chunk_size=-1), ValueError, "chunk_size"),
])
def test_refused_constructor_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_older_open_clip_bidir_argument():
    assert mmkernels.nn.SigLipLoss(bidir=False).dist_impl == "shift"
    assert mmkernels.nn.SigLipLoss(bidir=True, dist_impl="bidir").dist_impl == "bidir"


def test_world_size_above_one_needs_a_process_group():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        mmkernels.nn.ClipLoss(rank=1, world_size=2)(a, b, 2.0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        mmkernels.nn.SigLipLoss(rank=0, world_size=2)(a, b, 2.0, -1.0)
