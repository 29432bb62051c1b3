"""region_mask: the reference against UNITER's and LXMERT's formulas; every path (the torch reference,
the Triton kernels, under the interpreter on the CPU, and the CUDA C++ kernels on a GPU) against it
with the same seed, gradients against float64; mask statistics; the backend choice; output
poisoning; error paths; torch.compile; RegionMasker (opcheck and bf16 on the CPU: test_contract.py)."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmkernels.nn.region import RegionMasker
from mmkernels.ops import _common, _dispatch, _extension
from mmkernels.ops._dispatch import interpreting
from mmkernels.ops import region as region_op
from mmkernels.ops.region import launch as region_launch, reference
from mmkernels.ops._dispatch import AUTO_CUDA_BACKEND, resolve_backend
from mmkernels.ops._extension import cuda_extension_available
from mmkernels.ops.region import RegionMaskOutput, masked_region_loss, region_mask
from toolkit import CUDA, OpTrace, assert_within_rule, fresh_seed, needs_triton, value_and_grads

needs_extension = pytest.mark.skipif(not cuda_extension_available(), reason="mmkernels._C is not built")
# what CPU tensors do under Triton's interpreter (tests/conftest.py sets it where there is no GPU)
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="checks the CPU under TRITON_INTERPRET=1")

# Every path a CUDA or CPU tensor can take: the CPU runs "triton" under the interpreter.
PATHS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", marks=needs_triton, id="triton"),
    pytest.param("cuda", marks=[pytest.mark.gpu, needs_extension], id="cuda"),
]


def path_device(backend: str) -> torch.device:
    """Where `backend` runs its kernels here: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if CUDA and backend != "torch" or backend == "cuda" else "cpu")


pytestmark = pytest.mark.usefixtures("seed")


def generators(n: int = 2):
    """n CPU generators in the same fresh state: one seed, one mask, whichever backend draws it."""
    seed = fresh_seed()
    return [torch.Generator().manual_seed(seed) for _ in range(n)]


def lens_and_valid(n_samples, n_regions, device="cpu"):
    """Per-sample region counts covering 0, 1 and R, and the matching (B, R) bool mask."""
    lens = torch.randint(0, n_regions + 1, (n_samples,))
    lens[0], lens[-1] = 0, n_regions
    if n_samples > 2:
        lens[1] = 1
    valid = torch.arange(n_regions)[None, :] < lens[:, None]
    return lens.to(device), valid.to(device)


def scattered_valid(n_samples, n_regions, device="cpu"):
    """A (B, R) bool mask that is not a prefix, with an empty sample and a full one."""
    valid = torch.rand(n_samples, n_regions) < 0.7
    valid[0] = False
    valid[-1] = True
    return valid.to(device)


def plan(valid, generator, prob=0.15, min_masked=1, bert=False):
    """The (mask, source) that region_mask draws from `generator` (consumed as region_mask does)."""
    seed0, seed1 = torch.randint(0, 2**31, (2,), generator=generator, dtype=torch.int64).tolist()
    return reference.region_mask_plan(valid.cpu(), seed0, seed1, round(prob * 2**31), min_masked, bert)


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("with_embedding", [False, True])
def test_reference_zero_mode_is_uniter_masked_fill(with_embedding):
    feats = torch.randn(6, 11, 9, dtype=torch.float64)
    lens, valid = lens_and_valid(6, 11)
    emb = torch.randn(9, dtype=torch.float64) if with_embedding else None
    g_op, g_plan = generators()
    out = region_mask(feats, lens, prob=0.3, mask_embedding=emb, generator=g_op, backend="torch")
    assert isinstance(out, RegionMaskOutput)
    expected_mask, _ = plan(valid, g_plan, prob=0.3)
    assert torch.equal(out.mask, expected_mask) and out.mask.any()
    # UNITER's _mask_img_feat: img_feat.masked_fill(img_masks.unsqueeze(-1), 0)
    fill = emb if with_embedding else 0.0
    assert torch.equal(out.features, torch.where(out.mask[..., None], fill, feats))


