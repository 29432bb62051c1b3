"""The CUDA C++ extension mmkernels._C: it is built wherever nvcc is (setup.py), imports without a GPU
driver, fails with a clear error when called without a GPU, says how to build it when missing; its
numerics (csrc/region_math.h: the hash and the loss math, the warp's lane split and butterfly
replayed on the CPU) match the float64 reference with no GPU; and, on a GPU, the kernels match it."""
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmkernels.ops import _extension
from mmkernels.ops.region import reference
from mmkernels.ops._dispatch import resolve_backend
from mmkernels.ops._extension import cuda_extension_available
from mmkernels.ops.region import masked_region_loss, region_mask
from test_region import generators
from test_region_loss import assert_all_within_rule, eager, loss_inputs, oracle, run
from toolkit import assert_no_host_sync, assert_within_rule, fresh_seed, value_and_grads

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("seed")


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


WITHOUT_EXTENSION = """
import sys
sys.modules["mmkernels._C"] = None  # import mmkernels._C now raises ImportError, as where it is not built
import torch
import mmkernels
from mmkernels.ops import _extension
assert not _extension.cuda_extension_available() and "mmkernels._C" in _extension._C_IMPORT_ERROR
out = mmkernels.region_mask(torch.randn(2, 3, 4), torch.tensor([3, 1]), prob=1.0)
loss = mmkernels.masked_region_loss(out.features, torch.randn(2, 3, 4), out.mask)
assert out.mask.tolist() == [[True, True, True], [True, False, False]] and torch.isfinite(loss)
print("ok")
"""


def test_mmkernels_imports_and_runs_without_the_extension():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors, got cpu"):
        region_mask(torch.randn(2, 3, 4), torch.tensor([3, 1]), backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        masked_region_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool),
                           backend="cuda")


def test_cuda_backend_without_the_extension_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "_C_IMPORT_ERROR", "No module named 'mmkernels._C'")
    on_gpu = SimpleNamespace(dtype=torch.bfloat16, is_cuda=True, device=torch.device("cuda"))
    for op in ("region_mask", "masked_region_loss"):
        with pytest.raises(RuntimeError, match=r"mmkernels._C is not built.*pip install -e \..*build_ext --inplace"):
            resolve_backend(op, "cuda", on_gpu)
    with pytest.raises(RuntimeError, match="import failed: No module named 'mmkernels._C'"):
        _extension.extension()


# --------------------------------------------------------------------------- the numerics on the CPU


def host_compiler():
    return shutil.which(os.environ.get("CXX", "c++"))


@pytest.fixture(scope="module")
def region_math(tmp_path_factory):
    """tests/csrc/region_math_check.cpp (csrc/region_math.h driven as the kernels drive it), built
    with the host C++ compiler and loaded with ctypes."""
    if host_compiler() is None:
        pytest.skip("no C++ compiler (c++ or $CXX) to build csrc/region_math.h for the CPU")
    lib = tmp_path_factory.mktemp("region_math") / "region_math_check.so"
    subprocess.run(
        [host_compiler(), "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
         str(ROOT / "tests" / "csrc" / "region_math_check.cpp"), "-o", str(lib)],
        check=True, capture_output=True, timeout=120,
    )
    return ctypes.CDLL(str(lib))


def ptr(t: torch.Tensor):
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def test_host_hash_is_the_reference_bit_for_bit(region_math):
    n = 4096
    b = torch.randint(0, 2**31, (n,), dtype=torch.int64)
    r = torch.randint(0, 2**31, (n,), dtype=torch.int64)
    b[:4], r[:4] = torch.tensor([0, 0, 2**31 - 1, 7]), torch.tensor([0, 5, 2**31 - 1, 0])
    seed0, key = torch.randint(0, 2**31, (2,)).tolist()
    got = torch.empty(n, dtype=torch.int32)
    region_math.region_random_batch(ctypes.c_uint32(seed0), ctypes.c_uint32(key), ptr(b), ptr(r),
                                    ctypes.c_int64(n), ptr(got))
    want = reference.region_random(seed0, key, b, r)
    assert torch.equal(got.long(), want)
    assert want.unique().numel() > n - 8  # a hash, not a constant


