"""The pytest-benchmark suite that `python -m mmkernels.bench` runs: every case of the selected mode
and ops, each provider side by side. It reads its selection from the environment:

    MMKERNELS_BENCH_MODE=quick|full|dry-run    MMKERNELS_BENCH_OPS=contrastive,attention,region,model
    pytest mmkernels/bench/suite.py --benchmark-only --benchmark-json=out.json
"""
import os

import pytest

from mmkernels.bench.cases import OPS, cases_for, run_case

MODE = os.environ.get("MMKERNELS_BENCH_MODE", "full")
SELECTED = [(case, provider)
            for case in cases_for(MODE, os.environ.get("MMKERNELS_BENCH_OPS", ",".join(OPS)).split(","))
            for provider in case.providers]


@pytest.mark.parametrize("case,provider", SELECTED, ids=[f"{case.id}-{provider}" for case, provider in SELECTED])
def test_benchmark(benchmark, case, provider):
    run_case(benchmark, case, provider, MODE)
