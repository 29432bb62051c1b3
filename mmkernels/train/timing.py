"""Throughput with the variants interleaved, so that a change of load lands on all of them alike.

    timing = interleaved_throughput(cfg, ctx, data, spec, ("baseline", "mmkernels"))

The variants train one after the other, so on a shared machine a process that starts or stops
during the run slows one variant and not the other (the same command gave mmkernels / baseline
samples/s from 0.03x to 14x on a 2-core CPU shared with another job). After training, a fresh
trainer per variant (the same seed: the same model, optimizer and batches) is built, all alive at
once, and they take turns: WARMUP untimed steps each, then `rounds` rounds in which every variant
runs BLOCK consecutive timed steps, the order of the variants reversed from one round to the next.
Each timed step runs from a synchronised start to a synchronised end (forward, backward, optimizer;
the batch already on the device, the same batches for every variant). These steps train throwaway
copies: the run's losses, checkpoints and results are untouched, and every RNG state is restored.

Returns {"rounds", "block", "schedule": [[variant, round, start_s, seconds], ...] in the order the
steps ran, "variants": {name: {"median", "p20", "p80"} of the steps' samples/s}, and with two
variants "ratio": {"median": median mmkernels / median baseline, "p20", "p80" of the per-round
ratios of the two variants' block medians}}.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

from mmkernels.train import checkpoint
from mmkernels.train.data import BatchOrder, batch_loader
from mmkernels.train.loop import _sync, _to_device, _Trainer
from mmkernels.train.tasks import make_task

WARMUP = 3
BLOCK = 5


def timing_rounds(steps: int) -> int:
    """Rounds of BLOCK timed steps per variant: one per 50 training steps, at least 2, at most 12
    (the default CPU run: 60 timed steps per variant, about 4 s)."""
    return max(2, min(12, steps // 50))


def spread(values: list[float]) -> dict:
    """{"median", "p20", "p80"} of `values` (None for each when there are none)."""
    if not values:
        return {"median": None, "p20": None, "p80": None}
    if len(values) == 1:
        return {"median": values[0], "p20": values[0], "p80": values[0]}
    cuts = statistics.quantiles(values, n=5, method="inclusive")
    return {"median": statistics.median(values), "p20": cuts[0], "p80": cuts[3]}


def interleaved_throughput(cfg, ctx, data, spec, variants) -> dict:
    rng = checkpoint.rng_state()
    rounds = timing_rounds(cfg.steps)
    order = BatchOrder(len(data.train), cfg.batch_size, cfg.seed)
    batches = [_to_device(b, ctx.device) for _, b in batch_loader(data, order, 0, BLOCK, ctx.rank, ctx.world)]
    task = make_task(cfg, ctx, torch.float64 if cfg.precision == "fp64" else torch.float32, data.num_region_classes)
    trainers = {}
    for variant in variants:
        compiled = cfg.compile or (variant == "baseline" and cfg.baseline == "compile")
        trainers[variant] = _Trainer(cfg, ctx, data, spec, variant, task, compiled)
    steps = dict.fromkeys(variants, 0)

    def step(variant: str) -> float:
        i = steps[variant]
        steps[variant] += 1
        batch = batches[i % len(batches)]
        _sync(ctx.device)
        t0 = time.perf_counter()
        trainers[variant].step(batch, i)
        _sync(ctx.device)
        return time.perf_counter() - t0

    try:
        for _ in range(WARMUP):
            for variant in variants:
                step(variant)
        origin = time.perf_counter()
        schedule = []
        for r in range(rounds):
            for variant in (variants if r % 2 == 0 else variants[::-1]):
                for _ in range(BLOCK):
                    start = time.perf_counter() - origin
                    schedule.append([variant, r, start, step(variant)])
    finally:
        for trainer in trainers.values():
            trainer.close()
        del trainers
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        checkpoint.set_rng_state(rng)

    def rates(variant, r=None):
        return [cfg.batch_size / s for v, rr, _, s in schedule if v == variant and (r is None or rr == r)]

    out = {"rounds": rounds, "block": BLOCK, "warmup": WARMUP, "schedule": schedule,
           "variants": {v: spread(rates(v)) for v in variants}}
    if set(variants) == {"baseline", "mmkernels"}:
        per_round = [statistics.median(rates("mmkernels", r)) / statistics.median(rates("baseline", r))
                     for r in range(rounds)]
        ratio = spread(per_round)
        ratio["median"] = out["variants"]["mmkernels"]["median"] / out["variants"]["baseline"]["median"]
        out["ratio"] = ratio
    return out
