"""The compiled CUDA extension mmkernels._C and the backend choice of every op that has CUDA C++ kernels.

An op with both Triton and CUDA C++ kernels takes `backend="auto" | "triton" | "cuda" | "torch"` and
calls `resolve_backend(op, backend, x)` once per call, before any allocation:

- "torch": the plain-PyTorch reference (mmkernels/ops/reference.py), any device and dtype.
- "triton": the Triton kernels, on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1
  (float32 and float16 only there: the interpreter reads bfloat16 as raw integers and has no bf16
  atomics, see `_common.triton_enabled`).
- "cuda": the CUDA C++ kernels of csrc/, built into mmkernels._C by setup.py when nvcc is found.
- "auto": CUDA tensors in a kernel dtype take AUTO_CUDA_BACKEND[op] (falling back to the other
  kernel backend when the chosen one is missing); other tensors take the Triton kernels where
  `triton_enabled` says they run, else the reference.

mmkernels imports without the extension; only backend="cuda" needs it, and then says how to build it.
"""
from __future__ import annotations

import contextlib

import torch

from mmkernels.ops._common import HAS_TRITON, KERNEL_DTYPES, check_choice, interpreting, triton_enabled

__all__ = [
    "AUTO_CUDA_BACKEND",
    "BACKENDS",
    "DTYPE_CODE",
    "build_hint",
    "check_backend",
    "cuda_extension_available",
    "cuda_stream",
    "extension",
    "launch_device",
    "resolve_backend",
]

try:
    from mmkernels import _C
except ImportError as _err:  # built by setup.py when nvcc is found; optional
    _C = None
    _C_IMPORT_ERROR = str(_err)
else:
    _C_IMPORT_ERROR = ""

BACKENDS = ("auto", "triton", "cuda", "torch")

# Element type codes the CUDA entry points take (csrc/region.h, enum DType).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# What backend="auto" runs for CUDA tensors, per op. NOT MEASURED: no GPU was available when this
# was written, so "triton" is a default, not a finding. `pytest benchmarks/bench_region.py
# --benchmark-only` on a GPU prints the faster of "triton" and "cuda" per op (from the medians of
# the mmkernels-triton and mmkernels-cuda providers); set each entry to it. "cuda" falls back to
# "triton" when the extension is not built.
AUTO_CUDA_BACKEND = {"region_mask": "triton", "masked_region_loss": "triton"}


def cuda_extension_available() -> bool:
    """Whether the compiled CUDA extension mmkernels._C was built and imports."""
    return _C is not None


def build_hint() -> str:
    """Why mmkernels._C is missing and how to build it."""
    reason = f" (import failed: {_C_IMPORT_ERROR})" if _C_IMPORT_ERROR else ""
    return (
        "the CUDA extension mmkernels._C is not built" + reason + ". Build it with nvcc on PATH "
        "(or CUDA_HOME set): `pip install -e .` (or `pip install --no-build-isolation -e .`), "
        "or `python setup.py build_ext --inplace` from the repository root"
    )


def extension():
    """The mmkernels._C module, or a RuntimeError that says how to build it."""
    if _C is None:
        raise RuntimeError(f"backend='cuda': {build_hint()}")
    return _C


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
        if not x.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {x.device}")
        extension()
        return "cuda"
    if x.is_cuda and x.dtype in KERNEL_DTYPES:
        choice = AUTO_CUDA_BACKEND[op]
        if choice == "cuda" and _C is None:
            choice = "triton"
        if choice == "triton" and not HAS_TRITON:
            choice = "cuda" if _C is not None else "torch"
        return choice
    return "triton" if triton_enabled(x) else "torch"


def cuda_stream(t: torch.Tensor) -> tuple[int, int]:
    """(device index, raw handle of its current stream): where a CUDA entry point launches for `t`."""
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def launch_device(t: torch.Tensor):
    """Make t's GPU current while launching (Triton launches on the current device and stream);
    a no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
