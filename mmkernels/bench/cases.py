"""The benchmark cases, defined once: `python -m mmkernels.bench` and `pytest benchmarks/` both run them.

    from mmkernels.bench.cases import cases_for, run_case
    for case in cases_for("quick", ops=["contrastive"]): ...

A Case is one point of one op's curve (kernel_name, x_name = x_value, a fixed config) with the
providers that compute it. Three size sets:
- "quick" (CUDA): what fits a short GPU loan, under 8 minutes on one H100 (see estimate_seconds);
- "full" (CUDA): the sizes of the goals (CLIP at N = 32768, SigLIP at N = 65536, D = 768), longer
  attention, the base-sized models at larger batches;
- "dry-run", and any mode without CUDA: tiny fp32 sizes on the CPU, where mmkernels runs its Triton
  kernels under the interpreter when TRITON_INTERPRET=1 (python -m mmkernels.bench --dry-run sets
  it) and its PyTorch reference path otherwise.
On CUDA every case runs in bf16.
"""
from __future__ import annotations

import gc
import json
import os
from collections import Counter
from dataclasses import dataclass

import torch

from mmkernels.bench.models import model_step
from mmkernels.bench.steps import (NotRun, attention_step, compile_options, contrastive_step, region_loss_step,
                                   region_mask_step)
from mmkernels.bench.timing import measure

MODES = ("quick", "full", "dry-run")
OPS = ("contrastive", "attention", "region", "model")
# Where a run appends the (case, provider, reason) of every provider that did not run (JSON lines).
NOT_RUN_LOG = "MMKERNELS_BENCH_NOT_RUN"


@dataclass(frozen=True)
class Case:
    op: str                 # one of OPS: the group a command-line filter selects
    kernel: str             # Liger's kernel_name
    x_name: str
    x_value: int | float
    config: tuple           # ((key, value), ...): the fixed configuration of the curve
    providers: tuple
    operation: str = "full"  # Liger's kernel_operation_mode: "full" is forward + backward
    rounds: int = 10
    warmup: int = 2

    @property
    def settings(self) -> dict:
        return dict(self.config)

    @property
    def id(self) -> str:
        fixed = "-".join(f"{k}{v}" for k, v in self.config if k != "dtype")
        return f"{self.kernel}-{self.x_name}{self.x_value}" + (f"-{fixed}" if fixed else "")


