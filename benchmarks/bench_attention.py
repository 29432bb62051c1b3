"""Cross-modal attention, forward + backward: mmkernels against what a user would pick instead.

    pytest benchmarks/bench_attention.py --benchmark-only

The cases and providers are mmkernels.bench's (mmkernels/bench/cases.py and steps.py; `python -m
mmkernels.bench --ops attention` runs the same and writes the report): B·H fixed, Lq = Lk = L, a
fraction `padding` of the keys padded (per-sample key lengths evenly spread). Each provider is timed
on one training step's attention (forward, then the gradients of q, k, v):
- mmkernels: `cross_attention(q, k, v, kv_lens=...)`: padded keys are skipped.
- eager: Hugging Face's eager attention (mmkernels/testing.py): matmul → + additive
  (B, 1, 1, Lk) padding mask → softmax → matmul; torch.compile: the same, compiled.
- sdpa: `F.scaled_dot_product_attention` with the (B, 1, 1, Lk) bool padding mask (none unpadded).
- flex: compiled FlexAttention; the per-batch `create_block_mask` is timed too (new lengths every
  batch). CUDA only (no backward on the CPU).
- varlen: `torch.nn.attention.varlen.varlen_attn` on sequences packed beforehand (the packing is
  not timed). CUDA only, where the installed torch has it.

extra_info holds the TFLOP/s (FLOPs of the valid (query, key) pairs only: 4·d per pair forward, for
q·kᵀ and p·v, and 8·d backward, for dv, dp, dq and dk; the q·kᵀ that FlashAttention-style kernels
recompute in the backward is not work the step needs, so it is not counted) and the peak memory
above the inputs.
"""
import os

import pytest

from mmkernels.bench.cases import cases_for, run_case

MODE = os.environ.get("MMKERNELS_BENCH_MODE", "full")
SELECTED = [(case, provider) for case in cases_for(MODE, ["attention"]) for provider in case.providers]


@pytest.mark.parametrize("case,provider", SELECTED, ids=[f"{case.id}-{provider}" for case, provider in SELECTED])
def test_attention_fwd_bwd(benchmark, case, provider):
    run_case(benchmark, case, provider, MODE)
