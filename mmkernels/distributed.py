"""Multi-GPU contrastive losses over torch.distributed: the exact loss of the global batch, each rank
doing 1/world_size of the work.

    import mmkernels.distributed as mmd
    loss = mmd.clip_loss(image_local, text_local, logit_scale)                  # same value on every rank
    loss = mmd.siglip_loss(image_local, text_local, logit_scale, logit_bias)
    loss.backward()     # DDP / FSDP then average the gradients: the single-process update

Rank r holds M_r pairs (M_r may differ between ranks). The global batch is their concatenation in
rank order: N = Σ_r M_r pairs, rank r's rows start at offset_r = Σ_{q<r} M_q, and pair i's positive is
column i of the global logit matrix S (N, N). Rank r computes only the block row
S[offset_r : offset_r + M_r, :] with the block-row kernels of `mmkernels.ops.contrastive`; no rank
ever holds more of S than the kernels' workspace, and nothing of size N² is communicated.

Work per rank (matrix FLOPs, as the kernels state them): CLIP 8·M_r·N·D (2 for the row and column
statistics, 6 for the gradients), SigLIP 6·M_r·N·D. Memory per rank: the global text (N, D), the
fp32 partial text gradient (N, D), O(W·N) column statistics, and the kernels' workspace.

Communication per rank and call, W ranks, M = max_r M_r (each an ordinary torch.distributed
collective, so gloo on CPU and NCCL on GPU both run it):
1. The check: one all_gather of 13 int64 per rank (sizes, dtype, device type, which gradients,
   options, workspace), before any heavy collective, so that mismatched ranks or a workspace too
   small for one rank's block raise a clear error on every rank instead of leaving one waiting.
2. The text rows: one all_gather of (M, D) in the embeddings' dtype (rows past M_r are padding
   when the M_r differ). The image rows never travel: the column statistics CLIP needs are
   reductions over rows, so each rank reduces its own rows and sends O(N) numbers.
3. CLIP: one all_gather of 2N + 1 fp32 (the block's per-column max and sum of exponentials, and its
   rows' part of the loss); every rank merges them in rank order, so all ranks hold the same column
   log-sum-exps to the bit. SigLIP: one all_gather of the ranks' loss shares (one fp32 each).
4. When some rank needs the text gradient: one reduce-scatter of the (N, D) fp32 partial text
   gradients (padded to W·M rows when the M_r differ), each rank receiving its own rows' sum.
   (gloo implements reduce-scatter as an all-reduce, twice the bytes; NCCL as a reduce-scatter.)
5. Only for the open_clip variants that give every rank the whole dL/dlogit_scale (nn.ClipLoss
   with local_loss=False): one all_gather of the ranks' scalar shares (one fp32 each).

The gradients are finished inside the forward, when some input needs them; the backward only
multiplies them by the upstream gradient and runs no collective, so a rank that skips the backward
cannot stall the others. The forward makes one host sync (the sizes from the check decide the
buffer shapes).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmkernels import _ring
from mmkernels.ops import contrastive as _blocks
from mmkernels.ops import contrastive_kernels as _kernels
from mmkernels.ops._common import check_float_tensor, scalar_tensor, triton_enabled

__all__ = ["clip_loss", "siglip_loss"]

GRAD_SCALINGS = ("ddp", "none")

# --------------------------------------------------------------------------- gradient scaling


@dataclass(frozen=True)
class Scaling:
    """How one rank's gradients and returned value relate to the single-process loss L of the
    global batch (the modules in mmkernels.nn use the open_clip variants).

    block: the factor on this rank's block contributions (its image rows' gradients, its partial
        text gradients, its shares of the scalars' gradients): "world" = W, "one" = 1,
        "rows" = N / M_r (open_clip's SigLIP, whose local loss divides by M_r).
    scalar_total: logit_scale / logit_bias get the sum of all ranks' (unscaled) shares, i.e. dL/ds
        on every rank (one more all_gather of a few scalars), instead of this rank's share × block.
    local_value: return open_clip's per-rank local loss instead of the global loss.
    """

    name: str
    block: str
    scalar_total: bool = False
    local_value: bool = False

    def factor(self, plan: "_Plan") -> float:
        if self.block == "world":
            return float(plan.world_size)
        if self.block == "rows":
            return plan.n_total / plan.sizes[plan.rank]
        return 1.0


SCALINGS = {
    s.name: s
    for s in (
        Scaling("ddp", "world"),
        Scaling("none", "one"),
        Scaling("open_clip_gather_with_grad", "world", scalar_total=True),
        Scaling("open_clip_detached", "one", scalar_total=True),
        Scaling("open_clip_local_loss", "world", local_value=True),
        Scaling("open_clip_siglip", "rows", local_value=True),
    )
}
_SCALING_CODES = {name: i for i, name in enumerate(SCALINGS)}

# --------------------------------------------------------------------------- process group and check

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "meta")
_OPS = ("clip_loss", "siglip_loss")
MODES = ("gather", "ring")
# The check's fields, one int64 each, per rank.
_FIELDS = ("op", "rejected", "M", "D", "dtype", "device", "image_grad", "text_grad", "scalar_grad", "normalize",
           "label_smoothing", "grad_scaling", "workspace", "mode")


@dataclass(frozen=True)
class _Plan:
    """What every rank agreed on in the check: the group, the sizes, who needs which gradients."""

    group: object
    world_size: int
    rank: int
    sizes: tuple
    text_grad: bool     # some rank needs the text gradient: every rank computes its partials
    scalar_grad: bool   # some rank needs a scalar's gradient

    @property
    def n_total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    @property
    def equal_sizes(self) -> bool:
        return min(self.sizes) == max(self.sizes)


def process_group(group, caller: str):
    """`group` (default: the world group) after checking that torch.distributed is initialised and
    that this process belongs to it. Raises on every rank alike (no collective is involved)."""
    if not dist.is_available():
        raise RuntimeError(f"{caller}: this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{caller} needs a torch.distributed process group, and none is initialised: call "
            "torch.distributed.init_process_group(...) on every rank first (gloo for CPU tensors, "
            "nccl for CUDA tensors)"
        )
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"expected group to be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{caller}: this process (global rank {dist.get_rank()}) is not a member of group")
    return group


def _check_device(group, image) -> torch.device:
    """Where the check's small all_gather runs: the CPU when the group serves CPU tensors (gloo),
    else this rank's accelerator (NCCL: the embeddings' GPU, or the current one)."""
    types = {d.type for d in getattr(group, "_device_types", ())}
    if not types:
        types = {"cuda"} if "nccl" in str(dist.get_backend(group)) else {"cpu"}
    if "cpu" in types:
        return torch.device("cpu")
    if isinstance(image, torch.Tensor) and image.device.type in types:
        return image.device
    kind = sorted(types)[0]
    return torch.device(kind, getattr(torch, kind).current_device())


def _all_gather_rows(out: torch.Tensor, local: torch.Tensor, group) -> None:
    # all_gather_single is torch >= 2.13's name for all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


def _reduce_scatter_rows(out: torch.Tensor, full: torch.Tensor, group) -> None:
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, full, op=dist.ReduceOp.SUM, group=group)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _describe(values, fmt=str) -> str:
    """"D = 8 on ranks 0, 2, D = 16 on rank 1": each value seen, with the ranks that passed it."""
    ranks: dict = {}
    for r, v in enumerate(values):
        ranks.setdefault(v, []).append(r)

    def listed(rs):
        shown = ", ".join(map(str, rs[:8])) + (f", … ({len(rs)} ranks)" if len(rs) > 8 else "")
        return f"rank{'s' if len(rs) > 1 else ''} {shown}"

    return ", ".join(f"{fmt(v)} on {listed(rs)}" for v, rs in ranks.items())


def _check(caller: str, op: str, group, image, text, local_checks, *, image_grad: bool, text_grad: bool,
           scalar_grad: bool, normalize, label_smoothing, grad_scaling: str, workspace_bytes,
           mode: str = "gather") -> _Plan:
    """Run this rank's input checks, then one small all_gather of what every rank passed, and
    raise the same kind of error on every rank if any rank's inputs are invalid, the ranks
    disagree (embedding width, dtype, device type, options, the loss called) or a rank's kernel
    workspace cannot hold one block of its rows against the N columns. Returns the plan.

    A rank whose own inputs fail still joins the all_gather before raising its own error, so that
    no other rank is left waiting in a collective.
    """
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    local_error = None
    meta = [-1] * len(_FIELDS)
    meta[_FIELDS.index("op")] = _OPS.index(op)
    try:
        local_checks()
        meta[1:] = [
            0, image.shape[0], image.shape[1], _DTYPES.index(image.dtype),
            _DEVICE_TYPES.index(image.device.type) if image.device.type in _DEVICE_TYPES else len(_DEVICE_TYPES),
            int(image_grad), int(text_grad), int(scalar_grad), int(bool(normalize)), _float_bits(label_smoothing),
            _SCALING_CODES[grad_scaling], _blocks.resolve_workspace_bytes(workspace_bytes), MODES.index(mode),
        ]
    except Exception as err:  # re-raised below, after the other ranks have heard of it
        local_error = err
        meta[_FIELDS.index("rejected")] = 1
    device = _check_device(group, image)
    local = torch.tensor(meta, dtype=torch.int64, device=device)
    gathered = torch.empty(world_size * len(_FIELDS), dtype=torch.int64, device=device)
    _all_gather_rows(gathered, local, group)
    rows = gathered.view(world_size, len(_FIELDS)).tolist()  # the one host sync: sizes set the buffers
    col = {name: [row[i] for row in rows] for i, name in enumerate(_FIELDS)}

    if local_error is not None:
        raise local_error
    rejected = [r for r, bad in enumerate(col["rejected"]) if bad]
    if rejected:
        raise ValueError(
            f"{caller}: the inputs on rank(s) {rejected} were rejected (the error raised there says "
            "why); every rank raises so that none is left waiting in a collective"
        )
    if len(set(col["op"])) > 1:
        raise ValueError(
            "expected every rank to call the same distributed loss, got "
            + _describe(col["op"], lambda i: f"mmkernels.distributed.{_OPS[i]}")
        )
    if len(set(col["D"])) > 1:
        raise ValueError(
            "expected image_local and text_local to have the same embedding dimension D on every rank, got "
            + _describe(col["D"], lambda d: f"D = {d}")
        )
    if len(set(col["dtype"])) > 1:
        raise TypeError(
            "expected image_local and text_local to have the same dtype on every rank, got "
            + _describe(col["dtype"], lambda i: str(_DTYPES[i]))
        )
    if len(set(col["device"])) > 1:
        names = _DEVICE_TYPES + ("another device type",)
        raise ValueError(
            "expected the embeddings on the same kind of device on every rank (the collectives of one "
            "process group run on one device type), got " + _describe(col["device"], lambda i: names[i])
        )
    for name, fmt in (
        ("normalize", lambda v: f"normalize={bool(v)}"),
        ("label_smoothing", lambda v: f"label_smoothing={struct.unpack('<d', struct.pack('<q', v))[0]}"),
        ("grad_scaling", lambda v: f"{list(SCALINGS)[v]!r} gradient scaling"),
        ("mode", lambda v: f"mode={MODES[v]!r}"),
    ):
        if len(set(col[name])) > 1:
            raise ValueError(f"expected the same {name} on every rank, got " + _describe(col[name], fmt))
    if sum(col["M"]) == 0:
        raise ValueError("expected at least one pair in the global batch, got M = 0 on every rank")
    plan = _Plan(
        group=group, world_size=world_size, rank=rank, sizes=tuple(col["M"]),
        text_grad=any(col["text_grad"]), scalar_grad=any(col["scalar_grad"]),
    )
    if triton_enabled(image):
        _check_workspaces(caller, op, plan, col, image, SCALINGS[grad_scaling], mode)
    return plan


def _check_workspaces(caller: str, op: str, plan: _Plan, col: dict, image, scaling: "Scaling", mode: str) -> None:
    """Every rank evaluates, for every rank's rows, the workspace checks the block functions make
    before their launches (plain arithmetic on shapes), so a workspace too small for one rank's
    block raises on all ranks here, before any heavy collective, instead of on that rank alone.
    The ring's blocks are a rank's rows against one rank's columns at a time (at most max M_r)."""
    n, d = (plan.max_size if mode == "ring" else plan.n_total), image.shape[1]
    for r, m in enumerate(plan.sizes):
        image_grad, scalar_grad, workspace = bool(col["image_grad"][r]), bool(col["scalar_grad"][r]), col["workspace"][r]
        runs = _runs_gradient_pass(image_grad, scalar_grad, plan, scaling)
        try:
            if op == "clip_loss":
                _kernels.stats_workspace(m, n, d, image.dtype, image.device, workspace)
                if runs:
                    _kernels.panel_workspace(m, n, d, image.dtype, image.device, image_grad, plan.text_grad,
                                             torch.float32, workspace)
            else:
                _kernels.panel_workspace(m, n, d, image.dtype, image.device, runs and image_grad,
                                         runs and plan.text_grad, torch.float32, workspace)
        except ValueError as err:
            columns = f"{n} columns (the widest ring block)" if mode == "ring" else f"N = {n} columns"
            raise ValueError(f"{caller}: rank {r} (M = {m} rows against {columns}): {err}") from None


