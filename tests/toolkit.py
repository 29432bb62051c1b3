"""What every test file shares: fresh seeds, the numerics rule, the eager baselines (from
mmkernels.testing, which the benchmarks time too), the work and allocation counters.

    from toolkit import FLOOR, assert_within_rule, fresh_seed, needs_triton, OpTrace

- `fresh_seed()`: a new random seed per call, seeded into torch; every seed drawn during a test is
  printed in that test's failure report (tests/conftest.py), so a failure can be replayed with
  `MMKERNELS_TEST_SEED=<seed>`.
- `assert_within_rule(...)`: the numerics rule (docs/design.md), error(ours) <= 2 · error(eager) + floor, both
  measured against the float64 oracle.
- Output poisoning: tests/conftest.py sets MMKERNELS_POISON_OUTPUTS=1 before mmkernels is
  imported, so `mmkernels.ops._common.new_output` NaN-fills every buffer a kernel must write.
- `OpTrace`: a dispatch mode that opens up mmkernels' custom ops and records the matrix FLOPs that
  really execute (every aten matmul, every interpreted `tl.dot`) and every tensor allocated.
"""
from __future__ import annotations

import copy
import io
import math
import os
import pickle
import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmkernels.ops._common import HAS_TRITON
from mmkernels.testing import (eager_attention, eager_clip_loss, eager_info_nce_loss,  # noqa: F401  (re-exported)
                               eager_masked_region_loss, eager_siglip_loss)

# --------------------------------------------------------------------------- markers

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
CUDA = torch.cuda.is_available()

# --------------------------------------------------------------------------- seeds

_SEEDS: list[int] = []  # the seeds drawn by the running test; reset by conftest before each test


def fresh_seed() -> int:
    """A fresh seed (from os.urandom, or MMKERNELS_TEST_SEED to replay one), seeded into torch's
    CPU and CUDA generators and recorded for the failure report. Returns the seed; use it for
    explicit `torch.Generator`s too."""
    replay = os.environ.get("MMKERNELS_TEST_SEED")
    seed = int(replay) if replay else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    _SEEDS.append(seed)
    return seed


def seeded_generator(device="cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with a fresh (recorded) seed."""
    return torch.Generator(device=device).manual_seed(fresh_seed())


def drawn_seeds() -> list[int]:
    return list(_SEEDS)


def reset_seeds() -> None:
    _SEEDS.clear()


# --------------------------------------------------------------------------- the numerics rule

# The absolute floor of the rule, relative to the size of the output (or of the terms that cancel in
# it): a few units of rounding of the dtype's working precision.
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3, torch.float64: 1e-12}


def rule_error(got: torch.Tensor, oracle: torch.Tensor, metric: str) -> float:
    diff = got.detach().double() - oracle.detach().double()
    if metric == "max":
        return diff.abs().max().item() if diff.numel() else 0.0
    return diff.norm().item()


