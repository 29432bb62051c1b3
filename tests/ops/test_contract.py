"""The contract every public op keeps, run for every entry of tests/ops/registry.py (the list of what
runs is in registry.py's docstring): the numerics rule on both paths, bf16 on the CPU, non-finite
inputs, opcheck of every registered op, torch.compile(fullgraph=True), no gradient work for a frozen
side, no host synchronisation on the GPU."""
import inspect

import pytest
import torch

import mmkernels

from registry import ENTRIES, Inputs
from toolkit import (CUDA, HAS_TRITON, OpTrace, assert_no_host_sync, assert_within_rule, needs_triton,
                     triton_launches)

pytestmark = pytest.mark.usefixtures("seed")

# NaN and Inf inputs make the interpreter's numpy arithmetic warn where the GPU computes silently
NON_FINITE_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _cases(attribute):
    return [pytest.param(entry, index, id=f"{entry.name}-{index}")
            for entry in ENTRIES for index in range(len(getattr(entry, attribute)))]


def _entries(predicate=lambda entry: True):
    return [pytest.param(entry, id=entry.name) for entry in ENTRIES if predicate(entry)]


def values_and_grads(entry, inputs: Inputs, upstream=None, requires_grad=None):
    """[output, *d output / d leaf] of the public function on detached copies of the leaves; a leaf that
    does not require grad (requires_grad[i] False) gets None. `upstream`: float64, cast to the output's dtype."""
    requires_grad = requires_grad or [True] * len(inputs.leaves)
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip(inputs.leaves, requires_grad)]
    out = entry.run(inputs, *leaves)
    return _backward(out, leaves, upstream)


def _backward(out, leaves, upstream):
    wanted = [t for t in leaves if t.requires_grad]
    grad_out = None if upstream is None else upstream.to(out.dtype)
    grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    result = [out.detach()]
    for t in leaves:
        g = next(grads) if t.requires_grad else None
        result.append(torch.zeros_like(t) if t.requires_grad and g is None else g)
    return result


def eager_values_and_grads(entry, inputs: Inputs, upstream=None):
    leaves = [t.detach().clone().requires_grad_() for t in inputs.leaves]
    return _backward(entry.eager(inputs, *leaves), leaves, upstream)


def as_float64(inputs: Inputs) -> Inputs:
    return Inputs([t.detach().double() for t in inputs.leaves], inputs.fixed)


def draw_upstream(entry, inputs: Inputs):
    """A random float64 upstream gradient for an op whose output is not a scalar, else None."""
    if not entry.upstream:
        return None
    with torch.no_grad():
        shape = entry.run(inputs, *inputs.leaves).shape
    return torch.randn(shape, dtype=torch.float64, device=inputs.leaves[0].device)


def assert_dtypes(entry, inputs: Inputs, got):
    """The output in the entry's dtype (the inputs' by default), a scalar where the entry takes no
    upstream gradient; each gradient in its input's dtype."""
    out_dtype = entry.out_dtype or inputs.leaves[0].dtype
    assert got[0].dtype == out_dtype, f"{entry.name}: output {got[0].dtype}, expected {out_dtype}"
    assert entry.upstream or got[0].dim() == 0, f"{entry.name}: output of shape {tuple(got[0].shape)}, not a scalar"
    for name, g, leaf in zip(entry.names[1:], got[1:], inputs.leaves):
        assert g is None or g.dtype == leaf.dtype, f"{entry.name} {name}: {g.dtype}, the input is {leaf.dtype}"


def assert_rule(entry, inputs: Inputs, got, upstream, dtype, what):
    """The rule for the output and every gradient that `got` holds (None: not computed): against the
    oracle (the public function on float64 inputs: the reference path), within 2x the eager
    baseline's error plus the floor (scaled by the entry's sizes for sums that cancel)."""
    oracle_inputs = as_float64(inputs)
    oracle = values_and_grads(entry, oracle_inputs, upstream)
    eager = eager_values_and_grads(entry, inputs, upstream)
    sizes = entry.sizes(oracle_inputs.leaves, oracle_inputs) if entry.sizes else {}
    for name, g, e, o in zip(entry.names, got, eager, oracle):
        if g is None:
            continue
        size = sizes.get(name)
        if size is not None and name.startswith("d ") and o.dim() > 0:
            size = max(size, o.norm().item())
        assert_within_rule(f"{what}: {name}", g, e, o, dtype, size=size)


# --------------------------------------------------------------------------- the numerics rule


