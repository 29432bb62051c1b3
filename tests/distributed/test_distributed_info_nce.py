"""mmkernels.distributed.info_nce_loss over two gloo processes with unequal local batches (and a rank
with none): every rank's loss, and its gradients after the scaling it documents, against
`mmkernels.info_nce_loss` run by one process on the concatenated batch in float64 (the oracle) and
the eager formula in the inputs' dtype, under the numerics rule (docs/design.md); on the reference
path and on the Triton kernels under the interpreter. Errors name the arguments on every rank.

One spawned job runs every check on one process group; each check's outcome is its own test.
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F

import mmkernels
import mmkernels.distributed as mmd
from test_distributed import TRITON_CPU, on_path
from toolkit import assert_within_rule, fresh_seed, run_ranks

D = 8
JOB_TIMEOUT_S = 180.0


def single_process(Q, K, scale, rows: slice, *, normalize=False, eps=0.0, dtype=None):
    """One process on the global batch (Q, K) (N, D), in `dtype` (float64: mmkernels.info_nce_loss,
    the oracle; else the eager formula): the loss, dL/dQ and dL/dK of `rows`, the share of dL/dscale
    from those rows of S, and the size of each gradient's summands (the rule's floor scales with it)."""
    dtype = dtype or Q.dtype
    Q, K = (t.detach().to(dtype).requires_grad_() for t in (Q, K))
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    q, k = (F.normalize(Q, dim=-1), F.normalize(K, dim=-1)) if normalize else (Q, K)
    products = q @ k.T
    logits = s * products
    n = logits.shape[0]
    formula = F.cross_entropy(logits, torch.arange(n), label_smoothing=eps)
    logits_grad = torch.autograd.grad(formula, logits, retain_graph=True)[0]
    if dtype == torch.float64:
        loss = mmkernels.info_nce_loss(Q, K, s, normalize=normalize, label_smoothing=eps)
    else:
        loss = formula
    loss.backward()
    with torch.no_grad():
        targets = (1 - eps) * torch.eye(n, dtype=dtype) + eps / n
        terms = (torch.softmax(logits, 1) + targets) / n
        query_terms, keys_terms = scale * terms @ k.abs(), scale * terms.T @ q.abs()
        if normalize:
            query_terms = query_terms / Q.norm(dim=-1, keepdim=True)
            keys_terms = keys_terms / K.norm(dim=-1, keepdim=True)
    return dict(loss=loss.detach(), query=Q.grad[rows], keys=K.grad[rows],
                scale=(logits_grad[rows] * products[rows]).sum().detach(),
                query_size=query_terms[rows].norm().item(), keys_size=keys_terms[rows].norm().item(),
                scale_size=(terms[rows] * products[rows].abs()).sum().item(),
                loss_size=max(abs(loss.item()), scale * (terms * products.abs()).sum().item()))


def run_case(rank, sizes, seed, *, dtype=torch.float32, query_grad=True, keys_grad=True, scale_grad=True,
             factor=2, **kw):
    """This rank's loss and gradients against the single-process ones."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    Q = torch.randn(n, D, generator=gen, dtype=torch.float64).to(dtype)
    K = torch.randn(n, D, generator=gen, dtype=torch.float64).to(dtype)
    scale = float(torch.empty(()).uniform_(1.0, 4.0, generator=gen))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    leaves = {"query": Q[rows].clone().requires_grad_(query_grad), "keys": K[rows].clone().requires_grad_(keys_grad)}
    s = torch.tensor(scale, requires_grad=True) if scale_grad else scale
    if scale_grad:
        leaves["scale"] = s
    loss = mmd.info_nce_loss(leaves["query"], leaves["keys"], s, **kw)
    needed = {k: v for k, v in leaves.items() if v.requires_grad}
    grads = dict(zip(needed, torch.autograd.grad(loss, list(needed.values())))) if needed else {}
    options = dict(normalize=kw.get("normalize", False), eps=kw.get("label_smoothing", 0.0))
    oracle = single_process(Q, K, scale, rows, dtype=torch.float64, **options)
    eager = single_process(Q, K, scale, rows, dtype=dtype, **options)
    assert_within_rule("loss", loss, eager["loss"], oracle["loss"], dtype, size=oracle["loss_size"])
    for name, grad in grads.items():
        assert_within_rule(f"d {name} (rank {rank})", grad.double() / factor, eager[name], oracle[name], dtype,
                           size=oracle[f"{name}_size"])
    return set(grads)


