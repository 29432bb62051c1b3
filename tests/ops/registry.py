"""One entry per public op: everything tests/ops/test_contract.py needs to hold the op to its contract.

The contract (test_contract.py runs each item for every entry here):
- the numerics rule (`docs/design.md`) on both paths, the reference and the kernels: the output and
  every gradient within 2x the eager baseline's error (mmkernels.testing, in the inputs' dtype) plus
  a floor, both measured against the oracle (the public function on float64 inputs, which always
  takes the plain-PyTorch reference); the kernels path runs Triton kernels, the reference path none;
  the output and gradients in their documented dtypes;
- the oracle computes the eager baseline's function: both in float64 agree (`float64_tolerance`);
- bfloat16 on the CPU takes the reference path (no Triton launch, under the interpreter too), gives
  the reference path's result bit for bit, leaves its inputs as they were and meets the rule in
  bfloat16; asking for the kernels by name there (`kernels_only`) raises TypeError saying why;
- under torch.autocast (bf16) the op computes as without it, bit for bit (`autocast_case`);
- non-finite inputs propagate as the op documents (`poison` puts NaN/Inf in, `check_poisoned` says
  where it must come out), on both paths;
- `torch.library.opcheck` passes for every registered op (`torch.ops.mmkernels.<name>`) on every
  sample argument tuple the entry gives;
- `torch.compile(fullgraph=True)` of the public function gives the eager call's output and gradients;
- a side that does not require grad gets no gradient and no gradient work: the matrix FLOPs that
  run are the entry's count (`frozen`, counted by toolkit's OpTrace under the interpreter);
- on the GPU (tests marked `gpu`), a forward and backward make no host synchronisation;
- every public function of `mmkernels.__all__` that is an op has an entry here.

The registry imports only the public API (mmkernels), mmkernels.testing, torch.ops names and the
tests' shared helpers: the ops' internal modules move, the contract does not.

How to add an op (it then gets the whole contract):
1. Write `_<op>_inputs(case, dtype, device) -> Inputs`: the differentiable leaves (float tensors,
   fresh random values from torch's global generator, which the test has seeded) and the fixed
   arguments (lengths, masks, flags, a seed for the op's own randomness) in `Inputs.fixed`. Keep the
   shapes small (a few seconds a case under Triton's interpreter) and off every block size.
2. Write `_<op>_run(inputs, *leaves)`: the call of the public function (`mmkernels.<op>`) on `leaves`
   with `inputs.fixed`; it returns one tensor (a loss, or the output whose gradient the test takes).
3. Write `_<op>_eager(inputs, *leaves)`: the same computation as a user writes it without
   mmkernels, from mmkernels.testing (add the baseline there if it is new).
4. Write `_<op>_registered(device) -> {op name: [argument tuple, ...]}`: sample arguments for each
   registered op, keyed by its name in `torch.ops.mmkernels` (run the forward op to get what the
   backward op takes), and list those names in the entry's `ops`.
5. Write `poison(inputs)` (NaN or Inf put into a copy of the leaves) and `check_poisoned(out, inputs)`
   (where the op's docstring says they come out: `_assert_nan` for a loss).
6. Fill an `OpEntry` and append it to ENTRIES: `names` (the output, then "d <leaf>" per leaf),
   `cases` for the rule (N = 1, sizes off every block, a mask or length that leaves a row empty where
   the op has one), `bf16_case`, `out_dtype` where the output's dtype is not the inputs', `upstream`
   where the output is not a scalar; where they apply, `frozen` (leaf indices -> the FLOPs with those
   leaves frozen) with its `frozen_case`, `sizes` (floor sizes for outputs that are sums that
   cancel), `autocast_case`, `kernels_only`, `compile_run` (where torch.compile must trace a variant,
   e.g. without a torch.Generator argument), `float64_tolerance`.
7. Run `pytest tests/ops/test_contract.py -k <op>`; then delete the per-op tests this now covers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

import mmkernels
from contrastive_oracle import magnitudes
from mmkernels.testing import (eager_attention, eager_clip_loss, eager_info_nce_loss, eager_masked_region_loss,
                               eager_siglip_loss)

WORKSPACE_BYTES = 1 << 20
DEFAULT_WORKSPACE_BYTES = 256 << 20  # the contrastive ops' default workspace (workspace_bytes=None)


@dataclass
class Inputs:
    """leaves: the differentiable float tensors, in the order the entry's names give them;
    fixed: everything else the call takes (not differentiated, never cast to float64)."""
    leaves: list
    fixed: dict = field(default_factory=dict)


@dataclass
class OpEntry:
    """What the contract needs to know about one public op.

    name: the public function's name (`mmkernels.<name>`).
    names: a name per output of `run` and per leaf's gradient ("loss", "d image_emb", ...).
    make_inputs(case, dtype, device) -> Inputs.
    run(inputs, *leaves) -> tensor: the public function. eager(inputs, *leaves) -> tensor: the baseline.
    cases: the shapes the rule runs on (each a dict for make_inputs); bf16_case: the bf16-on-the-CPU case.
    ops: the names of the op's registered ops (`torch.ops.mmkernels.<name>`);
    registered(device) -> {op name: [sample argument tuples]} for each of them.
    poison(inputs) -> Inputs with non-finite values put in; check_poisoned(out, inputs) asserts where they went.
    frozen: {leaf index frozen (or a tuple of them): the matrix FLOPs of forward and backward
      as a function of the inputs} (toolkit.OpTrace counts them under the interpreter).
    frozen_case: the inputs for the frozen-side counts.
    sizes(leaves64, inputs) -> {name: floor size} for outputs that are sums that cancel.
    upstream: whether `run`'s output is not a scalar (the test draws a random upstream gradient).
    compile_run: what torch.compile traces, where it differs from `run` (default `run`).
    out_dtype: the dtype `run` returns (None: the inputs' dtype).
    kernels_only(inputs, *leaves): the public call that asks for the Triton kernels by name (an op
      with a `backend=` argument); on bf16 CPU tensors it raises TypeError saying why it cannot.
    autocast_case: the inputs for the autocast check (None: the op states no autocast contract).
    float64_tolerance: how closely the oracle and the eager baseline agree when both run in float64.
    """
    name: str
    names: list
    make_inputs: Callable[[dict, torch.dtype, torch.device], Inputs]
    run: Callable
    eager: Callable
    cases: list
    bf16_case: dict
    ops: list
    registered: Callable[[torch.device], dict]
    poison: Callable
    check_poisoned: Callable
    frozen: dict = field(default_factory=dict)
    frozen_case: dict | None = None
    sizes: Callable | None = None
    upstream: bool = False
    compile_run: Callable | None = None
    float64_tolerance: float = 1e-10
    out_dtype: torch.dtype | None = None
    kernels_only: Callable | None = None
    autocast_case: dict | None = None

    def __str__(self):
        return self.name


def _scalar(value: float, device) -> torch.Tensor:
    return torch.tensor(value, device=device)


def _log_uniform_scale(device) -> torch.Tensor:
    return _scalar(math.exp(torch.empty(()).uniform_(0.5, 2.5).item()), device)


def _assert_nan(out, inputs):
    assert torch.isnan(out).all(), f"a non-finite input gave {out}"


# --------------------------------------------------------------------------- contrastive losses


def _pair_inputs(case, dtype, device, bias=False):
    n, d = case["n"], case["d"]
    leaves = [torch.randn(n, d, dtype=dtype, device=device), torch.randn(n, d, dtype=dtype, device=device),
              _log_uniform_scale(device)]
    if bias:
        leaves.append(_scalar(torch.empty(()).uniform_(-3, 0).item(), device))
    return Inputs(leaves, dict(normalize=case["normalize"], label_smoothing=case.get("smoothing", 0.0)))


def _poison_pair(inputs):
    a = inputs.leaves[0].clone()
    a[min(3, a.shape[0] - 1), min(5, a.shape[1] - 1)] = float("nan")
    return Inputs([a, *inputs.leaves[1:]], inputs.fixed)


def _contrastive_sizes(loss_name):
    def sizes(leaves64, inputs):
        return magnitudes(loss_name, leaves64, inputs.fixed["normalize"], inputs.fixed["label_smoothing"])
    return sizes


def _group_ids(n: int, device) -> torch.Tensor:
    """(n,) int64 ids with duplicates, for the ops' optional group arguments."""
    return torch.randint(0, max(n // 3, 1), (n,), device=device)


def _block_groups(ids) -> tuple:
    """(row ids, row counts, col ids, col counts) of a batch against itself: the ops' group arguments."""
    counts = (ids[:, None] == ids[None, :]).sum(1)
    return ids, counts, ids, counts


def _rows(groups, p0: int, p1: int) -> tuple:
    """The group arguments of rows p0..p1-1 against all paired columns."""
    row_ids, row_count, col_ids, col_count = groups
    return row_ids[p0:p1], row_count[p0:p1], col_ids, col_count


def _clip_run(inputs, a, b, s):
    return mmkernels.clip_loss(a, b, s, normalize=inputs.fixed["normalize"],
                               label_smoothing=inputs.fixed["label_smoothing"])


def _clip_eager(inputs, a, b, s):
    return eager_clip_loss(a, b, s, inputs.fixed["normalize"], inputs.fixed["label_smoothing"])


def _clip_registered(device):
    a, b = torch.randn(13, 24, device=device), torch.randn(13, 24, device=device)
    s, g = _scalar(2.5, device), _scalar(1.5, device)
    grad_leaves = [t.clone().requires_grad_() for t in (a, b, s)]
    _, row_lse, col_lse = torch.ops.mmkernels.clip_loss_fwd(a, b, s, False, 0.0, WORKSPACE_BYTES)
    # group ids (duplicates) and K = 3 extra columns: the optional arguments of each op
    ids, extra = _group_ids(13, device), torch.randn(3, 24, device=device, requires_grad=True)
    groups = _block_groups(ids)
    columns = torch.cat([b, extra.detach()])
    return {
        "clip_loss_fwd": [(*grad_leaves, True, 0.1, WORKSPACE_BYTES),
                          (*grad_leaves, False, 0.2, WORKSPACE_BYTES, ids, extra)],
        "clip_block_stats": [(a[3:9], b, s, 2, False, WORKSPACE_BYTES),
                             (a[3:9], columns, s, 16, False, WORKSPACE_BYTES, *_rows(groups, 3, 9), 13)],
        "clip_block_grads": [(a, b, s, row_lse, col_lse, g, 0, 13, 0.1, True, image_grad, text_grad, torch.float32,
                              WORKSPACE_BYTES) for image_grad, text_grad in [(True, True), (False, True)]]
        + [(a, columns, s, row_lse, col_lse, g, 16, 13, 0.1, True, True, True, torch.float32, WORKSPACE_BYTES,
            *groups, 13, 16, directions) for directions in (1, 2)],
    }


def _siglip_run(inputs, a, b, s, bias):
    return mmkernels.siglip_loss(a, b, s, bias, normalize=inputs.fixed["normalize"])


def _siglip_eager(inputs, a, b, s, bias):
    return eager_siglip_loss(a, b, s, bias, inputs.fixed["normalize"])


def _siglip_registered(device):
    a, b = torch.randn(13, 24, device=device), torch.randn(13, 24, device=device)
    s, bias = _scalar(2.5, device), _scalar(-1.5, device)
    grad_leaves = [t.clone().requires_grad_() for t in (a, b, s, bias)]
    without_positives = (torch.randn(9, 6, device=device), torch.randn(5, 6, device=device), _scalar(2.0, device),
                         _scalar(-1.0, device))
    return {"siglip_block": [
        (a[2:7], b, s, bias, 4, 13, True, True, False, True, a.dtype, WORKSPACE_BYTES),
        (a, b, s, bias, 0, 13, False, False, False, False, a.dtype, WORKSPACE_BYTES),
        (*grad_leaves, 0, 13, False, True, True, True, a.dtype, WORKSPACE_BYTES),
        # offset = N (columns 0..N-1 hold no positive): what siglip_block(offset=None) passes
        (*without_positives, 5, 14, True, True, True, True, torch.float32, DEFAULT_WORKSPACE_BYTES),
        # positives by group id
        (a[2:7], b, s, bias, 13, 13, True, True, True, True, a.dtype, WORKSPACE_BYTES,
         *_rows(_block_groups(_group_ids(13, device)), 2, 7)),
    ]}


def _info_nce_run(inputs, q, k, s):
    return mmkernels.info_nce_loss(q, k, s, normalize=inputs.fixed["normalize"],
                                   label_smoothing=inputs.fixed["label_smoothing"])


def _info_nce_eager(inputs, q, k, s):
    return eager_info_nce_loss(q, k, s, inputs.fixed["normalize"], inputs.fixed["label_smoothing"])


def _info_nce_registered(device):
    q, k = torch.randn(13, 24, device=device), torch.randn(13, 24, device=device)
    s, g = _scalar(2.5, device), _scalar(1.5, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, s)]
    _, row_lse = torch.ops.mmkernels.info_nce_fwd(q, k, s, False, 0.0, WORKSPACE_BYTES)
    ids, extra = _group_ids(13, device), torch.randn(3, 24, device=device)
    _, extra_row_lse = torch.ops.mmkernels.info_nce_fwd(q, k, s, False, 0.0, WORKSPACE_BYTES, ids, extra)
    return {
        "info_nce_fwd": [(*leaves, True, 0.1, WORKSPACE_BYTES),
                         (*leaves, False, 0.2, WORKSPACE_BYTES, ids, extra.clone().requires_grad_())],
        "info_nce_grads": [(q, k, s, row_lse, g, 0.1, True, query_grad, keys_grad, torch.float32, WORKSPACE_BYTES)
                           for query_grad, keys_grad in [(True, True), (False, True), (True, False)]]
        + [(q, k, s, extra_row_lse, g, 0.2, False, True, True, torch.float32, WORKSPACE_BYTES, ids, extra)],
    }


# The kernels' matrix products, forward + backward, in units of N²·D (one tile: N = D = the tile).
def _units(k):
    return lambda inputs: k * inputs.leaves[0].shape[0] ** 2 * inputs.leaves[0].shape[1]


# The pair losses' rule cases: N = 1 and D = 1, sizes off every block; the bf16 case as the CPU runs it.
PAIR_CASES = [dict(n=1, d=16, normalize=False), dict(n=7, d=80, normalize=True, smoothing=0.1),
              dict(n=129, d=16, normalize=False)]
PAIR_AUTOCAST_CASE = dict(n=33, d=24, normalize=True, smoothing=0.1)
PAIR_FROZEN_CASE = dict(n=64, d=64, normalize=True, smoothing=0.1)  # one tile of the interpreter's fp32 blocks

CLIP = OpEntry(
    name="clip_loss", names=["loss", "d image_emb", "d text_emb", "d logit_scale"],
    make_inputs=_pair_inputs, run=_clip_run, eager=_clip_eager, cases=PAIR_CASES,
    bf16_case=dict(n=70, d=24, normalize=True, smoothing=0.1),
    ops=["clip_loss_fwd", "clip_block_stats", "clip_block_grads"], registered=_clip_registered,
    poison=_poison_pair, check_poisoned=_assert_nan, out_dtype=torch.float32, autocast_case=PAIR_AUTOCAST_CASE,
    frozen={(): _units(8), 0: _units(6), 1: _units(6), (0, 1): _units(4)}, frozen_case=PAIR_FROZEN_CASE,
    sizes=_contrastive_sizes("clip"),
)

SIGLIP = OpEntry(
    name="siglip_loss", names=["loss", "d image_emb", "d text_emb", "d logit_scale", "d logit_bias"],
    make_inputs=lambda case, dtype, device: _pair_inputs({**case, "smoothing": 0.0}, dtype, device, bias=True),
    run=_siglip_run, eager=_siglip_eager, cases=PAIR_CASES,
    bf16_case=dict(n=70, d=24, normalize=True),
    ops=["siglip_block"], registered=_siglip_registered,
    poison=_poison_pair, check_poisoned=_assert_nan, out_dtype=torch.float32,
    autocast_case=dict(n=33, d=24, normalize=True),
    frozen={(): _units(6), 0: _units(4), 1: _units(4), (0, 1): _units(2)}, frozen_case=PAIR_FROZEN_CASE,
    sizes=_contrastive_sizes("siglip"),
)

INFO_NCE = OpEntry(
    name="info_nce_loss", names=["loss", "d query", "d keys", "d logit_scale"],
    make_inputs=_pair_inputs, run=_info_nce_run, eager=_info_nce_eager, cases=PAIR_CASES,
    bf16_case=dict(n=70, d=24, normalize=True, smoothing=0.1),
    ops=["info_nce_fwd", "info_nce_grads"], registered=_info_nce_registered,
    poison=_poison_pair, check_poisoned=_assert_nan, out_dtype=torch.float32, autocast_case=PAIR_AUTOCAST_CASE,
    frozen={(): _units(8), 0: _units(6), 1: _units(6), (0, 1): _units(4)}, frozen_case=PAIR_FROZEN_CASE,
    sizes=_contrastive_sizes("info_nce"),
)


# --------------------------------------------------------------------------- cross_attention


def _attention_inputs(case, dtype, device):
    b, h, lq, lk, d = case["B"], case.get("H", 1), case["Lq"], case["Lk"], case["d"]
    leaves = [torch.randn(b, h, lq, d, dtype=dtype, device=device) for _ in range(1)]
    leaves += [torch.randn(b, h, lk, d, dtype=dtype, device=device) for _ in range(2)]
    kv_lens = torch.randint(1, lk + 1, (b,), device=device)
    kv_lens[-1] = lk
    if case.get("full"):
        kv_lens[:] = lk
    return Inputs(leaves, dict(kv_lens=kv_lens, is_causal=case.get("is_causal", False)))


def _attention_run(inputs, q, k, v):
    return mmkernels.cross_attention(q, k, v, kv_lens=inputs.fixed["kv_lens"], is_causal=inputs.fixed["is_causal"])


def _attention_eager(inputs, q, k, v):
    keep = torch.arange(k.shape[-2], device=k.device)[None, :] < inputs.fixed["kv_lens"][:, None]
    return eager_attention(q, k, v, attn_mask=keep[:, None, None, :], is_causal=inputs.fixed["is_causal"])


def _attention_registered(device):
    q = torch.randn(2, 1, 7, 16, device=device).requires_grad_()
    k = torch.randn(2, 1, 9, 16, device=device).requires_grad_()
    v = torch.randn(2, 1, 9, 16, device=device).requires_grad_()
    kv_lens, q_lens = torch.tensor([3, 9], device=device), torch.tensor([7, 2], device=device)
    kpm = torch.rand(2, 9, device=device) < 0.3
    bias = torch.randn(7, 9, device=device)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)  # a Philox seed, as the op draws it
    fwd_args = (q, k, v, kv_lens, q_lens, kpm, bias, seed, True, 0.2, 0.25)
    out, stats = torch.ops.mmkernels.cross_attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), stats, kv_lens, q_lens,
                kpm, bias, seed, True, 0.2, 0.25, False, True, True)
    return {"cross_attention_fwd": [fwd_args], "cross_attention_bwd": [bwd_args]}


