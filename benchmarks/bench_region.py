"""Masked region modeling: region_mask (forward) and masked_region_loss (forward + backward).

    pytest benchmarks/bench_region.py --benchmark-only

Providers:
- mmkernels-triton: the Triton kernels (CUDA only here: benchmarks do not run the interpreter).
- mmkernels-cuda: the CUDA C++ extension mmkernels._C (CUDA only; skipped when it is not built).
- mmkernels-torch: the PyTorch path mmkernels takes on the CPU.
- eager: what UNITER / LXMERT run. region_mask: a Bernoulli draw, UNITER's at-least-one fix-up,
  masked_fill (zero) or LXMERT's 80/10/10 split with a boolean-index copy of random rows (bert).
  masked_region_loss: gather the selected rows with a boolean index, then the loss, in the inputs'
  dtype (tests/toolkit.py's eager_masked_region_loss, the baseline the tests hold the kernels to).

On CUDA: bf16 at (B, R, D) = (256, 100, 2048) and (512, 36, 2048), with every sample holding
between 10 and R regions. Without CUDA: fp32 on small CPU shapes. extra_info holds the effective
GB/s (bytes the op must move: region_mask reads and writes the (B, R, D) features once; the loss
reads the selected rows of pred and target in the forward and again in the backward and writes the
full gradient of pred) and, on CUDA, the peak memory above the inputs.

When both mmkernels-triton and mmkernels-cuda ran, the end of the run prints, per op, which of the
two is faster over all cases (the sum of their medians) and the AUTO_CUDA_BACKEND entry to set in
mmkernels/ops/_extension.py (unmeasured until then).
"""
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from mmkernels.ops._extension import AUTO_CUDA_BACKEND, cuda_extension_available
from mmkernels.ops.region import region_mask
from mmkernels.ops.region_loss import masked_region_loss
from timing import CUDA, time_step
from toolkit import eager_masked_region_loss

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
PROB = 0.15

# (name, B, R, D)
SHAPES = (
    [("uniter_256x100x2048", 256, 100, 2048), ("lxmert_512x36x2048", 512, 36, 2048)]
    if CUDA
    else [("cpu_16x36x256", 16, 36, 256)]
)
PROVIDERS = ["mmkernels-triton", "mmkernels-cuda", "mmkernels-torch", "eager"]


# op -> case -> provider -> median seconds, for the AUTO_CUDA_BACKEND recommendation
MEDIANS = defaultdict(lambda: defaultdict(dict))


def recommend_auto_cuda_backend(medians) -> dict:
    """op -> ("triton" | "cuda", total triton seconds, total cuda seconds) over the cases both ran."""
    choice = {}
    for op, cases in medians.items():
        both = [c for c in cases.values() if "mmkernels-triton" in c and "mmkernels-cuda" in c]
        if both:
            triton_s = sum(c["mmkernels-triton"] for c in both)
            cuda_s = sum(c["mmkernels-cuda"] for c in both)
            choice[op] = ("cuda" if cuda_s < triton_s else "triton", triton_s, cuda_s)
    return choice


@pytest.fixture(scope="module", autouse=True)
def auto_cuda_backend_report(request):
    """After the suite: print the AUTO_CUDA_BACKEND entries that the medians call for."""
    yield
    choice = recommend_auto_cuda_backend(MEDIANS)
    if not choice:
        return
    lines = [f"{op}: triton {t * 1e3:.3f} ms, cuda {c * 1e3:.3f} ms in all -> {best!r} "
             f"(now {AUTO_CUDA_BACKEND.get(op)!r})" for op, (best, t, c) in choice.items()]
    table = ", ".join(f"{op!r}: {best!r}" for op, (best, _, _) in choice.items())
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nAUTO_CUDA_BACKEND, measured on " + torch.cuda.get_device_name() + ":\n  "
              + "\n  ".join(lines) + f"\n  set in mmkernels/ops/_extension.py: AUTO_CUDA_BACKEND = {{{table}}}")


def make_features(batch, regions, dim):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(batch, regions, dim, generator=gen).to(DEVICE, DTYPE)
    lens = torch.randint(min(10, regions), regions + 1, (batch,), generator=gen).to(DEVICE)
    return feats, lens