def check_default(rank, seed):
    assert run_case(rank, (5, 2), seed) == {"query", "keys", "scale"}


def check_normalize_smoothing_unscaled(rank, seed):
    run_case(rank, (5, 2), seed, normalize=True, label_smoothing=0.1, grad_scaling="none", factor=1)


def check_frozen_sides(rank, seed):
    # Queries frozen everywhere, the keys' gradient needed on rank 0 only: rank 1 still sends its
    # partial key gradients. Then the keys frozen, logit_scale a Python float.
    assert run_case(rank, (5, 2), seed, query_grad=False, keys_grad=rank == 0, scale_grad=False) == (
        {"keys"} if rank == 0 else set())
    assert run_case(rank, (5, 2), seed + 1, keys_grad=False, scale_grad=False, label_smoothing=0.2) == {"query"}


def check_empty_rank(rank, seed):
    run_case(rank, (3, 0), seed)


def check_fp16(rank, seed):
    run_case(rank, (5, 2), seed, dtype=torch.float16, normalize=True)


def grouped_single_process(Q, K, E, ids, scale, rows, extra_rows, *, eps, dtype):
    """With group ids (N,) and extra keys E (K, D): the loss, dL/dQ, dL/dK of `rows`, dL/dE of
    `extra_rows` and the share of dL/dscale from `rows`, with their summands' sizes; in float64
    mmkernels.info_nce_loss(group_ids=, extra_keys=) (the oracle), else the eager formula (targets
    (1-eps)·[g_i = g_j]/c_i on the paired keys, 0 on the extra ones, + eps/(N + K))."""
    Q, K, E = (t.detach().to(dtype).requires_grad_() for t in (Q, K, E))
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    columns = torch.cat([K, E])
    products = Q @ columns.T
    logits = s * products
    n, k = Q.shape[0], E.shape[0]
    same = (ids[:, None] == ids[None, :]).to(dtype)
    targets = F.pad((1 - eps) * same / same.sum(1, keepdim=True), (0, k)) + eps / (n + k)
    formula = -(targets * torch.log_softmax(logits, 1)).sum(1).mean()
    logits_grad = torch.autograd.grad(formula, logits, retain_graph=True)[0]
    loss = (mmkernels.info_nce_loss(Q, K, s, label_smoothing=eps, group_ids=ids, extra_keys=E)
            if dtype == torch.float64 else formula)
    loss.backward()
    with torch.no_grad():
        terms = (torch.softmax(logits, 1) + targets) / n
        query_terms, keys_terms = scale * terms @ columns.abs(), scale * terms.T @ Q.abs()
    return dict(loss=loss.detach(), query=Q.grad[rows], keys=K.grad[rows], extra=E.grad[extra_rows],
                scale=(logits_grad[rows] * products[rows]).sum().detach(),
                query_size=query_terms[rows].norm().item(), keys_size=keys_terms[:n][rows].norm().item(),
                extra_size=keys_terms[n:][extra_rows].norm().item(),
                scale_size=(terms[rows] * products[rows].abs()).sum().item(),
                loss_size=max(abs(loss.item()), scale * (terms * products.abs()).sum().item()))


