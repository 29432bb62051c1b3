"""Collect the benchmark suites named bench_<op>.py, so that `pytest benchmarks/ --benchmark-only`
runs every op's benchmark (pytest's default patterns only collect test_*.py).

This folder (timing.py) and tests/ (toolkit.py: the eager baselines the tests check against) go on
sys.path here, so the suites import them from any working directory."""
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _folder in (_HERE, _HERE.parent / "tests"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; do not collect it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
