"""The argument checks every op shares. Each raises TypeError or ValueError with a message that
names the argument and what was seen.

Public functions check their arguments once, here or beside them; internal callers (nn,
distributed, integrations) call the ops' internal entries with arguments already normalised.
"""
from __future__ import annotations

import numbers
import sys
from typing import Iterable

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_embedding_pair",
    "check_float_tensor",
    "check_lengths",
    "check_real",
    "check_same_device",
    "describe_type",
    "scalar_tensor",
]


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


def describe_type(value) -> str:
    """A value's type as an error message names it: `int`, `numpy.int64`, `torch.Tensor`."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}.{kind.__qualname__}"


def check_bool(name: str, value) -> bool:
    """`value` as a Python bool: a bool or a numpy.bool_ (numpy bools are bools); TypeError otherwise."""
    if isinstance(value, bool):
        return value
    numpy = sys.modules.get("numpy")  # a numpy bool can only exist where numpy is imported
    if numpy is not None and isinstance(value, numpy.bool_):
        return bool(value)
    raise TypeError(f"expected {name} to be a bool (or numpy.bool_), got {describe_type(value)}")


def check_real(name: str, value, *, optional: bool = False) -> None:
    """Raise TypeError unless `value` is a real number (Python or numpy; not a bool), or None if optional."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a float or None" if optional else "a float"
        raise TypeError(f"expected {name} to be {expected}, got {describe_type(value)}")


def check_lengths(name: str, lens, batch: int, limit: int, limit_name: str, device: torch.device) -> None:
    """Raise unless `lens` is None or a (batch,) int32/int64 tensor on `device` or the CPU, with
    values in [0, limit] (checked only where that needs no GPU sync: on the CPU, outside torch.compile)."""
    if lens is None:
        return
    if not isinstance(lens, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor of shape ({batch},), got {type(lens).__name__}")
    if lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expected {name} to have dtype int32 or int64, got {lens.dtype}")
    if tuple(lens.shape) != (batch,):
        raise ValueError(f"expected {name} to have shape ({batch},) (one length per sample), got {tuple(lens.shape)}")
    if lens.device != device and lens.device.type != "cpu":
        raise ValueError(f"expected {name} on {device} (or on the CPU), got {lens.device}")
    # Values are checked where that costs no GPU sync; on the GPU the kernels clamp them to [0, limit].
    if lens.device.type == "cpu" and not torch.compiler.is_compiling() and lens.numel() > 0:
        low, high = int(lens.min()), int(lens.max())
        if low < 0 or high > limit:
            raise ValueError(f"expected {name} in [0, {limit_name}={limit}], got values from {low} to {high}")