def target(mode: str, cuda: bool | None = None) -> tuple[torch.device, torch.dtype]:
    """Where the cases run: CUDA in bf16 unless dry-run or no GPU (cuda=None: whether this machine
    has one); else the CPU in fp32."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if mode != "dry-run" and cuda:
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


CONTRASTIVE_PROVIDERS = {
    "clip_loss": ("mmkernels", "eager", "torch.compile", "memeff", "inf-cl"),
    "siglip_loss": ("mmkernels", "eager", "torch.compile", "siglip-kernel"),
    "info_nce_loss": ("mmkernels", "eager", "torch.compile", "inf-cl"),
}
ATTENTION_PROVIDERS = ("mmkernels", "eager", "torch.compile", "sdpa", "flex", "varlen")
REGION_PROVIDERS = ("mmkernels", "mmkernels-cuda", "mmkernels-torch", "eager")
MODEL_PROVIDERS = ("mmkernels", "transformers")
# Providers left out on purpose: kernel -> provider -> why (the summary lists them with the rest).
NOT_OFFERED = {
    kernel: {"torch.compile": "not benchmarked: the eager code's boolean indexing has data-dependent shapes "
                              "(graph breaks), and its compilation would not fit --quick's 8 minutes"}
    for kernel in ("region_mask", "masked_region_loss")
}

# size set -> per op: the x values and the fixed configurations
CONTRASTIVE = {
    "quick": dict(N=(4096, 16384, 32768), D=(768,)),
    "full": dict(N=(4096, 16384, 32768, 65536), D=(512, 768)),
    "tiny": dict(N=(32, 64), D=(32,)),
}
# B·H fixed; L = Lq = Lk; curves of (head dim d, padding: the fraction of keys that are padding, L values).
# quick keeps 5 points: every new (L, d, padding) is a new autotuning key for mmkernels and a new
# graph for torch.compile / FlexAttention, which is what its time goes to.
ATTENTION = {
    "quick": dict(B=8, H=16, curves=[(64, 0.5, (512, 2048, 8192)), (64, 0.0, (2048,)), (128, 0.5, (2048,))]),
    "full": dict(B=8, H=16, curves=[(d, padding, (512, 1024, 2048, 4096, 8192, 16384))
                                    for d in (64, 128) for padding in (0.0, 0.25, 0.5, 0.75)]),
    "tiny": dict(B=2, H=2, curves=[(16, 0.0, (16, 32)), (16, 0.5, (16, 32))]),
}
REGION = {
    "quick": dict(B=(256, 1024), R=100, D=2048),
    "full": dict(B=(64, 256, 1024, 4096), R=100, D=2048),
    "tiny": dict(B=(4, 8), R=12, D=32),
}
MODEL = {  # kernel -> batches; the size of the models
    "quick": dict(size="base", batches={"clip_model": (256,)}),
    "full": dict(size="base", batches={"clip_model": (256, 1024), "lxmert_model": (256,)}),
    "tiny": dict(size="tiny", batches={"clip_model": (4, 8), "lxmert_model": (4,)}),
}
ROUNDS = {  # size set -> op -> (warm-up rounds, timed rounds)
    "quick": dict(contrastive=(2, 10), attention=(2, 10), region=(3, 20), model=(1, 5)),
    "full": dict(contrastive=(3, 20), attention=(3, 20), region=(5, 50), model=(2, 10)),
    "tiny": dict(contrastive=(0, 1), attention=(0, 1), region=(0, 1), model=(0, 1)),
}


def cases_for(mode: str, ops=OPS, cuda: bool | None = None) -> list[Case]:
    """Every case of these ops in this mode, in a stable order (cuda=None: for this machine; True:
    the cases a CUDA machine runs)."""
    if mode not in MODES:
        raise ValueError(f"expected mode in {MODES}, got {mode!r}")
    device, dtype = target(mode, cuda)
    sizes = mode if device.type == "cuda" else "tiny"
    dtype = str(dtype).removeprefix("torch.")
    out = []

    def add(op, kernel, x_name, x_value, providers, operation="full", **config):
        warmup, rounds = ROUNDS[sizes][op]
        out.append(Case(op, kernel, x_name, x_value, (("dtype", dtype),) + tuple(config.items()), tuple(providers),
                        operation, rounds, warmup))

    if "contrastive" in ops:
        grid = CONTRASTIVE[sizes]
        for kernel, providers in CONTRASTIVE_PROVIDERS.items():
            for d in grid["D"]:
                for n in grid["N"]:
                    add("contrastive", kernel, "N", n, providers, D=d)
        for kernel in ("clip_loss", "siglip_loss"):
            # group ids (every caption twice) against the diagonal above, at the largest N and D
            add("contrastive", kernel, "N", grid["N"][-1], ("mmkernels",), D=grid["D"][-1], groups=2)
    if "attention" in ops:
        grid = ATTENTION[sizes]
        for d, padding, lengths in grid["curves"]:
            for length in lengths:
                add("attention", "cross_attention", "L", length, ATTENTION_PROVIDERS,
                    B=grid["B"], H=grid["H"], d=d, padding=padding)
    if "region" in ops:
        grid = REGION[sizes]
        for mode_name in ("zero", "bert"):
            for batch in grid["B"]:
                add("region", "region_mask", "B", batch, REGION_PROVIDERS, "forward", R=grid["R"], D=grid["D"],
                    mode=mode_name)
        for kind in ("mse", "smooth_l1", "kl"):
            for batch in grid["B"]:
                add("region", "masked_region_loss", "B", batch, REGION_PROVIDERS, R=grid["R"], D=grid["D"], kind=kind)
    if "model" in ops:
        grid = MODEL[sizes]
        for kernel, batches in grid["batches"].items():
            for batch in batches:
                add("model", kernel, "batch", batch, MODEL_PROVIDERS, size=grid["size"])
    return out


_BUILDERS = {"contrastive": contrastive_step, "attention": attention_step, "model": model_step}


def build_step(case: Case, provider: str, mode: str):
    device, dtype = target(mode)
    if case.op == "region":
        builder = region_mask_step if case.kernel == "region_mask" else region_loss_step
    else:
        builder = _BUILDERS[case.op]
    return builder(case, provider, device, dtype)


def _not_run(case: Case, provider: str, reason: str, skip: bool = True):
    path = os.environ.get(NOT_RUN_LOG)
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(dict(kernel_name=case.kernel, kernel_provider=provider, case=case.id,
                                      reason=reason)) + "\n")
    if skip:
        import pytest  # noqa: PLC0415  (the cases import without pytest; running them needs it)

        pytest.skip(f"{provider}: {reason}")


def _release_memory(device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_case(benchmark, case: Case, provider: str, mode: str) -> None:
    """Time one provider on one case with pytest-benchmark; what the report needs goes to extra_info.
    A provider that cannot run is skipped with its reason (and logged to $MMKERNELS_BENCH_NOT_RUN)."""
    device, _ = target(mode)
    reason = None
    try:
        step, work = build_step(case, provider, mode)
        measured = measure(benchmark, step, device, case.rounds, case.warmup, group=case.id)
    except NotRun as not_run:
        reason = str(not_run)
    except torch.OutOfMemoryError:
        reason = "out of GPU memory"
    except Exception as error:
        _not_run(case, provider, f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                 skip=False)
        _release_memory(device)
        raise
    if reason is not None:
        # skipped outside the handler, so that the skip does not chain the error whose frames hold the tensors
        _release_memory(device)
        _not_run(case, provider, reason)
    config = case.settings
    if provider == "torch.compile":
        config["compile"] = compile_options(device) or "inductor"
    seconds = measured.ms[0] / 1e3
    rates = {}
    if "flops" in work:
        rates["tflops"] = work["flops"] / seconds / 1e12
    if "bytes" in work:
        rates["gbps"] = work["bytes"] / seconds / 1e9
    if "samples" in work:
        rates["samples_per_s"] = work["samples"] / seconds
    benchmark.extra_info.update(
        kernel_name=case.kernel, kernel_provider=provider, kernel_operation_mode=case.operation,
        x_name=case.x_name, x_value=case.x_value, config=config, **work, **rates)


# --------------------------------------------------------------------------- the --quick estimate

H100_BF16_FLOPS, H100_BYTES_PER_S = 790e12, 2.9e12
# Fixed costs assumed (not measured): Inductor compiling a forward + backward graph, and once more
# when a second shape makes it recompile with dynamic shapes; the Triton JIT of mmkernels' kernels
# per new specialisation (attention: autotuning ~13 candidates over its three kernels per key);
# building a base-sized model; pytest's and the inputs' set-up per (case, provider).
COMPILE_S, RECOMPILE_S = 30.0, 10.0
JIT_S = {"contrastive": 5.0, "attention": 20.0, "region": 2.0, "model": 20.0}
MODEL_BUILD_S, CASE_OVERHEAD_S = 10.0, 0.3


def _seconds_per_call(case: Case, provider: str) -> float:
    """A lower-bound-style guess of one call on an H100: the counted work at the ceilings, with the
    N² / L² intermediates that eager and torch.compile write counted as bytes."""
    s = case.settings
    if case.op == "contrastive":
        n, d = case.x_value, s["D"]
        flops, moved = 6 * n * n * d, 4 * n * d * 2
        if provider in ("eager", "torch.compile"):
            moved += 10 * n * n * 2  # logits, softmax / log-sigmoid, their gradients, both directions
        return max(flops / H100_BF16_FLOPS / 0.6, moved / H100_BYTES_PER_S)
    if case.op == "attention":
        length = case.x_value
        flops = 12 * s["d"] * s["B"] * s["H"] * length * length * (1 - s["padding"])
        moved = 8 * s["B"] * s["H"] * length * s["d"] * 2
        if provider in ("eager", "torch.compile"):
            moved += 12 * s["B"] * s["H"] * length * length * 2  # scores, fp32 softmax, their gradients
        return max(flops / H100_BF16_FLOPS / 0.5, moved / H100_BYTES_PER_S)
    if case.op == "region":
        return max(4 * case.x_value * s["R"] * s["D"] * 2 / H100_BYTES_PER_S, 20e-6)
    # CLIP ViT-B/16 forward: ~35 GFLOP per image (17.6 G multiply-adds) and ~6 GFLOP per 77-token
    # caption; x3 with the backward
    return 3 * 41e9 * case.x_value / H100_BF16_FLOPS / 0.4


def estimate_seconds(mode: str = "quick") -> float:
    """The expected duration of a CUDA run of `mode` on one H100: the counted work at the H100's
    ceilings (bf16 790 TFLOP/s at 40-60%, 2.9 TB/s) plus the fixed costs above. An estimate, not a
    measurement. Peers that are not installed cost nothing; they are counted as if they ran."""
    total = 0.0
    compiled, jitted = Counter(), set()
    for case in cases_for(mode, cuda=True):
        for provider in case.providers:
            calls = 2 + case.warmup + case.rounds  # first call, memory call, warm-up, timed rounds
            total += CASE_OVERHEAD_S + calls * _seconds_per_call(case, provider)
            if provider in ("torch.compile", "flex"):
                # a first shape compiles; a second recompiles with dynamic shapes, which later shapes reuse
                graph = (provider, case.kernel, case.settings.get("padding", 0) > 0)
                total += (COMPILE_S, RECOMPILE_S, 0.0)[min(compiled[graph], 2)]
                compiled[graph] += 1
            elif provider == "mmkernels":
                key = (case.kernel, case.x_value if case.op == "attention" else None, case.settings.get("d"),
                       case.settings.get("padding"))
                total += 0.0 if key in jitted else JIT_S[case.op]
                jitted.add(key)
            if case.op == "model":
                total += MODEL_BUILD_S
    return total
