"""The run's report: runs/<name>/report.json (everything), report.md (the table), curves.png (the plot).

For each variant: samples/s (median and p20-p80 of the interleaved timed steps, timing.py), peak
memory, final loss, held-out retrieval R@1/R@5 both ways, the largest batch (--max-batch), and the
ratio mmkernels / baseline of each. Warnings go at the top of report.md (and in report.json's
"warnings"): a variant whose held-out R@1 is not above chance (it did not learn, so its ratios
compare nothing), and a run in which `mmkernels.patch` swapped nothing (--allow-unpatched; no ratio
is shown then). On the CPU the samples/s ratio says in its cell that it is no speed claim.
"""
from __future__ import annotations

import json
import math
import os

from mmkernels.train.machine import describe

MIB = 1024 * 1024
RETRIEVAL = (("i2t_r1", "R@1 image→text"), ("i2t_r5", "R@5 image→text"),
             ("t2i_r1", "R@1 text→image"), ("t2i_r5", "R@5 text→image"))


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def ratios(baseline: dict, ours: dict) -> dict:
    """mmkernels / baseline for every measured quantity (None where either is missing)."""
    out = {
        "samples_per_s": _ratio(ours["samples_per_s"], baseline["samples_per_s"]),
        "peak_memory": _ratio(ours["peak_memory_bytes"], baseline["peak_memory_bytes"]),
        "final_loss": _ratio(ours["final_loss"], baseline["final_loss"]),
        "max_batch": _ratio(ours["max_batch"], baseline["max_batch"]),
    }
    for key, _ in RETRIEVAL:
        out[key] = _ratio(ours["retrieval"].get(key), baseline["retrieval"].get(key))
    return out


def curve_gap(a: list, b: list) -> dict:
    """The largest step-by-step difference of two loss curves, absolute and relative to the loss."""
    pairs = list(zip(a, b))
    if not pairs:
        return {"max_abs": None, "max_rel": None}
    return {"max_abs": max(abs(x - y) for x, y in pairs),
            "max_rel": max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs)}


def learned(retrieval: dict) -> bool | None:
    """Whether held-out R@1 is above chance in either direction: more hits than chance gives plus 3
    standard deviations (binomial over the n pairs). None without held-out pairs."""
    n, chance = retrieval.get("n", 0), retrieval.get("chance_r1")
    if not n or chance is None:
        return None
    bound = n * chance + 3 * math.sqrt(n * chance * (1 - chance))
    return max(retrieval.get("i2t_r1", 0), retrieval.get("t2i_r1", 0)) * n > bound


def _warnings(report: dict) -> list[str]:
    out = []
    if report["unpatched"]:
        out.append("mmkernels.patch swapped nothing in this run (--allow-unpatched): both variants ran the "
                   "model's own code, so no mmkernels / baseline ratio is shown.")
    for name, v in report["variants"].items():
        r = v["retrieval"]
        if report["learned"][name] is False:
            out.append(f"{name} did not learn: held-out R@1 (image→text {r['i2t_r1']:.1%}, text→image "
                       f"{r['t2i_r1']:.1%}) is not above chance ({r['chance_r1']:.2%}) over {r['n']} pairs; "
                       "its numbers compare a model that learned nothing (more steps, another --lr?).")
        elif report["learned"][name] is None:
            out.append(f"{name}: no held-out pairs, so whether it learned is not measured.")
    return out