def _attention_poison(inputs):
    q = inputs.leaves[0].clone()
    q[0, 0, 2, 3] = float("nan")
    return Inputs([q, *inputs.leaves[1:]], inputs.fixed)


def _attention_check_poisoned(out, inputs):
    """NaN in one query row: that row of the output is NaN, every other row is finite."""
    row = torch.zeros(out.shape[:-1], dtype=torch.bool, device=out.device)
    row[0, 0, 2] = True
    assert torch.isnan(out[row]).all(), "a NaN query gave a finite row"
    assert torch.isfinite(out[~row]).all(), "a NaN query reached another row"


def _dot_units(k):
    # the interpreter's 32 x 32 tiles of a (1, 1, 64, 16) problem: 2 x 2 tiles, 2·32·32·16 FLOPs a product
    return lambda inputs: k * 2 * 32 * 32 * 16


ATTENTION = OpEntry(
    name="cross_attention", names=["out", "d q", "d k", "d v"],
    make_inputs=_attention_inputs, run=_attention_run, eager=_attention_eager,
    cases=[dict(B=2, H=2, Lq=7, Lk=33, d=16), dict(B=2, Lq=33, Lk=7, d=80, is_causal=True)],
    bf16_case=dict(B=2, H=2, Lq=7, Lk=33, d=16), ops=["cross_attention_fwd", "cross_attention_bwd"],
    registered=_attention_registered,
    poison=_attention_poison, check_poisoned=_attention_check_poisoned,
    # forward: 2 products per tile (4 tiles); backward: dq pass 3 products per tile, dk/dv pass 4
    frozen={(): _dot_units(2 * 2 * 2 + 2 * 2 * 3 + 2 * 2 * 4), (1, 2): _dot_units(2 * 2 * 2 + 2 * 2 * 3),
            0: _dot_units(2 * 2 * 2 + 2 * 2 * 4)},
    frozen_case=dict(B=1, Lq=64, Lk=64, d=16, full=True), upstream=True,
    # Hugging Face's eager attention takes its softmax in float32 whatever the inputs' dtype
    float64_tolerance=1e-5,
)


