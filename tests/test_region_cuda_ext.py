"""The CUDA C++ extension mmkernels._C: it is built wherever nvcc is (setup.py), imports without a GPU
driver, fails with a clear error when called without a GPU, and (on a GPU) matches the reference."""
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from mmkernels.ops import region
from mmkernels.ops.region import cuda_extension_available, masked_region_loss, region_mask
from test_region import _assert_within_rule, _loss_and_grads, eager_gather_loss


def nvcc_found() -> bool:
    """setup.py's rule: the extension is built when nvcc is found and the build is not skipped."""
    if os.environ.get("MMKERNELS_SKIP_CUDA_BUILD", "").lower() in ("1", "true", "yes", "on"):
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ""
    candidates = [shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"]
    return any(c and os.path.isfile(c) for c in candidates)


needs_extension = pytest.mark.skipif(not cuda_extension_available(), reason="mmkernels._C is not built")


@pytest.mark.skipif(not nvcc_found(), reason="no nvcc here, so setup.py did not build mmkernels._C")
def test_extension_is_built_and_imports():
    import mmkernels._C as ext

    assert cuda_extension_available(), "nvcc is present but mmkernels._C did not import"
    for name in ("region_mask_forward", "region_mask_backward",
                 "masked_region_loss_forward", "masked_region_loss_backward"):
        assert callable(getattr(ext, name))


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_calling_without_a_gpu_raises_a_clear_error():
    from mmkernels import _C

    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        _C.region_mask_backward(0, 0, 0, 0, 0, 0, 1, 1, 1, 0, False, 0, 0)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        _C.masked_region_loss_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1.0, 0, 0)


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors, got cpu"):
        region_mask(torch.randn(2, 3, 4), torch.tensor([3, 1]), backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        masked_region_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool),
                           backend="cuda")


def test_cuda_backend_without_the_extension_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(region, "_C", None)
    monkeypatch.setattr(region, "_C_IMPORT_ERROR", "No module named 'mmkernels._C'")
    monkeypatch.setitem(region.AUTO_CUDA_BACKEND, "region_mask", "cuda")
    on_gpu = SimpleNamespace(dtype=torch.bfloat16, is_cuda=True, device=torch.device("cuda"))
    with pytest.raises(RuntimeError, match=r"mmkernels._C is not built.*pip install -e \..*build_ext --inplace"):
        region._resolve_backend("region_mask", "cuda", on_gpu)
    # auto falls back to Triton when the extension is missing
    assert region._resolve_backend("region_mask", "auto", on_gpu) == ("triton" if region.HAS_TRITON else "torch")


# --------------------------------------------------------------------------- GPU


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["zero", "bert"])
@pytest.mark.parametrize("existing", ["lens", "valid"])
def test_gpu_cuda_matches_reference(existing, mode, dtype):
    torch.manual_seed(0)
    feats = torch.randn(256, 100, 2048, device="cuda", dtype=dtype)
    lens = torch.randint(0, 101, (256,), device="cuda")
    lens[0], lens[1] = 0, 100
    emb = torch.randn(2048, device="cuda", dtype=dtype)
    if existing == "lens":
        where = dict(region_lens=lens)
    else:
        where = dict(valid_mask=torch.rand(256, 100, device="cuda") < 0.6)
    kw = dict(prob=0.15, mode=mode, mask_embedding=emb, min_masked=2, **where)
    results = []
    for backend in ("cuda", "torch"):
        f = feats.clone().requires_grad_()
        e = emb.clone().requires_grad_()
        out = region_mask(f, generator=gen(3), backend=backend, **{**kw, "mask_embedding": e})
        (out.features.float() * torch.linspace(-1, 1, 2048, device="cuda")).sum().backward()
        results.append((out, f.grad, e.grad))
    (got, gf, ge), (want, rf, re) = results
    assert torch.equal(got.mask, want.mask)
    assert torch.equal(got.features, want.features)
    torch.testing.assert_close(gf, rf)
    torch.testing.assert_close(ge.float(), re.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@needs_extension
def test_gpu_cuda_unaligned_rows_take_the_scalar_path():
    feats = torch.randn(8, 2 * 13, 37, device="cuda", dtype=torch.float16)[:, ::2]  # D·2 bytes not /16
    lens = torch.tensor([0, 1, 13, 5, 7, 13, 2, 9], device="cuda")
    got = region_mask(feats, lens, prob=0.5, mode="bert", generator=gen(1), backend="cuda")
    want = region_mask(feats, lens, prob=0.5, mode="bert", generator=gen(1), backend="torch")
    assert torch.equal(got.mask, want.mask) and torch.equal(got.features, want.features)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "kl"])
