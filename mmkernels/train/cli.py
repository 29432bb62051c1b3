"""`python -m mmkernels.train`: parse the options, set up the processes, run the variants, report."""
from __future__ import annotations

import os
import sys
import time

from mmkernels.train import ddp, options
from mmkernels.train.checkpoint import RunClock
from mmkernels.train.data import build_data
from mmkernels.train.loop import patch_preview, run_variant
from mmkernels.train.machine import describe, machine_info
from mmkernels.train.models import ModelSpec
from mmkernels.train.report import build_report, write_report
from mmkernels.train.tasks import VARIANTS
from mmkernels.train.timing import BLOCK, interleaved_throughput, timing_rounds

RUN_MARKER = "config.json"


class UsageError(Exception):
    """A problem with the options or the data, found before training: reported without a traceback."""


def _config(argv: list[str], ctx) -> options.TrainConfig:
    args = options.build_parser().parse_args(argv)
    given = options.explicit_options(argv)
    if args.resume is not None:
        marker = os.path.join(args.resume, RUN_MARKER)
        if not os.path.exists(marker):
            raise ValueError(f"--resume {args.resume}: no run there (no {RUN_MARKER})")
        cfg = options.resumed_config(options.load_config(marker), args, given)
        cfg.out = args.resume
        return cfg
    cfg = options.resolve(args, cuda=ctx.device.type == "cuda")
    cfg.out = ddp.broadcast_object(ctx, cfg.out)  # one run directory (and time stamp) for all ranks
    if os.path.exists(os.path.join(cfg.out, RUN_MARKER)):
        raise ValueError(f"{cfg.out} already holds a run: pass --resume {cfg.out} to continue it, or another --out")
    return cfg


def _device(argv: list[str]) -> str:
    """--device: a resumed run's own (from its config), else the command line's."""
    args = options.build_parser().parse_args(argv)
    if args.resume is not None and os.path.exists(os.path.join(args.resume, RUN_MARKER)):
        return options.load_config(os.path.join(args.resume, RUN_MARKER)).device
    return args.device


def _summary(results) -> str:
    lines = []
    for r in results:
        ret = r.retrieval
        lines.append(
            f"{r.variant:>9}: {r.samples_per_s or 0:8.1f} samples/s, peak {r.peak_memory_bytes / 2**20:8.1f} MiB, "
            f"final loss {r.final_loss:.4f}, held-out R@1 i→t {ret.get('i2t_r1', 0):.1%} "
            f"t→i {ret.get('t2i_r1', 0):.1%} (chance {ret.get('chance_r1', 0):.2%})"
        )
    return "\n".join(lines)


def _nothing_patched(cfg, skipped: list[str]) -> str:
    lines = "\n".join(f"  {line}" for line in skipped) or "  (nothing it recognised as attention or a loss)"
    fusion = (" (in the fusion task the mmkernels variant would still mask regions and compute the region "
              "losses with mmkernels)") if cfg.task == "fusion" else ""
    return (f"mmkernels.patch swapped nothing in the {cfg.task} model: the mmkernels variant would run the "
            f"model's own code{fusion}, so the run would compare the model with itself. What it left as it is, "
            f"and why:\n{lines}\nFix the cause, or pass --allow-unpatched to train anyway (the report then "
            "says so and shows no mmkernels/baseline ratio).")


def _too_few_examples(data, cfg) -> str:
    """The batch-size refusal, after the bad pairs that may explain it."""
    listed = "".join(f"  {p}\n" for p in data.problems)
    bad = f"{len(data.problems)} bad pair(s) left out:\n{listed}" if data.problems else ""
    return f"{bad}the training split has {len(data.train)} examples, fewer than --batch-size {cfg.batch_size}"


def run(argv: list[str]) -> dict | None:
    """Run the command line `argv`; returns the report on rank 0 (None on the others)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # batches may be built in forked workers
    started = time.perf_counter()
    try:
        ctx = ddp.setup(_device(argv))
    except ValueError as err:
        raise UsageError(str(err)) from err
    try:
        try:
            cfg = _config(argv, ctx)
            spec = ModelSpec(cfg.task, cfg.loss, cfg.model)
            data = build_data(cfg, spec)
            # refused before a run directory exists
            if len(data.train) < cfg.batch_size:
                raise ValueError(_too_few_examples(data, cfg))
            if not cfg.allow_unpatched:
                swapped, skipped = patch_preview(cfg, ctx, data, spec)
                if swapped == 0:
                    raise ValueError(_nothing_patched(cfg, skipped))
        except (ValueError, OSError) as err:
            raise UsageError(str(err)) from err
        if cfg.max_batch and ctx.device.type != "cuda" and ctx.is_main:
            print("--max-batch is GPU-only (it searches the GPU memory a step fits in): skipped on CPU",
                  file=sys.stderr)
        info = machine_info(ctx.device, ctx.world)
        clock = RunClock(cfg.out, started)
        if ctx.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            options.save_config(cfg, os.path.join(cfg.out, RUN_MARKER))
            print(f"run directory: {cfg.out}\nmachine: {describe(info)}\ndata: {data.description}", file=sys.stderr)
            for problem in data.problems:
                print(f"skipped: {problem}", file=sys.stderr)
        ddp.barrier(ctx)
        variants = VARIANTS if cfg.compare else ("mmkernels",)
        results = [run_variant(cfg, ctx, data, spec, variant, cfg.out, clock) for variant in variants]
        if ctx.is_main:
            print(f"samples/s: {timing_rounds(cfg.steps)} rounds of {BLOCK} timed steps per variant, the "
                  "variants taking turns", file=sys.stderr)
        timing = interleaved_throughput(cfg, ctx, data, spec, variants)
        if not ctx.is_main:
            return None
        for r in results:
            t = timing["variants"][r.variant]
            r.samples_per_s, r.samples_per_s_p20, r.samples_per_s_p80 = t["median"], t["p20"], t["p80"]
        report = build_report(cfg, info, data.description, data.problems, results, clock.total(), timing)
        paths = write_report(cfg.out, report)
        print(_summary(results), file=sys.stderr)
        print(f"report: {paths['md']} (and {os.path.basename(paths['json'])}, {os.path.basename(paths['png'])})",
              file=sys.stderr)
        return report
    finally:
        ddp.teardown(ctx)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


