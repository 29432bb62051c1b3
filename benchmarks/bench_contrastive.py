"""Contrastive losses, forward + backward: mmkernels against what a user would run instead.

    pytest benchmarks/bench_contrastive.py --benchmark-only

Providers, each timed on one training step's loss (forward, then the gradients of both embeddings
and of logit_scale, and of logit_bias for SigLIP):
- mmkernels: `mmkernels.clip_loss` / `mmkernels.siglip_loss` (no N×N logits).
- eager: the formula Hugging Face (`CLIPModel`, `SiglipModel`) and open_clip (`ClipLoss`) run:
  the full N×N logit matrix, then cross-entropy over rows and columns (or log-sigmoid).
- compile: `torch.compile` of eager (CUDA only).

On CUDA: bf16, N in {4096, 16384, 32768, 65536} × D in {512, 768}. Without CUDA: fp32 at small
sizes, where mmkernels takes its PyTorch reference path. extra_info holds TFLOP/s (6·N²·D: the
forward's and the two gradients' matrix products, the work the loss needs) and, on CUDA, the peak
memory above the inputs in MiB. A provider that runs out of memory is reported as skipped.
"""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from timing import CUDA, time_step

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SIZES = [(n, d) for n in (4096, 16384, 32768, 65536) for d in (512, 768)] if CUDA else [(256, 64), (1024, 128)]
PROVIDERS = ["mmkernels", "eager", "compile"]


def eager_clip(image_emb, text_emb, logit_scale):
    logits = logit_scale * image_emb @ text_emb.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def eager_siglip(image_emb, text_emb, logit_scale, logit_bias):
    logits = logit_scale * image_emb @ text_emb.T + logit_bias
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


LOSSES = {
    "clip": (mmkernels.clip_loss, eager_clip),
    "siglip": (mmkernels.siglip_loss, eager_siglip),
}


def _step(loss_fn, leaves):
    def run():
        loss = loss_fn(*leaves)
        return torch.autograd.grad(loss, leaves)
    return run


@pytest.mark.parametrize("n,d", SIZES, ids=[f"N{n}-D{d}" for n, d in SIZES])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_contrastive_loss_fwd_bwd(benchmark, loss_name, provider, n, d):
    if provider == "compile" and not CUDA:
        pytest.skip("torch.compile is benchmarked on CUDA only")
    ours, eager = LOSSES[loss_name]
    fn = {"mmkernels": ours, "eager": eager}.get(provider) or torch.compile(eager)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    image = F.normalize(torch.randn(n, d, device=DEVICE, generator=gen), dim=-1).to(DTYPE).requires_grad_()
    text = F.normalize(torch.randn(n, d, device=DEVICE, generator=gen), dim=-1).to(DTYPE).requires_grad_()
    scale = torch.tensor(14.3, device=DEVICE, requires_grad=True)
    leaves = [image, text, scale]
    if loss_name == "siglip":
        leaves.append(torch.tensor(-10.0, device=DEVICE, requires_grad=True))
    step = _step(fn, leaves)
    try:
        seconds = time_step(benchmark, step, f"{loss_name}-N{n}-D{d}", rounds=10)
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} ran out of GPU memory at N={n}, D={d}")
    benchmark.extra_info.update(provider=provider, dtype=str(DTYPE), tflops=6 * n * n * d / seconds / 1e12)
