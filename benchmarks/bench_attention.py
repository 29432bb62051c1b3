"""Cross-modal attention, forward + backward: mmkernels against what a user would pick instead.

    pytest benchmarks/bench_attention.py --benchmark-only

Providers, each timed on one training step's attention (forward, then the gradients of q, k, v):
- mmkernels: `cross_attention(q, k, v, kv_lens=...)`: padded keys are skipped.
- eager: Hugging Face's eager attention (tests/toolkit.py's `eager_attention`, the tests' baseline):
  matmul → + additive (B, 1, 1, Lk) padding mask → softmax → matmul.
- eager_compiled: the same under torch.compile (CUDA only).
- sdpa: `F.scaled_dot_product_attention` without a mask (computes the padded keys too: the speed a
  mask-free kernel would give, not a correct result for padded batches).
- sdpa_mask: SDPA with the (B, 1, 1, Lk) bool padding mask.
- flex: compiled FlexAttention; the per-batch `create_block_mask` is timed too (new lengths every
  batch). CUDA only.
- varlen: `torch.nn.attention.varlen.varlen_attn` on sequences packed beforehand (the packing is
  not timed). CUDA with fp16/bf16 only, where the installed torch has it.

On CUDA: bf16, the issue's shapes, key lengths drawn uniformly from 25–100% of Lk, plus unpadded
self-attention (CLIP's vision tower). Without CUDA: fp32 on small CPU shapes, with the providers
that run there. extra_info holds the TFLOP/s (FLOPs of the valid (query, key) pairs only: 4·d per
pair forward, for q·kᵀ and p·v, and 8·d backward, for dv, dp, dq and dk; the q·kᵀ that
FlashAttention-style kernels recompute in the backward is not work the step needs, so it is not
counted) and, on CUDA, the peak memory above the inputs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mmkernels.ops.attention import cross_attention
from timing import CUDA, time_step
from toolkit import eager_attention

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32

# (name, B, H, Lq, Lk, d, padded)
SHAPES = (
    [
        ("lxmert_256x12x32x100x64", 256, 12, 32, 100, 64, True),
        ("clip_patches_128x12x77x257x64", 128, 12, 77, 257, 64, True),
        ("long_32x16x512x1024x128", 32, 16, 512, 1024, 128, True),
        ("self_unpadded_128x12x257x257x64", 128, 12, 257, 257, 64, False),
    ]
    if CUDA
    else [
        ("cpu_lxmert_8x4x32x100x64", 8, 4, 32, 100, 64, True),
        ("cpu_self_unpadded_4x4x65x65x64", 4, 4, 65, 65, 64, False),
    ]
)
PROVIDERS = ["mmkernels", "eager", "eager_compiled", "sdpa", "sdpa_mask", "flex", "varlen"]


def make_problem(batch, heads, len_q, len_k, head_dim, padded):
    gen = torch.Generator().manual_seed(0)
    low = math.ceil(0.25 * len_k) if padded else len_k
    kv_lens = torch.randint(low, len_k + 1, (batch,), generator=gen)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(DEVICE, DTYPE) for n in (len_q, len_k, len_k))
    return q, k, v, kv_lens.to(DEVICE)


def step_for(provider, q, k, v, kv_lens, padded):
    """A function running forward + backward once, and the leaves it differentiates."""
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    scale = head_dim**-0.5
    keep = torch.arange(len_k, device=DEVICE)[None, :] < kv_lens[:, None]  # (B, Lk), True = real key
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    if provider == "mmkernels":
        lens = kv_lens if padded else None

        def forward():
            return cross_attention(*leaves, kv_lens=lens)
    elif provider in ("eager", "eager_compiled"):
        if provider == "eager_compiled" and not CUDA:
            pytest.skip("torch.compile of the eager formula is benchmarked on CUDA only")
        additive = torch.zeros(batch, 1, 1, len_k, device=DEVICE, dtype=DTYPE)
        additive = additive.masked_fill(~keep[:, None, None, :], torch.finfo(DTYPE).min) if padded else None
        attend = torch.compile(eager_attention) if provider == "eager_compiled" else eager_attention

        def forward():
            return attend(*leaves, attn_mask=additive, scale=scale)
    elif provider == "sdpa":

        def forward():
            return F.scaled_dot_product_attention(*leaves)
    elif provider == "sdpa_mask":
        if not padded:
            pytest.skip("no padding to mask")
        mask = keep[:, None, None, :]

        def forward():
            return F.scaled_dot_product_attention(*leaves, attn_mask=mask)
    elif provider == "flex":
        if not CUDA:
            pytest.skip("FlexAttention is benchmarked on CUDA only")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            pytest.skip("this torch has no FlexAttention")
        flex = torch.compile(flex_attention)

        def forward():
            if not padded:
                return flex(*leaves)
            block_mask = create_block_mask(
                lambda b, h, q_idx, kv_idx: kv_idx < kv_lens[b], batch, None, len_q, len_k, device=DEVICE
            )
            return flex(*leaves, block_mask=block_mask)
    elif provider == "varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            pytest.skip("this torch has no torch.nn.attention.varlen")
        if not CUDA:
            pytest.skip("varlen_attn runs FlashAttention: CUDA only")
        # Packed inputs: (total tokens, H, d), built outside the timed step.
        q_packed = q.transpose(1, 2).reshape(batch * len_q, heads, head_dim)
        k_packed = torch.cat([k[b, :, : kv_lens[b]].transpose(0, 1) for b in range(batch)])
        v_packed = torch.cat([v[b, :, : kv_lens[b]].transpose(0, 1) for b in range(batch)])
        leaves = [t.contiguous().requires_grad_() for t in (q_packed, k_packed, v_packed)]
        zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        cu_seq_q = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * len_q
        cu_seq_k = torch.cat([zero, kv_lens.cumsum(0).to(torch.int32)])

        def forward():
            return varlen_attn(*leaves, cu_seq_q, cu_seq_k, len_q, len_k)
    else:
        raise ValueError(f"unknown provider {provider!r}")

    def step():
        out = forward()
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_fwd_bwd(benchmark, shape, provider):
    name, batch, heads, len_q, len_k, head_dim, padded = shape
    q, k, v, kv_lens = make_problem(batch, heads, len_q, len_k, head_dim, padded)
    step = step_for(provider, q, k, v, kv_lens, padded)
    seconds = time_step(benchmark, step, name)

    valid_pairs = heads * len_q * int(kv_lens.sum())
    flops = (4 + 8) * head_dim * valid_pairs
    benchmark.extra_info.update(
        provider=provider,
        shape=dict(B=batch, H=heads, Lq=len_q, Lk=len_k, d=head_dim),
        dtype=str(DTYPE),
        key_fraction=round(int(kv_lens.sum()) / (batch * len_k), 3),
        tflops=flops / seconds / 1e12,
    )
