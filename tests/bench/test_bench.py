"""python -m mmkernels.bench --dry-run: every benchmark case at tiny sizes on the CPU, in a subprocess
as a user runs it, writing the Liger-schema CSV, the plots and the summary."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmkernels.bench.cases import cases_for
from mmkernels.bench.report import COLUMNS

REPO = Path(__file__).resolve().parents[2]
# providers that run on any CPU, per kernel (the rest need CUDA or a peer from pip)
CPU_PROVIDERS = {
    "clip_loss": {"mmkernels", "eager", "torch.compile"},
    "siglip_loss": {"mmkernels", "eager", "torch.compile"},
    "info_nce_loss": {"mmkernels", "eager", "torch.compile"},
    "cross_attention": {"mmkernels", "eager", "torch.compile", "sdpa"},
    "region_mask": {"mmkernels", "mmkernels-torch", "eager"},
    "masked_region_loss": {"mmkernels", "mmkernels-torch", "eager"},
    "clip_model": {"mmkernels", "transformers"},
    "lxmert_model": {"mmkernels", "transformers"},
}
PEERS = {"siglip-kernel": "siglip_kernel", "memeff": "memeff", "inf-cl": "inf_cl"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # as a user runs it: not under the tests' output poisoning
    env = {k: v for k, v in os.environ.items() if k != "MMKERNELS_POISON_OUTPUTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-m", "mmkernels.bench", "--dry-run", "--out", str(out)], env=env,
                            cwd=out, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out / "cpu"


@pytest.mark.slow
def test_dry_run_writes_liger_csv(dry_run):
    with open(dry_run / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    ran = {(r["kernel_name"], r["kernel_provider"]) for r in rows}
    for kernel, providers in CPU_PROVIDERS.items():
        for provider in providers:
            assert (kernel, provider) in ran, f"{provider} did not run {kernel}"
    for row in rows:
        assert row["gpu_name"] == "cpu" and row["version"] and row["timestamp"]
        assert (row["metric_name"], row["metric_unit"]) in {("speed", "ms"), ("memory", "MB")}
        assert row["kernel_operation_mode"] in {"forward", "backward", "full"}
        assert float(row["x_value"]) > 0
        assert 0 <= float(row["y_value_20"]) <= float(row["y_value_50"]) <= float(row["y_value_80"])
        assert json.loads(row["extra_benchmark_config_str"])["dtype"] == "float32"
    speed = {(r["kernel_name"], r["kernel_provider"], r["x_value"], r["extra_benchmark_config_str"])
             for r in rows if r["metric_name"] == "speed"}
    memory = {(r["kernel_name"], r["kernel_provider"], r["x_value"], r["extra_benchmark_config_str"])
              for r in rows if r["metric_name"] == "memory"}
    assert speed == memory


@pytest.mark.slow
def test_dry_run_accounts_for_every_provider(dry_run):
    """Every (case, provider) either has rows or is listed as not run, with its reason."""
    with open(dry_run / "results.csv", newline="") as f:
        speed_rows = [r for r in csv.DictReader(f) if r["metric_name"] == "speed"]
    summary = (dry_run / "summary.md").read_text()
    not_run = summary.split("## Not run", 1)[1]
    counts = [line.rsplit("|", 2)[1].strip() for line in not_run.splitlines() if "| not run: " in line]
    not_run_count = sum(int(count) for count in counts if count != "all")
    expected = sum(len(case.providers) for case in cases_for("dry-run"))
    assert len(speed_rows) + not_run_count == expected
    for provider in ("flex", "varlen", "mmkernels-cuda"):
        assert f"| {provider} | not run: " in not_run
    assert "| masked_region_loss | torch.compile | not run: not benchmarked: " in not_run
    for provider, module in PEERS.items():
        if importlib.util.find_spec(module) is None:
            assert f"| {provider} | not run: {provider} is not installed" in not_run


@pytest.mark.slow
def test_dry_run_writes_plots_and_summary(dry_run):
    for kernel in ("clip_loss", "siglip_loss", "info_nce_loss", "cross_attention", "cross_attention_padding",
                   "region_mask", "masked_region_loss", "clip_model"):
        assert (dry_run / f"{kernel}.png").stat().st_size > 0, kernel
    summary = (dry_run / "summary.md").read_text()
    for kernel in CPU_PROVIDERS:
        assert f"## {kernel}" in summary
    assert "| clip_loss |" not in summary.split("## Not run")[0]  # ratios sit under their kernel's heading
    assert "| mmkernels | " in summary and "x** |" in summary


def test_cpu_peak_memory_counts_live_storages():
    """The CPU's peak: storages alive at once, a freed one released, a view not counted again."""
    import torch

    from mmkernels.bench.timing import peak_memory_mb

    def step():
        first, second = torch.empty(2**18), torch.empty(2**18)  # 1 MiB each
        del first
        third = torch.empty(2**18)
        return second, third, third.view(-1)[:10]

    assert peak_memory_mb(step, torch.device("cpu")) == 2.0


@pytest.mark.parametrize("padding", [0.0, 0.25, 0.5, 0.75])
def test_attention_key_lengths_pad_the_asked_fraction(padding):
    from mmkernels.bench.steps import key_lengths

    lens = key_lengths(8, 2048, padding)
    assert lens.min() >= 1 and lens.max() <= 2048
    assert abs(1 - lens.sum().item() / (8 * 2048) - padding) < 1e-3
    assert (padding == 0) == bool((lens == 2048).all())