@pytest.mark.parametrize("entry, index", _cases("cases"))
def test_rule_on_both_paths(entry, index, kernel_path):
    """Output and gradients within the rule on the reference path and on the kernels; the kernels
    path launches Triton kernels, the reference path none."""
    inputs = entry.make_inputs(entry.cases[index], torch.float32, kernel_path.device)
    upstream = draw_upstream(entry, inputs)
    with triton_launches() as launches:
        got = values_and_grads(entry, inputs, upstream)
    if kernel_path.name == "reference":
        assert not launches, f"the reference path launched {len(launches)} Triton kernels"
    elif kernel_path.device.type == "cpu":
        assert launches, "the kernels path launched no Triton kernel"
    assert_dtypes(entry, inputs, got)
    assert_rule(entry, inputs, got, upstream, torch.float32,
                f"{entry.name} {entry.cases[index]} {kernel_path.name}")


@pytest.mark.parametrize("entry, index", _cases("cases"))
def test_oracle_is_the_eager_formula(entry, index, reference_path):
    """The oracle (the public function on float64 inputs, the reference path) computes what the eager
    baseline computes: both in float64, output and gradients agree to the entry's tolerance."""
    inputs = as_float64(entry.make_inputs(entry.cases[index], torch.float64, reference_path))
    upstream = draw_upstream(entry, inputs)
    oracle = values_and_grads(entry, inputs, upstream)
    eager = eager_values_and_grads(entry, inputs, upstream)
    for name, o, e in zip(entry.names, oracle, eager):
        atol = entry.float64_tolerance * max(1.0, o.abs().max().item() if o.numel() else 0.0)
        torch.testing.assert_close(o, e, rtol=entry.float64_tolerance, atol=atol,
                                   msg=lambda m: f"{entry.name} {entry.cases[index]} {name}: {m}")


@pytest.mark.parametrize("entry", _entries())
def test_bf16_on_the_cpu_takes_the_reference_path(entry, monkeypatch):
    """Triton's interpreter reads bf16 as raw integers: bf16 CPU tensors take the reference path even
    under TRITON_INTERPRET=1 (no Triton launch), with the reference path's result bit for bit, within
    the rule in bf16."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = entry.make_inputs(entry.bf16_case, torch.bfloat16, torch.device("cpu"))
    before = [t.clone() for t in inputs.leaves]
    upstream = draw_upstream(entry, inputs)
    with triton_launches() as launches:
        got = values_and_grads(entry, inputs, upstream)
    assert not launches, f"bf16 on the CPU launched {len(launches)} Triton kernels"
    assert all(torch.equal(t, t0) for t, t0 in zip(inputs.leaves, before)), "the op modified its inputs"
    assert_dtypes(entry, inputs, got)
    if entry.kernels_only is not None and HAS_TRITON:
        with pytest.raises(TypeError, match=r"cannot run torch.bfloat16 on the CPU.*interpreter"):
            entry.kernels_only(inputs, *inputs.leaves)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name, g, w in zip(entry.names, got, values_and_grads(entry, inputs, upstream)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"{name}: differs from the reference path"
    assert_rule(entry, inputs, got, upstream, torch.bfloat16, f"{entry.name} bf16 on the CPU")


def _autocast_cases():
    return [pytest.param(entry, id=entry.name) for entry in ENTRIES if entry.autocast_case is not None]


@pytest.mark.parametrize("backward", ["outside", "inside"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entry", _autocast_cases())
def test_autocast_changes_nothing(entry, dtype, backward, kernel_path):
    """Under torch.autocast (bf16) the op computes as its contract says (from the inputs' own dtype
    with fp32 accumulation, e.g. an fp32 loss): the same output and gradients as without autocast,
    bit for bit, whether the backward runs inside the autocast region or after it (as training
    loops run it); within the rule."""
    device = kernel_path.device
    if kernel_path.name == "kernels" and dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("bf16 on the CPU takes the reference path")
    inputs = entry.make_inputs(entry.autocast_case, dtype, device)
    upstream = draw_upstream(entry, inputs)
    plain = values_and_grads(entry, inputs, upstream)
    leaves = [t.detach().clone().requires_grad_() for t in inputs.leaves]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = entry.run(inputs, *leaves)
        got = _backward(out, leaves, upstream) if backward == "inside" else None
    if got is None:
        got = _backward(out, leaves, upstream)
    assert_dtypes(entry, inputs, got)
    for name, g, p in zip(entry.names, got, plain):
        assert g.dtype == p.dtype and torch.equal(g, p), f"{entry.name} {name}: differs under autocast"
    assert_rule(entry, inputs, got, upstream, dtype, f"{entry.name} {dtype} under autocast")


# --------------------------------------------------------------------------- non-finite inputs


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("entry", _entries())
def test_non_finite_inputs_propagate(entry, kernel_path):
    inputs = entry.poison(entry.make_inputs(entry.cases[0], torch.float32, kernel_path.device))
    with torch.no_grad():
        out = entry.run(inputs, *inputs.leaves)
    entry.check_poisoned(out, inputs)


# --------------------------------------------------------------------------- registration and compile


def _registered(predicate=lambda entry: True):
    return [pytest.param(entry, op, id=f"{entry.name}-{op}") for entry in ENTRIES if predicate(entry)
            for op in entry.ops]


@needs_triton
@pytest.mark.parametrize("entry, op", _registered())
def test_opcheck(entry, op, device):
    samples = entry.registered(device)
    assert set(samples) == set(entry.ops), f"{entry.name}: samples for {sorted(samples)}, ops {entry.ops}"
    for args in samples[op]:
        torch.library.opcheck(getattr(torch.ops.mmkernels, op).default, args)


@needs_triton
@pytest.mark.parametrize("entry", _entries())
def test_compile_fullgraph_matches_eager(entry, device):
    """torch.compile(fullgraph=True) of the public function (a graph break raises) gives the eager
    call's output and gradients. On the CPU the graph runs on aot_eager (the ops' fake, autograd and
    functionalisation, as Inductor traces them), without Inductor's C++ build."""
    torch._dynamo.reset()
    inputs = entry.make_inputs(entry.cases[0], torch.float32, device)
    upstream = draw_upstream(entry, inputs)
    run = entry.compile_run or entry.run
    compiled = torch.compile(lambda *leaves: run(inputs, *leaves), fullgraph=True,
                             backend="inductor" if CUDA else "aot_eager")

    def outputs(fn):
        torch.manual_seed(inputs.fixed.get("seed", 0))
        leaves = [t.detach().clone().requires_grad_() for t in inputs.leaves]
        return _backward(fn(*leaves), leaves, upstream)

    for name, got, want in zip(entry.names, outputs(compiled), outputs(lambda *leaves: run(inputs, *leaves))):
        torch.testing.assert_close(got, want, msg=lambda m: f"{entry.name} {name}: {m}")


