"""Test set-up: without CUDA the Triton kernels run under Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before triton is first imported, so this runs before mmkernels loads;
so must MMKERNELS_POISON_OUTPUTS, which makes the kernels' output buffers start as NaN (an element a
kernel never writes then fails the test), and OPENBLAS_NUM_THREADS. Every seed a test draws with
`toolkit.fresh_seed()` is printed in its failure report.

The fixtures every test file shares:
- `seed`: a fresh seed seeded into torch (printed if the test fails); a file whose every test draws
  from torch's global generator says `pytestmark = pytest.mark.usefixtures("seed")`.
- `reference_path`: CPU tensors take mmkernels' plain-PyTorch reference (TRITON_INTERPRET=0).
- `kernel_path`: parametrised over the two paths, "reference" (as `reference_path`) and "kernels"
  (the Triton kernels: on the GPU where there is one, else on the CPU under the interpreter;
  skipped where triton is not installed); gives `KernelPath(name, device)`.
- `device`: where the kernels run here (the GPU, or the CPU under the interpreter).
torch.compile's on-disk caches go to a fresh folder: a cached graph that calls one of our ops with
an older schema would otherwise be replayed (seen with torch 2.13 after an op gained arguments).
"""
import atexit
import os
import shutil
import sys
import tempfile
from typing import NamedTuple

# The interpreter runs each tl.dot as a numpy matmul; with OpenBLAS's threads on a small, shared
# machine a 128×128 block product took ~20 ms of spinning instead of ~50 µs. One thread, set before
# numpy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmkernels-test-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MMKERNELS_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

# The shared helpers (toolkit.py, contrastive_oracle.py, attention_checks.py, compile_check.py) live
# in tests/ beside this file; the tests live in folders that mirror the package (tests/ops/, tests/nn/,
# ...), and a few import another folder's test module for its helpers (tests/nn/test_nn_losses.py
# runs its ranks with tests/distributed/test_distributed.py's). tests/ and each folder go on sys.path,
# so any subset of the suite collects.
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _folder in ("", "ops", "nn", "distributed", "integrations", "train", "bench"):
    sys.path.insert(0, os.path.join(_TESTS, _folder))

import toolkit  # noqa: E402

CUDA = torch.cuda.is_available()
KERNEL_PATHS = ["reference", pytest.param("kernels", marks=toolkit.needs_triton)]


def pytest_runtest_setup(item):
    toolkit.reset_seeds()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = toolkit.drawn_seeds()
    if report.failed and seeds:
        report.sections.append(
            ("seeds", "seeds drawn by this test (replay with MMKERNELS_TEST_SEED=<seed>): "
             + ", ".join(map(str, seeds)))
        )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """Where the Triton path runs: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def seed():
    """A fresh seed, seeded into torch's generators (printed in the failure report)."""
    return toolkit.fresh_seed()


@pytest.fixture
def reference_path(monkeypatch):
    """CPU tensors take the plain-PyTorch reference (TRITON_INTERPRET=0); returns the CPU device."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return torch.device("cpu")


class KernelPath(NamedTuple):
    name: str  # "reference" or "kernels"
    device: torch.device  # where that path's tensors live


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request, monkeypatch):
    """Each of the two paths in turn: "reference" (CPU tensors on the plain-PyTorch reference,
    TRITON_INTERPRET=0) and "kernels" (the Triton kernels: CUDA tensors where there is a GPU, else
    CPU tensors under TRITON_INTERPRET=1; skipped without triton)."""
    if request.param == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return KernelPath("reference", torch.device("cpu"))
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return KernelPath("kernels", torch.device("cuda" if CUDA else "cpu"))
