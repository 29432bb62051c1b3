"""What the attention tests share: random cases, the kernels' dropout mask, and the two checks.

- `check_against_reference`: finite inputs; output and q, k, v gradients under the numerics rule (docs/design.md)
  against the float64 reference (eager = the same formula in the inputs' dtype).
- `check_contract`: any inputs, NaN and Inf included; checks what `mmkernels.cross_attention`
  documents: exact zeros for rows that do not exist or attend no key (and their gradients), the
  non-finite elements of the output between what must be non-finite (a NaN or +inf score, all
  attended scores -inf, a non-finite attended value) and what may be (also: a non-finite value of
  an existing but masked key), the rule on every finite element, the rule on every gradient of a
  (sample, head) whose existing inputs are all finite, and a non-finite query gradient for every
  non-finite row.
"""
from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from mmkernels.ops import attention as attention_op
from mmkernels.ops.attention import reference
from mmkernels.ops._common import tl, triton
from mmkernels.ops.attention import draw_dropout_seed
from mmkernels.ops.attention.kernels import _dropout_keep
from toolkit import assert_within_rule, fresh_seed

PATHS = ("reference", "kernels")
# numpy's warnings from inside Triton's interpreter when the inputs hold NaN or Inf on purpose.
NONFINITE_WARNINGS = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:All-NaN slice encountered:RuntimeWarning",
)


@contextmanager
def on_path(path: str):
    """Run cross_attention on the CPU reference ("reference") or on the Triton kernels ("kernels":
    CUDA, or the interpreter on the CPU), whatever the tensors."""
    if path == "reference":
        with mock.patch.object(attention_op, "uses_kernels", lambda op, x: False):
            yield
    else:
        yield


# --------------------------------------------------------------------------- the kernels' dropout mask