def test_reference_bert_mode_is_lxmert_random_feat():
    feats = torch.randn(8, 10, 5, dtype=torch.float64)
    valid = scattered_valid(8, 10)
    emb = torch.randn(5, dtype=torch.float64)
    g_op, g_plan = generators()
    out = region_mask(feats, valid_mask=valid, prob=0.9, mode="bert", mask_embedding=emb, generator=g_op,
                      backend="torch")
    mask, source = plan(valid, g_plan, prob=0.9, bert=True)
    assert torch.equal(out.mask, mask)
    # LXMERT's loop, given the per-region decisions: mask -> embedding, random -> another region's
    # features, keep -> unchanged; everything not selected unchanged.
    flat_feats = feats.reshape(-1, 5)
    expected = feats.clone()
    n_random = 0
    for b in range(8):
        for r in range(10):
            src = int(source[b, r])
            if src == -1:
                expected[b, r] = emb
            elif src != b * 10 + r:
                n_random += 1
                assert valid.flatten()[src], "a random replacement copies an existing region"
                expected[b, r] = flat_feats[src]
    assert n_random > 0
    assert torch.equal(out.features, expected)


def test_reference_gradients_follow_eager_indexing():
    feats = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(3, dtype=torch.float64, requires_grad=True)
    valid = scattered_valid(4, 6)
    seed = fresh_seed()
    assert torch.autograd.gradcheck(
        lambda f, e: region_mask(f, valid_mask=valid, prob=0.8, mode="bert", mask_embedding=e,
                                 generator=torch.Generator().manual_seed(seed), backend="torch").features,
        (feats, emb),
    )


def test_same_seed_same_mask_other_seed_other_mask():
    feats = torch.randn(16, 30, 4)
    lens, _ = lens_and_valid(16, 30)
    g_a, g_b = generators()
    a = region_mask(feats, lens, prob=0.3, generator=g_a, backend="torch")
    b = region_mask(feats, lens, prob=0.3, generator=g_b, backend="torch")
    (g_c,) = generators(1)
    c = region_mask(feats, lens, prob=0.3, generator=g_c, backend="torch")
    assert torch.equal(a.mask, b.mask) and torch.equal(a.features, b.features)
    assert not torch.equal(a.mask, c.mask)  # 16·30 regions: two seeds agreeing is a ~2^-200 event
    seed = fresh_seed()
    d = region_mask(feats, lens, prob=0.3, backend="torch")
    torch.manual_seed(seed)
    e = region_mask(feats, lens, prob=0.3, backend="torch")
    assert torch.equal(d.mask, e.mask)


def test_input_is_not_modified():
    feats = torch.randn(3, 5, 4)
    before = feats.clone()
    out = region_mask(feats, torch.tensor([5, 2, 0]), prob=1.0, mode="bert", backend="torch")
    assert torch.equal(feats, before)
    assert out.features.data_ptr() != feats.data_ptr()


# --------------------------------------------------------------------------- statistics


def test_selection_rate_padding_and_min_masked():
    n_samples, n_regions, prob = 64, 50, 0.15
    lens, valid = lens_and_valid(n_samples, n_regions)
    selected = existing = 0
    for _ in range(20):
        mask, _ = plan(valid, generators(1)[0], prob=prob, min_masked=0)
        assert not (mask & ~valid).any(), "padding regions are never selected"
        selected += int(mask.sum())
        existing += int(valid.sum())
    rate = selected / existing
    sigma = (prob * (1 - prob) / existing) ** 0.5
    assert abs(rate - prob) < 5 * sigma, f"selection rate {rate:.4f} vs prob {prob}"

    for min_masked in (1, 3):
        for _ in range(10):
            mask, _ = plan(valid, generators(1)[0], prob=0.02, min_masked=min_masked)
            counts = mask.sum(1)
            assert (counts >= lens.clamp(max=min_masked)).all(), "min_masked honoured"
            assert (counts[lens == 0] == 0).all()


