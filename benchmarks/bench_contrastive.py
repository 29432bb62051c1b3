"""Contrastive losses, forward + backward: mmkernels against what a user would run instead.

    pytest benchmarks/bench_contrastive.py --benchmark-only
    MMKERNELS_BENCH_HUGE=1 pytest benchmarks/bench_contrastive.py --benchmark-only -k huge   # N = 2^20

The cases and providers are mmkernels.bench's (mmkernels/bench/cases.py and steps.py; `python -m
mmkernels.bench --ops contrastive` runs the same and writes the report). Each provider is timed on
one training step's loss (forward, then the gradients of both embeddings and of the learnable log
logit scale, and of logit_bias for SigLIP), for CLIP, SigLIP and the one-directional InfoNCE
(BridgeTower's contrastive terms):
- mmkernels: `mmkernels.clip_loss` / `siglip_loss` / `info_nce_loss` (no N×N logits; default 256 MiB workspace).
- eager: the formula Hugging Face (`CLIPModel`, `SiglipModel`, `BridgeTowerForContrastiveLearning`) and
  open_clip (`ClipLoss`) run (mmkernels/testing.py): the full N×N logit matrix, then
  cross-entropy over rows and columns (InfoNCE: rows only), or log-sigmoid.
- torch.compile: of eager.
- siglip-kernel (SigLIP), memeff (CLIP) and inf-cl (CLIP, InfoNCE): the public peers, where they import
  (skipped with the reason otherwise). memeff's loss has a fixed temperature (no logit_scale gradient)
  and is given normalised inputs, as it assumes; it is timed on what it computes.

extra_info holds TFLOP/s counted as 6·N²·D for every provider (the forward's and the two gradients'
matrix products: the work the loss needs) and the peak memory above the inputs in MiB. A provider
that runs out of memory is reported as skipped.

The opt-in huge run (MMKERNELS_BENCH_HUGE=1, CUDA): N = 1,048,576, D = 512, bf16, mmkernels only,
6·N²·D = 3.4·10^15 FLOP. Its extra memory beyond the 2 GiB of inputs: the 2 GiB of gradients, the
2 GiB fp32 text-gradient accumulator, O(N) statistics, and a 2 GiB workspace (passed as
workspace_bytes: one 128-row panel of W needs 128 · N · 2 bytes = 256 MiB, just over the default);
the measured peak is in extra_info.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.bench.cases import cases_for, run_case
from mmkernels.bench.timing import CUDA, measure

MODE = os.environ.get("MMKERNELS_BENCH_MODE", "full")
SELECTED = [(case, provider) for case in cases_for(MODE, ["contrastive"]) for provider in case.providers]
HUGE_N, HUGE_D, HUGE_WORKSPACE = 2**20, 512, 2 * 2**30


@pytest.mark.parametrize("case,provider", SELECTED, ids=[f"{case.id}-{provider}" for case, provider in SELECTED])
def test_contrastive_loss_fwd_bwd(benchmark, case, provider):
    run_case(benchmark, case, provider, MODE)


@pytest.mark.skipif(not CUDA or os.environ.get("MMKERNELS_BENCH_HUGE") != "1",
                    reason="opt-in (MMKERNELS_BENCH_HUGE=1), CUDA only: N = 1,048,576 takes seconds a step")
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_contrastive_loss_huge(benchmark, loss_name):
    fn = mmkernels.clip_loss if loss_name == "clip" else mmkernels.siglip_loss
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    leaves = [F.normalize(torch.randn(HUGE_N, HUGE_D, device=device, generator=gen), dim=-1).bfloat16().requires_grad_()
              for _ in range(2)]
    leaves.append(torch.tensor(math.log(14.3), device=device, requires_grad=True))
    if loss_name == "siglip":
        leaves.append(torch.tensor(-10.0, device=device, requires_grad=True))

    def step():
        loss = fn(leaves[0], leaves[1], leaves[2].exp(), *leaves[3:], workspace_bytes=HUGE_WORKSPACE)
        return torch.autograd.grad(loss, leaves)

    measured = measure(benchmark, step, device, rounds=1, group=f"{loss_name}-huge")
    benchmark.extra_info.update(provider="mmkernels", dtype="bfloat16", n=HUGE_N, d=HUGE_D,
                                workspace_bytes=HUGE_WORKSPACE, tflops=6 * HUGE_N**2 * HUGE_D / measured.ms[0] / 1e9)