def _runs_gradient_pass(image_grad: bool, scalar_grad: bool, plan: _Plan, scaling: "Scaling") -> bool:
    """Whether a rank computes its block's gradients: for its own inputs, or because another rank
    needs what it contributes (text partials; scalar shares summed over ranks)."""
    return image_grad or plan.text_grad or scalar_grad or (scaling.scalar_total and plan.scalar_grad)


def _embedding_checks(image, text):
    check_float_tensor("image_local", image, 2, "(M, D)")
    check_float_tensor("text_local", text, 2, "(M, D)")
    if image.device != text.device:
        raise ValueError(f"expected image_local and text_local on one device, got {image.device} and {text.device}")
    if image.shape[0] != text.shape[0]:
        raise ValueError(
            "expected image_local and text_local to hold the same number of local pairs M, "
            f"got {image.shape[0]} and {text.shape[0]}"
        )
    if image.shape[1] != text.shape[1]:
        raise ValueError(
            "expected image_local and text_local to have the same last dimension, "
            f"got {image.shape[1]} and {text.shape[1]}"
        )
    if image.dtype != text.dtype:
        raise TypeError(f"expected image_local and text_local to share a dtype, got {image.dtype} and {text.dtype}")
    if image.shape[1] == 0:
        raise ValueError("expected an embedding dimension D >= 1, got D = 0")
    if image.dtype not in _DTYPES:
        raise TypeError(f"expected image_local and text_local in one of {_DTYPES}, got {image.dtype}")