# --------------------------------------------------------------------------- region ops


def _region_mask_inputs(case, dtype, device):
    b, r, d = case["B"], case["R"], case["D"]
    if "lens" in case:
        lens = torch.tensor(case["lens"], device=device)
    else:
        lens = torch.randint(0, r + 1, (b,), device=device)
        lens[0], lens[-1] = 0, r
    seed = torch.randint(0, 2**31, ()).item()
    return Inputs([torch.randn(b, r, d, dtype=dtype, device=device), torch.randn(d, dtype=dtype, device=device)],
                  dict(lens=lens, seed=seed, mode=case.get("mode", "bert"), prob=case.get("prob", 0.5)))


def _region_mask_call(inputs, feats, emb, backend="auto"):
    generator = torch.Generator(device=feats.device).manual_seed(inputs.fixed["seed"])
    return mmkernels.region_mask(feats, inputs.fixed["lens"], prob=inputs.fixed["prob"], mode=inputs.fixed["mode"],
                                 mask_embedding=emb, generator=generator, backend=backend).features


def _region_mask_compile_run(inputs, feats, emb):
    """region_mask drawing from torch's global generator (seeded by the caller) inside the graph."""
    return mmkernels.region_mask(feats, inputs.fixed["lens"], prob=inputs.fixed["prob"], mode=inputs.fixed["mode"],
                                 mask_embedding=emb).features


