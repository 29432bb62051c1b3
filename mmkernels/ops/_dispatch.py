"""Which implementation runs a call: one decision for every op.

Every op takes one of three implementations, chosen once per call before any allocation by
`resolve_backend(op, backend, x)`:

- "torch": the plain-PyTorch reference (each family's reference.py), any device and dtype.
- "triton": the Triton kernels, on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1
  (float32 and float16 only there: the interpreter reads bfloat16 as raw integers and has no bf16
  dot or atomics, see `triton_enabled`).
- "cuda": the CUDA C++ kernels of csrc/ (mmkernels._C, see _extension.py), for the ops that have
  them (the region ops).

`backend="auto"` (the only choice the contrastive and attention ops offer) takes, for CUDA tensors
in a kernel dtype, AUTO_CUDA_BACKEND[op] where the op has CUDA C++ kernels (falling back to the
other kernel backend when the chosen one is missing) and the Triton kernels otherwise; other
tensors take the Triton kernels where `triton_enabled` says they run, else the reference.
float64 always takes the reference: it is the oracle's dtype, not a training dtype.
"""
from __future__ import annotations

import os

import torch

from mmkernels.ops._args import check_choice
from mmkernels.ops._common import HAS_TRITON, KERNEL_DTYPES
from mmkernels.ops._extension import cuda_extension_available, extension

__all__ = ["AUTO_CUDA_BACKEND", "BACKENDS", "check_backend", "interpreting", "resolve_backend", "triton_enabled",
           "uses_kernels"]


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where the Triton kernels run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_enabled(*tensors: torch.Tensor) -> bool:
    """Whether these tensors go to the Triton kernels (CUDA, or CPU under the interpreter).

    float64 always takes the reference path: it is the oracle's dtype, not a training dtype.
    bfloat16 on the CPU takes it too: Triton's interpreter reads bf16 as raw 16-bit integers and
    has no bf16 dot (upstream: not supported), so the kernels would return garbage there.
    """
    if not HAS_TRITON:
        return False
    t = tensors[0]
    if t.dtype not in KERNEL_DTYPES:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreting() and t.dtype != torch.bfloat16


BACKENDS = ("auto", "triton", "cuda", "torch")


# What backend="auto" runs for CUDA tensors, per op. NOT MEASURED: no GPU was available when this
# was written, so "triton" is a default, not a finding. `pytest benchmarks/bench_region.py
# --benchmark-only` on a GPU prints the faster of "triton" and "cuda" per op (from the medians of
# the mmkernels-triton and mmkernels-cuda providers); set each entry to it. "cuda" falls back to
# "triton" when the extension is not built.
AUTO_CUDA_BACKEND = {"region_mask": "triton", "masked_region_loss": "triton"}


def check_backend(backend) -> None:
    """Raise ValueError unless `backend` is one of BACKENDS."""
    check_choice("backend", backend, BACKENDS)


def resolve_backend(op: str, backend: str, x: torch.Tensor) -> str:
    """"triton", "cuda" or "torch" for a call of `op` on `x`, or an error saying why the asked one cannot run."""
    if backend == "torch":
        return "torch"
    if backend in ("triton", "cuda") and x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend={backend!r} supports float16, bfloat16 and float32, got {x.dtype}; "
            "use backend='torch' (or 'auto') for other dtypes"
        )
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs triton installed; use backend='torch'")
        if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {x.device}"
            )
        if not triton_enabled(x):
            raise TypeError(
                f"backend='triton' cannot run {x.dtype} on the CPU: Triton's interpreter reads bfloat16 "
                "as raw integers and has no bfloat16 atomics; use float16/float32, a CUDA tensor, or "
                "backend='torch' (or 'auto', which takes it for bfloat16 on the CPU)"
            )
        return "triton"
    if backend == "cuda":
        if op not in AUTO_CUDA_BACKEND:
            raise ValueError(f"backend='cuda': {op} has no CUDA C++ kernels; use 'auto', 'triton' or 'torch'")
        if not x.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {x.device}")
        extension()
        return "cuda"
    if x.is_cuda and x.dtype in KERNEL_DTYPES:
        has_cuda_kernels = op in AUTO_CUDA_BACKEND
        choice = AUTO_CUDA_BACKEND.get(op, "triton")
        if choice == "cuda" and not cuda_extension_available():
            choice = "triton"
        if choice == "triton" and not HAS_TRITON:
            choice = "cuda" if has_cuda_kernels and cuda_extension_available() else "torch"
        return choice
    return "triton" if triton_enabled(x) else "torch"


def uses_kernels(op: str, x: torch.Tensor) -> bool:
    """Whether a call of `op` (one without a `backend=` argument) on `x` runs kernels: the
    backend="auto" choice, which for these ops is the Triton kernels or the reference."""
    return resolve_backend(op, "auto", x) != "torch"
