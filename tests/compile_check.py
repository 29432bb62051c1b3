"""The real compiler on the CPU machine: every Triton kernel at every specialisation its launcher
picks on CUDA, compiled for sm_80 and sm_90, and what ptxas says about it.

How the specialisations are found: the registered ops run on small CPU tensors with the CUDA
choices forced (`is_cuda` true, the launchers' tile functions asked for a "cuda" device, the
attention launcher on its autotuner path) and every kernel replaced by a recorder, so no kernel
runs. A recorded launch is specialised for the target by Triton's own argument binder (the one
`JITFunction.run` uses: pointer and integer divisibility, integers equal to 1), so the compiled
code is what the JIT would build for those arguments on a GPU. Each attention launch yields every
autotune candidate left after the launcher's early prune. Identical specialisations compile once.

Compiling: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` in a pool of worker
processes, with ptxas' `-v` log captured (registers, spill stores and loads); shared memory from
the compiled metadata; `wgmma` from the sm_90 PTX. Results are cached as JSON under
$MMKERNELS_COMPILE_CACHE (default ~/.cache/mmkernels-compile), keyed by the kernel's source hash
(Triton's, which covers the functions it calls), the specialisation, the target and the Triton
version.

`python tests/compile_check.py` prints the table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TARGETS = (80, 90)
# shared memory per block (opt-in maximum) and per SM, bytes; 1 KiB per block is reserved by the driver
SMEM_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
# the matrix-unit kernels that must fit two blocks per SM
MIN_BLOCKS = {"_clip_stats_kernel": 2, "_panel_kernel": 2}
CACHE_ENV = "MMKERNELS_COMPILE_CACHE"


# --------------------------------------------------------------------------- recording the launches


@dataclasses.dataclass
class Launch:
    """One kernel launch as the CUDA path would make it: the kernel, its arguments, its
    constexprs and launch options (num_warps, num_stages), and where it came from."""

    kernel: object  # triton.JITFunction
    args: tuple
    kwargs: dict
    label: str
    cc: int  # the target it was launched for (the attention launcher picks candidates per target)


class _Recorder:
    """Stands in for a JITFunction (`kernel[grid](*args, **kwargs)`): records, launches nothing."""

    def __init__(self, kernel, launches: list, label: list):
        self.kernel, self.launches, self.label = kernel, launches, label

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.kernel, args, dict(kwargs), self.label[0], self.label[1]))

        return record


class _TunedRecorder:
    """Stands in for the attention launcher's autotuner: records one launch per candidate that
    survives the autotuner's early prune for these arguments."""

    def __init__(self, tuner, launches: list, label: list):
        self.tuner, self.launches, self.label = tuner, launches, label

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            named = dict(zip(self.tuner.arg_names, args))
            configs = self.tuner.configs
            prune = (self.tuner.early_config_prune if self.tuner.early_config_prune is not None
                     else lambda configs, named_args, **kw: configs)
            for config in prune(configs, named, **kwargs):
                options = dict(kwargs, **config.all_kwargs())
                self.launches.append(Launch(self.tuner.fn, args, options, self.label[0], self.label[1]))

        return record


_ABSENT = object()


