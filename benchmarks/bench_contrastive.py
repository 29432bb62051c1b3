"""Contrastive losses, forward + backward: mmkernels against what a user would run instead.

    pytest benchmarks/bench_contrastive.py --benchmark-only
    MMKERNELS_BENCH_HUGE=1 pytest benchmarks/bench_contrastive.py --benchmark-only -k huge   # N = 2^20

Providers, each timed on one training step's loss (forward, then the gradients of both embeddings
and of the learnable log logit scale, and of logit_bias for SigLIP), for CLIP, SigLIP and the
one-directional InfoNCE (BridgeTower's contrastive terms):
- mmkernels: `mmkernels.clip_loss` / `siglip_loss` / `info_nce_loss` (no N×N logits; default 256 MiB workspace).
- eager: the formula Hugging Face (`CLIPModel`, `SiglipModel`, `BridgeTowerForContrastiveLearning`) and
  open_clip (`ClipLoss`) run, from tests/toolkit.py: the full N×N logit matrix, then cross-entropy over
  rows and columns (InfoNCE: rows only, `F.cross_entropy(scale · q @ k.T, arange(N))`), or log-sigmoid.
- compile: `torch.compile` of eager (CUDA only).
- siglip-kernel (SigLIP) and memeff (CLIP): the public peers, where they import (`pip install
  siglip-kernel memeff`; skipped otherwise). memeff's loss has a fixed temperature (no logit_scale
  gradient) and is given normalised inputs, as it assumes; it is timed on what it computes.

On CUDA: bf16, N in {4096, 16384, 32768, 65536} × D in {512, 768} (the goals: CLIP at N = 32768,
D = 768; SigLIP at N = 65536, D = 768). Without CUDA: fp32 at small sizes, where mmkernels takes its
PyTorch reference path. extra_info holds TFLOP/s counted as 6·N²·D for every provider (the forward's
and the two gradients' matrix products: the work the loss needs) and, on CUDA, the peak memory above
the inputs in MiB. A provider that runs out of memory is reported as skipped.

The opt-in huge run (MMKERNELS_BENCH_HUGE=1, CUDA): N = 1,048,576, D = 512, bf16, mmkernels only,
6·N²·D = 3.4·10^15 FLOP. Its extra memory beyond the 2 GiB of inputs: the 2 GiB of gradients, the
2 GiB fp32 text-gradient accumulator, O(N) statistics, and a 2 GiB workspace (passed as
workspace_bytes: one 128-row panel of W needs 128 · N · 2 bytes = 256 MiB, just over the default);
the measured peak is in extra_info.
"""
import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from timing import CUDA, time_step
from toolkit import eager_clip_loss, eager_info_nce_loss, eager_siglip_loss

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SIZES = [(n, d) for n in (4096, 16384, 32768, 65536) for d in (512, 768)] if CUDA else [(256, 64), (1024, 128)]
PROVIDERS = ["mmkernels", "eager", "compile", "siglip-kernel", "memeff"]
LOSSES = ["clip", "siglip", "info_nce"]
OURS = {"clip": mmkernels.clip_loss, "siglip": mmkernels.siglip_loss, "info_nce": mmkernels.info_nce_loss}
EAGER = {"clip": eager_clip_loss, "siglip": eager_siglip_loss, "info_nce": eager_info_nce_loss}
SCALE, BIAS = 14.3, -10.0
HUGE_N, HUGE_D, HUGE_WORKSPACE = 2**20, 512, 2 * 2**30


def _peer(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} is not installed")


def _provider(provider: str, loss_name: str):
    """A function of the leaves [image, text, log_scale, (bias)] that returns the loss."""
    if provider == "siglip-kernel":
        if loss_name != "siglip":
            pytest.skip("siglip-kernel computes SigLIP only")
        fused = _peer("siglip_kernel").fused_siglip_loss
        return lambda a, b, log_scale, bias: fused(a, b, log_scale, bias)
    if provider == "memeff":
        if loss_name != "clip":
            pytest.skip("memeff computes CLIP only")
        loss = _peer("memeff").MemoryEfficientCLIPLoss(temperature=1 / SCALE, normalized_inputs=True)
        return lambda a, b, log_scale: loss(a, b)
    if provider == "compile" and not CUDA:
        pytest.skip("torch.compile is benchmarked on CUDA only")
    fn = (OURS if provider == "mmkernels" else EAGER)[loss_name]

    def loss(a, b, log_scale, *bias):  # bias: SigLIP's only
        return fn(a, b, log_scale.exp(), *bias)
    return torch.compile(loss) if provider == "compile" else loss


def _leaves(loss_name: str, n: int, d: int):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    image = F.normalize(torch.randn(n, d, device=DEVICE, generator=gen), dim=-1).to(DTYPE).requires_grad_()
    text = F.normalize(torch.randn(n, d, device=DEVICE, generator=gen), dim=-1).to(DTYPE).requires_grad_()
    leaves = [image, text, torch.tensor(math.log(SCALE), device=DEVICE, requires_grad=True)]
    if loss_name == "siglip":
        leaves.append(torch.tensor(BIAS, device=DEVICE, requires_grad=True))
    return leaves


def _step(loss_fn, leaves):
    def run():
        loss = loss_fn(*leaves)
        return torch.autograd.grad(loss, leaves, allow_unused=True)
    return run


def _record(benchmark, provider, n, d, seconds, **extra):
    benchmark.extra_info.update(provider=provider, dtype=str(DTYPE), n=n, d=d,
                                tflops=6 * n * n * d / seconds / 1e12, **extra)


@pytest.mark.parametrize("n,d", SIZES, ids=[f"N{n}-D{d}" for n, d in SIZES])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_contrastive_loss_fwd_bwd(benchmark, loss_name, provider, n, d):
    loss_fn = _provider(provider, loss_name)
    leaves = _leaves(loss_name, n, d)
    try:
        seconds = time_step(benchmark, _step(loss_fn, leaves), f"{loss_name}-N{n}-D{d}", rounds=10)
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} ran out of GPU memory at N={n}, D={d}")
    _record(benchmark, provider, n, d, seconds)


@pytest.mark.skipif(not CUDA or os.environ.get("MMKERNELS_BENCH_HUGE") != "1",
                    reason="opt-in (MMKERNELS_BENCH_HUGE=1), CUDA only: N = 1,048,576 takes seconds a step")
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_contrastive_loss_huge(benchmark, loss_name):
    fn = mmkernels.clip_loss if loss_name == "clip" else mmkernels.siglip_loss
    leaves = _leaves(loss_name, HUGE_N, HUGE_D)

    def loss_fn(a, b, log_scale, *bias):
        return fn(a, b, log_scale.exp(), *bias, workspace_bytes=HUGE_WORKSPACE)

    seconds = time_step(benchmark, _step(loss_fn, leaves), f"{loss_name}-huge", rounds=1)
    _record(benchmark, "mmkernels", HUGE_N, HUGE_D, seconds, workspace_bytes=HUGE_WORKSPACE)
