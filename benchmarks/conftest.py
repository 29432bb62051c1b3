"""Collect the benchmark suites named bench_<op>.py, so that `pytest benchmarks/ --benchmark-only`
runs every op's benchmark (pytest's default patterns only collect test_*.py).

The cases, providers and timing live in mmkernels.bench (python -m mmkernels.bench runs the same
cases and writes the CSV, plots and summary); MMKERNELS_BENCH_MODE=quick|full|dry-run picks the
sizes here (default full: the GPU sizes on CUDA, tiny CPU sizes elsewhere)."""
import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; do not collect it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
