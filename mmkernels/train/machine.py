"""The machine a run measured on, and its peak memory.

Peak memory is `torch.cuda.max_memory_allocated` on a GPU (reset before each variant). On the CPU
it is the process's peak resident set size (VmHWM); on Linux it is reset before each variant
(writing 5 to /proc/self/clear_refs), after freed heap memory is handed back to the system, so
each variant's peak is its own. Where the reset is not possible the report says that the peak
covers the whole process so far.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import sys

import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken beside this torch: the report says None
        return None


def machine_info(device: torch.device, world: int) -> dict:
    import mmkernels

    info = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpus": world if device.type == "cuda" else 0,
        "processes": world,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "mmkernels": mmkernels.__version__,
    }
    return info


def describe(info: dict) -> str:
    """One line: the GPU (or the CPU and its cores) and the versions that matter."""
    where = f"{info['gpu']} x{info['gpus']}" if info["gpu"] else f"{info['cpu']}, {info['cpu_count']} cores"
    return (f"{where}; torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
            f"mmkernels {info['mmkernels']}")


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of one variant: `start()` before it, `peak()` after (bytes), `kind` says which."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "torch.cuda.max_memory_allocated"
        else:
            self.kind = "peak RSS (VmHWM)"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # hand freed heap back first, so that the reset peak starts from what is really in use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "peak RSS of the process so far (ru_maxrss; this system cannot reset it)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _vm_hwm_bytes()
        if hwm is not None:
            return hwm
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
