"""A random sweep of clip_loss and siglip_loss: both paths (the kernels, under the interpreter on
the CPU, and the CPU reference path) against the float64 oracle under the numerics rule (docs/design.md), over random
N, D, dtype, normalize, label smoothing, logit scale and bias, workspace, and NaN/Inf injection.

Slow-marked; CI runs MMKERNELS_SWEEP_CASES cases (default 20), each with a fresh seed printed on
failure (replay one with MMKERNELS_TEST_SEED=<seed>).
"""
import math
import os
import warnings

import pytest
import torch

import mmkernels
from contrastive_oracle import check_clip, check_siglip
from mmkernels.ops.contrastive import plan
from toolkit import fresh_seed, value_and_grads

CASES = int(os.environ.get("MMKERNELS_SWEEP_CASES", "20"))


def _draw(gen: torch.Generator, device, kernels_path: bool) -> dict:
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=gen).item()

    def pick(options):
        return options[torch.randint(len(options), (), generator=gen).item()]

    if kernels_path:
        dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    else:
        dtypes = [torch.float32, torch.bfloat16]
    case = dict(
        loss=pick(["clip", "siglip"]),
        n=pick([1, 2, 3, 7, 64, 65]) if torch.rand((), generator=gen) < 0.3 else int(uniform(1, 150)),
        d=pick([1, 3, 16, 64, 65]) if torch.rand((), generator=gen) < 0.3 else int(uniform(1, 96)),
        dtype=pick(dtypes),
        normalize=pick([False, True]),
        smoothing=pick([0.0, uniform(0.0, 1.0)]),
        scale=math.exp(uniform(-1.0, 4.0)),
        bias=uniform(-10.0, 2.0),
        one_block_workspace=torch.rand((), generator=gen).item() < 0.3,
        poison=pick([None, None, None, float("nan"), float("inf"), float("-inf")]),
    )
    if case["normalize"] is False:  # keep un-normalised logits in a range that fp16 eager can hold
        case["scale"] = min(case["scale"], 30.0 / math.sqrt(case["d"]))
    return case


@pytest.mark.slow
@pytest.mark.parametrize("case_index", range(CASES))
def test_random_case_against_float64(case_index, kernel_path):
    path, device = kernel_path
    gen = torch.Generator().manual_seed(fresh_seed())
    case = _draw(gen, device, path == "kernels")
    n, d, dtype = case["n"], case["d"], case["dtype"]
    a = torch.randn(n, d, generator=gen).to(dtype).to(device)
    b = torch.randn(n, d, generator=gen).to(dtype).to(device)
    leaves = [a, b, torch.tensor(case["scale"], device=device), torch.tensor(case["bias"], device=device)]
    kw = {}
    if case["one_block_workspace"] and path == "kernels":
        block = plan.tile_config(d, dtype, device)["BLOCK_M"]
        kw["workspace_bytes"] = max(plan.stats_panel_bytes(min(block, n), n, d, dtype, device),
                                    plan.panel_bytes(min(block, n), n, d, dtype, device, True, True, dtype))
    if case["loss"] == "clip":
        def ours(x, y, s):
            return mmkernels.clip_loss(x, y, s, normalize=case["normalize"], label_smoothing=case["smoothing"], **kw)
        leaves = leaves[:3]
    else:
        def ours(x, y, s, c):
            return mmkernels.siglip_loss(x, y, s, c, normalize=case["normalize"], **kw)
    if case["poison"] is not None:
        where = torch.randint(n * d, (), generator=gen).item()
        target = leaves[torch.randint(2, (), generator=gen).item()]
        target.view(-1)[where] = case["poison"]
        with warnings.catch_warnings():
            # the NaN/Inf makes the interpreter's numpy arithmetic warn, where the GPU computes silently
            warnings.simplefilter("ignore", RuntimeWarning)
            loss = ours(*leaves)
        assert torch.isnan(loss), f"{case}: a non-finite input gave {loss}"
        return
    got = value_and_grads(ours, leaves)
    what = f"sweep {path} {case}"
    if case["loss"] == "clip":
        check_clip(got, leaves, dtype, what, case["normalize"], case["smoothing"])
    else:
        check_siglip(got, leaves, dtype, what, case["normalize"])

