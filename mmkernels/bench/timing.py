"""Time one step with pytest-benchmark and measure its peak memory, the same way for every provider.

    from mmkernels.bench.timing import measure
    result = measure(benchmark, step, device, rounds=10)   # result.ms (p50, p20, p80), result.peak_mb
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA = torch.cuda.is_available()


@dataclass
class Measured:
    ms: tuple[float, float, float]  # median, 20th and 80th percentile of the rounds, milliseconds
    peak_mb: float | None           # peak memory of one step above what was allocated before it, MiB


class _PeakTensorBytes(TorchDispatchMode):
    """The CPU's stand-in for torch.cuda.max_memory_allocated: the peak of the bytes held by tensor
    storages created inside the mode (each counted once, released when its storage is freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._held = set()

    def _release(self, key, nbytes):
        self._held.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._held:
                continue
            self._held.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def _synced(step, device):
    def run():
        result = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result
    return run


def peak_memory_mb(step, device: torch.device) -> float:
    """Peak memory of one call of `step` above what was allocated before it, MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        _synced(step, device)()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    tracker = _PeakTensorBytes()
    with tracker:
        step()
    return tracker.peak / 2**20


def measure(benchmark, step, device: torch.device, rounds: int, warmup_rounds: int = 1,
            group: str | None = None, memory: bool = True) -> Measured:
    """Time `step` (synchronised) with pytest-benchmark: the first call stays outside the timing and
    the memory peak (compilation, autotuning), then one call measures the peak memory, then
    `warmup_rounds` untimed rounds and `rounds` timed ones. The percentiles go to extra_info too."""
    synced = _synced(step, device)
    synced()
    peak_mb = peak_memory_mb(step, device) if memory else None
    if group is not None:
        benchmark.group = group
    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    data = sorted(benchmark.stats.stats.data)
    ms = tuple(1e3 * _quantile(data, q) for q in (0.5, 0.2, 0.8))
    benchmark.extra_info.update(ms_50=ms[0], ms_20=ms[1], ms_80=ms[2], peak_memory_mib=peak_mb,
                                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    return Measured(ms, peak_mb)


def _quantile(sorted_data, q):
    """Linear interpolation between the closest ranks (numpy's default)."""
    position = q * (len(sorted_data) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_data) - 1)
    return sorted_data[low] + (sorted_data[high] - sorted_data[low]) * (position - low)