def test_gpu_cuda_loss_matches_triton_and_reference(kind, dtype):
    torch.manual_seed(1)
    pred = torch.randn(256, 100, 2048, device="cuda", dtype=dtype) * (4 if kind == "kl" else 1)
    target = torch.randn(256, 100, 2048, device="cuda")
    target = (torch.softmax(target, -1) if kind == "kl" else target).to(dtype)
    mask = torch.rand(256, 100, device="cuda") < 0.15
    outs = {
        backend: _loss_and_grads(lambda p, t: masked_region_loss(p, t, mask, kind, backend=backend), pred, target)
        for backend in ("cuda", "triton")
    }
    eager = _loss_and_grads(lambda p, t: eager_gather_loss(p, t, mask, kind), pred, target)
    ref = _loss_and_grads(lambda p, t: masked_region_loss(p.double(), t.double(), mask, kind, backend="torch"),
                          pred, target)
    for backend, got in outs.items():
        _assert_within_rule(got, eager, ref, dtype, f"{backend} {kind} {dtype}")
    for got, other in zip(outs["cuda"], outs["triton"]):
        torch.testing.assert_close(got.float(), other.float(), rtol=2e-2, atol=1e-6)


@pytest.mark.gpu
@needs_extension
def test_gpu_cuda_min_masked_beyond_int32():
    lens = torch.tensor([0, 1, 7, 4], device="cuda")
    feats = torch.randn(4, 7, 16, device="cuda")
    got = region_mask(feats, lens, prob=0.0, min_masked=2**32, generator=gen(2), backend="cuda")
    assert torch.equal(got.mask, torch.arange(7, device="cuda")[None, :] < lens[:, None])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_extension)])
@pytest.mark.parametrize("lens_device", ["cuda", "cpu"])
def test_gpu_forward_and_backward_never_sync_the_host(lens_device, backend):
    feats = torch.randn(8, 20, 64, device="cuda", requires_grad=True)
    emb = torch.randn(64, device="cuda", requires_grad=True)
    lens = torch.tensor([0, 1, 20, 5, 7, 20, 2, 9], device=lens_device)
    target = torch.randn(8, 20, 64, device="cuda")

    def step():
        out = region_mask(feats, lens, prob=0.3, mode="bert", mask_embedding=emb, generator=gen(4),
                          backend=backend)
        for kind in ("mse", "kl"):
            masked_region_loss(out.features, target.softmax(-1), out.mask, kind, backend=backend).backward(
                retain_graph=True)

    step()  # compile the Triton kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_extension)])
def test_gpu_kernels_run_on_the_inputs_device_and_keep_the_current_one(backend):
    torch.cuda.set_device(0)
    feats = torch.randn(4, 9, 32, device="cuda:1", requires_grad=True)
    lens = torch.tensor([0, 3, 9, 5], device="cuda:1")
    kw = dict(prob=0.5, mode="bert", generator=gen(6))
    got = region_mask(feats, lens, backend=backend, **kw)
    assert torch.cuda.current_device() == 0
    want = region_mask(feats, lens, backend="torch", **kw)
    assert torch.equal(got.mask, want.mask) and torch.equal(got.features, want.features)
    target = torch.randn(4, 9, 32, device="cuda:1")
    masked_region_loss(got.features, target, got.mask, "mse", backend=backend).backward()
    assert torch.cuda.current_device() == 0 and torch.isfinite(feats.grad).all()
