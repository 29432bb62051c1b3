"""`--max-batch`: the largest batch one training step fits in GPU memory.

Doubling from the run's batch size until a step runs out of memory, then bisection between the
last size that fit and the first that did not, down to 1/32 of the size that fit (the answer is
within ~3% below the true limit). Each try is one full training step (forward, backward, AdamW
step, so the optimizer state is allocated too) on a fresh model built as the variant's was; the
rows are the run's first batch repeated, since memory depends on the shapes alone.
"""
from __future__ import annotations

import gc

import torch

LIMIT = 1 << 20  # no search goes past a million rows


def _tile(template: dict, rows: int) -> dict:
    n = next(iter(template.values())).shape[0]
    reps = -(-rows // n)
    return {k: v.repeat(reps, *([1] * (v.dim() - 1)))[:rows] for k, v in template.items()}


def _fits(trainer, template: dict, rows: int) -> bool:
    try:
        trainer.step(_tile(template, rows), 0)
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        pass
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
    # out of memory: the failed step's tensors became garbage when the exception (whose frames held
    # them) was dropped; hand that memory back before the next try
    gc.collect()
    torch.cuda.empty_cache()
    return False


def largest_batch(build, template: dict, start: int) -> tuple[int | None, str]:
    """(largest batch that fit, how it was found) for the trainer `build()` returns.

    build: () -> an object with .step(batch, step), .optimizer and .close(); template: a batch
    on the GPU (its rows are repeated to each size tried).
    """
    trainer = build()
    try:
        if not _fits(trainer, template, start):
            return None, f"not even the run's batch of {start} fits"
        lo, hi = start, None
        while hi is None:
            if 2 * lo > LIMIT:
                return lo, f"fits {lo}; the search stops at {LIMIT} rows"
            if _fits(trainer, template, 2 * lo):
                lo *= 2
            else:
                hi = 2 * lo
        while hi - lo > max(1, lo // 32):
            mid = (lo + hi) // 2
            if _fits(trainer, template, mid):
                lo = mid
            else:
                hi = mid
        return lo, f"{lo} fits, {hi} runs out of memory"
    finally:
        trainer.close()
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