def host_loss(region_math, pred, target, kind, beta, vec, upstream):
    """[per-region loss, d pred, d target] of the CUDA math on the CPU; pred, target (1, R, K) fp32."""
    _, n_rows, dim = pred.shape
    p, t = pred[0].contiguous(), target[0].contiguous()
    loss = torch.empty(n_rows)
    stats = torch.empty(n_rows, 2)
    kind_code = {"mse": 0, "smooth_l1": 1, "kl": 2}[kind]
    region_math.loss_forward_rows(ptr(p), ptr(t), ctypes.c_int64(n_rows), ctypes.c_int64(dim), kind_code,
                                  ctypes.c_float(beta), vec, ptr(loss), ptr(stats))
    d_pred, d_target = torch.empty_like(p), torch.empty_like(t)
    g = upstream[0].contiguous()
    region_math.loss_backward_rows(ptr(g), ptr(p), ptr(t), ptr(stats), ctypes.c_int64(n_rows), ctypes.c_int64(dim),
                                   kind_code, ctypes.c_float(beta), ptr(d_pred), ptr(d_target))
    return [loss[None], d_pred[None], d_target[None]]


def awkward_rows(kind, n_rows, dim):
    """(1, R, K) fp32 rows the kernels must get right: NaN and ±Inf in pred and target, and for "kl"
    targets that do not sum to 1, negative ones, zeros under -inf logits, a lane that only sees -inf
    (lane 10 of 32 holds element 10 alone when K = 40, vec = 1) or all lanes but lane 0, an all-zero
    target row, an all -inf row."""
    pred, target, _ = loss_inputs(kind, 1, n_rows, dim, torch.float32, "cpu")
    inf, nan = float("inf"), float("nan")
    pred[0, 0, 3], target[0, 1, 4], pred[0, 2, 5], pred[0, 3, 6] = nan, nan, inf, -inf
    if kind == "kl":
        target[0, 4:] *= torch.rand(n_rows - 4, 1) * 3
        target[0, 5, 7] = -0.5
        pred[0, 6, 10], target[0, 6, 10] = -inf, 0.0
        pred[0, 7, 10] = -inf
        pred[0, 8, ::2], target[0, 8, ::2] = -inf, 0.0
        target[0, 9] = 0.0
        pred[0, 10, 0], target[0, 10] = nan, 0.0
        pred[0, 11, 1:] = -inf  # every lane but lane 0 sees -inf logits only, under positive targets
        pred[0, 12] = -inf
    else:
        target[0, 4, 8], pred[0, 5, 9], target[0, 5, 9] = -inf, inf, inf
    return pred, target


@pytest.mark.parametrize("vec", [1, 4, 8])
@pytest.mark.parametrize("kind, beta", [("mse", 1.0), ("smooth_l1", 0.5), ("smooth_l1", 0.0), ("kl", 1.0)])
def test_host_loss_math_matches_float64_for_any_input(region_math, kind, beta, vec):
    """csrc/region_math.h's loss math, run as the kernels run it (each of 32 lanes folds every 32nd
    vector of `vec` elements, then the xor butterfly merges the lanes), against the float64 reference
    per region, NaN and Inf where the reference has them."""
    n_rows, dim = 14, 40
    pred, target = awkward_rows(kind, n_rows, dim)
    mask = torch.ones(1, n_rows, dtype=torch.bool)
    upstream = torch.randn(1, n_rows)
    got = host_loss(region_math, pred, target, kind, beta, vec, upstream)
    want = oracle(pred, target, mask, kind, "none", beta=beta, upstream=upstream)
    assert not torch.isfinite(want[0]).all() and torch.isfinite(want[0]).sum() >= 4  # both kinds of rows
    # the eager formula in fp32 (UNITER's gather-then-F.kl_div has NaN where the contract has 0)
    fp32 = run("torch", pred, target, mask, kind, "none", beta=beta, upstream=upstream)
    assert_all_within_rule(f"host {kind} beta={beta} vec={vec}", got, fp32, want, torch.float32,
                           allow_nonfinite=True)


def test_host_loss_math_check_can_fail(region_math):
    """Negative control: the same comparison catches a wrong loss (another beta)."""
    pred, target, _ = loss_inputs("smooth_l1", 1, 6, 40, torch.float32, "cpu")
    pred = pred * 3
    mask = torch.ones(1, 6, dtype=torch.bool)
    upstream = torch.randn(1, 6)
    got = host_loss(region_math, pred, target, "smooth_l1", 0.25, 1, upstream)
    want = oracle(pred, target, mask, "smooth_l1", "none", beta=1.0, upstream=upstream)
    with pytest.raises(AssertionError):
        assert_within_rule("loss", got[0], want[0], want[0], torch.float32)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["zero", "bert"])