def test_min_masked_adds_the_smallest_draws_only():
    valid = torch.ones(200, 7, dtype=torch.bool)
    g_zero, g_half = generators()
    mask, _ = plan(valid, g_zero, prob=0.0, min_masked=2)
    assert (mask.sum(1) == 2).all(), "prob 0 selects exactly min_masked regions per sample"
    with_draws, _ = plan(valid, g_half, prob=0.5, min_masked=2)
    counts = with_draws.sum(1)
    assert (counts >= 2).all() and (counts > 2).any()


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("min_masked", [7, 2**32, 2**64])
def test_min_masked_beyond_int32_selects_every_existing_region(min_masked, backend):
    """min_masked >= R selects every existing region, however large the int (no 32/64-bit wrap)."""
    device = path_device(backend)
    lens, valid = lens_and_valid(4, 7, device)
    out = region_mask(torch.randn(4, 7, 5, device=device), lens, prob=0.0, min_masked=min_masked,
                      generator=generators(1)[0], backend=backend)
    assert torch.equal(out.mask, valid)


def test_bert_split_is_80_10_10():
    n_samples, n_regions = 64, 50
    valid = torch.ones(n_samples, n_regions, dtype=torch.bool)
    counts = torch.zeros(3)
    own = torch.arange(n_samples * n_regions).view(n_samples, n_regions)
    for _ in range(10):
        mask, source = plan(valid, generators(1)[0], prob=0.5, bert=True)
        counts[0] += int((source == -1).sum())
        counts[1] += int((mask & (source >= 0) & (source != own)).sum())
        counts[2] += int((mask & (source == own)).sum())
    total = counts.sum()
    for share, expected in zip(counts / total, (0.8, 0.1, 0.1)):
        sigma = (expected * (1 - expected) / total) ** 0.5
        assert abs(share - expected) < 5 * sigma, f"{counts.tolist()}"


def test_bert_with_a_single_existing_region_keeps_it():
    valid = torch.zeros(4, 5, dtype=torch.bool)
    valid[2, 3] = True
    feats = torch.randn(4, 5, 3)
    for _ in range(20):
        out = region_mask(feats, valid_mask=valid, prob=1.0, mode="bert", generator=generators(1)[0],
                          backend="torch")
        assert out.mask.sum() == 1 and out.mask[2, 3]
        assert torch.equal(out.features[2, 3], feats[2, 3]) or torch.equal(out.features[2, 3], torch.zeros(3))


# --------------------------------------------------------------------------- every path vs the reference

KERNEL_CASES = [
    # (mode, existing given as, with_embedding, dtype, prob, min_masked, B, R, D)
    ("zero", "lens", False, torch.float32, 0.3, 1, 4, 13, 70),
    ("zero", "valid", True, torch.float16, 0.15, 3, 3, 20, 33),
    ("bert", "lens", True, torch.float32, 1.0, 1, 4, 13, 70),
    ("bert", "valid", False, torch.float16, 0.5, 2, 3, 9, 64),
]


def existing_args(kind, n_samples, n_regions, device):
    if kind == "lens":
        return dict(region_lens=lens_and_valid(n_samples, n_regions, device)[0])
    return dict(valid_mask=scattered_valid(n_samples, n_regions, device))


@pytest.mark.parametrize("backend", [p for p in PATHS if p.id != "torch"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c[:4])))
def test_kernels_match_the_reference_bit_for_bit(case, backend):
    mode, existing, with_emb, dtype, prob, min_masked, n_samples, n_regions, dim = case
    device = path_device(backend)
    # a view with non-unit strides over B and R
    feats = torch.randn(n_samples, 2 * n_regions, dim, device=device, dtype=dtype)[:, ::2]
    emb = torch.randn(dim, device=device, dtype=dtype) if with_emb else None
    kw = dict(prob=prob, mode=mode, mask_embedding=emb, min_masked=min_masked,
              **existing_args(existing, n_samples, n_regions, device))
    g_kernel, g_torch = generators()
    got = region_mask(feats, generator=g_kernel, backend=backend, **kw)
    want = region_mask(feats, generator=g_torch, backend="torch", **kw)
    assert torch.equal(got.mask, want.mask) and got.mask.any()
    assert torch.equal(got.features, want.features)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("grad_from", ["sum", "dense"])