def _region_mask_registered(device):
    feats = torch.randn(2, 5, 8, device=device, requires_grad=True)
    emb = torch.randn(8, device=device, requires_grad=True)
    seed, lens = torch.tensor([3, 4]), torch.tensor([5, 2], device=device)
    fwd, bwd = [], []
    for bert in (False, True):
        fwd.append((feats, lens, None, emb, seed, round(0.5 * 2**31), 1, bert, "triton"))
        source = torch.ops.mmkernels.region_mask_fwd(feats, lens, None, emb, seed, 2**30, 1, bert, "triton")[2]
        bwd.append((torch.randn(2, 5, 8, device=device), source, True, bert, "triton"))
    return {"region_mask_fwd": fwd, "region_mask_bwd": bwd}


def _region_mask_poison(inputs):
    feats = inputs.leaves[0].clone()
    # the last sample's regions are all real (selected, replaced or kept at random); the first
    # sample has none (make_inputs sets lens[0] = 0), so its poisoned padding passes through whatever
    # the draw, and the check below cannot go blind
    feats[-1, 0, 1] = float("nan")
    feats[-1, 1, 2] = float("inf")
    feats[0, 0, 1] = float("nan")
    feats[0, 1, 2] = float("-inf")
    return Inputs([feats, *inputs.leaves[1:]], inputs.fixed)