# --------------------------------------------------------------------------- frozen sides


def _frozen_cases():
    return [pytest.param(entry, frozen, id=f"{entry.name}-frozen{frozen}") for entry in ENTRIES
            for frozen in entry.frozen]


@needs_triton
@pytest.mark.parametrize("entry, frozen", _frozen_cases())
def test_frozen_side_gets_no_gradient_work(entry, frozen, device):
    """A leaf that does not require grad gets no gradient and costs no product: the matrix FLOPs that
    run (forward and backward, counted by OpTrace under the interpreter) are the entry's count, the
    gradients that remain within the rule."""
    if device.type != "cpu":
        pytest.skip("counts interpreted tl.dot")
    frozen_set = set(frozen) if isinstance(frozen, tuple) else {frozen}
    inputs = entry.make_inputs(entry.frozen_case, torch.float32, device)
    requires_grad = [i not in frozen_set for i in range(len(inputs.leaves))]
    upstream = draw_upstream(entry, inputs)
    with OpTrace() as trace:
        got = values_and_grads(entry, inputs, upstream, requires_grad)
    assert trace.matmul_flops == entry.frozen[frozen](inputs), (
        f"{entry.name} frozen {sorted(frozen_set)}: {trace.matmul_flops} matrix FLOPs, "
        f"expected {entry.frozen[frozen](inputs)}")
    assert all((g is None) == (i in frozen_set) for i, g in enumerate(got[1:]))
    assert_rule(entry, inputs, got, upstream, torch.float32, f"{entry.name} frozen {sorted(frozen_set)}")


# --------------------------------------------------------------------------- the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("entry", _entries())
def test_gpu_forward_and_backward_do_not_sync(entry):
    inputs = entry.make_inputs(entry.bf16_case, torch.bfloat16, torch.device("cuda"))
    upstream = draw_upstream(entry, inputs)
    leaves = [t.detach().clone().requires_grad_() for t in inputs.leaves]

    def step():
        out = entry.run(inputs, *leaves)
        torch.autograd.grad(out, leaves, None if upstream is None else upstream.to(out.dtype), allow_unused=True)

    assert_no_host_sync(step)


def test_every_public_op_has_an_entry():
    """Every public function of mmkernels (but the model patching) is an op with a registry entry."""
    not_ops = {"patch", "unpatch"}
    ops = {name for name in mmkernels.__all__ if inspect.isfunction(getattr(mmkernels, name)) and name not in not_ops}
    assert {entry.name for entry in ENTRIES} == ops
    assert {"clip_loss", "siglip_loss", "info_nce_loss", "cross_attention", "region_mask",
            "masked_region_loss"} <= ops