@contextlib.contextmanager
def _cuda_choices(launches: list, label: list):
    """Within: the launchers take their CUDA branches on CPU tensors and record their launches."""
    from mmkernels.ops.attention import launch as attention_launch
    from mmkernels.ops.contrastive import kernels as contrastive_kernels
    from mmkernels.ops.contrastive import launch as contrastive_launch
    from mmkernels.ops.contrastive import plan as contrastive_plan
    from mmkernels.ops.region import kernels as region_kernels, launch as region_launch, plan as region_plan, \
        registered as region_registered

    cuda = torch.device("cuda")
    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, vars(owner).get(name, _ABSENT)))
        setattr(owner, name, value)

    tile_config, region_blocks, loss_blocks = (contrastive_plan.tile_config, region_plan._region_blocks,
                                               region_plan._loss_blocks)
    tuned = attention_launch._tuned
    try:
        patch(torch.Tensor, "is_cuda", property(lambda self: True))
        patch(contrastive_plan, "tile_config", lambda d, dtype, device: tile_config(d, dtype, cuda))
        patch(region_launch, "_region_blocks", lambda r, d, device: region_blocks(r, d, cuda))
        patch(region_launch, "_loss_blocks", lambda d, device: loss_blocks(d, cuda))
        patch(region_registered, "launch_device", lambda t: contextlib.nullcontext())
        patch(attention_launch, "interpreting", lambda: False)
        patch(attention_launch, "_tuned", lambda name, capability: _TunedRecorder(tuned(name, capability), launches, label))
        patch(torch.cuda, "get_device_capability", lambda device=None: divmod(label[1], 10))
        for module, kernel_module in ((contrastive_launch, contrastive_kernels), (region_launch, region_kernels)):
            for name, value in vars(kernel_module).items():
                if name.endswith("_kernel") and hasattr(value, "arg_names") and hasattr(module, name):
                    patch(module, name, _Recorder(value, launches, label))
        yield
    finally:
        for owner, name, value in reversed(saved):
            if value is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def _contrastive_scenarios():
    """The contrastive ops: CLIP, InfoNCE (statistics and gradient passes), SigLIP (with and
    without gradients and scalar gradients), every BLOCK_K the tile config picks (by D), D
    a multiple of 8 but not of 16 too (strides without the 16-divisibility), normalised or not."""
    ops = torch.ops.mmkernels
    n, ws = 512, 1 << 30
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (16, 32, 64, 768, 200):
            a, b = torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)
            scale, bias = torch.tensor(10.0), torch.tensor(-1.0)
            grad = torch.tensor(1.0)
            lse = torch.zeros(n, dtype=torch.float64)
            tag = f"{str(dtype)[6:]} d={d}"
            for normalize in (False, True):
                yield f"clip {tag}", lambda: ops.clip_loss_fwd(a, b, scale, normalize, 0.1, ws)
                yield f"clip grads {tag}", lambda: ops.clip_block_grads(
                    a, b, scale, lse, lse, grad, 0, n, 0.1, normalize, True, True, dtype, ws)
                yield f"info_nce {tag}", lambda: ops.info_nce_fwd(a, b, scale, normalize, 0.0, ws)
                yield f"info_nce grads {tag}", lambda: ops.info_nce_grads(
                    a, b, scale, lse, grad, 0.0, normalize, True, True, dtype, ws)
                for grads, scalars in ((False, False), (True, True), (True, False), (False, True)):
                    yield f"siglip {tag}", lambda: ops.siglip_block(
                        a, b, scale, bias, 0, n, normalize, grads, grads, scalars, dtype, ws)
            if d in (64, 768) and dtype != torch.float16:
                # group ids (GROUPS) and extra negative columns (EXTRA): their own specialisations
                ids = (torch.arange(n) // 3 * 3).to(torch.int32)  # group_labels' int32 labels and counts
                count = torch.full((n,), 3, dtype=torch.int32)
                extra = torch.randn(7, d, dtype=dtype)
                yield f"clip groups+extra {tag}", lambda: ops.clip_loss_fwd(a, b, scale, False, 0.1, ws, ids, extra)
                yield f"clip grads groups {tag}", lambda: ops.clip_block_grads(
                    a, b, scale, lse, lse, grad, 0, n, 0.1, False, True, True, dtype, ws, ids, count, ids, count)
                yield f"info_nce grads groups+extra {tag}", lambda: ops.info_nce_grads(
                    a, b, scale, lse, grad, 0.0, False, True, True, dtype, ws, ids, extra)
                yield f"siglip groups {tag}", lambda: ops.siglip_block(
                    a, b, scale, bias, 0, n, False, True, True, True, dtype, ws, ids, count, ids, count)


def _region_scenarios():
    """region_mask (lengths or a valid mask, with or without the mask embedding, "bert" or not)
    and masked_region_loss (every kind, with and without the target's gradient), fwd and bwd."""
    ops = torch.ops.mmkernels
    batch = 3
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for regions, dim in ((36, 768), (100, 40)):
            feats = torch.randn(batch, regions, dim, dtype=dtype)
            lens = torch.full((batch,), regions, dtype=torch.int64)
            valid = torch.ones(batch, regions, dtype=torch.bool)
            emb = torch.randn(dim, dtype=dtype)
            seed = torch.tensor([1, 2], dtype=torch.int64)
            tag = f"{str(dtype)[6:]} R={regions} D={dim}"
            for bert in (False, True):
                for lens_, valid_ in ((lens, None), (None, valid)):
                    for emb_ in (emb, None):
                        yield f"region_mask {tag}", lambda: ops.region_mask_fwd(
                            feats, lens_, valid_, emb_, seed, 1 << 20, 1, bert, "triton")
                    yield f"region_mask bwd {tag}", lambda: ops.region_mask_bwd(
                        feats, torch.zeros(batch, regions, dtype=torch.int32), emb_ is not None, bert, "triton")
            mask = torch.ones(batch, regions, dtype=torch.bool)
            for kind in ("mse", "smooth_l1", "kl"):
                stats = torch.zeros(batch, regions, 2) if kind == "kl" else torch.zeros(0)
                yield f"region_loss {kind} {tag}", lambda: ops.masked_region_loss_fwd(feats, feats, mask, kind, 1.0,
                                                                                       "triton")
                for target_grad in (False, True):
                    yield f"region_loss bwd {kind} {tag}", lambda: ops.masked_region_loss_bwd(
                        torch.ones(batch, regions), feats, feats, mask, stats, kind, 1.0, target_grad, "triton")


def _attention_scenarios(full: bool = True):
    """cross_attention: every padded head dim (16 .. 256) and one that is not a power of two; no
    mask, and every mask and length at once (additive mask with causal, and the bool mask without);
    fwd, the full backward and the dv-only backward. Lengths of 1024: the early prune keeps every
    candidate of the head dim's group (shorter lengths keep a subset of them).

    full=False (the default test run, within CI's time): the variant with the most live values
    (every mask, length, causal and dropout at once), fp16 and fp32, the largest head dim of each
    candidate group (64, 128, 256), the forward and the full backward."""
    ops = torch.ops.mmkernels
    batch, heads, length = 2, 2, 1024
    variants = {
        "plain": (),
        "all+additive+causal": ("kv_lens", "q_lens", "kpm", "additive_mask", "causal", "dropout"),
        "all+bool": ("kv_lens", "q_lens", "kpm", "bool_mask", "dropout"),
    }
    dtypes, head_dims, needs = ((torch.float16, torch.bfloat16, torch.float32), (16, 32, 64, 128, 256, 80),
                                ((True, True, True), (False, False, True)))
    if not full:
        variants = {"all+additive+causal": variants["all+additive+causal"]}
        dtypes, head_dims, needs = (torch.float16, torch.float32), (64, 128, 256), ((True, True, True),)
    for dtype in dtypes:
        for head_dim in head_dims:
            q = torch.randn(batch, heads, length, head_dim, dtype=dtype)
            for name, variant in variants.items():
                on = set(variant)
                lens = torch.full((batch,), length, dtype=torch.int32)
                kv_lens, q_lens = (lens if "kv_lens" in on else None), (lens if "q_lens" in on else None)
                kpm = torch.zeros(batch, length, dtype=torch.bool) if "kpm" in on else None
                mask = None
                if "bool_mask" in on:
                    mask = torch.ones(length, length, dtype=torch.bool)
                if "additive_mask" in on:
                    mask = torch.zeros(length, length, dtype=dtype)
                dropout = 0.1 if "dropout" in on else 0.0
                seed = torch.tensor([7], dtype=torch.int64) if dropout else None
                args = (q, q, q, kv_lens, q_lens, kpm, mask, seed, "causal" in on, dropout, 0.125)
                tag = f"{str(dtype)[6:]} d={head_dim} {name}"
                yield f"attention {tag}", lambda: ops.cross_attention_fwd(*args)
                stats = torch.zeros(batch, heads, 2, length)
                for need in needs:
                    yield f"attention bwd {tag}", lambda: ops.cross_attention_bwd(
                        q, q, q, q, q, stats, *args[3:], *need)


FAMILIES = {
    "contrastive": _contrastive_scenarios,
    "region": _region_scenarios,
    "attention": _attention_scenarios,
    "attention-ci": functools.partial(_attention_scenarios, full=False),
}


def record_launches(families=tuple(FAMILIES)) -> dict:
    """{family: [Launch]}: what the launchers of each family launch on CUDA for its scenarios."""
    recorded = {}
    for family in families:
        launches, label = [], ["", 0]  # (scenario, target)
        with _cuda_choices(launches, label), torch.no_grad():
            for label[1] in TARGETS:
                for label[0], run in FAMILIES[family]():
                    run()
        recorded[family] = launches
    return recorded


# --------------------------------------------------------------------------- specialising and compiling


@dataclasses.dataclass(frozen=True)
class Job:
    """A kernel specialised for one target: what triton.compile needs, picklable."""

    module: str
    name: str
    cc: int
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple
    key: str


_BINDERS = {}  # (kernel, cc) -> (backend, Triton's argument binder for that target)
_TWINS = {}  # kernel module name -> the module loaded again with the interpreter off


def _compilable(kernel):
    """The JITFunction of a kernel. Under TRITON_INTERPRET=1 (the test run) `triton.jit` made an
    InterpretedFunction: its module is loaded once more with the interpreter off, so that the twin
    carries the same source, callees and jit options (do_not_specialize) as on a GPU."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    name = kernel.fn.__module__
    if name not in _TWINS:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"{name}__compiled", sys.modules[name].__file__)
        module = importlib.util.module_from_spec(spec)
        with _environment({"TRITON_INTERPRET": "0"}):
            spec.loader.exec_module(module)
        _TWINS[name] = module
    return getattr(_TWINS[name], kernel.fn.__name__)


def specialise(launch: Launch, cc: int) -> Job:
    """The Job the JIT would compile for this launch on a GPU of compute capability `cc`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _compilable(launch.kernel)
    if (fn, cc) not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", cc, 32))
        _BINDERS[fn, cc] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[fn, cc]
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    opts = {k: launch.kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in launch.kwargs}
    signature = tuple(signature.items())
    constexprs = tuple(sorted((k, _plain(v)) for k, v in constexprs.items()))
    attrs = tuple(sorted((k, json.dumps(v)) for k, v in attrs.items()))
    options = tuple(sorted(opts.items()))
    text = json.dumps([fn.cache_key, triton.__version__, cc, signature, constexprs, attrs, options], default=str)
    return Job(launch.kernel.fn.__module__, fn.fn.__name__, cc, signature, constexprs, attrs, options,
               hashlib.sha256(text.encode()).hexdigest()[:24])


def _plain(value):
    return value.value if hasattr(value, "value") else value


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_job(job: Job) -> dict:
    """Compile one Job (in a worker) and read what the compiler reports about it."""
    import importlib
    import time

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = getattr(importlib.import_module(job.module), job.name)
    target = GPUTarget("cuda", job.cc, 32)
    options = make_backend(target).parse_options(dict(job.options)).__dict__
    src = ASTSource(fn, dict(job.signature), dict(job.constexprs),
                    {k: json.loads(v) for k, v in job.attrs})
    log = io.StringIO()
    start = time.perf_counter()
    result = dict(key=job.key, error=None)
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            compiled = triton.compile(src, target=target, options=options)
    except Exception as error:  # a compile error is a result: the check reports it
        result["error"] = f"{type(error).__name__}: {str(error)[-2000:]}"
        return result
    text = log.getvalue()
    regs = [int(r) for r in _PTXAS_REGS.findall(text)]
    spills = [(int(s), int(l)) for s, l in _PTXAS_SPILLS.findall(text)]
    ptx = compiled.asm["ptx"]
    result.update(
        seconds=round(time.perf_counter() - start, 1),
        registers=max(regs) if regs else None,
        spill_stores=max((s for s, _ in spills), default=0),
        spill_loads=max((l for _, l in spills), default=0),
        shared=compiled.metadata.shared,
        wgmma="wgmma.mma_async" in ptx,
        mma_sync="mma.sync" in ptx,
    )
    return result


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mmkernels-compile")


def compile_all(jobs: list, processes: int = 2) -> dict:
    """{job.key: result} for the unique jobs, from the cache or compiled in a process pool."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    results, todo = {}, []
    for job in {job.key: job for job in jobs}.values():
        path = directory / f"{job.key}.json"
        if path.exists():
            results[job.key] = json.loads(path.read_text())
        else:
            todo.append(job)
    if todo:
        # slowest first (the wide fp32 tiles) so the pool does not end on one long compile
        todo.sort(key=lambda j: -_weight(j))
        with tempfile.TemporaryDirectory() as triton_cache:
            env = dict(os.environ, TRITON_CACHE_DIR=triton_cache, TRITON_DEFAULT_FP_FUSION="1", TRITON_INTERPRET="0")
            context = multiprocessing.get_context("spawn")
            with _environment(env), context.Pool(processes) as pool:
                for result in pool.imap_unordered(compile_job, todo):
                    results[result["key"]] = result
                    if result["error"] is None:  # compile errors are not cached
                        (directory / f"{result['key']}.json").write_text(json.dumps(result))
    return results


def _weight(job: Job) -> int:
    c = dict(job.constexprs)
    size = 1
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_K"):
        size *= c.get(name, 1)
    return size * (4 if c.get("DOT_PRECISION") == "ieee" else 1)


@contextlib.contextmanager
def _environment(env: dict):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------- the rules and the table


def blocks_per_sm(result: dict, num_warps: int, cc: int) -> int:
    """Resident blocks per SM: registers (allocated per warp in units of 256), shared memory
    (plus the 1 KiB the driver reserves per block), warps and the block limit."""
    regs = max(result["registers"] or 1, 1)
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_smem = SMEM_PER_SM[cc] // (result["shared"] + 1024)
    return min(by_regs, by_smem, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)


@dataclasses.dataclass
class Row:
    """One compiled specialisation, with the launches that use it."""

    job: Job
    result: dict
    labels: list

    @property
    def kernel(self) -> str:
        return self.job.name

    @property
    def constexprs(self) -> dict:
        return dict((self.job.signature[k[0]][0] if isinstance(k, (list, tuple)) else k, v)
                    for k, v in self.job.constexprs)

    @property
    def num_warps(self) -> int:
        return dict(self.job.options).get("num_warps", 4)

    @property
    def num_stages(self) -> int:
        return dict(self.job.options).get("num_stages", 3)

    @property
    def dtype(self) -> str:
        """The inputs' float type: the first fp16/bf16 pointer's, else fp32 where there is one."""
        pointers = {t[1:] for _, t in self.job.signature if t.startswith("*")}
        return next((t for _, t in self.job.signature if t[1:] in ("fp16", "bf16")), "*fp32" if "fp32" in pointers
                    else "*")[1:]

    def _mma_sync_documented(self) -> bool:
        """The attention head dims whose sm_90 candidates are mma.sync tiles, with the reason in a
        comment beside plan.SM90_MMA_SYNC_HEAD_DIMS."""
        from mmkernels.ops.attention import plan

        return self.kernel.startswith("_cross_attention") and \
            self.constexprs.get("BLOCK_D") in plan.SM90_MMA_SYNC_HEAD_DIMS

    def problems(self) -> list:
        r, cc = self.result, self.job.cc
        if r["error"]:
            return [f"compile error: {r['error'].splitlines()[0] if r['error'] else ''}"]
        found = []
        if r["spill_stores"] or r["spill_loads"]:
            found.append(f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads per thread")
        if r["shared"] > SMEM_PER_BLOCK[cc]:
            found.append(f"shared memory {r['shared']} B > {SMEM_PER_BLOCK[cc]} B")
        need = MIN_BLOCKS.get(self.kernel)
        if need and blocks_per_sm(r, self.num_warps, cc) < need:
            found.append(f"{blocks_per_sm(r, self.num_warps, cc)} block(s) per SM < {need}")
        if cc == 90 and r["mma_sync"] and not r["wgmma"] and self.dtype in ("fp16", "bf16") \
                and not self._mma_sync_documented():
            found.append("fp16/bf16 matrix product without wgmma on sm_90")
        return found


def build_rows(launches: list) -> list:
    """One Row per unique (kernel specialisation, target), compiled (or from the cache)."""
    jobs, labels = {}, {}
    for launch in launches:
        for cc in (launch.cc,):
            job = specialise(launch, cc)
            jobs[job.key] = job
            labels.setdefault(job.key, [])
            if launch.label not in labels[job.key]:
                labels[job.key].append(launch.label)
    results = compile_all(list(jobs.values()))
    return [Row(job, results[key], labels[key]) for key, job in jobs.items()]


_SHOWN = ("MODE", "SCALARS", "WRITE_W", "COLUMNS", "GROUPS", "EXTRA", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D",
          "BLOCK_R", "CHUNK", "BLOCK", "KIND", "BERT", "TARGET_GRAD", "HAS_EMB", "HAS_EMB_GRAD", "HAS_LENS",
          "HAS_KV_LENS", "HAS_Q_LENS", "HAS_KPM", "MASK_KIND", "IS_CAUSAL", "HAS_DROPOUT", "COMPUTE_DQ",
          "COMPUTE_DK", "COMPUTE_DV", "INIT", "WRITE_LSE")


def describe(row: Row) -> str:
    c = row.constexprs
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.items() if k in _SHOWN]
    return " ".join(parts) + f" w{row.num_warps} s{row.num_stages}"


def table(rows: list) -> str:
    """The rows as a text table, worst first within each kernel."""
    header = (f"{'kernel':<34}{'sm':>3} {'dtype':<5}{'regs':>5}{'spill st/ld':>12}{'smem KiB':>9}"
              f"{'wgmma':>6}{'blk/SM':>7}  specialisation")
    lines = [header, "-" * len(header)]
    for row in sorted(rows, key=lambda r: (r.kernel, r.job.cc, r.dtype, describe(r))):
        r = row.result
        if r["error"]:
            lines.append(f"{row.kernel:<34}{row.job.cc:>3} {row.dtype:<5} COMPILE ERROR  {describe(row)}")
            continue
        mma = "yes" if r["wgmma"] else ("mma" if r["mma_sync"] else "-")
        lines.append(
            f"{row.kernel:<34}{row.job.cc:>3} {row.dtype:<5}{r['registers']:>5}"
            f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>12}{r['shared'] / 1024:>9.1f}"
            f"{mma:>6}{blocks_per_sm(r, row.num_warps, row.job.cc):>7}  {describe(row)}"
            + ("  <-- " + "; ".join(row.problems()) if row.problems() else "")
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- csrc/ with nvcc


def nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


_NVCC_FUNCTION = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")


def compile_csrc(root: Path) -> list:
    """[(file, arch, function, registers, spill stores, spill loads)] from nvcc -Xptxas -v for
    every .cu file under csrc/, sm_80 and sm_90 (cached like the Triton kernels)."""
    compiler = nvcc()
    rows = []
    sources = sorted((root / "csrc").glob("*.cu"))
    headers = b"".join(p.read_bytes() for p in sorted((root / "csrc").glob("*.h*")))
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for source in sources:
        key = hashlib.sha256(source.read_bytes() + headers + version.encode()).hexdigest()[:24]
        path = directory / f"csrc-{key}.json"
        if path.exists():
            rows += [tuple(r) for r in json.loads(path.read_text())]
            continue
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run(
                [compiler, "-c", str(source), "-o", os.path.join(out, "x.o"), "-Xptxas", "-v", "-std=c++17",
                 "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"],
                capture_output=True, text=True,
            )
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name}:\n{done.stderr[-3000:]}")
        found, current = [], None
        for line in done.stderr.splitlines():
            m = _NVCC_FUNCTION.search(line)
            if m:
                current = [source.name, m.group(2), m.group(1), None, 0, 0]
                found.append(current)
            elif current is not None:
                if (m := _PTXAS_SPILLS.search(line)):
                    current[4], current[5] = int(m.group(1)), int(m.group(2))
                if (m := _PTXAS_REGS.search(line)):
                    current[3] = int(m.group(1))
        path.write_text(json.dumps(found))
        rows += [tuple(r) for r in found]
    return rows


def csrc_table(rows: list) -> str:
    lines = [f"{'file':<16}{'arch':<7}{'regs':>5}{'spill st/ld':>12}  function"]
    for file, arch, function, regs, stores, loads in rows:
        lines.append(f"{file:<16}{arch:<7}{regs:>5}{f'{stores}/{loads}':>12}  {_demangle(function)}")
    return "\n".join(lines)


def _demangle(name: str) -> str:
    tool = shutil.which("c++filt")
    if not tool:
        return name
    return subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name


def main(argv: list) -> int:
    families = argv or list(FAMILIES)
    recorded = record_launches(families)
    failed = 0
    for family in families:
        rows = build_rows(recorded[family])
        print(f"\n== {family}: {len(recorded[family])} launches, {len(rows)} unique compiles\n{table(rows)}")
        failed += sum(bool(r.problems()) for r in rows)
    if nvcc():
        print("\n== csrc (nvcc)\n" + csrc_table(compile_csrc(Path(__file__).resolve().parents[1])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv[1:]))
