"""`python -m mmkernels.train`: parse the options, set up the processes, run the variants, report."""
from __future__ import annotations

import os
import sys
import time

from mmkernels.train import ddp, options
from mmkernels.train.data import build_data
from mmkernels.train.loop import run_variant
from mmkernels.train.machine import describe, machine_info
from mmkernels.train.models import ModelSpec
from mmkernels.train.report import build_report, write_report
from mmkernels.train.tasks import VARIANTS

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
            if len(data.train) < cfg.batch_size:  # refused before a run directory exists
                raise ValueError(f"the training split has {len(data.train)} examples, "
                                 f"fewer than --batch-size {cfg.batch_size}")
        except (ValueError, OSError) as err:
            raise UsageError(str(err)) from err
        if cfg.max_batch and ctx.device.type != "cuda" and ctx.is_main:
            print("--max-batch is GPU-only (it searches the GPU memory a step fits in): skipped on CPU",
                  file=sys.stderr)
        info = machine_info(ctx.device, ctx.world)
        if ctx.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            options.save_config(cfg, os.path.join(cfg.out, RUN_MARKER))
            print(f"run directory: {cfg.out}\nmachine: {describe(info)}\ndata: {data.description}", file=sys.stderr)
            for problem in data.problems:
                print(f"skipped: {problem}", file=sys.stderr)
        ddp.barrier(ctx)
        variants = VARIANTS if cfg.compare else ("mmkernels",)
        results = [run_variant(cfg, ctx, data, spec, variant, cfg.out) for variant in variants]
        if not ctx.is_main:
            return None
        report = build_report(cfg, info, data.description, data.problems, results, time.perf_counter() - started)
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


