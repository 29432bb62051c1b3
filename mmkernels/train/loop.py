"""One variant's training run: build, (patch,) train with checkpoints, measure, evaluate.

    result = run_variant(cfg, ctx, data, spec, "mmkernels", run_dir)

The mmkernels variant is exactly the baseline's model after
`handle = mmkernels.patch(model, global_loss=True)` (under torchrun its contrastive loss is then that
of the global batch; and, in the fusion task, mmkernels' region masking and losses; see tasks.py);
the patch is undone at the end. Each step's time is recorded (a synchronised start to a
synchronised end: forward, backward, optimizer; the batch is already on the device), but the
variants train one after the other, so the throughput the report compares is measured apart, with
the variants interleaved (timing.py).
`patch_preview` tells, before anything is trained, what the patch would swap. Checkpoints (runs/<name>/<variant>/checkpoint.pt) hold the model, the
optimizer, the scheduler, the gradient scaler, every RNG state of every rank, the step (the data
position: batches are a function of the step) and the measurements so far, so a resumed run
continues exactly where the checkpoint was taken.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

import mmkernels
from mmkernels.train import checkpoint, ddp
from mmkernels.train.data import BatchOrder, batch_loader, collate, heldout_batches
from mmkernels.train.machine import PeakMemory
from mmkernels.train.maxbatch import largest_batch
from mmkernels.train.models import build_model, count_parameters
from mmkernels.train.options import WEIGHT_DECAY
from mmkernels.train.retrieval import recall_at_k
from mmkernels.train.tasks import make_task

# the mmkernels variant's patch: under torchrun the patched contrastive loss is the global batch's
PATCH_OPTIONS = dict(global_loss=True)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
# what must match between a checkpoint and the run that resumes it
FINGERPRINT = ("task", "loss", "model", "seed", "batch_size", "steps", "lr", "precision", "compile", "baseline",
               "mask_prob", "data", "train_size")


@dataclass
class VariantResult:
    variant: str
    steps: int
    losses: list = field(default_factory=list)          # per step, all steps of the run
    step_seconds: list = field(default_factory=list)    # per step timed (a resumed run: all of them)
    warmup_steps: int = 0
    samples_per_s: float | None = None                  # from timing.py: median, p20, p80 of per-step samples/s
    samples_per_s_p20: float | None = None
    samples_per_s_p80: float | None = None
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    final_loss: float | None = None
    retrieval: dict = field(default_factory=dict)
    max_batch: int | None = None
    max_batch_note: str = ""
    patched: str = ""
    patched_count: int | None = None                    # modules the patch swapped (None: the baseline)
    parameters: int = 0
    resumed_from_step: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def warmup_steps(steps: int) -> int:
    """The first steps, whose times include one-off costs (allocations, compilation): the first 10%
    (at least 3, at most steps - 1)."""
    return max(0, min(steps - 1, max(3, steps // 10)))


def patch_preview(cfg, ctx, data, spec) -> tuple[int, list[str]]:
    """(how many modules `mmkernels.patch` swaps in this run's model, "path kind: reason" of each one
    it leaves as it is), from a model built as the mmkernels variant builds it, then undone and dropped."""
    model = build_model(spec, len(data.tokenizer), data.pad_id, data.end_id, cfg.seed,
                        region_dim=data.region_dim, num_region_classes=data.num_region_classes)
    model.to(ctx.device, dtype=torch.float64 if cfg.precision == "fp64" else None)
    handle = mmkernels.patch(model, **PATCH_OPTIONS)
    try:
        return len(handle.records), [f"{s.path or '(model)'} {s.kind}: {s.reason}" for s in handle.skipped]
    finally:
        handle.undo()


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases, norms, logit scale/bias
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(steps: int):
    warm = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return factor


class _Trainer:
    """The model, optimizer, scheduler and scaler of one variant, and its step."""

    def __init__(self, cfg, ctx, data, spec, variant, task, compiled: bool):
        self.cfg, self.ctx, self.variant, self.task = cfg, ctx, variant, task
        self.dtype = DTYPES[cfg.precision]
        model = build_model(spec, len(data.tokenizer), data.pad_id, data.end_id, cfg.seed,
                            region_dim=data.region_dim, num_region_classes=data.num_region_classes)
        model.to(ctx.device, dtype=torch.float64 if cfg.precision == "fp64" else None)
        self.model = model
        self.handle = mmkernels.patch(model, **PATCH_OPTIONS) if variant == "mmkernels" else None
        self.optimizer = torch.optim.AdamW(_param_groups(model, WEIGHT_DECAY), lr=cfg.lr, betas=(0.9, 0.98),
                                           eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(cfg.steps))
        self.scaler = torch.amp.GradScaler(ctx.device.type) if cfg.precision == "fp16" else None
        forward = model
        if ctx.distributed:
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.forward = torch.compile(forward) if compiled else forward

    def autocast(self):
        if self.cfg.precision in ("bf16", "fp16"):
            return torch.autocast(self.ctx.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def step(self, batch: dict, step: int) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.task.loss(self.forward, batch, self.variant, step)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])

    def close(self) -> tuple[str, int | None]:
        """Undo the patch; returns (what it did, as text, how many modules it swapped), ("", None) for the baseline."""
        if self.handle is None:
            return "", None
        text, count = str(self.handle), len(self.handle.records)
        self.handle.undo()
        return text, count


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fingerprint(cfg) -> dict:
    return {name: getattr(cfg, name) for name in FINGERPRINT}


def _save(trainer, ctx, path, step, result: VariantResult, cfg, clock) -> None:
    """A checkpoint after `step` completed steps (every rank takes part: the RNG states are per rank)."""
    rngs = ddp.gather_objects(ctx, checkpoint.rng_state())
    if ctx.is_main:
        state = trainer.state()
        state.update(step=step, rng=rngs, world=ctx.world, variant=result.variant, config=_fingerprint(cfg),
                     losses=list(result.losses), step_seconds=list(result.step_seconds))
        checkpoint.save_atomic(state, path)
        if clock is not None:
            clock.save()
    ddp.barrier(ctx)


def _restore(trainer, ctx, path, cfg, result: VariantResult) -> int:
    """Load the variant's checkpoint if there is one; returns the step to continue from."""
    if ctx.is_main:
        checkpoint.remove_stale_temporaries(path)
    state = checkpoint.load(path)
    if state is None:
        return 0
    if state["config"] != _fingerprint(cfg):
        raise ValueError(f"{path} was written by a run with other options: {state['config']}")
    if state["world"] != ctx.world:
        raise ValueError(f"{path} was written by {state['world']} processes; resume it with as many, not {ctx.world}")
    trainer.load(state)
    checkpoint.set_rng_state(state["rng"][ctx.rank])
    result.losses, result.step_seconds = list(state["losses"]), list(state["step_seconds"])
    result.resumed_from_step = state["step"]
    return state["step"]


