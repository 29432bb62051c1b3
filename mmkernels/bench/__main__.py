"""python -m mmkernels.bench: every op and the patched models against eager PyTorch, torch.compile,
SDPA / FlexAttention / varlen and the installed peers, in one command.

    python -m mmkernels.bench              # the full sizes (CUDA); tiny CPU sizes without a GPU
    python -m mmkernels.bench --quick      # what a short GPU loan runs: under 8 min on one H100 (estimated)
    python -m mmkernels.bench --dry-run    # every case at tiny sizes on the CPU (Triton interpreter)

Writes <out>/<gpu-name>/results.csv (Liger-Kernel's benchmark schema), one plot per op and
summary.md; the raw pytest-benchmark JSON stays next to them (benchmark.json).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import mmkernels
from mmkernels.bench import cases, report

SUITE = Path(__file__).with_name("suite.py")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m mmkernels.bench", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help=f"the short GPU run (estimated {cases.estimate_seconds('quick') / 60:.1f} min on one "
                           "H100; an estimate from the FLOP counts and the H100's ceilings, not yet measured)")
    size.add_argument("--dry-run", action="store_true",
                      help="every case at tiny sizes on the CPU, the Triton kernels under the interpreter")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="output folder (default: bench)")
    parser.add_argument("--ops", default=",".join(cases.OPS),
                        help=f"comma-separated subset of {','.join(cases.OPS)} (default: all)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression over the case ids")
    args = parser.parse_args(argv)
    unknown = set(args.ops.split(",")) - set(cases.OPS)
    if unknown:
        parser.error(f"--ops: expected names from {', '.join(cases.OPS)}, got {', '.join(sorted(unknown))}")
    return args


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gpu_name(mode: str) -> str:
    return torch.cuda.get_device_name() if cases.target(mode)[0].type == "cuda" else "cpu"


def main(argv=None) -> int:
    args = _parse(argv)
    missing = [name for name in ("pytest", "pytest_benchmark", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"mmkernels.bench needs {', '.join(missing)}: pip install 'mmkernels[bench]'", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "dry-run" if args.dry_run else "full"
    name = gpu_name(mode)
    out_dir = args.out / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    out_dir.mkdir(parents=True, exist_ok=True)
    benchmark_json = out_dir / "benchmark.json"
    not_run_log = out_dir / "not_run.jsonl"
    for stale in (benchmark_json, not_run_log):
        stale.unlink(missing_ok=True)
    if mode != "dry-run" and not torch.cuda.is_available():
        print(f"mmkernels.bench: no CUDA device, so the {mode} run takes the tiny CPU sizes of --dry-run", flush=True)
    elif mode == "quick":
        print(f"mmkernels.bench --quick: expected {cases.estimate_seconds('quick') / 60:.1f} min on one H100 "
              "(an estimate, not a measurement)", flush=True)

    env = dict(os.environ, MMKERNELS_BENCH_MODE=mode, MMKERNELS_BENCH_OPS=args.ops,
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env[cases.NOT_RUN_LOG] = str(not_run_log.resolve())
    # the suite runs from a scratch folder: it imports this mmkernels, installed or not
    package_root = str(Path(mmkernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if mode == "dry-run" or not torch.cuda.is_available():
        # TRITON_INTERPRET must be set before triton is imported: the suite runs in a fresh process.
        # The interpreter runs each tl.dot as a numpy matmul: OpenBLAS threads only spin at these sizes.
        env.update(TRITON_INTERPRET="1", OPENBLAS_NUM_THREADS="1")
    # pytest-benchmark is the engine; plugins are not auto-loaded, so name it (and nothing else)
    command = [sys.executable, "-m", "pytest", str(SUITE), "-p", "pytest_benchmark.plugin", "-p", "no:cacheprovider",
               "--rootdir", str(SUITE.parent), "-o", "addopts=", "-q", "-rs", "--benchmark-only",
               f"--benchmark-json={benchmark_json.resolve()}", "--benchmark-columns=median,iqr,rounds",
               "-W", "ignore::RuntimeWarning"]
    if args.keyword:
        command += ["-k", args.keyword]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mmkernels-bench-") as scratch:
        # a fresh Inductor cache unless the caller names one: a cached graph that calls one of mmkernels'
        # ops with an older schema would be replayed (seen with torch 2.13 after an op gained arguments)
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(scratch) / "inductor"))
        returncode = subprocess.call(command, env=env, cwd=scratch)
    seconds = time.monotonic() - started

    header = [
        f"# mmkernels benchmarks on {name}",
        "",
        f"mmkernels {mmkernels.__version__}, torch {torch.__version__}, triton {_version('triton')}; mode `{mode}`; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; the run took {seconds:.0f} s"
        + ("" if returncode == 0 else f" (pytest exit code {returncode}: see its output)") + ".",
        "",
        "speed: median ms of one call (mode full: forward + backward; forward: forward only); memory: peak MB of "
        "one call above what was allocated before it (CUDA: the caching allocator's peak; CPU: the tensors the "
        "call creates, tracked at the dispatcher). ratio = mmkernels / the best other provider: below 1 means "
        "mmkernels is faster or lighter.",
    ]
    if mode == "dry-run":
        header += ["", "A dry run: tiny sizes on the CPU, mmkernels' Triton kernels under the interpreter and "
                       "torch.compile with the aot_eager backend. It checks that every case runs; its numbers say "
                       "nothing about GPU speed."]
    ran_kernels = {case.kernel for case in cases.cases_for(mode, args.ops.split(","))}
    not_offered = [dict(kernel_name=kernel, kernel_provider=provider, case="all", reason=reason)
                   for kernel, providers in cases.NOT_OFFERED.items() if kernel in ran_kernels
                   for provider, reason in providers.items()]
    written = report.write_report(benchmark_json, not_run_log, out_dir, mmkernels.__version__, header, not_offered)
    print(f"mmkernels.bench: {seconds:.0f} s; wrote {written['csv']}, {written['summary']}"
          + "".join(f", {p}" for p in written["plots"]))
    return returncode


if __name__ == "__main__":
    sys.exit(main())
