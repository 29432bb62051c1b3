"""`mmkernels.patch` on whole models, forward + backward: the model's own code against the same model
patched, side by side in one run.

    pytest benchmarks/bench_patch.py --benchmark-only --benchmark-columns=median,rounds

The cases are mmkernels.bench's (mmkernels/bench/cases.py, models in mmkernels/bench/models.py;
`python -m mmkernels.bench --ops model` runs the same). Providers, each timed on one training step
(forward with the loss, backward into every parameter):
- transformers: the model as transformers builds it (its default attention implementation, SDPA
  where the model supports it; the contrastive loss through the N x N logits);
- mmkernels: the same model after `mmkernels.patch(model)` (extra_info["patched"] says what the
  patch swapped, so that a run says what was patched).

Models: CLIP at ViT-B/16 size, `CLIPModel(return_loss=True)` with captions of varied lengths
(padded); LXMERT at its base size with varied token and region counts, trained on the language,
vision and pooled outputs. On CUDA in bf16; without CUDA tiny configurations in fp32 on the CPU
(mmkernels' reference path), so the suite runs everywhere; CPU times say nothing about GPU speed.

extra_info: samples/s and the peak memory of one step above what was allocated before it
(`peak_memory_mib`). A provider that runs out of GPU memory is reported as skipped.
"""
import os

import pytest

from mmkernels.bench.cases import cases_for, run_case

pytest.importorskip("transformers")

MODE = os.environ.get("MMKERNELS_BENCH_MODE", "full")
SELECTED = [(case, provider) for case in cases_for(MODE, ["model"]) for provider in case.providers]


@pytest.mark.parametrize("case,provider", SELECTED, ids=[f"{case.id}-{provider}" for case, provider in SELECTED])
def test_patched_model_fwd_bwd(benchmark, case, provider):
    run_case(benchmark, case, provider, MODE)