# --------------------------------------------------------------------------- communication


def _gather_rows(local: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """All ranks' (M_r, D) rows concatenated in rank order: (N, D)."""
    local = local.contiguous()
    if plan.equal_sizes:
        out = local.new_empty((plan.n_total, local.shape[1]))
        _all_gather_rows(out, local, plan.group)
        return out
    padded = local.new_zeros((plan.max_size, local.shape[1]))
    padded[: local.shape[0]] = local
    out = local.new_empty((plan.world_size * plan.max_size, local.shape[1]))
    _all_gather_rows(out, padded, plan.group)
    out = out.view(plan.world_size, plan.max_size, -1)
    return torch.cat([out[r, :m] for r, m in enumerate(plan.sizes)])


def _scatter_sum_rows(partial: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Sum the ranks' (N, D) partials and hand each rank its own (M_r, D) rows."""
    if plan.equal_sizes:
        out = partial.new_empty((plan.sizes[plan.rank], partial.shape[1]))
        _reduce_scatter_rows(out, partial.contiguous(), plan.group)
        return out
    padded = partial.new_zeros((plan.world_size, plan.max_size, partial.shape[1]))
    start = 0
    for r, m in enumerate(plan.sizes):
        padded[r, :m] = partial[start: start + m]
        start += m
    out = partial.new_empty((plan.max_size, partial.shape[1]))
    _reduce_scatter_rows(out, padded.view(-1, partial.shape[1]), plan.group)
    return out[: plan.sizes[plan.rank]]


def _gather_scalars(values: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """(W, k): every rank's (k,) fp32 values, in rank order."""
    out = values.new_empty((plan.world_size * values.numel(),))
    _all_gather_rows(out, values.reshape(-1).contiguous(), plan.group)
    return out.view(plan.world_size, -1)


def _scalar_grads(shares: list, needed: tuple, plan: _Plan, scaling: Scaling, factor: float) -> list:
    """The scalars' gradients on this rank: its own shares × factor, or (scalar_total) the sum of
    every rank's shares, which every rank then sends, needed or not (one all_gather of k fp32)."""
    if scaling.scalar_total:
        if not plan.scalar_grad:  # no rank needs them; every rank skips the all_gather alike
            return [None for _ in shares]
        local = torch.stack([s.float().reshape(()) for s in shares])
        total = _gather_scalars(local, plan).double().sum(0).float()
        shares = list(total.unbind())
        factor = 1.0
    return [s * factor if need else None for s, need in zip(shares, needed)]


def _public_scaling(grad_scaling):
    """The public functions take "ddp" and "none" (the open_clip variants are the modules')."""
    def check(_group):
        if grad_scaling not in GRAD_SCALINGS:
            raise ValueError(f"expected grad_scaling to be one of {GRAD_SCALINGS}, got {grad_scaling!r}")
    return check


def _needs_grad(t) -> bool:
    return torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad


@dataclass(frozen=True)
class _Options:
    normalize: bool
    label_smoothing: float
    workspace_bytes: int | None
    scaling: Scaling
    image_grad: bool      # this rank's image rows need their gradient
    scalar_grads: tuple   # which scalars (logit_scale[, logit_bias]) need a gradient on this rank
    mode: str = "gather"  # how the text rows travel (SigLIP: "gather" or "ring")

    def runs_gradient_pass(self, plan: _Plan) -> bool:
        return _runs_gradient_pass(self.image_grad, any(self.scalar_grads), plan, self.scaling)


class _FinishedGradients(torch.autograd.Function):
    """Base of the two losses: forward computes the value and, when needed, every gradient (scaled
    as Scaling says); backward multiplies them by the upstream gradient (no collective)."""

    @staticmethod
    def backward(ctx, grad_value):
        grads = [None if g is None else (g * grad_value).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None)


# --------------------------------------------------------------------------- CLIP


class _ClipLoss(_FinishedGradients):
    @staticmethod
    def forward(ctx, image, text, scale, plan: _Plan, opts: _Options):
        n, off, m = plan.n_total, plan.offset, image.shape[0]
        eps = opts.label_smoothing
        text_all = _gather_rows(text, plan)
        stats = _blocks.clip_block_stats(
            image, text_all, scale, offset=off, normalize=opts.normalize, workspace_bytes=opts.workspace_bytes,
        )
        # L = (Σ_i row_lse_i + Σ_j col_lse_j - 2(1-ε)·Σ_i S_ii - (2ε/N)·Σ_ij S_ij) / (2N). The row terms are
        # this rank's; the column log-sum-exps merge every rank's column statistics.
        row_terms = (stats.row_lse.double() - 2 * (1 - eps) * stats.diag.double()
                     - (2 * eps / n) * stats.row_sum.double()).sum()
        packed = torch.cat([stats.col_max.float(), stats.col_sumexp.float(), row_terms.float().reshape(1)])
        gathered = _gather_scalars(packed, plan)
        col_lse = _blocks.merge_column_stats(gathered[:, :n], gathered[:, n: 2 * n])
        if opts.scaling.local_value:
            # open_clip's local loss (local_loss=True): the mean cross-entropy of this rank's M rows and
            # of its M columns (ε = 0: nn.ClipLoss refuses label smoothing there).
            value = (stats.row_lse.double().sum() + col_lse[off: off + m].double().sum()
                     - 2 * stats.diag.double().sum()) / (2 * m)
        else:
            value = (gathered[:, 2 * n].double().sum() + col_lse.double().sum()) / (2 * n)

        grads = (None, None, None)
        if opts.runs_gradient_pass(plan):
            g_image, g_text, g_scale = _blocks.clip_block_grads(
                image, text_all, scale, stats.row_lse, col_lse, offset=off, n_total=n, label_smoothing=eps,
                normalize=opts.normalize, image_grad=opts.image_grad, text_grad=plan.text_grad,
                workspace_bytes=opts.workspace_bytes,
            )
            factor = opts.scaling.factor(plan)
            del text_all
            g_text = None if g_text is None else _scatter_sum_rows(g_text * factor, plan)
            (g_scale,) = _scalar_grads([g_scale], opts.scalar_grads, plan, opts.scaling, factor)
            grads = (None if g_image is None else g_image * factor, g_text, g_scale)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (image.dtype, text.dtype, scale.dtype)
        return value.float()


def clip_loss_scaled(image_local, text_local, logit_scale, *, group, normalize, label_smoothing,
                     workspace_bytes, scaling: str, caller: str = "mmkernels.distributed.clip_loss",
                     extra_checks=None):
    """`clip_loss` with any of SCALINGS by name (mmkernels.nn.ClipLoss uses the open_clip ones).
    `extra_checks(group)` runs with this rank's input checks: what it raises is raised on this rank,
    and every other rank raises too."""
    group = process_group(group, caller)
    scale = []

    def local_checks():
        if extra_checks is not None:
            extra_checks(group)
        _embedding_checks(image_local, text_local)
        scale.append(scalar_tensor("logit_scale", logit_scale, image_local))
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise TypeError(f"expected label_smoothing to be a float, got {type(label_smoothing).__name__}")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"expected label_smoothing in [0, 1], got {label_smoothing}")
        if scaling not in SCALINGS:
            raise ValueError(f"expected scaling to be one of {tuple(SCALINGS)}, got {scaling!r}")

    image_grad, text_grad, scale_grad = (_needs_grad(t) for t in (image_local, text_local, logit_scale))
    plan = _check(caller, "clip_loss", group, image_local, text_local, local_checks, image_grad=image_grad,
                  text_grad=text_grad, scalar_grad=scale_grad, normalize=normalize, label_smoothing=label_smoothing,
                  grad_scaling=scaling, workspace_bytes=workspace_bytes)
    if SCALINGS[scaling].local_value and not plan.equal_sizes:
        # open_clip's local loss weights rank r's rows and columns by 1/M_r; with unequal M_r that
        # is not a per-block-row weighting, and open_clip itself needs equal local batches.
        raise ValueError(
            f"{caller}: open_clip's local loss (local_loss=True) needs the same local batch size on every "
            f"rank, got M = {list(plan.sizes)}; mmkernels.distributed.clip_loss takes unequal ones"
        )
    opts = _Options(bool(normalize), float(label_smoothing), workspace_bytes, SCALINGS[scaling], image_grad,
                    (scale_grad,))
    return _ClipLoss.apply(image_local, text_local, scale[0], plan, opts)


def clip_loss(image_local, text_local, logit_scale, *, group=None, normalize: bool = False,
              label_smoothing: float = 0.0, grad_scaling: str = "ddp", workspace_bytes: int | None = None):
    """CLIP's symmetric InfoNCE loss of the global batch, from each rank's local pairs.

    Args:
        image_local: (M_r, D) this rank's image embeddings; M_r may differ between ranks, D, dtype
            and device type may not. The global batch is the ranks' rows concatenated in rank order
            (N = Σ M_r); pair i is the positive of global row i and column i.
        text_local: (M_r, D) this rank's text embeddings, same dtype and device.
        logit_scale: the multiplier, already exponentiated (`model.logit_scale.exp()`): a Python
            float or a 0-dim tensor on the embeddings' device.
        group: the torch.distributed process group (default: the world group). Every rank of it
            must call this function with the same options.
        normalize: L2-normalise the embeddings inside the kernels.
        label_smoothing: as in `F.cross_entropy`, in [0, 1], over the N global classes.
        grad_scaling: "ddp" (default) or "none", see below.
        workspace_bytes: the block-row kernels' workspace bound (default: theirs).

    Returns:
        () float32, the same value on every rank: the loss one process computes on the concatenated
        batch, (CE(rows of S) + CE(columns of S)) / 2 with S = logit_scale · image @ text.T (N × N).

    Gradients (what `loss.backward()` leaves on rank r; L is that single-process loss):
        - "ddp": image_local and text_local get W · dL/d(their rows), logit_scale gets
          W · (rank r's share of dL/dlogit_scale), where W is the group's size and rank r's share is
          the part of dL/dlogit_scale that comes from its block row S[offset_r : offset_r + M_r, :]
          (the shares of all ranks sum to dL/dlogit_scale). DDP and FSDP average gradients over
          ranks, so their averaging of these gives exactly the single-process gradient of every
          parameter: the update of one process training on the global batch. (This is also what
          open_clip's gather_with_grad=True, local_loss=True yields with equal M_r.)
        - "none": the unscaled shares: dL/d(rows) for the embeddings, rank r's share for
          logit_scale; summing over ranks (not averaging) gives the single-process gradient.
        Each rank's gradients are multiplied by its own upstream gradient (1 for loss.backward()).
        They are computed in the forward when some input requires grad (so the backward runs no
        collective); a frozen tower costs no product on its side.

    Raises the same error on every rank when a rank's inputs are invalid or the ranks disagree
    (D, dtype, device type, options); RuntimeError when no process group is initialised.
    """
    return clip_loss_scaled(image_local, text_local, logit_scale, group=group, normalize=normalize,
                            label_smoothing=label_smoothing, workspace_bytes=workspace_bytes, scaling=grad_scaling,
                            extra_checks=_public_scaling(grad_scaling))


# --------------------------------------------------------------------------- SigLIP


class _SiglipLoss(_FinishedGradients):
    @staticmethod
    def forward(ctx, image, text, scale, bias, plan: _Plan, opts: _Options):
        passes = opts.runs_gradient_pass(plan)
        flags = dict(
            n_total=plan.n_total, normalize=opts.normalize, image_grad=passes and opts.image_grad,
            text_grad=passes and plan.text_grad, workspace_bytes=opts.workspace_bytes,
            scalar_grads=any(opts.scalar_grads) or (opts.scaling.scalar_total and plan.scalar_grad),
        )
        factor = opts.scaling.factor(plan)
        if opts.mode == "ring":
            block, g_text = _siglip_ring(image, text, scale, bias, plan, flags, factor)
        else:
            text_all = _gather_rows(text, plan)
            block = _blocks.siglip_block(image, text_all, scale, bias, offset=plan.offset, **flags)
            del text_all
            g_text = None if block.text_grad is None else _scatter_sum_rows(block.text_grad * factor, plan)
        shares = _gather_scalars(block.loss.float().reshape(1), plan)
        value = block.loss.double() * factor if opts.scaling.local_value else shares.double().sum()
        # Finite inputs give a finite loss; an Inf among them leaves it undefined: NaN, as for CLIP.
        value = torch.where(torch.isinf(value), torch.nan, value)
        grads = (None, None, None, None)
        if passes:
            g_scale, g_bias = _scalar_grads([block.scale_grad, block.bias_grad], opts.scalar_grads, plan,
                                            opts.scaling, factor)
            grads = (None if block.image_grad is None else block.image_grad * factor, g_text, g_scale, g_bias)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (image.dtype, text.dtype, scale.dtype, bias.dtype)
        return value.float()


def _siglip_ring(image, text, scale, bias, plan: _Plan, flags: dict, factor: float):
    """This rank's image rows against every rank's text rows as they pass around the ring
    (mmkernels._ring): its own texts with their positives (offset 0), the others' as negatives
    only (offset None), one siglip_block each, 2·M_r·M_q·D per product. Returns the block row's
    SiglipBlock (loss and scalar shares summed over the blocks, image gradient complete, text_grad
    None) and this rank's text gradient (the contributions of every rank's rows, each × its
    rank's factor, summed around the ring), or None when no rank needs it."""
    shares = []  # (loss, scale share, bias share) of each block: O(W) scalars
    image_grad = {}  # one (M_r, D) fp32 buffer, accumulated in place

    def compute(q: int, text_q: torch.Tensor):
        part = _blocks.siglip_block(image, text_q, scale, bias, offset=0 if q == plan.rank else None, **flags)
        shares.append((part.loss, part.scale_grad, part.bias_grad))
        if part.image_grad is not None:
            image_grad["sum"] = image_grad["sum"].add_(part.image_grad) if image_grad else part.image_grad
        return None if part.text_grad is None else part.text_grad * factor

    # compute runs at least once: some rank holds a pair (the check), and every nonempty block comes by
    g_text = _ring.ring_pass(text, plan.sizes, plan.group, compute, gradients=flags["text_grad"])

    def total(k: int, dtype):
        if shares[0][k] is None:
            return None
        return torch.stack([s[k].double() for s in shares]).sum().to(dtype)

    block = _blocks.SiglipBlock(total(0, torch.float32), image_grad.get("sum"), None, total(1, scale.dtype),
                                total(2, bias.dtype))
    return block, g_text


def siglip_loss_scaled(image_local, text_local, logit_scale, logit_bias, *, group, normalize, workspace_bytes,
                       scaling: str, mode: str = "gather", caller: str = "mmkernels.distributed.siglip_loss",
                       extra_checks=None):
    """`siglip_loss` with any of SCALINGS by name (mmkernels.nn.SigLipLoss uses "open_clip_siglip");
    `extra_checks` as for `clip_loss_scaled`."""
    group = process_group(group, caller)
    scalars = []

    def local_checks():
        if extra_checks is not None:
            extra_checks(group)
        _embedding_checks(image_local, text_local)
        scalars.append(scalar_tensor("logit_scale", logit_scale, image_local))
        scalars.append(scalar_tensor("logit_bias", logit_bias, image_local))
        if scaling not in SCALINGS:
            raise ValueError(f"expected scaling to be one of {tuple(SCALINGS)}, got {scaling!r}")
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"expected mode to be one of {MODES}, got {mode!r}")

    image_grad, text_grad, scale_grad, bias_grad = (
        _needs_grad(t) for t in (image_local, text_local, logit_scale, logit_bias))
    plan = _check(caller, "siglip_loss", group, image_local, text_local, local_checks, image_grad=image_grad,
                  text_grad=text_grad, scalar_grad=scale_grad or bias_grad, normalize=normalize, label_smoothing=0.0,
                  grad_scaling=scaling, workspace_bytes=workspace_bytes, mode=mode)
    if SCALINGS[scaling].block == "rows" and 0 in plan.sizes:
        raise ValueError(
            f"{caller}: open_clip's SigLIP loss divides each rank's loss by its local batch size, got M = "
            f"{list(plan.sizes)}; mmkernels.distributed.siglip_loss takes empty ranks"
        )
    opts = _Options(bool(normalize), 0.0, workspace_bytes, SCALINGS[scaling], image_grad, (scale_grad, bias_grad),
                    mode)
    return _SiglipLoss.apply(image_local, text_local, scalars[0], scalars[1], plan, opts)


def siglip_loss(image_local, text_local, logit_scale, logit_bias, *, group=None, normalize: bool = False,
                grad_scaling: str = "ddp", workspace_bytes: int | None = None, mode: str = "gather"):
    """SigLIP's pairwise sigmoid loss of the global batch, from each rank's local pairs.

    Args:
        image_local, text_local: (M_r, D) this rank's embeddings, as for `clip_loss`.
        logit_scale: the multiplier, already exponentiated; a Python float or a 0-dim tensor.
        logit_bias: the additive bias; a Python float or a 0-dim tensor.
        group, normalize, grad_scaling, workspace_bytes: as for `clip_loss`.
        mode: how the text rows travel; the same value and gradients either way (every rank must
            pass the same mode).
            - "gather" (default): one all_gather of the text rows, (N, D) on every rank, and one
              reduce-scatter of the (N, D) fp32 partial text gradients (module docstring).
            - "ring": point-to-point, the text blocks pass around the ring of ranks (rank r
              receives from r-1, sends to r+1), each rank's image rows meet one rank's texts at a
              time while the next block travels (siglip-kernel's and open_clip's "shift" scheme),
              and the text-gradient contributions follow the same ring home, summed on the way.
              Memory per rank: two text blocks (current and next) and three fp32 gradient blocks
              of at most M = max_r M_r rows, O(M·D), instead of the (N, D) gathered text and (N, D)
              fp32 partial gradient; the kernels' workspace is sized against M columns instead of
              N. Communication per rank: W-1 sends of a text block (≤ (W-1)·M·D elements, as the
              all_gather) and, when some rank needs the text gradient, W-1 sends of an fp32
              gradient block (≤ (W-1)·M·D fp32, as NCCL's reduce-scatter, half of gloo's), each
              overlapped with the compute of one block except the last gradient hop; no N-sized
              buffer. The gradients travel back around the ring rather than by one reduce-scatter
              at the end because the reduce-scatter needs every rank's (N, D) fp32 partial at
              once (the memory the ring saves) and starts only after the last block, while the
              ring sends the same bytes in steps hidden behind the compute. Worth it when the
              (N, D) text buffers matter (large global batches) or the network is slower than
              the compute of one block (2·M_r·M_q·D FLOPs per product); the gather mode makes
              fewer, larger messages (W-1 small-message latencies less per step on NVLink).

    Returns:
        () float32, the same value on every rank: -Σ_ij log σ(label_ij · S_ij) / N over the global
        N × N logits S = logit_scale · image @ text.T + logit_bias (label +1 on the diagonal, -1
        elsewhere), as one process computes it on the concatenated batch. NaN if an input is NaN
        or infinite.

    Gradients, as for `clip_loss` ("ddp": W · dL/d(rows) for the embeddings, W · rank r's share
    (from its block row of S) for logit_scale and logit_bias; "none": the unscaled shares).
    """
    return siglip_loss_scaled(image_local, text_local, logit_scale, logit_bias, group=group, normalize=normalize,
                              workspace_bytes=workspace_bytes, scaling=grad_scaling, mode=mode,
                              extra_checks=_public_scaling(grad_scaling))