def _region_mask_check_poisoned(out, inputs):
    """The features are selected or copied, never mixed: a non-finite value shows up exactly where
    the reference (run on the same poisoned inputs, same seed) puts it."""
    want = _region_mask_call(inputs, *inputs.leaves, backend="torch")
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.equal(torch.isinf(out), torch.isinf(want))
    assert not torch.isfinite(want).all(), "the poisoned values were all masked out: the check is blind"


REGION_MASK = OpEntry(
    name="region_mask", names=["features", "d feats", "d mask_embedding"],
    make_inputs=_region_mask_inputs, run=_region_mask_call,
    # no N x N formula to write: what UNITER / LXMERT compute is this selection, exact in any dtype,
    # so the baseline is the reference in the inputs' dtype (same seed, same mask)
    eager=lambda inputs, feats, emb: _region_mask_call(inputs, feats, emb, backend="torch"),
    cases=[dict(B=4, R=30, D=8), dict(B=3, R=7, D=16, mode="zero")],
    bf16_case=dict(B=4, R=30, D=8, prob=1.0, lens=[30, 20, 10, 5]), ops=["region_mask_fwd", "region_mask_bwd"],
    registered=_region_mask_registered,
    poison=_region_mask_poison, check_poisoned=_region_mask_check_poisoned, upstream=True,
    compile_run=_region_mask_compile_run,
    kernels_only=lambda inputs, feats, emb: _region_mask_call(inputs, feats, emb, backend="triton"),
)


