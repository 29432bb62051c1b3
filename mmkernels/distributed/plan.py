"""What the ranks of mmkernels.distributed agree on before any heavy collective: the process group,
the check (one small all_gather of what every rank passed, and the same error on every rank when
they disagree), the plan it yields (sizes, who needs which gradients), and the gradient scalings.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmkernels.ops._args import check_embedding_pair
from mmkernels.ops._dispatch import uses_kernels
from mmkernels.ops.contrastive.plan import check_call_workspace, resolve_workspace_bytes

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

    def factor(self, plan: "Plan") -> float:
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
_OPS = ("clip_loss", "siglip_loss", "info_nce_loss")
MODES = ("gather", "ring")
# The check's fields, one int64 each, per rank.
_FIELDS = ("op", "rejected", "M", "D", "dtype", "device", "image_grad", "text_grad", "scalar_grad", "normalize",
           "label_smoothing", "grad_scaling", "workspace", "mode", "K", "group_ids")


@dataclass(frozen=True)
class Plan:
    """What every rank agreed on in the check: the group, the sizes, who needs which gradients."""

    group: object
    world_size: int
    rank: int
    sizes: tuple
    text_grad: bool     # some rank needs the text (or extra text) gradient: every rank computes its partials
    scalar_grad: bool   # some rank needs a scalar's gradient
    workspace_bytes: int  # this rank's kernel workspace, resolved (argument, environment or default)
    extra_sizes: tuple  # K_r: each rank's extra text rows (CLIP's extra negatives; 0 without)
    groups: bool        # the ranks passed group ids

    @property
    def n_extra(self) -> int:
        return sum(self.extra_sizes)

    @property
    def block_sizes(self) -> tuple:
        """Each rank's text block: its M_r text rows followed by its K_r extra rows."""
        return tuple(m + k for m, k in zip(self.sizes, self.extra_sizes))

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


def all_gather_rows(out: torch.Tensor, local: torch.Tensor, group) -> None:
    # all_gather_single is torch >= 2.13's name for all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


def reduce_scatter_rows(out: torch.Tensor, full: torch.Tensor, group) -> None:
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


def check(caller: str, op: str, group, image, text, local_checks, *, image_grad: bool, text_grad: bool,
           scalar_grad: bool, normalize, label_smoothing, grad_scaling: str, workspace_bytes,
           mode: str = "gather", names: tuple = ("image_local", "text_local"), extra=None,
           group_ids=None) -> Plan:
    """Run this rank's input checks, then one small all_gather of what every rank passed, and
    raise the same kind of error on every rank if any rank's inputs are invalid, the ranks
    disagree (embedding width, dtype, device type, options, mode, whether group ids were passed,
    the loss called) or a rank's kernel workspace cannot hold one block of its rows against the
    N + K columns (mode "ring": against the widest block, max M_r + K_r columns). `extra`: this
    rank's extra text rows (K_r, D) or None (K_r = 0: the ranks may differ in K_r); `group_ids`:
    this rank's ids or None, checked by `local_checks`. Returns the plan.

    A rank whose own inputs fail still joins the all_gather before raising its own error, so that
    no other rank is left waiting in a collective. `names`: the caller's names of image and text,
    for the messages.
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
            _SCALING_CODES[grad_scaling], resolve_workspace_bytes(workspace_bytes), MODES.index(mode),
            0 if extra is None else extra.shape[0], int(group_ids is not None),
        ]
    except Exception as err:  # re-raised below, after the other ranks have heard of it
        local_error = err
        meta[_FIELDS.index("rejected")] = 1
    device = _check_device(group, image)
    local = torch.tensor(meta, dtype=torch.int64, device=device)
    gathered = torch.empty(world_size * len(_FIELDS), dtype=torch.int64, device=device)
    all_gather_rows(gathered, local, group)
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
            f"expected {names[0]} and {names[1]} to have the same embedding dimension D on every rank, got "
            + _describe(col["D"], lambda d: f"D = {d}")
        )
    if len(set(col["dtype"])) > 1:
        raise TypeError(
            f"expected {names[0]} and {names[1]} to have the same dtype on every rank, got "
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
        ("group_ids", lambda v: "group ids" if v else "group_ids=None"),
    ):
        if len(set(col[name])) > 1:
            raise ValueError(f"expected the same {name} on every rank, got " + _describe(col[name], fmt))
    if sum(col["M"]) == 0:
        raise ValueError("expected at least one pair in the global batch, got M = 0 on every rank")
    plan = Plan(
        group=group, world_size=world_size, rank=rank, sizes=tuple(col["M"]),
        text_grad=any(col["text_grad"]), scalar_grad=any(col["scalar_grad"]), workspace_bytes=col["workspace"][rank],
        extra_sizes=tuple(col["K"]), groups=bool(col["group_ids"][rank]),
    )
    if uses_kernels(op, image):
        check_workspaces(caller, op, plan, col, image, SCALINGS[grad_scaling], mode)
    return plan


def check_workspaces(caller: str, op: str, plan: Plan, col: dict, image, scaling: "Scaling", mode: str) -> None:
    """Every rank evaluates, for every rank's rows, the workspace checks the block functions make
    before their launches (plain arithmetic on shapes), so a workspace too small for one rank's
    block raises on all ranks here, before any heavy collective, instead of on that rank alone.
    The ring's blocks are a rank's rows against one rank's columns at a time (at most max M_r + K_r)."""
    n, d = (max(plan.block_sizes) if mode == "ring" else plan.n_total + plan.n_extra), image.shape[1]
    for r, m in enumerate(plan.sizes):
        image_grad, scalar_grad, workspace = bool(col["image_grad"][r]), bool(col["scalar_grad"][r]), col["workspace"][r]
        runs = runs_gradient_pass(image_grad, scalar_grad, plan, scaling)
        try:
            if op in ("clip_loss", "info_nce_loss"):  # the block functions check CLIP's statistics for both
                check_call_workspace(m, n, d, image.dtype, image.device, workspace, stats=True,
                                     panel=(image_grad, plan.text_grad, torch.float32) if runs else None)
            else:
                check_call_workspace(m, n, d, image.dtype, image.device, workspace,
                                     panel=(runs and image_grad, runs and plan.text_grad, torch.float32))
        except ValueError as err:
            columns = (f"{n} columns (the widest ring block)" if mode == "ring"
                       else f"N + K = {n} columns" if plan.n_extra else f"N = {n} columns")
            raise ValueError(f"{caller}: rank {r} (M = {m} rows against {columns}): {err}") from None


def runs_gradient_pass(image_grad: bool, scalar_grad: bool, plan: Plan, scaling: "Scaling") -> bool:
    """Whether a rank computes its block's gradients: for its own inputs, or because another rank
    needs what it contributes (text partials; scalar shares summed over ranks)."""
    return image_grad or plan.text_grad or scalar_grad or (scaling.scalar_total and plan.scalar_grad)


def embedding_checks(image, text, names: tuple = ("image_local", "text_local")):
    check_embedding_pair(image, text, names, ("M", "M"), same_rows="local pairs M")
    if image.dtype not in _DTYPES:
        raise TypeError(f"expected {names[0]} and {names[1]} in one of {_DTYPES}, got {image.dtype}")
