"""Masked region modeling: region_mask (forward) and masked_region_loss (forward + backward).

    pytest benchmarks/bench_region.py --benchmark-only

The cases and providers are mmkernels.bench's (mmkernels/bench/cases.py and steps.py; `python -m
mmkernels.bench --ops region` runs the same and writes the report). Providers:
- mmkernels: the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1).
- mmkernels-cuda: the CUDA C++ extension mmkernels._C (CUDA only; skipped when it is not built).
- mmkernels-torch: mmkernels' PyTorch path.
- eager: what UNITER / LXMERT run (mmkernels/testing.py). region_mask: a Bernoulli draw,
  UNITER's at-least-one fix-up, masked_fill (zero) or LXMERT's 80/10/10 split with a boolean-index
  copy of random rows (bert). masked_region_loss: gather the selected rows with a boolean index,
  then the loss, in the inputs' dtype.

Every sample holds between 10 and R regions. extra_info holds the effective GB/s (bytes the op must
move: region_mask reads and writes the (B, R, D) features once; the loss reads the selected rows of
pred and target in the forward and again in the backward and writes the full gradient of pred) and
the peak memory above the inputs.

When both mmkernels (Triton) and mmkernels-cuda ran, the end of the run prints, per op, which of the
two is faster over all cases (the sum of their medians) and the AUTO_CUDA_BACKEND entry to set in
mmkernels/ops/_dispatch.py (unmeasured until then).
"""
import os
from collections import defaultdict

import pytest
import torch

from mmkernels.bench.cases import cases_for, run_case
from mmkernels.ops._dispatch import AUTO_CUDA_BACKEND

MODE = os.environ.get("MMKERNELS_BENCH_MODE", "full")
SELECTED = [(case, provider) for case in cases_for(MODE, ["region"]) for provider in case.providers]
BACKEND_OF = {"mmkernels": "triton", "mmkernels-cuda": "cuda"}

# op -> case id -> backend -> median seconds, for the AUTO_CUDA_BACKEND recommendation
MEDIANS = defaultdict(lambda: defaultdict(dict))


def recommend_auto_cuda_backend(medians) -> dict:
    """op -> ("triton" | "cuda", total triton seconds, total cuda seconds) over the cases both ran."""
    choice = {}
    for op, cases in medians.items():
        both = [c for c in cases.values() if "triton" in c and "cuda" in c]
        if both:
            triton_s = sum(c["triton"] for c in both)
            cuda_s = sum(c["cuda"] for c in both)
            choice[op] = ("cuda" if cuda_s < triton_s else "triton", triton_s, cuda_s)
    return choice


@pytest.fixture(scope="module", autouse=True)
def auto_cuda_backend_report(request):
    """After the suite: print the AUTO_CUDA_BACKEND entries that the medians call for."""
    yield
    choice = recommend_auto_cuda_backend(MEDIANS)
    if not choice:
        return
    lines = [f"{op}: triton {t * 1e3:.3f} ms, cuda {c * 1e3:.3f} ms in all -> {best!r} "
             f"(now {AUTO_CUDA_BACKEND.get(op)!r})" for op, (best, t, c) in choice.items()]
    table = ", ".join(f"{op!r}: {best!r}" for op, (best, _, _) in choice.items())
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nAUTO_CUDA_BACKEND, measured on " + torch.cuda.get_device_name() + ":\n  "
              + "\n  ".join(lines) + f"\n  set in mmkernels/ops/_dispatch.py: AUTO_CUDA_BACKEND = {{{table}}}")


@pytest.mark.parametrize("case,provider", SELECTED, ids=[f"{case.id}-{provider}" for case, provider in SELECTED])
def test_region(benchmark, case, provider):
    run_case(benchmark, case, provider, MODE)
    if provider in BACKEND_OF:
        MEDIANS[case.kernel][case.id][BACKEND_OF[provider]] = benchmark.extra_info["ms_50"] / 1e3
