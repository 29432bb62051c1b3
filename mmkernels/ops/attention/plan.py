"""How `cross_attention`'s kernels are tiled and launched: block sizes, the autotune candidates by
kernel, target, dtype and head dim, the autotuning keys, and the launch grids."""
from __future__ import annotations

import torch

from mmkernels.ops._common import triton


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_d(head_dim: int) -> int:
    return max(16, _next_power_of_2(head_dim))


def _length_bucket(n: int) -> int:
    """Autotuning key for a length: its power-of-two ceiling (capped), so that batches of
    slightly different lengths share one tuned config."""
    return min(_next_power_of_2(max(n, 1)), 4096)


# Under the interpreter every block costs Python time: small fixed blocks, no autotuning.
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of the CUDA autotuner, by kernel, target and
# padded head dim ("small": 16, 32 and 64). Each one compiles with ptxas for its target without a
# register spill at head dims 16, 32, 64, 96, 128, 200 and 256 in the variants checked (no flag;
# lengths, key padding, an additive mask, causal and dropout; the same with a bool mask; fp16 also
# without dropout), and fits the target's shared memory (sm_80: 163 KiB, sm_90: 227 KiB). ptxas
# trades a few bytes of spill for a register count at an occupancy step where it sees fit, so a
# variant not checked can still spill a little (the project's compile check compiles every variant
# the launcher can pick; float64 masks reach the kernels as fp32).
# On sm_90 the products' M side (BLOCK_M in the forward and dq passes, BLOCK_N in the dk/dv pass,
# whose products are in (key, query) orientation) is a multiple of 64 and num_warps a multiple of
# 4, so that fp16/bf16 products are warpgroup MMAs (wgmma), except at d = 256 (see
# _SM90_CANDIDATES).
_SM80_CANDIDATES = {
    "fwd": {
        "small": [(64, 32, 4, 3)],
        128: [(64, 32, 8, 3, 168)],
        256: [(32, 16, 4, 2)],
    },
    "dq": {
        "small": [(32, 32, 4, 3)],
        128: [(64, 32, 8, 3)],
        256: [(32, 16, 4, 2), (32, 16, 8, 2)],
    },
    "dkdv": {
        "small": [(16, 64, 4, 2)],
        128: [(16, 64, 8, 3)],
        256: [(16, 32, 8, 2), (32, 32, 8, 2)],
    },
}
# At d = 256 every warpgroup tile tried on sm_90 (64 or 128 rows, 4 or 8 warps, 1 or 2 stages)
# spills: the 64 x 256 fp32 accumulator of p·v, kept live by the asynchronous wgmma while the next
# block's scores, masks and dropout bits are computed, leaves too few of the 255 registers. That
# head dim runs 32-row tiles there (mma.sync); the compile check reads this set.
SM90_MMA_SYNC_HEAD_DIMS = frozenset({256})
_SM90_CANDIDATES = {
    "fwd": {
        "small": [(64, 32, 4, 3), (128, 32, 8, 3)],
        128: [(64, 32, 8, 3)],
        256: [(32, 16, 4, 2)],
    },
    "dq": {
        "small": [(64, 32, 4, 3), (128, 32, 8, 3)],
        128: [(128, 16, 8, 3), (64, 16, 4, 3)],
        256: [(32, 16, 8, 2)],
    },
    "dkdv": {
        "small": [(16, 64, 4, 3), (32, 128, 8, 3)],
        128: [(16, 64, 8, 3)],
        256: [(16, 16, 4, 2), (16, 32, 8, 2)],
    },
}
# fp32 runs DOT_PRECISION="ieee": FMA products, as accurate as eager fp32 (tf32 products would not
# meet the numerics rule, an error at most 2x eager fp32's against float64). An FMA product holds
# each thread's rows and columns of both operands over the whole head dim in registers, so only
# small tiles compile without spills (8 warps share a 16 x 16 tile where the head dim needs it); the same ones
# on every target. Left to itself ptxas caps some of these at 80 or 128 registers and spills a few
# bytes (an occupancy step it aims at); the fifth entry, `maxnreg` = 255, lifts that cap (a lower
# explicit cap, 128 or 168, spills more).
_FP32_CANDIDATES = {
    "fwd": {
        "small": [(16, 16, 4, 2, 255), (32, 16, 4, 2, 255)],
        128: [(16, 16, 8, 2, 255)],
        256: [(16, 16, 8, 2, 255)],
    },
    "dq": {
        "small": [(16, 16, 4, 2, 255)],
        128: [(16, 16, 8, 2, 255)],
        256: [(16, 16, 8, 2, 255)],
    },
    "dkdv": {
        "small": [(16, 16, 8, 2, 255)],
        128: [(16, 16, 4, 1, 255)],
        256: [(16, 16, 8, 1, 255)],
    },
}
_TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "HAS_KV_LENS", "HAS_Q_LENS", "HAS_KPM", "MASK_KIND",
             "IS_CAUSAL", "HAS_DROPOUT"]