@pytest.mark.parametrize("with_embedding", [False, True])
def test_gradients_within_rule_of_float64(with_embedding, grad_from, backend):
    device = path_device(backend)
    feats = torch.randn(4, 9, 40, device=device)
    emb = torch.randn(40, device=device) if with_embedding else None
    lens, _ = lens_and_valid(4, 9, device)
    # .sum() alone sends an expanded (all strides 0) gradient; a weighted sum a dense one
    weight = torch.randn(4, 9, 40, device=device)
    seed = fresh_seed()

    def run(f, e, on):
        out = region_mask(f, lens, prob=1.0, mode="bert", mask_embedding=e,
                          generator=torch.Generator().manual_seed(seed), backend=on)
        return out.features.sum() if grad_from == "sum" else (out.features * weight.to(f.dtype)).sum()

    leaves = [feats, emb] if with_embedding else [feats]
    got = value_and_grads(lambda *x: run(x[0], x[1] if with_embedding else None, backend), leaves)
    eager = value_and_grads(lambda *x: run(x[0], x[1] if with_embedding else None, "torch"), leaves)
    oracle = value_and_grads(lambda *x: run(x[0], x[1] if with_embedding else None, "torch"),
                             [t.double() for t in leaves])
    if backend == "torch":
        eager = oracle  # the torch path is the eager formula: held to the floor alone
    for name, g, e, o in zip(["d feats", "d mask_embedding"], got[1:], eager[1:], oracle[1:]):
        assert_within_rule(f"{backend} {name}", g, e, o, torch.float32)


COMPILE_FOR_SM90 = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmkernels.ops.region import kernels as rk

SM90 = GPUTarget("cuda", 90, 32)


@triton.jit
def region_random_kernel(out_ptr, seed0, key, b):
    rows = tl.arange(0, 16)
    tl.store(out_ptr + rows, rk._region_random(seed0, key, b, rows))


def compile_for_sm90(fn, pointers, constexprs, debug=False):
    # pointers: element type per pointer argument ("*" for the others); ints are i32, strides i64
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, pointers["*"]) if name.endswith("_ptr")
        else "fp32" if name == "beta" else "i64" if name.startswith("stride") else "i32"
        for name in fn.arg_names
    }
    return triton.compile(ASTSource(fn, signature, constexprs), target=SM90,
                          options=dict(num_warps=4, debug=debug))


hashed = compile_for_sm90(region_random_kernel, {"*": "*i32"}, {}, debug=True)
assert "overflow detected" not in hashed.asm["ttir"], "the hash has overflow checks"
ints = {"lens_ptr": "*i64", "valid_ptr": "*u8", "flat_cum_ptr": "*i32", "mask_ptr": "*u8", "source_ptr": "*i32",
        "emb_partial_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32", "grad_loss_ptr": "*fp32"}
bf16 = {"*": "*bf16", **ints}
compile_for_sm90(rk._region_mask_fwd_kernel, bf16, dict(
    MASK_BELOW=1717986918, RANDOM_BELOW=1932735283, HAS_LENS=True, HAS_EMB=True, BERT=True,
    CHUNK=128, BLOCK_R=8, BLOCK_D=512))
compile_for_sm90(rk._region_mask_bwd_kernel, bf16, dict(HAS_EMB_GRAD=True, BLOCK_R=8, BLOCK_D=512))
compile_for_sm90(rk._region_mask_scatter_kernel, bf16, dict(BLOCK_R=16, BLOCK_D=256))
compile_for_sm90(rk._masked_region_loss_fwd_kernel, bf16, dict(KIND=2, BLOCK_R=4, BLOCK_K=1024))
for kind in (1, 2):
    compile_for_sm90(rk._masked_region_loss_bwd_kernel, bf16, dict(KIND=kind, TARGET_GRAD=True, BLOCK_R=4,
                                                                   BLOCK_K=1024))