def assert_within_rule(name: str, got, eager, oracle, dtype: torch.dtype, *, size: float | None = None,
                       metric: str = "norm", allow_nonfinite: bool = False, floor_scale: float = 1.0) -> None:
    """The numerics rule (docs/design.md): error(got) <= 2 · error(eager) + FLOOR[dtype] · size, errors against the
    float64 `oracle` (metric "norm": Frobenius norm of the difference; "max": largest element).

    `size` is the magnitude the floor scales with: by default the oracle's own (its norm, or its
    largest element, at least 1 for "max"); pass the size of the summands where a result is a sum
    that cancels (a scalar's gradient, dS = P·(dP - Δ)). Non-finite values fail unless
    `allow_nonfinite`, where they must sit exactly where the oracle has them (NaN for NaN, ±Inf
    for the same Inf). `floor_scale` multiplies the floor (whole models: see MODEL_FLOOR_SCALE).
    """
    got, eager, oracle = got.detach(), eager.detach(), oracle.detach().double()
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(oracle.shape)}"
    finite = torch.isfinite(oracle)
    if allow_nonfinite:
        g = got.double()
        same_nan = torch.isnan(g) == torch.isnan(oracle)
        same_inf = torch.where(torch.isinf(oracle), g == oracle, ~torch.isinf(g))
        assert bool((same_nan & same_inf).all()), f"{name}: NaN/Inf where the oracle has none, or the reverse"
        got, eager, oracle = got[finite], eager[finite], oracle[finite]
    else:
        assert bool(torch.isfinite(got).all()), f"{name}: non-finite values"
    err = rule_error(got, oracle, metric)
    eager_err = rule_error(eager, oracle, metric)
    if size is None:
        if metric == "max":
            size = max(oracle.abs().max().item() if oracle.numel() else 0.0, 1.0)
        else:
            size = oracle.norm().item()
    floor = FLOOR[dtype] * floor_scale * size
    bound = 2 * eager_err + floor + 1e-12
    assert err <= bound, (
        f"{name}: error {err:.3e} > 2 × eager error {eager_err:.3e} + floor {floor:.3e} "
        f"({metric}; oracle size {size:.3e}; {dtype})"
    )


def value_and_grads(fn, leaves, upstream=None):
    """(fn(*leaves), *d fn / d leaves) on detached copies of `leaves`; non-float leaves pass as they are
    and get no gradient. `upstream` is the output's gradient (default ones for a scalar)."""
    copies = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in leaves]
    out = fn(*copies)
    wrt = [t for t in copies if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, upstream, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]
    return [out.detach()] + [g.detach() for g in grads]


# --------------------------------------------------------------------------- work and allocations


def _matmul_flops(func, args, kwargs, out) -> int:
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    return int(formula(*args, out_val=out, **(kwargs or {})))  # the registry's wrapper takes shapes itself


@dataclass
class Allocation:
    op: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int


@dataclass
class OpTrace:
    """What ran inside a block of code, mmkernels' custom ops opened up.

        with OpTrace() as trace:
            loss = mmkernels.clip_loss(a, b, s); loss.backward()
        trace.matmul_flops      # aten matmuls + interpreted tl.dot, 2·M·N·K each
        trace.largest_allocation, trace.peak_bytes, trace.allocations

    The matrix work counts every aten matmul (torch.utils.flop_counter's formulas) and every
    `tl.dot` that Triton's interpreter executes (2·M·N·K; run under TRITON_INTERPRET=1). Each op's
    output storage that is new (not a view of an input) counts as an allocation; `peak_bytes` is the
    most bytes of those alive at once (freed when the storage dies).

    `OpTrace(collect_cycles=True)`: Triton's interpreter keeps each launch's arguments' storages in a
    reference cycle (a self-recursive closure in triton 3.x), so under TRITON_INTERPRET=1 a buffer
    lives on until Python's cyclic GC runs, not when its last tensor goes as it does on a GPU; this
    runs gc.collect() after every interpreted launch so that `peak_bytes` counts what a GPU holds
    (slower: use it where a test bounds the peak of several launches in a row).
    """

    collect_cycles: bool = False
    aten_flops: int = 0
    dot_flops: int = 0
    dot_calls: int = 0
    ops: list = field(default_factory=list)
    allocations: list = field(default_factory=list)
    live_bytes: int = 0
    peak_bytes: int = 0

    @property
    def matmul_flops(self) -> int:
        return self.aten_flops + self.dot_flops

    @property
    def largest_allocation(self) -> int:
        return max((a.nbytes for a in self.allocations), default=0)

    def _free(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def _record_outputs(self, name, inputs, out) -> None:
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(inputs)
                if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in seen or storage.nbytes() == 0:
                continue
            seen.add(ptr)
            nbytes = storage.nbytes()
            self.allocations.append(Allocation(name, tuple(t.shape), t.dtype, nbytes))
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._free, nbytes)

    def __enter__(self):
        self._mode = _TraceMode(self)
        self._mode.__enter__()
        self._dot_patch = _patch_interpreter_dot(self)
        self._dot_patch.__enter__()
        self._gc_patch = _collect_after_interpreted_launches(self.collect_cycles)
        self._gc_patch.__enter__()
        return self

    def __exit__(self, *exc):
        self._gc_patch.__exit__(*exc)
        self._dot_patch.__exit__(*exc)
        return self._mode.__exit__(*exc)


