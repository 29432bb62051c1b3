"""One way to time a benchmark step for every suite: warm up, measure one call's peak memory, time.

    from timing import CUDA, time_step
"""
import torch

CUDA = torch.cuda.is_available()


def time_step(benchmark, step, group: str, rounds: int = 20) -> float:
    """Time `step` (synchronised) with pytest-benchmark and return the median in seconds.

    The first call stays outside the timing and the memory peak (compilation, autotuning). On CUDA,
    extra_info["peak_memory_mib"] is the peak allocated above what was allocated before one call.
    """
    def synced():
        result = step()
        if CUDA:
            torch.cuda.synchronize()
        return result

    synced()
    peak_mib = None
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        synced()
        peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    benchmark.group = group
    benchmark.pedantic(synced, rounds=rounds if CUDA else 3, warmup_rounds=3 if CUDA else 1, iterations=1)
    benchmark.extra_info["peak_memory_mib"] = peak_mib
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    return benchmark.stats.stats.median