print("compiled")
"""


@needs_triton
def test_triton_kernels_compile_for_sm90_and_the_hash_has_no_overflow_checks(tmp_path):
    """Without a GPU, the interpreter never compiles the kernels: compile every region kernel for
    sm_90 (bf16, the GPU configurations; no GPU needed) in a process without the interpreter. The
    hash wraps uint32 products on purpose; compiled with debug=True (TRITON_DEBUG=1), Triton asserts
    that no 32-bit product overflows, so it must hold no such product or the kernels would abort."""
    script = tmp_path / "compile_for_sm90.py"
    script.write_text(COMPILE_FOR_SM90)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile, do not replay a cached build
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "compiled"


@pytest.mark.parametrize("backend", [p for p in PATHS if p.id != "torch"])
@pytest.mark.parametrize("mode", ["zero", "bert"])
def test_kernels_read_strided_lens_and_mask_embedding(mode, backend):
    """region_lens (B,) and mask_embedding (D,) given as views with a stride other than 1."""
    device = path_device(backend)
    feats = torch.randn(3, 6, 20, device=device)
    lens = torch.tensor([[6, 0], [3, 0], [2, 0]], device=device)[:, 0]
    emb = torch.randn(20, 2, device=device)[:, 0]
    kw = dict(prob=0.5, mode=mode, mask_embedding=emb)
    g_kernel, g_torch = generators()
    got = region_mask(feats, lens, generator=g_kernel, backend=backend, **kw)
    want = region_mask(feats, lens.contiguous(), generator=g_torch, backend="torch", **kw)
    assert torch.equal(got.mask, want.mask)
    assert torch.equal(got.features, want.features)


# --------------------------------------------------------------------------- bf16 and the backend choice


def ran_kernels(fn) -> bool:
    """Whether fn() called one of mmkernels' registered ops (the kernels) rather than the reference."""
    with OpTrace() as trace:
        fn()
    return any(op.startswith("mmkernels.") for op in trace.ops)


@needs_triton
@needs_interpreter
@pytest.mark.parametrize("dtype, kernels", [(torch.float32, True), (torch.float16, True),
                                            (torch.bfloat16, False), (torch.float64, False)])
def test_auto_on_the_cpu_runs_the_interpreted_kernels_for_fp32_and_fp16_only(dtype, kernels):
    feats = torch.randn(2, 5, 8, dtype=dtype)
    lens = torch.tensor([5, 3])
    pred, target = torch.randn(2, 5, 8, dtype=dtype), torch.randn(2, 5, 8, dtype=dtype)
    assert ran_kernels(lambda: region_mask(feats, lens)) is kernels
    assert ran_kernels(lambda: masked_region_loss(pred, target, lens[:, None] > torch.arange(5))) is kernels
    assert not ran_kernels(lambda: region_mask(feats, lens, backend="torch"))  # negative control