class _TraceMode(TorchDispatchMode):
    def __init__(self, trace: OpTrace):
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.trace.ops.append(name)
        if func.namespace == "mmkernels":
            # Run the op's own implementation with this mode active, so that what it does inside
            # (allocations, matmuls, kernel launches) is seen.
            from torch._library.custom_ops import OPDEFS

            opdef = OPDEFS[func._schema.name]
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        self.trace.aten_flops += _matmul_flops(func, args, kwargs, out)
        self.trace._record_outputs(name, (args, kwargs), out)
        return out


@contextmanager
def _patch_interpreter_dot(trace: OpTrace):
    if not HAS_TRITON:
        yield
        return
    from triton.runtime.interpreter import InterpreterBuilder

    original = InterpreterBuilder.create_dot

    def counting_dot(self, a, b, d, *rest, **kw):
        a_shape, b_shape = a.data.shape, b.data.shape
        batch = math.prod(a_shape[:-2]) if len(a_shape) > 2 else 1
        trace.dot_flops += 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]
        trace.dot_calls += 1
        return original(self, a, b, d, *rest, **kw)

    InterpreterBuilder.create_dot = counting_dot
    try:
        yield
    finally:
        InterpreterBuilder.create_dot = original


@contextmanager
def _collect_after_interpreted_launches(enabled: bool):
    if not (enabled and HAS_TRITON):
        yield
        return
    import gc

    from triton.runtime.interpreter import GridExecutor

    original = GridExecutor.__call__

    def launch_then_collect(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        finally:
            gc.collect()

    GridExecutor.__call__ = launch_then_collect
    try:
        yield
    finally:
        GridExecutor.__call__ = original


@contextmanager
def triton_launches():
    """Count the Triton kernel launches that the interpreter runs inside the block (a list that
    holds one entry per launch; always empty without triton or off the interpreter)."""
    launches: list = []
    if not HAS_TRITON:
        yield launches
        return
    from triton.runtime.interpreter import GridExecutor

    original = GridExecutor.__call__

    def counting_launch(self, *args, **kwargs):
        launches.append(getattr(self, "fn", None))
        return original(self, *args, **kwargs)

    GridExecutor.__call__ = counting_launch
    try:
        yield launches
    finally:
        GridExecutor.__call__ = original


# --------------------------------------------------------------------------- whole models


def model_outputs_and_grads(model: torch.nn.Module, run) -> tuple[dict, dict]:
    """Run `run(model) -> (scalar loss, {name: output tensor})`, backpropagate the loss, and return
    ({"loss": loss, **outputs}, {parameter name: gradient}) detached; a parameter the loss does not
    reach gets a zero gradient."""
    model.zero_grad(set_to_none=True)
    loss, outputs = run(model)
    loss.backward()
    values = {"loss": loss.detach(), **{name: t.detach() for name, t in outputs.items()}}
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for name, p in model.named_parameters()}
    return values, grads


# Whole models (a patched model against the unpatched one): a patch changes the rounding of one
# layer, and the backward of every layer below carries that difference into each parameter's
# gradient, where the fp32 run nearer the float64 one is then chance. Measured on BLIP's text
# tower (loss patched, whose own gradient was nearer the oracle than eager's): parameter gradients
# 2.6-3x eager's error at 3-7e-6 of their size (kernels path). The floor for models is
# 10x the op floor; a model computing another function (the negative controls: pairs misaligned,
# a padding mask dropped) is off by far more.
MODEL_FLOOR_SCALE = 10.0


