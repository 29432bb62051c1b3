"""Test set-up: without CUDA the Triton kernels run under Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before triton is first imported, so this runs before mmkernels loads;
so must MMKERNELS_POISON_OUTPUTS, which makes the kernels' output buffers start as NaN (an element a
kernel never writes then fails the test), and OPENBLAS_NUM_THREADS. Every seed a test draws with
`toolkit.fresh_seed()` is printed in its failure report.
torch.compile's on-disk caches go to a fresh folder: a cached graph that calls one of our ops with
an older schema would otherwise be replayed (seen with torch 2.13 after an op gained arguments).
"""
import atexit
import os
import shutil
import sys
import tempfile

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
# ...), so tests/ goes on sys.path for them.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toolkit  # noqa: E402


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
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