def _region_loss_inputs(case, dtype, device):
    b, r, k, kind = case["B"], case["R"], case["K"], case["kind"]
    pred = torch.randn(b, r, k, dtype=dtype, device=device)
    if kind == "kl":
        pred = pred * 4
        target = torch.softmax(torch.randn(b, r, k, device=device) * 2, -1).to(dtype)
    else:
        target = torch.randn(b, r, k, dtype=dtype, device=device)
    mask = torch.rand(b, r, device=device) < 0.3
    mask[0, 0] = True
    mask[-1] = False
    return Inputs([pred, target], dict(mask=mask, kind=kind))


def _region_loss_run(inputs, pred, target):
    return mmkernels.masked_region_loss(pred, target, inputs.fixed["mask"], inputs.fixed["kind"])


def _region_loss_eager(inputs, pred, target):
    return eager_masked_region_loss(pred, target, inputs.fixed["mask"], inputs.fixed["kind"])


def _region_loss_registered(device):
    args = {"masked_region_loss_fwd": [], "masked_region_loss_bwd": []}
    for kind in ("mse", "kl"):
        inputs = _region_loss_inputs(dict(B=2, R=3, K=8, kind=kind), torch.float32, device)
        pred, target = inputs.leaves
        mask = torch.rand(2, 3, device=device) < 0.5
        mask[0, 0], mask[-1] = True, False
        args["masked_region_loss_fwd"].append((pred.requires_grad_(), target, mask, kind, 1.0, "triton"))
        _, stats = torch.ops.mmkernels.masked_region_loss_fwd(pred, target, mask, kind, 1.0, "triton")
        args["masked_region_loss_bwd"].append(
            (torch.randn(2, 3, device=device), pred.detach(), target, mask, stats, kind, 1.0, True, "triton"))
    return args


