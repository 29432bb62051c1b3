"""What every op file shares: the Triton import, the kernel dtypes, autocast and output buffers.

Triton is optional at import time (it installs on Linux only). Without it, `triton.jit` is a
no-op decorator so the op files still import, and every op takes its reference path.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

    class _NoTriton:
        constexpr = int

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        def __getattr__(self, name):
            raise RuntimeError("triton is not installed; mmkernels uses its PyTorch reference path")

    triton = tl = _NoTriton()

__all__ = [
    "HAS_TRITON",
    "triton",
    "tl",
    "autocast_off",
    "without_autocast",
    "reference_dtype",
    "last_dim_contiguous",
    "new_output",
    "poisoning_outputs",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)



def reference_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the plain-PyTorch references compute in: float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def autocast_off(t: torch.Tensor):
    """A context with autocast off for `t`'s device type (nothing to do where it is off already).

    The ops compute as their contracts say whatever autocast state the caller is in: in the inputs'
    own dtype with fp32 accumulation (float64 for float64), their results in their documented dtypes.
    Under autocast the reference path's products would otherwise run in the autocast dtype (an
    fp32 loss from bf16 logits) and its autograd graph would record them so for the backward."""
    device_type = t.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


class _AutocastOff(torch.autograd.Function):
    """fn's autograd graph, built and differentiated with autocast off (see without_autocast)."""

    @staticmethod
    def forward(ctx, fn, args, positions, device_type, *leaves):
        call = list(args)
        inner = [leaf.detach().requires_grad_() for leaf in leaves]
        for i, leaf in zip(positions, inner):
            call[i] = leaf
        with torch.enable_grad(), torch.autocast(device_type, enabled=False):
            out = fn(*call)
        ctx.graph, ctx.device_type = (out, inner), device_type
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out, inner = ctx.graph
        with torch.autocast(ctx.device_type, enabled=False):
            grads = torch.autograd.grad(out, inner, grad, allow_unused=True)
        del ctx.graph
        return (None, None, None, None, *grads)


def without_autocast(fn, *args):
    """fn(*args) (a function of tensors returning one tensor, differentiable by autograd) with
    autocast off for the first tensor's device type, in the forward and in its backward alike:
    a backward run inside an autocast region would otherwise recompute the products of the
    graph's backward in the autocast dtype. Outside autocast, plainly fn(*args)."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    off = autocast_off(first)
    if isinstance(off, contextlib.nullcontext):
        return fn(*args)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    if not positions or not torch.is_grad_enabled():
        with off:
            return fn(*args)
    return _AutocastOff.apply(fn, args, positions, first.device.type, *(args[i] for i in positions))


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension is contiguous (the kernels take the other strides), else a
    contiguous copy. A last dimension of size 1 counts as contiguous whatever its stride."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# Set by the test suite (tests/conftest.py sets MMKERNELS_POISON_OUTPUTS=1 before importing
# mmkernels): buffers that kernels must write in full start as NaN, so an element a kernel skips
# fails the test. Production allocations stay uninitialised and cost no fill.
_POISON_OUTPUTS = os.environ.get("MMKERNELS_POISON_OUTPUTS", "0") == "1"


def poisoning_outputs() -> bool:
    """True when `new_output` fills its buffers with NaN (under test only)."""
    return _POISON_OUTPUTS


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer that a kernel writes in full: `torch.empty`, or NaN-filled under test
    (integer buffers: -1) so that an unwritten element cannot pass for a result."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON_OUTPUTS:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