def eager_region_mask(feats, lens, prob, mode, mask_embedding):
    """UNITER's _get_img_mask + _mask_img_feat, and LXMERT's random_feat split, batched on device."""
    batch, regions, dim = feats.shape
    valid = torch.arange(regions, device=feats.device)[None, :] < lens[:, None]
    mask = (torch.rand(batch, regions, device=feats.device) < prob) & valid
    # at least one masked region per sample: pick a random existing one where none was drawn
    none = ~mask.any(1) & (lens > 0)
    pick = (torch.rand(batch, device=feats.device) * lens).long()
    mask = mask | (F.one_hot(pick, regions).bool() & none[:, None])
    if mode == "zero":
        return torch.where(mask[..., None], mask_embedding, feats), mask
    action = torch.rand(batch, regions, device=feats.device)
    masked = mask & (action < 0.8)
    replaced = mask & (action >= 0.8) & (action < 0.9)
    out = torch.where(masked[..., None], mask_embedding, feats)
    existing = valid.flatten().nonzero().squeeze(1)
    n_replaced = int(replaced.sum())
    sources = existing[torch.randint(0, existing.numel(), (n_replaced,), device=feats.device)]
    out[replaced] = feats.reshape(-1, dim)[sources]
    return out, mask


def mask_step(provider, feats, lens, mode, mask_embedding):
    if provider == "eager":
        return lambda: eager_region_mask(feats, lens, PROB, mode, mask_embedding)
    backend = provider.split("-")[1]
    if backend in ("triton", "cuda") and not CUDA:
        pytest.skip(f"{provider} is benchmarked on CUDA only")
    if backend == "cuda" and not cuda_extension_available():
        pytest.skip("mmkernels._C is not built (pip install -e . with nvcc on PATH)")
    return lambda: region_mask(feats, lens, prob=PROB, mode=mode, mask_embedding=mask_embedding, backend=backend)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["zero", "bert"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_region_mask(benchmark, shape, mode, provider):
    name, batch, regions, dim = shape
    feats, lens = make_features(batch, regions, dim)
    mask_embedding = torch.randn(dim, device=DEVICE, dtype=DTYPE)
    step = mask_step(provider, feats, lens, mode, mask_embedding)
    seconds = time_step(benchmark, step, f"region_mask-{mode}-{name}", rounds=50)
    MEDIANS["region_mask"][(name, mode)][provider] = seconds
    moved = 2 * feats.numel() * feats.element_size() + batch * regions
    benchmark.extra_info.update(
        provider=provider, op="region_mask", mode=mode, shape=dict(B=batch, R=regions, D=dim),
        dtype=str(DTYPE), bytes=moved, gbps=moved / seconds / 1e9,
    )


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "kl"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_masked_region_loss_fwd_bwd(benchmark, shape, kind, provider):
    name, batch, regions, dim = shape
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(batch, regions, dim, generator=gen).to(DEVICE, DTYPE).requires_grad_()
    target = torch.randn(batch, regions, dim, generator=gen)
    if kind == "kl":
        target = torch.softmax(target, dim=-1)
    target = target.to(DEVICE, DTYPE)
    feats, lens = make_features(batch, regions, dim)
    mask = region_mask(feats[..., :1].float().cpu(), lens.cpu(), prob=PROB, backend="torch").mask.to(DEVICE)

    if provider == "eager":
        def forward():
            return eager_masked_region_loss(pred, target, mask, kind)
    else:
        backend = provider.split("-")[1]
        if backend in ("triton", "cuda") and not CUDA:
            pytest.skip(f"{provider} is benchmarked on CUDA only")
        if backend == "cuda" and not cuda_extension_available():
            pytest.skip("mmkernels._C is not built (pip install -e . with nvcc on PATH)")

        def forward():
            return masked_region_loss(pred, target, mask, kind, backend=backend)

    def step():
        return torch.autograd.grad(forward(), pred)

    seconds = time_step(benchmark, step, f"masked_region_loss-{kind}-{name}", rounds=50)
    MEDIANS["masked_region_loss"][(name, kind)][provider] = seconds
    element = pred.element_size()
    n_selected = int(mask.sum())
    moved = 4 * n_selected * dim * element + pred.numel() * element + 2 * mask.numel()
    benchmark.extra_info.update(
        provider=provider, op="masked_region_loss", kind=kind, shape=dict(B=batch, R=regions, D=dim),
        dtype=str(DTYPE), selected=n_selected, bytes=moved, gbps=moved / seconds / 1e9,
    )