# The backward passes' variants (which gradients they compute) are tuned apart.
_EXTRA_TUNE_KEY = {"fwd": [], "dq": ["COMPUTE_DQ"], "dkdv": ["COMPUTE_DK", "COMPUTE_DV"]}


def _group(block_d: int):
    return block_d if block_d >= 128 else "small"


def _candidate_tables(dtype: torch.dtype, capability: tuple[int, int]) -> dict:
    if dtype == torch.float32:
        return _FP32_CANDIDATES
    return _SM90_CANDIDATES if capability[0] >= 9 else _SM80_CANDIDATES


def attention_candidates(kernel: str, block_d: int, dtype: torch.dtype,
                         capability: tuple[int, int]) -> list[tuple[int, ...]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) configs that the CUDA autotuner tries for one of
    the kernels ("fwd", "dq" or "dkdv") at a padded head dim (BLOCK_D: 16, 32, 64, 128 or 256), an
    input dtype and a device's compute capability, e.g. (9, 0). Capabilities below 9 take the
    sm_80 list, 9 and above the sm_90 one (devices with less shared memory than the A100 skip the
    configs that do not fit, as the autotuner skips any that fail to launch)."""
    return list(_candidate_tables(dtype, capability)[kernel][_group(block_d)])


def _shape_of(config) -> tuple:
    shape = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    return shape + ((config.maxnreg,) if config.maxnreg is not None else ())


def _config(shape: tuple):
    """A candidate (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) as a triton.Config."""
    block_m, block_n, warps, stages, *maxnreg = shape
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg[0] if maxnreg else None)


def _candidates_for(kernel: str, capability: tuple[int, int]):
    """Every config that `attention_candidates` lists for the kernel on this capability, and a
    pruner keeping those of the call's head dim and dtype whose blocks do not exceed the
    (power-of-two) lengths, or else the smallest of them."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        group = set(attention_candidates(kernel, args["BLOCK_D"], args["Q"].dtype, capability))
        candidates = [c for c in configs if _shape_of(c) in group]
        fitting = [
            c for c in candidates
            if c.kwargs["BLOCK_M"] <= max(args["LQ_BUCKET"], 16) and c.kwargs["BLOCK_N"] <= max(args["LK_BUCKET"], 16)
        ]
        return fitting or [min(candidates, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    shapes = sorted({
        shape
        for dtype in (torch.float16, torch.float32)
        for group in _candidate_tables(dtype, capability)[kernel].values()
        for shape in group
    })
    configs = [_config(shape) for shape in shapes]
    return configs, prune


def _grid(length: int, block: str, batch: int, heads: int):
    """The launch grid of a kernel whose programs each take `block` rows of `length`: one axis of
    n_blocks · B · H programs (axes 1 and 2 are capped at 65535 on CUDA; axis 0 at 2^31 - 1)."""
    return lambda meta: (triton.cdiv(length, meta[block]) * batch * heads,)
