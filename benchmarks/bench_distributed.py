"""One rank's share of a multi-GPU contrastive loss, forward + backward, at M = N / 8 (8 ranks):
the block-row kernels that mmkernels.distributed runs against what open_clip runs on each rank.

    pytest benchmarks/bench_distributed.py --benchmark-only

A single GPU cannot show scaling; this times the compute one of 8 ranks does for a global batch of
N pairs (its M = N / 8 local pairs against all N), the communication aside. Providers:
- mmkernels: the block-row API as mmkernels.distributed calls it. CLIP: clip_block_stats, the
  column statistics of 8 blocks merged (merge_column_stats), clip_block_grads (image rows and the
  partial text gradient). SigLIP: siglip_block with both gradients. No M × N block is stored.
- mmkernels_ring: what one rank computes in mode="ring". SigLIP (siglip_loss): 8 siglip_block calls
  of M × M (its own texts with their positives, 7 others' without), the image gradient summed and
  each block's text gradient scaled, as the ring does between its messages. CLIP (clip_loss): its
  two passes, 8 statistics blocks of M × M (the rows' statistics folded by log-add-exp, each
  block's column statistics merged with another's, as the ring does on the way home), then 8
  gradient blocks against each block's column log-sum-exps, the image gradient summed. The messages
  are not there: a single GPU cannot show the ring's overlap of communication with compute, only
  what computing in 8 blocks of M columns costs against one block of N = 8·M columns.
- open_clip: open_clip's per-rank loss with local_loss=True on features already gathered (CLIP:
  the local images against all N texts and the local texts against all N images; SigLIP: the
  local images against all N texts), autograd through the M × N logit blocks, the gradients of
  the local and of the gathered features (what gather_with_grad sends back).
- compile: torch.compile of open_clip (CUDA only).

On CUDA: bf16, global N in {32768, 65536}, D = 768. Without CUDA: fp32 at small sizes (the
reference path). extra_info: TFLOP/s counted as 6·M·N·D (the block's three products: its logits
and the two gradient products), and on CUDA the peak memory above the inputs in MiB.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from mmkernels.ops import contrastive as blocks
from mmkernels.bench.timing import CUDA, measure

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
RANKS = 8
SIZES = [(n, 768) for n in (32768, 65536)] if CUDA else [(1024, 64)]
PROVIDERS = ["mmkernels", "mmkernels_ring", "open_clip", "compile"]


def mmkernels_clip(image, text_all, scale, offset):
    stats = blocks.clip_block_stats(image, text_all, scale, offset=offset, normalize=False)
    # The other 7 ranks' column statistics arrive by all_gather; merging 8 rows costs O(8·N).
    col_lse = blocks.merge_column_stats(stats.col_max.expand(RANKS, -1), stats.col_sumexp.expand(RANKS, -1))
    return blocks.clip_block_grads(image, text_all, scale, stats.row_lse, col_lse, offset=offset,
                                   n_total=text_all.shape[0], label_smoothing=0.0, normalize=False,
                                   image_grad=True, text_grad=True)


def mmkernels_siglip(image, text_all, scale, bias, offset):
    return blocks.siglip_block(image, text_all, scale, bias, offset=offset, n_total=text_all.shape[0],
                               normalize=False, image_grad=True, text_grad=True)


def mmkernels_siglip_ring(image, text_all, scale, bias, rank):
    m, n = image.shape[0], text_all.shape[0]
    image_grad = None
    for step in range(RANKS):  # the ring's order: own texts first, then rank - 1, rank - 2, ...
        q = (rank - step) % RANKS
        part = blocks.siglip_block(image, text_all[q * m: (q + 1) * m], scale, bias, offset=0 if q == rank else None,
                                   n_total=n, normalize=False, image_grad=True, text_grad=True)
        image_grad = part.image_grad if image_grad is None else image_grad.add_(part.image_grad)
        part.text_grad.mul_(RANKS)
    return image_grad


def mmkernels_clip_ring(image, text_all, scale, rank):
    m, n = image.shape[0], text_all.shape[0]
    workspace = blocks.resolve_workspace_bytes(None)
    order = [(rank - step) % RANKS for step in range(RANKS)]  # the ring's: own texts first, then rank - 1, ...
    row_lse, col_lse = None, {}
    for q in order:
        stats = blocks.clip_block_stats_unchecked(image, text_all[q * m: (q + 1) * m], scale, 0 if q == rank else None,
                                                  False, workspace)
        row_lse = stats.row_lse if row_lse is None else torch.logaddexp(row_lse, stats.row_lse)
        # The ring merges each block's column statistics with those arriving; here with themselves.
        col_lse[q] = blocks.merge_column_stats(torch.stack([stats.col_max] * 2), torch.stack([stats.col_sumexp] * 2))
    image_grad, one = None, torch.ones((), device=image.device)
    for q in order:
        part = blocks.clip_block_grads_unchecked(image, text_all[q * m: (q + 1) * m], scale, row_lse, col_lse[q],
                                                 0 if q == rank else None, n, 0.0, False, True, True, one, workspace)
        image_grad = part.image_grad if image_grad is None else image_grad.add_(part.image_grad)
        part.text_grad.mul_(RANKS)
    return image_grad


def open_clip_clip(image, text, image_all, text_all, scale, offset):
    labels = torch.arange(image.shape[0], device=image.device) + offset
    per_image = scale * image @ text_all.T
    per_text = scale * text @ image_all.T
    loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    return torch.autograd.grad(loss, (image, text, image_all, text_all, scale))


def open_clip_siglip(image, text_all, scale, bias, offset):
    logits = scale * image @ text_all.T + bias
    m = image.shape[0]
    labels = -torch.ones_like(logits)
    labels[torch.arange(m, device=logits.device), offset + torch.arange(m, device=logits.device)] = 1
    loss = -F.logsigmoid(labels * logits).sum() / m
    return torch.autograd.grad(loss, (image, text_all, scale, bias))


@pytest.mark.parametrize("n,d", SIZES, ids=[f"N{n}-M{n // RANKS}-D{d}" for n, d in SIZES])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_one_rank_of_eight_fwd_bwd(benchmark, loss_name, provider, n, d):
    if provider == "compile" and not CUDA:
        pytest.skip("torch.compile is benchmarked on CUDA only")
    m = n // RANKS
    offset = 3 * m  # rank 3 of 8
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def features():
        return F.normalize(torch.randn(n, d, device=DEVICE, generator=gen), dim=-1).to(DTYPE)

    image_all, text_all = features(), features()
    image = image_all[offset: offset + m].clone()
    text = text_all[offset: offset + m].clone()
    scale = torch.tensor(14.3, device=DEVICE)
    bias = torch.tensor(-10.0, device=DEVICE)
    if provider == "mmkernels":
        step = ((lambda: mmkernels_clip(image, text_all, scale, offset)) if loss_name == "clip"
                else (lambda: mmkernels_siglip(image, text_all, scale, bias, offset)))
    elif provider == "mmkernels_ring":
        step = (functools.partial(mmkernels_clip_ring, image, text_all, scale, offset // m) if loss_name == "clip"
                else functools.partial(mmkernels_siglip_ring, image, text_all, scale, bias, offset // m))
    else:
        fn = open_clip_clip if loss_name == "clip" else open_clip_siglip
        fn = torch.compile(fn) if provider == "compile" else fn
        leaves = [t.requires_grad_() for t in (image, text, image_all, text_all, scale, bias)]
        image, text, image_all, text_all, scale, bias = leaves
        step = ((lambda: fn(image, text, image_all, text_all, scale, offset)) if loss_name == "clip"
                else (lambda: fn(image, text_all, scale, bias, offset)))
    try:
        measured = measure(benchmark, step, DEVICE, rounds=10 if CUDA else 3, warmup_rounds=3 if CUDA else 1,
                           group=f"{loss_name}-rank-of-{RANKS}-N{n}-D{d}", memory=CUDA)
        seconds = measured.ms[0] / 1e3
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} ran out of GPU memory at N={n}, M={m}, D={d}")
    benchmark.extra_info.update(provider=provider, dtype=str(DTYPE), n=n, m=m, d=d,
                                tflops=6 * m * n * d / seconds / 1e12)