@triton.jit
def _dropout_keep_kernel(Keep, Seed, Lq, Lk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep[bh, i, j] of the dropout mask that the attention kernels draw."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(Seed), bh, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
    ptrs = Keep + (bh.to(tl.int64) * Lq + offs_m[:, None]) * Lk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, len_q: int, len_k: int, dropout_p: float):
    """The (B, H, Lq, Lk) bool keep mask that the kernels draw for `seed` (from draw_dropout_seed)."""
    keep = torch.empty(batch * heads, len_q, len_k, dtype=torch.int8, device=seed.device)
    if keep.numel() > 0:
        grid = (triton.cdiv(len_q, 32), triton.cdiv(len_k, 32), batch * heads)
        _dropout_keep_kernel[grid](keep, seed, len_q, len_k, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return keep.view(batch, heads, len_q, len_k).bool()


def keep_mask_for(path: str, generator_seed: int, shape: tuple, dropout_p: float, device) -> torch.Tensor:
    """The keep mask that cross_attention(..., dropout_p, generator=Generator().manual_seed(generator_seed))
    uses on `path`: the kernels' Philox mask, or the reference's torch.rand draw."""
    if path == "kernels":
        seed = draw_dropout_seed(torch.Generator(device=device).manual_seed(generator_seed), torch.device(device))
        return dropout_keep_mask(seed, *shape, dropout_p)
    uniform = torch.rand(shape, generator=torch.Generator(device=device).manual_seed(generator_seed), device=device)
    return uniform >= dropout_p


# --------------------------------------------------------------------------- random cases


def random_lengths(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(batch,) lengths in [1, length], then sample 1 gets the full length and sample 0 none."""
    lens = torch.randint(1, length + 1, (batch,), generator=gen)
    lens[1 % batch], lens[0] = length, 0
    return lens


def make_inputs(case: dict, dtype, device):
    """Random q, k, v (bhld, requiring grad), masks and lengths for one case, from a fresh seed."""
    gen = torch.Generator().manual_seed(fresh_seed())
    batch, heads = case.get("B", 3), case.get("H", 2)
    len_q, len_k, head_dim = case["Lq"], case["Lk"], case["d"]
    q = torch.randn(batch, heads, len_q, head_dim, generator=gen)
    k = torch.randn(batch, heads, len_k, head_dim, generator=gen)
    v = torch.randn(batch, heads, len_k, head_dim, generator=gen)
    args = {"is_causal": case.get("causal", False)}
    if case.get("kv_lens"):
        args["kv_lens"] = random_lengths(batch, len_k, gen)
    if case.get("q_lens"):  # the last sample has no query, the one before all of them
        args["q_lens"] = random_lengths(batch, len_q, gen).flip(0)
    if case.get("kpm"):
        kpm = torch.rand(batch, len_k, generator=gen) < 0.3
        kpm[0] = True  # sample 0 has every key padded
        args["key_padding_mask"] = kpm.to(device)
    mask = case.get("mask")
    if mask == "bool":  # (Lq, Lk), True = attend; row 0 attends nothing
        allowed = torch.rand(len_q, len_k, generator=gen) < 0.7
        allowed[0] = False
        args["attn_mask"] = allowed.to(device)
    elif mask == "additive":  # (B, 1, Lq, Lk) with -inf holes, the last query row all -inf
        bias = torch.randn(batch, 1, len_q, len_k, generator=gen)
        bias[torch.rand(bias.shape, generator=gen) < 0.2] = float("-inf")
        bias[:, :, -1] = float("-inf")
        args["attn_mask"] = bias.to(device)
    elif mask == "additive_full":  # (B, H, Lq, Lk), finite
        args["attn_mask"] = torch.randn(batch, heads, len_q, len_k, generator=gen).to(device)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    return tensors, args


# --------------------------------------------------------------------------- the oracle


def reference_values(q, k, v, args, upstream, compute_dtype, dropout_keep=None, dropout_p=0.0):
    """(out, dq, dk, dv) of the reference computed in `compute_dtype` (float64: the oracle; the
    inputs' dtype: the eager formula)."""
    inputs = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    out = reference.cross_attention(*inputs, dropout_p=dropout_p, dropout_keep=dropout_keep,
                                    compute_dtype=compute_dtype, **args)
    grads = torch.autograd.grad(out, inputs, upstream.to(compute_dtype))
    return [out.detach(), *(g.detach() for g in grads)]


def gradient_term_sizes(q, k, v, args, upstream, out, dropout_keep=None, dropout_p=0.0):
    """float64 sizes (per (b, h, row)) of the sums that make dq and dk: Σ_j P_ij·(|dP_ij| + |Δ|_i)·|k_j|
    (and over i with |q_i|), where dS = P·(dP - Δ) cancels. The kernels take Δ = rowsum(dO·O)
    (FlashAttention's identity) where the eager backward takes Σ_j P_ij·dP_ij: equal in exact
    arithmetic, not in rounding, so where dS cancels to ~0 (one key, say) the eager error is 0
    and ours is not: the rule's floor scales with these sizes. Δ's size is that of its summands,
    |Δ|_i = Σ_d |dO_id·O_id|: O comes to the backward rounded to the inputs' dtype, and Δ itself
    cancels (fp16, one key, dropout: Δ = dO·O off by 2^-12·Σ|dO·O|, 2.5x over |Δ|'s floor, seed
    2497692532)."""
    batch, heads, len_k = k.shape[0], k.shape[1], k.shape[2]
    identity = torch.eye(len_k, dtype=torch.float64).expand(batch, heads, len_k, len_k)
    probs = reference.cross_attention(q, k, identity, dropout_p=dropout_p, dropout_keep=dropout_keep,
                                      compute_dtype=torch.float64, **args)  # (B, H, Lq, Lk)
    d_probs = upstream @ v.transpose(-1, -2)
    delta = (upstream * out).abs().sum(-1, keepdim=True)
    weight = probs * (d_probs.abs() + delta) * (args.get("scale") or q.shape[-1] ** -0.5)
    return weight @ k.abs(), weight.transpose(-1, -2) @ q.abs()


def _max_size(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _assert_rule(name, got, eager, oracle, dtype, term_size=0.0):
    size = max(_max_size(oracle), term_size, 1.0)
    assert_within_rule(name, got, eager, oracle, dtype, size=size, metric="max")


def check_against_reference(q, k, v, args, out, upstream=None, dropout_keep=None, dropout_p=0.0):
    """Compare out = cross_attention(q, k, v, **args) and its q, k, v gradients with the float64
    reference under the rule (all finite)."""
    upstream = torch.randn_like(out) if upstream is None else upstream
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    oracle = reference_values(q, k, v, args, upstream, torch.float64, dropout_keep, dropout_p)
    eager = reference_values(q, k, v, args, upstream, q.dtype, dropout_keep, dropout_p)
    exact = [t.detach().double() for t in (q, k, v)]
    dq_terms, dk_terms = gradient_term_sizes(*exact, args, upstream.double(), oracle[0], dropout_keep, dropout_p)
    sizes = (0.0, _max_size(dq_terms), _max_size(dk_terms), 0.0)
    for name, got, e, o, size in zip(("out", "dq", "dk", "dv"), (out, *grads), eager, oracle, sizes):
        _assert_rule(name, got.detach(), e, o, q.dtype, size)


# --------------------------------------------------------------------------- the contract, NaN and Inf included


def structure(args: dict, batch: int, heads: int, len_q: int, len_k: int, device):
    """From lengths and masks only: attended (B, H, Lq, Lk) (existing rows and keys, not masked),
    row_attends (B, H, Lq), row_exists (B, 1, Lq), key_exists (B, 1, Lk)."""
    row_exists = torch.ones(batch, 1, len_q, dtype=torch.bool, device=device)
    key_exists = torch.ones(batch, 1, len_k, dtype=torch.bool, device=device)
    if args.get("q_lens") is not None:
        row_exists = torch.arange(len_q, device=device) < args["q_lens"].to(device).view(batch, 1, 1)
    if args.get("kv_lens") is not None:
        key_exists = torch.arange(len_k, device=device) < args["kv_lens"].to(device).view(batch, 1, 1)
    attended = row_exists[..., None] & key_exists[:, :, None, :]
    if args.get("key_padding_mask") is not None:
        attended = attended & ~args["key_padding_mask"].view(batch, 1, 1, len_k)
    mask = args.get("attn_mask")
    if mask is not None:
        attended = attended & (mask if mask.dtype == torch.bool else mask != float("-inf"))
    if args.get("is_causal"):
        attended = attended & torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril()
    attended = attended.expand(batch, heads, len_q, len_k)
    return attended, attended.any(-1), row_exists, key_exists


def nonfinite_bounds(q, k, v, args, attended, row_attends, key_exists):
    """(must, may): (B, H, Lq, d) bools, the output elements the definition makes non-finite, and
    those it allows to be (must, plus rows with a key where an existing masked key's value is not)."""
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    scores = (q64 @ k64.transpose(-1, -2)) * (args.get("scale") or q.shape[-1] ** -0.5)
    mask = args.get("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask.double()
    nan_score = (attended & (torch.isnan(scores) | (scores == float("inf")))).any(-1)
    all_minus_inf = row_attends & ~(attended & (scores != float("-inf"))).any(-1)
    bad_value = ~torch.isfinite(v64)  # (B, H, Lk, d)
    attended_bad_value = (attended.double() @ bad_value.double()) > 0
    must = (nan_score | all_minus_inf)[..., None] | attended_bad_value
    existing_bad_value = (key_exists[..., None] & bad_value).any(-2)  # (B, H, d)
    may = must | (row_attends[..., None] & existing_bad_value[:, :, None, :])
    return must, may


def finite_slices(q, k, v, args, row_exists, key_exists):
    """(B, H) bool: the (sample, head) pairs whose existing inputs (queries, keys, values, and the
    additive mask over existing rows and keys, -inf aside) are all finite."""
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    rows = row_exists.expand(batch, heads, len_q)
    keys = key_exists.expand(batch, heads, len_k)
    ok = ~(rows & ~torch.isfinite(q.detach()).all(-1)).any(-1)
    ok &= ~(keys & ~torch.isfinite(k.detach()).all(-1)).any(-1)
    ok &= ~(keys & ~torch.isfinite(v.detach()).all(-1)).any(-1)
    mask = args.get("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        bad = torch.isnan(mask) | (mask == float("inf"))
        pairs = rows[..., None] & keys[:, :, None, :]
        ok &= ~(pairs & bad.expand(batch, heads, len_q, len_k)).any(-1).any(-1)
    return ok


def check_contract(q, k, v, args, out, dropout_keep=None, dropout_p=0.0, label=""):
    """Everything `cross_attention` promises for out = cross_attention(q, k, v, **args) and its
    gradients, for any inputs (see the module docstring)."""
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    upstream = torch.randn_like(out)
    grads = [g.detach() for g in torch.autograd.grad(out, (q, k, v), upstream)]
    out = out.detach()
    attended, row_attends, row_exists, key_exists = structure(args, batch, heads, len_q, len_k, q.device)
    must, may = nonfinite_bounds(q, k, v, args, attended, row_attends, key_exists)
    nonfinite = ~torch.isfinite(out)
    assert not (must & ~nonfinite).any(), f"{label}: finite output where the definition makes it non-finite"
    assert not (nonfinite & ~may).any(), f"{label}: non-finite output where the definition allows none"
    silent = ~row_attends
    assert bool((out[silent] == 0).all()), f"{label}: a row that does not exist or attends no key is not 0"
    assert bool((grads[0][silent] == 0).all()), f"{label}: such a row passes a gradient to its query"
    for name, grad in (("dk", grads[1]), ("dv", grads[2])):
        missing = ~key_exists.expand(batch, heads, len_k)
        assert bool((grad[missing] == 0).all()), f"{label}: {name} of a key past kv_lens is not 0"
    bad_rows = nonfinite.any(-1)
    assert bool((~torch.isfinite(grads[0][bad_rows])).any(-1).all()), \
        f"{label}: a non-finite row passes a finite gradient to its query"

    oracle = reference_values(q, k, v, args, upstream, torch.float64, dropout_keep, dropout_p)
    eager = reference_values(q, k, v, args, upstream, q.dtype, dropout_keep, dropout_p)
    dtype = q.dtype
    compared = ~nonfinite & torch.isfinite(oracle[0]) & torch.isfinite(eager[0])
    if compared.any():
        _assert_rule(f"{label} out", out[compared], eager[0][compared], oracle[0][compared], dtype)
    slices = finite_slices(q, k, v, args, row_exists, key_exists)
    if slices.any():
        # The floor's term sizes, from inputs with their non-finite values zeroed: (b, h) pairs are
        # independent, so those of the finite pairs are exact.
        clean_args = dict(args)
        mask = args.get("attn_mask")
        if mask is not None and mask.dtype != torch.bool:
            clean_args["attn_mask"] = torch.where(torch.isnan(mask) | (mask == float("inf")), 0.0, mask)
        clean = [torch.nan_to_num(t.detach().double(), nan=0.0, posinf=0.0, neginf=0.0) for t in (q, k, v, oracle[0])]
        dq_terms, dk_terms = gradient_term_sizes(*clean[:3], clean_args, upstream.double(), clean[3], dropout_keep,
                                                 dropout_p)
        sizes = (_max_size(dq_terms[slices]), _max_size(dk_terms[slices]), 0.0)
        for name, got, e, o, size in zip(("dq", "dk", "dv"), grads, eager[1:], oracle[1:], sizes):
            _assert_rule(f"{label} {name}", got[slices], e[slices], o[slices], dtype, size)
