"""pytest-benchmark's JSON into the report: results.csv in Liger-Kernel's benchmark schema, one plot
per op (speed and memory against x; attention also against the padding fraction) and summary.md
(per row the ratio of mmkernels to the best other provider, and every provider that did not run).

Rows: one "speed" row (ms: median, 20th and 80th percentile of the timed rounds) and one "memory"
row (MB, as Liger writes it: MiB, the peak of one call above what was allocated before it) per
(case, provider) that ran.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

COLUMNS = ["kernel_name", "kernel_provider", "kernel_operation_mode", "metric_name", "metric_unit", "x_name",
           "x_value", "y_value_50", "y_value_20", "y_value_80", "extra_benchmark_config_str", "gpu_name",
           "timestamp", "version"]


def rows_from_json(benchmark_json: Path, version: str) -> list[dict]:
    data = json.loads(Path(benchmark_json).read_text())
    timestamp = data.get("datetime", "")
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "kernel_name" not in info:
            continue
        common = dict(kernel_name=info["kernel_name"], kernel_provider=info["kernel_provider"],
                      kernel_operation_mode=info["kernel_operation_mode"], x_name=info["x_name"],
                      x_value=info["x_value"], extra_benchmark_config_str=json.dumps(info["config"], sort_keys=True),
                      gpu_name=info["device"], timestamp=timestamp, version=version)
        rows.append(dict(common, metric_name="speed", metric_unit="ms", y_value_50=info["ms_50"],
                         y_value_20=info["ms_20"], y_value_80=info["ms_80"]))
        if info.get("peak_memory_mib") is not None:
            peak = info["peak_memory_mib"]
            rows.append(dict(common, metric_name="memory", metric_unit="MB", y_value_50=peak, y_value_20=peak,
                             y_value_80=peak))
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _is_ours(provider: str) -> bool:
    return provider.startswith("mmkernels")


def _label(config: dict, skip=("dtype",)) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items() if k not in skip)


def _curves(rows, kernel, metric, x_key):
    """{fixed config label: {provider: [(x, y50, y20, y80)]}} for plotting against x_key, where x_key is
    "x" (the row's x_name) or a key of the config (then the row's x joins the fixed part)."""
    curves = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["kernel_name"] != kernel or row["metric_name"] != metric:
            continue
        config = json.loads(row["extra_benchmark_config_str"])
        config.pop("compile", None)
        if x_key == "x":
            x = row["x_value"]
        else:
            x = config.pop(x_key)
            config = {row["x_name"]: row["x_value"], **config}
        curves[_label(config)][row["kernel_provider"]].append(
            (x, row["y_value_50"], row["y_value_20"], row["y_value_80"]))
    return curves


def plot_kernel(rows: list[dict], kernel: str, path: Path, x_key: str = "x", x_label: str | None = None,
                min_points: int = 1) -> bool:
    """Speed (top) and memory (bottom) against x, one column per fixed configuration with a curve of
    at least `min_points` points, one line per provider with its 20-80th percentile band. False when
    there is no such configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = _curves(rows, kernel, "speed", x_key)
    speed = {group: lines for group, lines in speed.items()
             if any(len(points) >= min_points for points in lines.values())}
    if not speed:
        return False
    memory = _curves(rows, kernel, "memory", x_key)
    x_name = x_label or next(r["x_name"] for r in rows if r["kernel_name"] == kernel)
    fig, axes = plt.subplots(2, len(speed), figsize=(5 * len(speed), 7), squeeze=False)
    for column, group in enumerate(sorted(speed)):
        for row_index, (metric, unit, curves) in enumerate((("speed", "ms", speed), ("memory", "MB", memory))):
            ax = axes[row_index][column]
            for provider, points in sorted(curves.get(group, {}).items()):
                points.sort()
                xs, y50, y20, y80 = zip(*points)
                line, = ax.plot(xs, y50, marker="o", label=provider, linewidth=2.5 if _is_ours(provider) else 1.2)
                ax.fill_between(xs, y20, y80, alpha=0.2, color=line.get_color())
            xs_all = sorted({p[0] for points in curves.get(group, {}).values() for p in points})
            if xs_all and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 4:
                ax.set_xscale("log", base=2)
            ys_all = [p[1] for points in curves.get(group, {}).values() for p in points if p[1] > 0]
            if ys_all and max(ys_all) / min(ys_all) >= 10:
                ax.set_yscale("log")
            ax.set_xlabel(x_name)
            ax.set_ylabel(f"{metric} ({unit})")
            ax.set_title(f"{kernel} {metric}\n{group}", fontsize=9)
            ax.grid(alpha=0.3)
            if column == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def summary_markdown(rows: list[dict], not_run: list[dict], header: list[str]) -> str:
    """Per kernel: one line per (case, metric, mmkernels provider) with the best other provider and
    the ratio; then the providers that did not run, with their reasons."""
    lines = list(header)
    cells = defaultdict(dict)  # (kernel, config, x, mode, metric) -> provider -> y50
    for row in rows:
        key = (row["kernel_name"], row["extra_benchmark_config_str"], row["x_name"], row["x_value"],
               row["kernel_operation_mode"], row["metric_name"], row["metric_unit"])
        cells[key][row["kernel_provider"]] = row["y_value_50"]
    kernels = list(dict.fromkeys(row["kernel_name"] for row in rows))
    for kernel in kernels:
        lines += ["", f"## {kernel}", "", "| config | x | mode | metric | provider | value | best other | value | ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, values in cells.items():
            if key[0] != kernel:
                continue
            _, config, x_name, x_value, mode, metric, unit = key
            config = json.loads(config)
            config.pop("compile", None)
            others = {p: v for p, v in values.items() if not _is_ours(p)}
            best = min(others, key=others.get) if others else None
            for provider in sorted(p for p in values if _is_ours(p)):
                ours = values[provider]
                ratio = f"**{ours / others[best]:.2f}x**" if best and others[best] > 0 else "n/a"
                lines.append(f"| {_label(config)} | {x_name}={x_value} | {mode} | {metric} ({unit}) | {provider} | "
                             f"{_fmt(ours)} | {best or 'none ran'} | {_fmt(others[best]) if best else ''} | {ratio} |")
    lines += ["", "## Not run", ""]
    if not not_run:
        lines.append("Every provider ran every case.")
    else:
        grouped = defaultdict(list)
        for entry in not_run:
            grouped[(entry["kernel_name"], entry["kernel_provider"], entry["reason"])].append(entry["case"])
        lines += ["| kernel | provider | reason | cases |", "|---|---|---|---|"]
        for (kernel, provider, reason), cases in grouped.items():
            reason = reason.replace("|", "\\|")
            count = "all" if "all" in cases else len(cases)
            lines.append(f"| {kernel} | {provider} | not run: {reason} | {count} |")
    return "\n".join(lines) + "\n"


def read_not_run(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_report(benchmark_json: Path, not_run_log: Path, out_dir: Path, version: str, header: list[str],
                 not_offered: list[dict] = ()) -> dict:
    """results.csv, <kernel>.png (and cross_attention_padding.png) and summary.md in out_dir; returns
    the paths written. not_offered: providers left out on purpose, listed with those that did not run
    (case "all")."""
    rows = rows_from_json(benchmark_json, version) if Path(benchmark_json).exists() else []
    not_run = read_not_run(not_run_log) + list(not_offered)
    written = {"csv": out_dir / "results.csv", "summary": out_dir / "summary.md", "plots": []}
    write_csv(rows, written["csv"])
    for kernel in dict.fromkeys(row["kernel_name"] for row in rows):
        if plot_kernel(rows, kernel, out_dir / f"{kernel}.png"):
            written["plots"].append(out_dir / f"{kernel}.png")
        if kernel == "cross_attention" and plot_kernel(rows, kernel, out_dir / f"{kernel}_padding.png", "padding",
                                                       "padding fraction", min_points=2):
            written["plots"].append(out_dir / f"{kernel}_padding.png")
    plots = ", ".join(p.name for p in written["plots"]) or "none (nothing ran)"
    written["summary"].write_text(summary_markdown(rows, not_run, header + ["", f"Plots: {plots}."]))
    return written