@pytest.mark.parametrize("existing", ["lens", "valid"])
def test_gpu_cuda_matches_reference(existing, mode, dtype):
    feats = torch.randn(256, 100, 2048, device="cuda", dtype=dtype)
    lens = torch.randint(0, 101, (256,), device="cuda")
    lens[0], lens[1] = 0, 100
    emb = torch.randn(2048, device="cuda", dtype=dtype)
    if existing == "lens":
        where = dict(region_lens=lens)
    else:
        where = dict(valid_mask=torch.rand(256, 100, device="cuda") < 0.6)
    weight = torch.linspace(-1, 1, 2048, device="cuda", dtype=torch.float64)
    seed = fresh_seed()

    def run_mask(f, e, backend):
        out = region_mask(f, prob=0.15, mode=mode, mask_embedding=e, min_masked=2, backend=backend,
                          generator=torch.Generator().manual_seed(seed), **where)
        return out, (out.features.double() * weight).sum()

    got, _ = run_mask(feats, emb, "cuda")
    want, _ = run_mask(feats, emb, "torch")
    assert torch.equal(got.mask, want.mask) and torch.equal(got.features, want.features)
    grads = {
        name: value_and_grads(lambda f, e: run_mask(f, e, backend)[1], leaves)
        for name, backend, leaves in [("cuda", "cuda", [feats, emb]), ("eager", "torch", [feats, emb]),
                                      ("oracle", "torch", [feats.double(), emb.double()])]
    }
    for i, name in ((1, "d feats"), (2, "d mask_embedding")):
        assert_within_rule(name, grads["cuda"][i], grads["eager"][i], grads["oracle"][i], dtype)


@pytest.mark.gpu
@needs_extension
def test_gpu_cuda_unaligned_rows_take_the_scalar_path():
    feats = torch.randn(8, 2 * 13, 37, device="cuda", dtype=torch.float16)[:, ::2]  # D·2 bytes not /16
    lens = torch.tensor([0, 1, 13, 5, 7, 13, 2, 9], device="cuda")
    g_cuda, g_torch = generators()
    got = region_mask(feats, lens, prob=0.5, mode="bert", generator=g_cuda, backend="cuda")
    want = region_mask(feats, lens, prob=0.5, mode="bert", generator=g_torch, backend="torch")
    assert torch.equal(got.mask, want.mask) and torch.equal(got.features, want.features)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "kl"])
def test_gpu_cuda_loss_unaligned_rows_within_rule(kind):
    """K·2 bytes not a multiple of 16: the kernels take their one-element path."""
    pred, target, mask = loss_inputs(kind, 8, 13, 37, torch.float16, "cuda", prob=0.5)
    assert_all_within_rule(f"cuda {kind}", run("cuda", pred, target, mask, kind), eager(pred, target, mask, kind),
                           oracle(pred, target, mask, kind), torch.float16)


@pytest.mark.gpu
@needs_extension
def test_gpu_cuda_min_masked_beyond_int32():
    lens = torch.tensor([0, 1, 7, 4], device="cuda")
    feats = torch.randn(4, 7, 16, device="cuda")
    got = region_mask(feats, lens, prob=0.0, min_masked=2**32, backend="cuda")
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
        out = region_mask(feats, lens, prob=0.3, mode="bert", mask_embedding=emb, backend=backend)
        for kind in ("mse", "kl"):
            masked_region_loss(out.features, target.softmax(-1), out.mask, kind, backend=backend).backward(
                retain_graph=True)

    assert_no_host_sync(step)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_extension)])
def test_gpu_kernels_run_on_the_inputs_device_and_keep_the_current_one(backend):
    torch.cuda.set_device(0)
    feats = torch.randn(4, 9, 32, device="cuda:1", requires_grad=True)
    lens = torch.tensor([0, 3, 9, 5], device="cuda:1")
    g_kernel, g_torch = generators()
    got = region_mask(feats, lens, prob=0.5, mode="bert", generator=g_kernel, backend=backend)
    assert torch.cuda.current_device() == 0
    want = region_mask(feats, lens, prob=0.5, mode="bert", generator=g_torch, backend="torch")
    assert torch.equal(got.mask, want.mask) and torch.equal(got.features, want.features)
    target = torch.randn(4, 9, 32, device="cuda:1")
    masked_region_loss(got.features, target, got.mask, "mse", backend=backend).backward()
    assert torch.cuda.current_device() == 0 and torch.isfinite(feats.grad).all()