@pytest.mark.parametrize("op", ["region_mask", "masked_region_loss"])
@pytest.mark.parametrize("entry", ["triton", "cuda"])
def test_auto_on_cuda_tensors_takes_the_table_entry_and_falls_back(op, entry, monkeypatch):
    """backend="auto" on CUDA tensors runs AUTO_CUDA_BACKEND[op] (unmeasured: see _dispatch.py);
    "cuda" without the extension runs "triton", "triton" without triton runs "cuda" or "torch"."""
    on_gpu = SimpleNamespace(dtype=torch.bfloat16, is_cuda=True, device=torch.device("cuda"))
    monkeypatch.setitem(AUTO_CUDA_BACKEND, op, entry)
    monkeypatch.setattr(_dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(_extension, "_C", SimpleNamespace())
    assert resolve_backend(op, "auto", on_gpu) == entry
    monkeypatch.setattr(_extension, "_C", None)
    assert resolve_backend(op, "auto", on_gpu) == "triton"
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    assert resolve_backend(op, "auto", on_gpu) == "torch"
    monkeypatch.setattr(_extension, "_C", SimpleNamespace())
    assert resolve_backend(op, "auto", on_gpu) == "cuda"
    on_gpu.dtype = torch.float64
    assert resolve_backend(op, "auto", on_gpu) == "torch"


def test_empty_inputs():
    out = region_mask(torch.randn(2, 0, 4), torch.tensor([0, 0]))
    assert out.features.shape == (2, 0, 4) and out.mask.shape == (2, 0)
    out = region_mask(torch.randn(3, 4, 0), torch.tensor([4, 1, 0]), prob=1.0)
    assert out.mask.sum(1).tolist() == [4, 1, 0]


# --------------------------------------------------------------------------- output buffers


@needs_triton
@pytest.mark.parametrize("bert", [False, True])
def test_outputs_are_poisoned_under_test_and_never_filled_in_production(bert, monkeypatch, device):
    feats = torch.randn(2, 5, 8, device=device, requires_grad=True)
    emb = torch.randn(8, device=device, requires_grad=True)
    seed, lens = torch.tensor([3, 4]), torch.tensor([5, 2], device=device)
    args = (feats, lens, None, emb, seed, 2**30, 1, bert, "triton")

    def step():
        out, _, _ = torch.ops.mmkernels.region_mask_fwd(*args)
        out.sum().backward()

    with OpTrace() as trace:
        step()
    assert "aten.fill_.Scalar" in trace.ops  # under test: poisoned
    monkeypatch.setattr(_common, "_POISON_OUTPUTS", False)
    with OpTrace() as trace:
        step()
    assert "aten.fill_.Scalar" not in trace.ops, "production pays no fill"
    # a kernel that writes nothing leaves the poison in place, so a skipped element fails the tests
    monkeypatch.setattr(_common, "_POISON_OUTPUTS", True)
    monkeypatch.setitem(region_launch._REGION_MASK_FWD, "triton", lambda *a: None)
    out, mask, source = torch.ops.mmkernels.region_mask_fwd(*args)
    assert out.isnan().all() and mask.all() and (source == -1).all()


# --------------------------------------------------------------------------- errors


def _region_call(**overrides):
    kw = dict(feats=torch.randn(2, 4, 3), region_lens=torch.tensor([4, 1]), prob=0.15, backend="torch")
    kw.update(overrides)
    return region_mask(**kw)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(feats=torch.randn(4, 3)), ValueError, "feats to be 3-D"),
        (dict(feats=torch.ones(2, 4, 3, dtype=torch.long)), TypeError, "floating-point"),
        (dict(region_lens=None), ValueError, "neither"),
        (dict(valid_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "both"),
        (dict(region_lens=torch.tensor([4, 5])), ValueError, r"region_lens in \[0, R\] = \[0, 4\], got \[5\]"),
        (dict(region_lens=torch.tensor([-1, 2])), ValueError, "got \\[-1\\]"),
        (dict(region_lens=torch.tensor([4, 1, 2])), ValueError, r"shape \(B,\) = \(2,\)"),
        (dict(region_lens=torch.tensor([4.0, 1.0])), TypeError, "integer tensor"),
        (dict(region_lens=None, valid_mask=torch.ones(2, 4)), TypeError, "bool tensor"),
        (dict(region_lens=None, valid_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"\(2, 4\)"),
        (dict(prob=1.5), ValueError, r"prob in \[0, 1\], got 1.5"),
        (dict(prob=-0.1), ValueError, "prob in"),
        (dict(prob="0.1"), TypeError, "prob"),
        (dict(mode="random"), ValueError, "mode to be one of 'zero', 'bert', got 'random'"),
        (dict(mask_embedding=torch.randn(4)), ValueError, r"mask_embedding of shape \(D,\) = \(3,\), got \(4,\)"),
        (dict(mask_embedding=torch.randn(1, 3)), ValueError, "mask_embedding"),
        (dict(min_masked=-1), ValueError, "min_masked"),
        (dict(generator=123), TypeError, "torch.Generator"),
        (dict(backend="cudnn"), ValueError, "backend to be one of 'auto', 'triton', 'cuda', 'torch', got 'cudnn'"),
        (dict(backend="triton", feats=torch.randn(2, 4, 3, dtype=torch.float64)), TypeError, "float64"),
        (dict(backend="cuda"), ValueError, "backend='cuda' needs CUDA tensors"),
    ],
)
def test_region_mask_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        _region_call(**overrides)


