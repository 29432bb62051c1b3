"""What every op file shares: the Triton import, the backend choice and input checks.

Triton is optional at import time (it installs on Linux only). Without it, `triton.jit` is a
no-op decorator so the op files still import, and every op takes its reference path.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

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
    "interpreting",
    "triton_enabled",
    "autocast_off",
    "without_autocast",
    "check_float_tensor",
    "check_same_device",
    "check_choice",
    "scalar_tensor",
    "last_dim_contiguous",
    "new_output",
    "poisoning_outputs",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def check_float_tensor(name: str, t, ndim: int | None = None, shape_doc: str = "") -> None:
    """Raise TypeError/ValueError naming `name` unless `t` is a floating tensor of `ndim` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"expected {name} to be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        doc = f" {shape_doc}" if shape_doc else ""
        raise ValueError(f"expected {name} to be {ndim}-D{doc}, got shape {tuple(t.shape)}")


def check_same_device(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise ValueError if the given tensors are not all on one device."""
    named = [(n, t) for n, t in named if isinstance(t, torch.Tensor)]
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        seen = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"expected all inputs on one device, got {seen}")


def check_embedding_pair(a, b, names: tuple[str, str], rows: tuple[str, str] = ("N", "N"),
                         same_rows: str | None = None) -> None:
    """Two (rows, D) float embedding matrices `a`, `b` named `names`: on one device, one dtype, the
    same D >= 1; with `same_rows` (what their rows are, "pairs N"), the same number of rows."""
    name_a, name_b = names
    check_float_tensor(name_a, a, 2, f"({rows[0]}, D)")
    check_float_tensor(name_b, b, 2, f"({rows[1]}, D)")
    check_same_device([(name_a, a), (name_b, b)])
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected {name_a} and {name_b} to have the same last dimension, got {a.shape[1]} and {b.shape[1]}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"expected {name_a} and {name_b} to share a dtype, got {a.dtype} and {b.dtype}")
    if a.shape[1] == 0:
        raise ValueError("expected an embedding dimension D >= 1, got D = 0")
    if same_rows is not None and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"expected {name_a} and {name_b} to hold the same number of {same_rows}, got {a.shape[0]} and {b.shape[0]}"
        )


def check_choice(name: str, value, choices) -> None:
    """Raise ValueError naming `name` unless `value` is one of the strings `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"expected {name} to be one of {', '.join(map(repr, choices))}, got {value!r}")


def scalar_tensor(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A Python number or 0-dim (or 1-element) tensor as a 0-dim fp32 tensor on `like`'s device.

    Gradients flow through the conversion when `value` is a tensor that requires grad.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"expected {name} to be a scalar (a Python float or a 0-dim tensor), "
                f"got a tensor of shape {tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(f"expected {name} to be a floating-point scalar, got dtype {value.dtype}")
        if value.device != like.device:
            raise ValueError(
                f"expected {name} on the inputs' device {like.device}, got {value.device}"
            )
        return value.reshape(()).to(torch.float32 if like.dtype != torch.float64 else torch.float64)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected {name} to be a float or a 0-dim tensor, got {type(value).__name__}")
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    # Rounded on the host as torch.tensor rounds it (a value past the dtype's range to ±inf, which
    # torch.full would refuse), then filled on the device: torch.tensor(value, device="cuda") copies
    # from the host and waits for the GPU.
    rounded = torch.tensor(float(value), dtype=dtype).item()
    return torch.full((), rounded, dtype=dtype, device=like.device)


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