def build_report(cfg, info: dict, data_description: str, problems: list, results: list, wall_seconds: float,
                 timing: dict | None = None) -> dict:
    variants = {r.variant: r.to_json() for r in results}
    report = {
        "config": cfg.to_json(),
        "machine": info,
        "data": data_description,
        "bad_data": [str(p) for p in problems],
        "variants": variants,
        "wall_seconds": wall_seconds,
        "unpatched": variants.get("mmkernels", {}).get("patched_count") == 0,
        "learned": {name: learned(v["retrieval"]) for name, v in variants.items()},
    }
    if timing is not None:
        report["throughput"] = timing
    if "baseline" in variants and "mmkernels" in variants:
        if not report["unpatched"]:
            report["ratios"] = ratios(variants["baseline"], variants["mmkernels"])
            if timing is not None and "ratio" in timing:
                report["ratios"]["samples_per_s_p20"] = timing["ratio"]["p20"]
                report["ratios"]["samples_per_s_p80"] = timing["ratio"]["p80"]
        report["loss_curve_gap"] = curve_gap(variants["baseline"]["losses"], variants["mmkernels"]["losses"])
    report["warnings"] = _warnings(report)
    return report


def _fmt(value, spec: str = ".4g", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def markdown(report: dict) -> str:
    cfg, variants = report["config"], report["variants"]
    names = list(variants)
    compare = "ratios" in report
    cpu = report["machine"]["gpu"] is None
    model = f"{cfg['task']} task, {cfg['loss'] + ' loss, ' if cfg['task'] == 'clip' else ''}{cfg['model']} preset"
    lines = [f"# mmkernels training report: {model}", ""]
    if report.get("warnings"):
        lines += [f"> **Warning:** {w}" for w in report["warnings"]] + [""]
    lines += [
        f"- Machine: {describe(report['machine'])}",
        f"- Run: {cfg['steps']} steps, global batch {cfg['batch_size']}, {cfg['precision']}, lr {cfg['lr']}, "
        f"seed {cfg['seed']}, {report['machine']['processes']} process(es); baseline: {cfg['baseline']}"
        f"{'; every variant compiled' if cfg['compile'] else ''}",
        f"- Data: {report['data']}",
        f"- Wall time: {report['wall_seconds']:.0f} s",
        "",
    ]
    header = "| | " + " | ".join(names) + (" | mmkernels / baseline |" if compare else " |")
    lines += [header, "|---" * (len(names) + 1 + compare) + "|"]

    def row(label, values, ratio_key=None, ratio_fmt=".3f"):
        cells = " | ".join(values)
        ratio = ""
        if compare:
            ratio = " | " + _fmt(report["ratios"].get(ratio_key), ratio_fmt, "×") if ratio_key else " | "
        lines.append(f"| {label} | {cells}{ratio} |")

    first = variants[names[0]]
    throughput = report.get("throughput")
    speed_label = "samples/s"
    if throughput:
        speed_label = (f"samples/s, median (p20–p80) of {throughput['rounds'] * throughput['block']} steps "
                       f"each, the variants interleaved")
    speed = [_fmt(variants[n]["samples_per_s"], ".1f") + (
        f" ({_fmt(variants[n]['samples_per_s_p20'], '.1f')}–{_fmt(variants[n]['samples_per_s_p80'], '.1f')})"
        if variants[n].get("samples_per_s_p20") is not None else "") for n in names]
    if compare:
        r = report["ratios"]
        cell = _fmt(r.get("samples_per_s"), ".3f", "×")
        if r.get("samples_per_s_p20") is not None:
            cell += f" (per round {r['samples_per_s_p20']:.2f}–{r['samples_per_s_p80']:.2f}×)"
        if cpu:
            cell += ": not a speed claim, the CPU runs mmkernels' reference path"
        lines.append(f"| {speed_label} | {' | '.join(speed)} | {cell} |")
    else:
        row(speed_label, speed)
    row(f"peak memory, MiB ({first['memory_kind']})",
        [_fmt(variants[n]["peak_memory_bytes"] / MIB, ".1f") for n in names], "peak_memory")
    row("final loss", [_fmt(variants[n]["final_loss"], ".4f") for n in names], "final_loss")
    for key, label in RETRIEVAL:
        row(f"held-out {label}", [_fmt(variants[n]["retrieval"].get(key), ".1%") for n in names], key)
    if cfg["max_batch"]:
        row("largest batch", [_fmt(variants[n]["max_batch"], "d") for n in names], "max_batch", ".2f")
    chance = first["retrieval"].get("chance_r1")
    lines += ["", f"Retrieval over {first['retrieval'].get('n', 0)} held-out pairs; chance R@1 = {_fmt(chance, '.2%')}."]
    if "loss_curve_gap" in report:
        gap = report["loss_curve_gap"]
        lines.append(f"Loss curves: largest step-by-step difference {_fmt(gap['max_abs'], '.3g')} "
                     f"(relative {_fmt(gap['max_rel'], '.3g')}).")
        if cfg["task"] == "fusion":
            lines.append("(The fusion variants draw different region masks, eager torch.rand against "
                         "region_mask's counter-based hash: their curves agree in distribution, not step by step.)")
    if compare and cpu:
        lines.append("(On the CPU the patched model runs mmkernels' plain-PyTorch reference path: the kernels "
                     "need a GPU, so this run shows the same function and learning, not the speed-up.)")
    notes = [f"- {n}: {variants[n]['max_batch_note']}" for n in names if variants[n]["max_batch_note"]]
    if notes:
        lines += ["", "Largest batch:"] + notes
    patched = [v["patched"] for v in variants.values() if v["patched"]]
    if patched:
        lines += ["", "What `mmkernels.patch(model, global_loss=True)` swapped:", "", "```", patched[0], "```"]
    if report["bad_data"]:
        lines += ["", f"Left out ({len(report['bad_data'])} bad pairs):", ""] + [f"- {p}" for p in report["bad_data"]]
    if report.get("curves"):
        lines += ["", f"![loss curves, throughput and memory]({report['curves']})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """curves.png: the loss per step of each variant; samples/s and peak memory side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = list(variants)
    colours = {"baseline": "tab:gray", "mmkernels": "tab:orange"}
    styles = {"baseline": "-", "mmkernels": "--"}  # dashed over solid: identical curves stay visible
    fig, (ax_loss, ax_speed, ax_mem) = plt.subplots(1, 3, figsize=(15, 4.2),
                                                     gridspec_kw={"width_ratios": [2.2, 1, 1]})
    for n in names:
        ax_loss.plot(range(1, len(variants[n]["losses"]) + 1), variants[n]["losses"], label=n,
                     color=colours.get(n), linestyle=styles.get(n), linewidth=1.2, alpha=0.85)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss per step")
    ax_loss.legend()
    speed_note = ("CPU: reference path, not a speed claim" if report["machine"]["gpu"] is None
                  else "the variants interleaved")
    bars = [(ax_speed, "samples_per_s", 1.0, f"samples/s, median and p20–p80\n({speed_note})"),
            (ax_mem, "peak_memory_bytes", MIB, f"peak memory, MiB\n({variants[names[0]]['memory_kind']})")]
    for ax, key, scale, title in bars:
        values = [(variants[n][key] or 0) / scale for n in names]
        errors = None
        if key == "samples_per_s" and all(variants[n].get("samples_per_s_p20") is not None for n in names):
            errors = [[v - variants[n]["samples_per_s_p20"] for n, v in zip(names, values)],
                      [variants[n]["samples_per_s_p80"] - v for n, v in zip(names, values)]]
        ax.bar(names, values, color=[colours.get(n) for n in names], yerr=errors, capsize=6)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.4g}", (i, v), ha="center", va="bottom")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{report['config']['task']} / {report['config']['model']} on {describe(report['machine'])}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str, report: dict) -> dict:
    """report.json, curves.png and report.md in run_dir; returns the paths written."""
    paths = {"json": os.path.join(run_dir, "report.json"), "md": os.path.join(run_dir, "report.md"),
             "png": os.path.join(run_dir, "curves.png")}
    plot(report, paths["png"])
    report["curves"] = "curves.png"
    for key, text in (("json", json.dumps(report, indent=1)), ("md", markdown(report))):
        tmp = paths[key] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, paths[key])
    return paths