@pytest.mark.parametrize("compiling", [False, True])
def test_lengths_on_the_cpu_go_with_features_on_any_device(compiling, monkeypatch):
    """CPU region_lens are accepted for features on another device (meta stands in for CUDA) whether
    torch.compile traces the call or not (then their values go unchecked); lengths on a device that
    is neither the CPU nor the features' are refused."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    check = region_op._check_region_mask_inputs
    check(torch.empty(2, 4, 3, device="meta"), torch.tensor([4, 1]), None, 0.15, "zero", None, 1, None, "auto")
    with pytest.raises(ValueError, match="region_lens on feats' device cpu or on the CPU, got meta"):
        check(torch.randn(2, 4, 3), torch.tensor([4, 1], device="meta"), None, 0.15, "zero", None, 1, None, "auto")


def test_triton_backend_on_cpu_needs_the_interpreter(reference_path):
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        _region_call(backend="triton")


def test_more_than_2_pow_31_regions_is_refused_before_any_work():
    """The kernels index regions with int32: B·R >= 2^31 raises (expanded views: no memory)."""
    feats = torch.zeros(1, 1, 1).expand(2**16, 2**15, 1)
    with pytest.raises(ValueError, match=r"B·R < 2\^31 regions, got 65536·32768"):
        region_mask(feats, valid_mask=torch.ones(1, 1, dtype=torch.bool).expand(2**16, 2**15))


# --------------------------------------------------------------------------- compile


@needs_triton
def test_masking_and_loss_compile_with_fullgraph_and_match_eager(device):
    """One torch.compile'd step (fullgraph: a graph break raises) gives eager's mask, features, loss
    and gradients, the same seed drawing the same mask inside and outside the graph. On the CPU the
    graph runs on aot_eager (the ops' fake, autograd and functionalisation, as Inductor traces them):
    Inductor's C++ build of the glue around the ops costs ~20 s there and tests nothing of ours."""
    feats = torch.randn(3, 7, 16, device=device)
    emb = torch.randn(16, device=device)
    lens = torch.tensor([7, 2, 0], device=device)
    target = torch.randn(3, 7, 16, device=device)

    def step(feats, emb):
        out = region_mask(feats, lens, prob=0.5, mode="bert", mask_embedding=emb)
        return masked_region_loss(out.features, target, out.mask, "mse"), out.features, out.mask

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    seed = fresh_seed()
    results = []
    for fn in (compiled, step):
        torch.manual_seed(seed)
        f, e = feats.clone().requires_grad_(), emb.clone().requires_grad_()
        loss, features, mask = fn(f, e)
        loss.backward()
        results.append((loss.detach(), features.detach(), mask, f.grad, e.grad))
    (c_loss, c_feat, c_mask, c_gf, c_ge), (loss, feat, mask, gf, ge) = results
    assert mask.any() and torch.equal(c_mask, mask) and torch.equal(c_feat, feat)
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(c_gf, gf, rtol=1e-6, atol=0)
    torch.testing.assert_close(c_ge, ge, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- module


def test_region_masker_module():
    masker = RegionMasker(6, prob=1.0, mode="zero", backend="torch")
    assert [name for name, _ in masker.named_parameters()] == ["mask_embedding"]
    feats = torch.randn(2, 3, 6)
    out = masker(feats, torch.tensor([3, 1]))
    assert torch.equal(out.features[0], masker.mask_embedding.detach().expand(3, 6))
    assert torch.equal(out.features[1, 1:], feats[1, 1:])
    out.features.sum().backward()
    torch.testing.assert_close(masker.mask_embedding.grad, torch.full((6,), 4.0))
    plain = RegionMasker(6, learned_mask_embedding=False, prob=1.0, backend="torch")
    assert list(plain.parameters()) == []
    assert (plain(feats, valid_mask=torch.ones(2, 3, dtype=torch.bool)).features == 0).all()
    assert "feat_dim=6" in repr(masker)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [p for p in PATHS if p.id != "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["zero", "bert"])
def test_gpu_kernels_match_the_reference_at_scale(mode, dtype, backend):
    feats = torch.randn(256, 100, 2048, device="cuda", dtype=dtype)
    lens = torch.randint(0, 101, (256,), device="cuda")
    emb = torch.randn(2048, device="cuda", dtype=dtype)
    kw = dict(prob=0.15, mode=mode, mask_embedding=emb)
    g_kernel, g_torch = generators()
    got = region_mask(feats, lens, generator=g_kernel, backend=backend, **kw)
    want = region_mask(feats, lens, generator=g_torch, backend="torch", **kw)
    assert torch.equal(got.mask, want.mask)
    assert torch.equal(got.features, want.features)