def assert_models_within_rule(got: tuple, eager: tuple, oracle: tuple, dtype: torch.dtype, what: str = "",
                              sizes: dict | None = None) -> None:
    """The numerics rule (docs/design.md) for every output and every parameter gradient of three runs of one model
    (`model_outputs_and_grads` results): ours, the eager model in `dtype`, and its float64 copy.
    `sizes` gives the floor's size by name ("loss", "grad logit_scale", ...) where a value is a sum
    that cancels (see `assert_within_rule`): a number, or the name of another output or gradient
    whose oracle norm (or the value's own, if larger) is the size of the summands (see `bias_sizes`)."""
    sizes = sizes or {}
    for index, kind in ((0, ""), (1, "grad ")):
        assert got[index].keys() == oracle[index].keys(), f"{what}: different {kind or 'output '}names"
        for name, reference in oracle[index].items():
            size = sizes.get(kind + name)
            if isinstance(size, str):
                other = oracle[1][size[len("grad "):]] if size.startswith("grad ") else oracle[0][size]
                size = max(other.norm().item(), reference.norm().item())
            assert_within_rule(f"{what} {kind}{name}", got[index][name], eager[index][name], reference, dtype,
                               size=size, floor_scale=MODEL_FLOOR_SCALE)


def use_path(monkeypatch, name: str) -> list:
    """Send CPU fp32 tensors down one path of mmkernels' ops: "reference" (TRITON_INTERPRET=0) or
    "kernels" (the Triton kernels under the interpreter); "cuda" changes nothing (CUDA tensors take
    the kernels). Returns the list that records a name for each call of reference.cross_attention /
    clip_loss / siglip_loss / info_nce_loss from then on."""
    from mmkernels.ops.attention import reference as attention_reference
    from mmkernels.ops.contrastive import reference as contrastive_reference

    if name != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "1" if name == "kernels" else "0")
    calls = []
    for module, op in ((attention_reference, "cross_attention"), (contrastive_reference, "clip_loss"),
                       (contrastive_reference, "siglip_loss"), (contrastive_reference, "info_nce_loss")):
        original = getattr(module, op)
        monkeypatch.setattr(module, op, lambda *a, _op=op, _original=original, **k: calls.append(_op) or _original(*a, **k))
    return calls


def bias_sizes(model: torch.nn.Module) -> dict:
    """`assert_models_within_rule` sizes for every bias that has a weight beside it (`x.bias` and
    `x.weight`, `in_proj_bias` and `in_proj_weight`): a bias's gradient sums the same upstream rows as
    its weight's gradient, with cancellation (the key bias's is zero in exact arithmetic, since
    softmax ignores a constant shift), so its floor scales with the weight's gradient. Likewise
    position and token type embeddings beside word embeddings."""
    names = {name for name, _ in model.named_parameters()}
    sizes = {}
    for name in names:
        if name.endswith("bias") and name[: -len("bias")] + "weight" in names:
            sizes[f"grad {name}"] = f"grad {name[: -len('bias')]}weight"
        # a position (or token type) embedding's gradient sums over the batch the per-token gradients
        # that the word embedding's gradient holds by token id (BLIP's text CLS position: 0.57 from
        # summands of size ~7 under the interpreter)
        for table in ("position_embeddings.weight", "token_type_embeddings.weight"):
            words = name[: -len(table)] + "word_embeddings.weight"
            if name.endswith(table) and words in names:
                sizes[f"grad {name}"] = f"grad {words}"
    return sizes