def _evaluate(trainer, ctx, data, task) -> dict:
    if len(data.heldout) == 0:  # a --data folder of fewer than 5 pairs holds none out
        return {"n": 0}
    model = trainer.model
    model.eval()
    try:
        batches = (_to_device(b, ctx.device) for b in heldout_batches(data, max(1, trainer.cfg.batch_size)))
        with trainer.autocast():
            scores = task.scores(model, batches)
    finally:
        model.train()
    captions = [data.heldout[i].caption for i in range(len(data.heldout))]
    return recall_at_k(scores, captions)


def run_variant(cfg, ctx, data, spec, variant: str, run_dir: str, clock=None) -> VariantResult:
    """Train (or finish, or load the result of) one variant; returns its measurements. `clock`
    (a checkpoint.RunClock) saves the run's elapsed time with every checkpoint."""
    from tqdm import tqdm

    variant_dir = os.path.join(run_dir, variant)
    result_path = os.path.join(variant_dir, "result.json")
    if os.path.exists(result_path):  # finished before a resume: nothing to redo
        with open(result_path) as f:
            return VariantResult(**json.load(f))
    os.makedirs(variant_dir, exist_ok=True)
    ckpt_path = os.path.join(variant_dir, "checkpoint.pt")
    task = make_task(cfg, ctx, torch.float64 if cfg.precision == "fp64" else torch.float32, data.num_region_classes)
    compiled = cfg.compile or (variant == "baseline" and cfg.baseline == "compile")
    trainer = _Trainer(cfg, ctx, data, spec, variant, task, compiled)
    result = VariantResult(variant=variant, steps=cfg.steps, warmup_steps=warmup_steps(cfg.steps),
                           parameters=count_parameters(trainer.model))
    start = _restore(trainer, ctx, ckpt_path, cfg, result)
    order = BatchOrder(len(data.train), cfg.batch_size, cfg.seed)
    memory = PeakMemory(ctx.device)
    result.memory_kind = memory.kind
    memory.start()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"{variant:>9}", disable=not ctx.is_main, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    loader = iter(batch_loader(data, order, start, cfg.steps, ctx.rank, ctx.world, cfg.workers,
                               pin_memory=ctx.device.type == "cuda"))
    for step in range(start, cfg.steps):
        try:
            _, batch = next(loader)
        except Exception:
            # the state is that of the last completed step: keep it before giving up
            _save(trainer, ctx, ckpt_path, step, result, cfg, clock)
            raise
        batch = _to_device(batch, ctx.device)
        _sync(ctx.device)
        t0 = time.perf_counter()
        loss = trainer.step(batch, step)
        _sync(ctx.device)
        seconds = time.perf_counter() - t0
        value = ddp.mean_over_ranks(ctx, loss.float()).item()
        result.losses.append(value)
        result.step_seconds.append(seconds)
        bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{cfg.batch_size / seconds:.0f}", refresh=False)
        bar.update(1)
        done = step + 1
        if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
            _save(trainer, ctx, ckpt_path, done, result, cfg, clock)
    bar.close()
    result.peak_memory_bytes = memory.peak()
    result.final_loss = result.losses[-1] if result.losses else None
    if ctx.is_main:
        result.retrieval = _evaluate(trainer, ctx, data, task)
    ddp.barrier(ctx)
    if cfg.max_batch:
        result.max_batch, result.max_batch_note = _max_batch(cfg, ctx, data, spec, variant, task, compiled)
    result.patched, result.patched_count = trainer.close()
    del trainer
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    if ctx.is_main:
        tmp = result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result.to_json(), f, indent=1)
        os.replace(tmp, result_path)
        if clock is not None:
            clock.save()
    return result


def _max_batch(cfg, ctx, data, spec, variant, task, compiled) -> tuple[int | None, str]:
    if ctx.device.type != "cuda":
        return None, "GPU only: on the CPU the limit is the machine's RAM, not a memory pool to measure"
    if ctx.distributed:
        return None, "measured in single-process runs only (every rank would have to agree on each out-of-memory)"
    template = _to_device(collate([data.train[i] for i in range(cfg.batch_size)], data), ctx.device)

    def build():
        return _Trainer(cfg, ctx, data, spec, variant, task, compiled)

    return largest_batch(build, template, start=cfg.batch_size)
