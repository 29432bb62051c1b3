"""The compiled CUDA extension mmkernels._C: loading it, and launching on a tensor's device and stream.

Only the ops with CUDA C++ kernels (the region ops) use it; which backend a call takes is
_dispatch.py's decision. mmkernels imports without the extension; only backend="cuda" needs it,
and then says how to build it.
"""
from __future__ import annotations

import contextlib

import torch


__all__ = [
    "DTYPE_CODE",
    "build_hint",
    "cuda_extension_available",
    "cuda_stream",
    "extension",
    "launch_device",
]

try:
    from mmkernels import _C
except ImportError as _err:  # built by setup.py when nvcc is found; optional
    _C = None
    _C_IMPORT_ERROR = str(_err)
else:
    _C_IMPORT_ERROR = ""


# Element type codes the CUDA entry points take (csrc/region.h, enum DType).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


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


def cuda_stream(t: torch.Tensor) -> tuple[int, int]:
    """(device index, raw handle of its current stream): where a CUDA entry point launches for `t`."""
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def launch_device(t: torch.Tensor):
    """Make t's GPU current while launching (Triton launches on the current device and stream);
    a no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