def compare_patched(make_model, run, patch, path: str, reference_calls: list, *, got_run=None, sizes=None):
    """Build a model, patch a copy with `patch(model)`, and hold the patched fp32 model to docs/design.md's
    rule against the unpatched fp32 model (eager) and its float64 copy (the oracle): every output of
    `run(model) -> (loss, {name: tensor})` and every parameter gradient. `got_run` replaces `run` for
    the patched model (negative controls); `sizes(model) -> dict` gives floor sizes by name (see
    `assert_models_within_rule`). Checks that the patched run took `path` ("reference": some
    reference op ran; "kernels": none did and interpreted tl.dot ran; "cuda": none did). The rule's
    floor is the model's parameter dtype's. Returns patch's result."""
    eager = make_model()
    sizes = {**bias_sizes(eager), **(sizes(eager) if sizes is not None else {})}
    oracle = copy.deepcopy(eager).double()
    patched = copy.deepcopy(eager)
    handle = patch(patched)
    reference_calls.clear()
    with OpTrace() as trace:
        got = model_outputs_and_grads(patched, got_run or run)
    if path == "reference":
        assert reference_calls, "the patched model ran no mmkernels reference op"
    else:
        assert not reference_calls, "the patched model ran mmkernels' reference path"
        assert path == "cuda" or trace.dot_calls > 0, "the patched model ran no Triton kernel"
    results = [got, model_outputs_and_grads(eager, run), model_outputs_and_grads(oracle, run)]
    dtype = next(eager.parameters()).dtype
    assert_models_within_rule(*results, dtype, what=type(eager).__name__, sizes=sizes)
    return handle


PICKLERS = ("pickle", "torch.save")


def pickled_copy(obj, how: str):
    """`obj` through `pickle.dumps` / `pickle.loads` ("pickle") or `torch.save` / `torch.load(...,
    weights_only=False)` ("torch.save"): what loading a whole saved model gives."""
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    if how != "torch.save":
        raise ValueError(f"expected how to be one of {PICKLERS}, got {how!r}")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def assert_no_host_sync(step) -> None:
    """Run `step()` once (it compiles and autotunes the kernels), then again with CUDA's sync
    debug mode at "error": any host synchronisation inside the second call raises."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- multi-process jobs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, world_size, port, backend, timeout_s, out_dir, args):
    import datetime
    import pickle
    import traceback

    import torch.distributed as dist

    result = {"ok": False}
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)  # the ranks share the machine's cores
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = {"ok": True, "value": fn(rank, world_size, *args)}
        finally:
            dist.destroy_process_group()
    except BaseException:
        result = {"ok": False, "error": traceback.format_exc()}
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)  # the parent never reads a half-written file
    # Leave without the interpreter's finalisation: gloo's threads can abort it ("terminate called without
    # an active exception", SIGABRT, after the result is written, cf. pytorch#179291).
    # A rank that dies before this line still fails the call (no result file, or a non-zero exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 120.0) -> list:
    """fn(rank, world_size, *args) in `world_size` spawned processes that share a torch.distributed
    process group (`backend`, 127.0.0.1, a free port); returns each rank's return value (picklable).

    Bounded: the processes are killed and the call fails once `timeout_s` has passed, and every
    collective times out after `timeout_s` too, so a hang fails the test instead of stalling CI.
    A rank that raises fails the call with that rank's traceback. `fn` must be a module-level
    function of an importable module (spawn pickles it by name); the children inherit os.environ.
    """
    import pickle
    import tempfile
    import time

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="mmkernels-ranks-") as out_dir:
        ctx = mp.start_processes(_rank_main, args=(fn, world_size, _free_port(), backend, timeout_s, out_dir, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        paths = [os.path.join(out_dir, f"rank{rank}.pkl") for rank in range(world_size)]

        def load(path):
            with open(path, "rb") as f:
                return pickle.load(f)

        def kill_all():
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)

        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            # A rank that failed leaves the others waiting in a collective: stop them now.
            if any(os.path.exists(p) and not load(p)["ok"] for p in paths):
                time.sleep(1.0)
                kill_all()
                break
            if time.monotonic() > deadline:
                kill_all()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran past {timeout_s} s (killed)")
        results = [load(p) if os.path.exists(p) else {"ok": False, "error": "killed after another rank failed"}
                   for p in paths]
    failed = [(r, res["error"]) for r, res in enumerate(results) if not res["ok"]]
    if failed:
        raise AssertionError("\n".join(f"rank {r} raised:\n{err}" for r, err in failed))
    return [res["value"] for res in results]
