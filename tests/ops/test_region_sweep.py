"""A random sweep of region_mask and masked_region_loss: every path that runs here (the torch
reference; the Triton kernels, under the interpreter on the CPU for float32/float16; "auto", which
takes the reference for CPU bfloat16; on a GPU the Triton and CUDA C++ kernels in every dtype) against
the float64 reference, on fresh random cases: shapes that cross the kernels' block edges, any prob,
min_masked, mode, region_lens or valid_mask, NaN and Inf in selected and unselected regions, every
loss kind and reduction, targets that are not distributions.

Slow-marked. MMKERNELS_SWEEP_CASES sets the number of cases (default 20, what CI runs); each case's
seed is printed when it fails, and MMKERNELS_TEST_SEED=<seed> replays it.
"""
import os
import random

import pytest
import torch

from mmkernels.ops._common import HAS_TRITON
from mmkernels.ops._extension import cuda_extension_available
from mmkernels.ops.region import masked_region_loss, region_mask
from toolkit import CUDA, assert_within_rule, fresh_seed, value_and_grads

CASES = int(os.environ.get("MMKERNELS_SWEEP_CASES", "20"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIALS = [float("nan"), float("inf"), -float("inf")]


def paths(dtype):
    """(backend, device) of every path that runs `dtype` here."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    found = [("torch", cpu)]
    if HAS_TRITON and (CUDA or dtype != torch.bfloat16):
        found.append(("triton", gpu if CUDA else cpu))
    if CUDA and cuda_extension_available():
        found.append(("cuda", gpu))
    if not CUDA and dtype == torch.bfloat16:
        found.append(("auto", cpu))  # the reference, as the interpreter has no bfloat16
    return found


def inject(rng, t, rows, count):
    """Put NaN / ±Inf at `count` random elements of the given (b, r) rows of t (B, R, X)."""
    for _ in range(count if rows else 0):
        b, r = rows[rng.randrange(len(rows))]
        t[b, r, rng.randrange(t.shape[2])] = rng.choice(SPECIALS)


def within_rule(what, got, eager, oracle, dtype):
    for name, g, e, o in zip(["value", "grad 1", "grad 2"], got, eager, oracle):
        assert_within_rule(f"{what}: {name}", g, e, o, dtype, allow_nonfinite=True)


def check_region_mask(rng, dtype, what):
    # the interpreter's tiles: CHUNK 16, BLOCK_R 8, BLOCK_D 64; each crossed or not
    n_samples, n_regions, dim = rng.randint(1, 4), rng.randint(1, 20), rng.choice([rng.randint(1, 64), rng.randint(1, 64), 65, 70])
    prob = rng.choice([0.0, 1.0, rng.random()])
    mode = rng.choice(["zero", "bert"])
    min_masked = rng.choice([0, 1, 1, 2, 3, n_regions + 3, 2**33])
    what += f" region_mask B={n_samples} R={n_regions} D={dim} prob={prob:.3f} {mode} min_masked={min_masked}"
    feats = torch.randn(n_samples, n_regions, dim).to(dtype)
    emb = torch.randn(dim).to(dtype) if rng.random() < 0.5 else None
    inject(rng, feats, [(b, r) for b in range(n_samples) for r in range(n_regions)], rng.randint(0, 4))
    if rng.random() < 0.5:
        lens = torch.randint(0, n_regions + 1, (n_samples,))
        where = dict(region_lens=lens.to(rng.choice([torch.int64, torch.int32, torch.int16])))
    else:
        where = dict(valid_mask=torch.rand(n_samples, n_regions) < rng.random())
    upstream = torch.randn(n_samples, n_regions, dim).to(dtype)
    seed = rng.randrange(2**63)

    def run(backend, device, leaves):
        """[features, d feats, d mask_embedding or 0] and the mask, of one path."""
        masks = []

        def features(f, e=None):
            on = {k: v.to(device) for k, v in where.items()}
            out = region_mask(f.to(device), prob=prob, mode=mode, mask_embedding=None if e is None else e.to(device),
                              min_masked=min_masked, generator=torch.Generator().manual_seed(seed),
                              backend=backend, **on)
            masks.append(out.mask.cpu())
            return out.features.cpu()

        result = value_and_grads(features, leaves, upstream.to(leaves[0].dtype))
        return result + [torch.zeros(1)] * (3 - len(result)), masks[0]

    leaves = [feats] + ([emb] if emb is not None else [])
    oracle, oracle_mask = run("torch", "cpu", [t.double() for t in leaves])
    eager, eager_mask = run("torch", "cpu", leaves)
    for backend, device in paths(dtype):
        got, mask = (eager, eager_mask) if backend == "torch" else run(backend, device, leaves)
        assert torch.equal(mask, oracle_mask), f"{what} {backend}: mask"
        # the features are copies: exactly the oracle's, NaN and Inf included
        torch.testing.assert_close(got[0], oracle[0].to(dtype), rtol=0, atol=0, equal_nan=True,
                                   msg=f"{what} {backend}: features")
        reference = oracle if backend == "torch" and dtype == torch.float32 else eager
        within_rule(f"{what} {backend}", got, reference, oracle, dtype)


def check_masked_region_loss(rng, dtype, what):
    # the interpreter's tiles: BLOCK_R 8, BLOCK_K 64
    n_samples, n_regions, dim = rng.randint(1, 4), rng.randint(1, 12), rng.randint(1, 140)
    mask = torch.rand(n_samples, n_regions) < rng.choice([0.0, 1.0, rng.random()])
    selected = mask.nonzero().tolist()
    unselected = (~mask).nonzero().tolist()
    for kind in ("mse", "smooth_l1", "kl"):
        reduction = rng.choice(["mean", "sum", "none"])
        beta = rng.choice([0.0, 0.5, 1.0, 2.0])
        case = f"{what} {kind} {reduction} B={n_samples} R={n_regions} K={dim} beta={beta}"
        pred = torch.randn(n_samples, n_regions, dim) * (4 if kind == "kl" else 1)
        if kind == "kl":
            target = torch.softmax(torch.randn(n_samples, n_regions, dim) * 2, -1)
            target = target * rng.choice([1.0, rng.random() * 3])  # distributions or not
            target[torch.rand(target.shape) < rng.choice([0.0, 0.3])] = 0.0
            if rng.random() < 0.3:
                target[rng.randrange(n_samples), rng.randrange(n_regions), rng.randrange(dim)] = -0.5
        else:
            target = torch.randn(n_samples, n_regions, dim)
        pred, target = pred.to(dtype), target.to(dtype)
        inject(rng, pred, unselected, rng.randint(0, 3))
        inject(rng, target, unselected, rng.randint(0, 3))
        inject(rng, pred, selected, rng.choice([0, 0, 1, 2]))
        if kind != "kl":  # an infinite "probability" is outside even the extended kl contract
            inject(rng, target, selected, rng.choice([0, 0, 1]))
        upstream = torch.randn(n_samples, n_regions) if reduction == "none" else None

        def results(backend, device, p, t):
            return value_and_grads(
                lambda p, t: masked_region_loss(p.to(device), t.to(device), mask.to(device), kind, reduction,
                                                beta=beta, backend=backend).cpu(),
                [p, t], None if upstream is None else upstream.to(torch.float64 if p.dtype == torch.float64
                                                                 else torch.float32),
            )

        oracle = results("torch", "cpu", pred.double(), target.double())
        eager = results("torch", "cpu", pred, target)
        for backend, device in paths(dtype):
            got = eager if backend == "torch" else results(backend, device, pred, target)
            reference = oracle if backend == "torch" and dtype == torch.float32 else eager
            within_rule(f"{case} {backend}", got, reference, oracle, dtype)


@pytest.mark.slow
# every case may inject NaN/Inf (inject): the interpreter's numpy arithmetic on them warns, where the
# GPU computes silently
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case", range(CASES))
def test_random_sweep_every_path_matches_float64(case):
    seed = fresh_seed()
    rng = random.Random(seed)
    dtype = rng.choice(DTYPES)
    what = f"case {case} (seed {seed}) {dtype}"
    check_region_mask(rng, dtype, what)
    check_masked_region_loss(rng, dtype, what)
