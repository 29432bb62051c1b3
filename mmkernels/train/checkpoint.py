"""Kill-safe checkpoints: written to a temporary file, flushed to disk, then renamed over the last one.

A reader sees the previous checkpoint or the new one, never half of one: `os.replace` is atomic on
POSIX and Windows, and the data is fsync'ed before the rename (and the directory after it), so a
SIGKILL or a power cut at any moment leaves a complete file.

    save_atomic(state, path)
    state = load(path)           # or None when there is no checkpoint
    state["rng"] = rng_state(); ...; set_rng_state(state["rng"])
    clock = RunClock(run_dir); ...; clock.save(); clock.total()   # a run's wall time across resumes
"""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch


def _fsync_dir(directory: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj, path: str) -> None:
    """torch.save(obj) to `path` so that `path` is always either the old or the new complete file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


def remove_stale_temporaries(path: str) -> None:
    """Delete the temporary files of saves of `path` that a kill interrupted (never the checkpoint)."""
    directory, name = os.path.split(os.path.abspath(path))
    if os.path.isdir(directory):
        for entry in os.listdir(directory):
            if entry.startswith(f"{name}.tmp."):
                os.remove(os.path.join(directory, entry))


def load(path: str):
    """The checkpoint at `path` (on the CPU), or None if there is none."""
    if not os.path.exists(path):
        return None
    # weights_only: a checkpoint holds tensors, numbers, strings, lists and dicts (RNG states as tensors)
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Every random number generator the process uses: Python's, NumPy's, torch's CPU and CUDA ones."""
    state = {
        "python": _python_state(random.getstate()),
        "numpy": _numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), None if gauss is None else float(gauss)))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# weights_only loading accepts tensors and plain containers: store the Python and NumPy states as such


def _python_state(state):
    version, internal, gauss = state
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _numpy_state(state):
    kind, keys, pos, has_gauss, cached = state
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


class RunClock:
    """The wall time of a run across its resumes: the seconds its earlier processes had spent by
    their last save (run_dir/elapsed.json) plus this process's since the clock was made."""

    FILE = "elapsed.json"

    def __init__(self, run_dir: str, started: float | None = None):
        """`started`: this process's start (a time.perf_counter() value), default now."""
        self.path = os.path.join(run_dir, self.FILE)
        self.started = time.perf_counter() if started is None else started
        self.before = 0.0
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.before = float(json.load(f)["seconds"])

    def total(self) -> float:
        return self.before + time.perf_counter() - self.started

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"seconds": self.total()}, f)
        os.replace(tmp, self.path)