def _region_loss_poison(inputs):
    """NaN in a selected region's prediction."""
    pred = inputs.leaves[0].clone()
    pred[0, 0, 1] = float("nan")
    return Inputs([pred, *inputs.leaves[1:]], inputs.fixed)


MASKED_REGION_LOSS = OpEntry(
    name="masked_region_loss", names=["loss", "d pred", "d target"],
    make_inputs=_region_loss_inputs, run=_region_loss_run, eager=_region_loss_eager,
    cases=[dict(B=4, R=5, K=37, kind="mse"), dict(B=3, R=7, K=12, kind="smooth_l1"),
           dict(B=4, R=5, K=37, kind="kl")],
    bf16_case=dict(B=3, R=5, K=16, kind="kl"), ops=["masked_region_loss_fwd", "masked_region_loss_bwd"],
    registered=_region_loss_registered,
    poison=_region_loss_poison, check_poisoned=_assert_nan, out_dtype=torch.float32,
    kernels_only=lambda inputs, pred, target: mmkernels.masked_region_loss(
        pred, target, inputs.fixed["mask"], inputs.fixed["kind"], backend="triton"),
)


ENTRIES: list[OpEntry] = [CLIP, SIGLIP, INFO_NCE, ATTENTION, REGION_MASK, MASKED_REGION_LOSS]