def check_group_ids_and_extra_keys(rank, seed):
    """Group ids spanning the ranks and extra keys (3 on rank 0, none on rank 1: a (0, D) tensor,
    or None when frozen): every rank's extra keys are negatives of every rank's queries."""
    sizes, extra_sizes = (5, 2), (3, 0)
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    Q, K, E = (torch.randn(m, D, generator=gen, dtype=torch.float64).float() for m in (n, n, sum(extra_sizes)))
    ids = torch.randint(0, 3, (n,), generator=gen)
    scale = float(torch.empty(()).uniform_(1.0, 4.0, generator=gen))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    extra_rows = slice(sum(extra_sizes[:rank]), sum(extra_sizes[: rank + 1]))
    for eps, extra_grad in ((0.0, True), (0.1, False)):
        leaves = {"query": Q[rows].clone().requires_grad_(), "keys": K[rows].clone().requires_grad_(),
                  "extra": E[extra_rows].clone().requires_grad_(extra_grad),
                  "scale": torch.tensor(scale, requires_grad=True)}
        extra = leaves["extra"] if extra_grad or rank == 0 else None
        loss = mmd.info_nce_loss(leaves["query"], leaves["keys"], leaves["scale"], label_smoothing=eps,
                                 group_ids_local=ids[rows], extra_keys_local=extra)
        needed = {k: v for k, v in leaves.items() if v.requires_grad}
        grads = dict(zip(needed, torch.autograd.grad(loss, list(needed.values()))))
        oracle, eager = (grouped_single_process(Q, K, E, ids, scale, rows, extra_rows, eps=eps, dtype=dtype)
                         for dtype in (torch.float64, torch.float32))
        assert_within_rule("loss", loss, eager["loss"], oracle["loss"], torch.float32, size=oracle["loss_size"])
        for name, grad in grads.items():
            assert_within_rule(f"d {name} (rank {rank}, eps {eps})", grad.double() / 2, eager[name], oracle[name],
                               torch.float32, size=oracle[f"{name}_size"])


def check_errors_name_the_arguments_on_every_rank(rank, seed):
    query, keys = torch.randn(3, D), torch.randn(3, D if rank == 0 else D + 1)
    with pytest.raises(ValueError, match="keys_local" if rank == 1 else r"rank\(s\) \[1\] were rejected"):
        mmd.info_nce_loss(query, keys, 1.0)
    keys = torch.randn(3, D + rank)
    with pytest.raises(ValueError, match="expected query_local and keys_local to have the same embedding dimension"):
        mmd.info_nce_loss(torch.randn(3, D + rank), keys, 1.0)
    with pytest.raises(ValueError, match="grad_scaling"):
        mmd.info_nce_loss(torch.randn(3, D), torch.randn(3, D), 1.0, grad_scaling="open_clip_local_loss")


CHECKS = {
    "default": (check_default, ("reference", "triton")),
    "normalize_smoothing_unscaled": (check_normalize_smoothing_unscaled, ("reference", "triton")),
    "frozen_sides": (check_frozen_sides, ("reference", "triton")),
    "empty_rank": (check_empty_rank, ("reference", "triton")),
    "fp16": (check_fp16, ("triton",)),
    "group_ids_and_extra_keys": (check_group_ids_and_extra_keys, ("reference", "triton")),
    "errors_name_the_arguments_on_every_rank": (check_errors_name_the_arguments_on_every_rank, ("reference",)),
}
CASES = [(name, path) for name, (_, paths) in CHECKS.items() for path in paths]


def _runnable():
    return [(name, path) for name, path in CASES if path == "reference" or TRITON_CPU]


def job(rank, world_size, seed, cases):
    outcomes = {}
    for index, (name, path) in enumerate(cases):
        try:
            with on_path(path):
                CHECKS[name][0](rank, seed + 10 * index)
            outcomes[name, path] = None
        except Exception:
            outcomes[name, path] = traceback.format_exc()
    return outcomes


@pytest.fixture(scope="module")
def outcome():
    seed = fresh_seed()
    try:
        return seed, run_ranks(job, 2, seed, _runnable(), timeout_s=JOB_TIMEOUT_S)
    except Exception as err:
        return seed, err


@pytest.mark.parametrize("check,path", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_info_nce_loss_matches_single_process(outcome, check, path):
    if path == "triton" and not TRITON_CPU:
        pytest.skip("the Triton path on CPU needs triton and TRITON_INTERPRET=1")
    seed, ranks = outcome
    if isinstance(ranks, Exception):
        raise AssertionError(f"the 2-rank job failed (seed {seed})") from ranks
    failures = [f"rank {r}:\n{res[check, path]}" for r, res in enumerate(ranks) if res[check, path]]
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)


def test_missing_process_group_raises():
    with pytest.raises(RuntimeError, match="mmkernels.distributed.info_nce_loss needs a torch.distributed process"):
        mmd.info_nce_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0)
