"""The plan of the contrastive kernels: their tiles, the workspace's size and layout, the grids.

Plain Python on shapes only: the public functions size the workspace with it before any launch
(too small for one block of rows raises a ValueError naming the minimum).

Workspace. Beyond O((M + N)·D) buffers (the fp32 gradient accumulator of the text side, fp32 copies
of fp16 operands, the gradients themselves) and O(M + N) statistics, every buffer comes from one
workspace of at most `workspace_bytes`; the panel height derives from it. W is bf16 for bf16 inputs
(its products then accumulate in fp32 through torch.mm(..., out_dtype=torch.float32) where the
torch build has it) and fp32 otherwise (fp16 would underflow: W's entries are ~1/N).
"""
from __future__ import annotations

import numbers
import os

import torch

from mmkernels.ops._common import new_output

DEFAULT_WORKSPACE_BYTES = 256 * 2**20
WORKSPACE_ENV = "MMKERNELS_WORKSPACE_BYTES"
_ALIGN = 256  # bytes between the workspace's regions
_W_ROW_ALIGN = 8  # W's row stride, in elements: cuBLAS wants 16-byte aligned leading dimensions


def resolve_workspace_bytes(workspace_bytes) -> int:
    """The workspace size: `workspace_bytes`, else $MMKERNELS_WORKSPACE_BYTES, else 256 MiB."""
    name = "workspace_bytes"
    if workspace_bytes is None:
        env = os.environ.get(WORKSPACE_ENV)
        if env is None:
            return DEFAULT_WORKSPACE_BYTES
        name = f"${WORKSPACE_ENV}"
        try:
            workspace_bytes = int(env)
        except ValueError:
            raise ValueError(f"expected {name} to be a whole number of bytes, got {env!r}") from None
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, numbers.Integral):
        raise TypeError(f"expected {name} to be an int (bytes), got {type(workspace_bytes).__name__}")
    if workspace_bytes <= 0:
        raise ValueError(f"expected {name} > 0, got {workspace_bytes}")
    return int(workspace_bytes)


# --------------------------------------------------------------------------- tiles


def gpu_tile_config(d: int, dtype: torch.dtype) -> dict:
    """The GPU's tiles: 64×64 logits per program (one warpgroup of 4 warps: wgmma on sm_90) over
    BLOCK_K-wide steps of D; the same tiles in every pass, so a logit comes out the same in each.

    Sized by ptxas (tests/compile_check.py): at 64×64 and 4 warps no kernel spills and each fits
    two or more blocks per SM on sm_80 and sm_90. 64×128 (4 warps) and 128×128 (8 warps) spill
    hundreds of bytes per thread in the gradient pass: its softmax terms (the logit, W, each
    column's float64 log-sum-exp split into two fp32 values) stay live across the tile. fp32
    inputs (FMA products) take BLOCK_K = 16: at 32 the statistics pass spills on sm_80.
    A D that is not a multiple of 16 (the rows' stride: no 16-element alignment, so the loads are
    neither vectorised nor asynchronous copies and every element keeps its own address) takes
    BLOCK_K = 32 for fp16/bf16 and no software pipelining for fp32: otherwise the statistics pass
    spills 16-52 bytes per thread on sm_80.

    `programs`: at least this many programs per launch of the statistics pass, which splits the
    columns when a panel has few row blocks (1024: several waves on any current GPU).
    """
    width = max(16, 1 << (d - 1).bit_length())
    aligned = d % 16 == 0
    block_k = 16 if dtype == torch.float32 else (64 if aligned else 32)
    stages = 1 if dtype == torch.float32 and not aligned else 3
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(block_k, width), num_warps=4, num_stages=stages,
                programs=1024)


def cpu_tile_config(d: int, dtype: torch.dtype) -> dict:
    """The interpreter's tiles: 64×64, large enough to keep the interpreted block operations few,
    small enough that the tests' shapes take several tiles and several steps of D."""
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1, programs=1)


def tile_config(d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The tiles the launchers use on `device` (tests substitute gpu_tile_config under the interpreter).
    Plain Python on shapes only, so that the public functions can size the workspace before a launch."""
    if device.type == "cuda":
        return gpu_tile_config(d, dtype)
    return cpu_tile_config(d, dtype)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products, as the fp32 eager formula (tf32 would be ~1e-3 off)
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


class _Layout:
    """Regions carved out of one uint8 workspace, each aligned to _ALIGN bytes."""

    def __init__(self, regions: dict):
        self.regions = {name: spec for name, spec in regions.items() if spec is not None}
        self.nbytes = sum(_round_up(_numel(shape) * dtype.itemsize, _ALIGN) for shape, dtype in self.regions.values())

    def carve(self, device) -> dict:
        buffer = new_output((self.nbytes,), torch.uint8, device)
        views, start = {}, 0
        for name, (shape, dtype) in self.regions.items():
            size = _numel(shape) * dtype.itemsize
            views[name] = buffer[start:start + size].view(dtype).view(shape)
            start += _round_up(size, _ALIGN)
        return views


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------- workspace


def _largest_panel(m: int, block_m: int, layout_of, workspace_bytes: int, what: str) -> tuple[int, _Layout]:
    """The most rows per panel (a multiple of block_m, at most m) whose layout fits the workspace."""
    if m == 0:
        return 0, layout_of(0)
    lo, hi = 1, -(-m // block_m)
    smallest = layout_of(min(block_m, m))
    if smallest.nbytes > workspace_bytes:
        raise ValueError(
            f"expected workspace_bytes >= {smallest.nbytes} (one block of {min(block_m, m)} rows of S for "
            f"{what}), got {workspace_bytes}"
        )
    while lo < hi:  # the largest k with layout_of(k·block_m) fitting; the bytes grow with k
        mid = (lo + hi + 1) // 2
        if layout_of(min(mid * block_m, m)).nbytes <= workspace_bytes:
            lo = mid
        else:
            hi = mid - 1
    rows = min(lo * block_m, m)
    return rows, layout_of(rows)


def column_splits(row_blocks: int, n: int, cfg: dict) -> tuple[int, int]:
    """(splits, columns per split) so that row_blocks · splits reaches cfg["programs"] when it can."""
    tiles = -(-n // cfg["BLOCK_N"])
    splits = max(1, min(tiles, -(-cfg["programs"] // max(row_blocks, 1))))
    per_split = -(-tiles // splits) * cfg["BLOCK_N"]
    return -(-n // per_split), per_split


def _stats_layout(rows: int, n: int, cfg: dict, columns: bool = True) -> _Layout:
    row_blocks = -(-rows // cfg["BLOCK_M"])
    splits, _ = column_splits(row_blocks, n, cfg)
    f32 = torch.float32
    col = ((row_blocks, n), f32) if columns else None
    return _Layout({"col_m": col, "col_l": col, "row": ((5, splits, rows), f32)})


def stats_plan(m: int, n: int, cfg: dict, workspace_bytes: int, columns: bool) -> tuple[int, _Layout]:
    return _largest_panel(m, cfg["BLOCK_M"], lambda r: _stats_layout(r, n, cfg, columns), workspace_bytes,
                          "the CLIP statistics" if columns else "the row statistics")


def stats_grid(rows: int, n: int, cfg: dict) -> tuple[tuple[int, int], int]:
    """((row blocks, column splits), columns per split) of one launch of the statistics pass over
    a panel of `rows` rows against n columns."""
    row_blocks = -(-rows // cfg["BLOCK_M"])
    splits, per_split = column_splits(row_blocks, n, cfg)
    return (row_blocks, splits), per_split


def stats_panel_bytes(rows: int, n: int, d: int, dtype, device, columns: bool = True) -> int:
    """Workspace bytes that clip_stats uses for a panel of `rows` rows against n columns."""
    return _stats_layout(rows, n, tile_config(d, dtype, device), columns).nbytes


def stats_workspace(m: int, n: int, d: int, dtype, device, workspace_bytes: int, columns: bool = True) -> int:
    """Rows per panel of clip_stats; raises ValueError (naming the minimum) if the workspace is too small."""
    return stats_plan(m, n, tile_config(d, dtype, device), workspace_bytes, columns)[0]


def _w_dtype(dtype: torch.dtype) -> torch.dtype:
    """W's dtype: bf16 for bf16 inputs, else fp32 (fp16's range would lose W's small entries)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _panel_layout(rows: int, n: int, d: int, cfg: dict, w_dtype, write_w: bool, image_buffer: bool) -> _Layout:
    row_blocks = -(-rows // cfg["BLOCK_M"])
    col_blocks = -(-n // cfg["BLOCK_N"])
    return _Layout({
        "w": ((rows, _round_up(n, _W_ROW_ALIGN)), w_dtype) if write_w else None,
        "image": ((rows, d), torch.float32) if image_buffer else None,
        "part": ((3, row_blocks, col_blocks), torch.float32),
    })


def panel_plan(m, n, d, dtype, device, image_grad, text_grad, grad_dtype, workspace_bytes):
    cfg = tile_config(d, dtype, device)
    w_dtype = _w_dtype(dtype)
    write_w = image_grad or text_grad
    image_buffer = image_grad and grad_dtype != torch.float32
    rows, layout = _largest_panel(
        m, cfg["BLOCK_M"], lambda r: _panel_layout(r, n, d, cfg, w_dtype, write_w, image_buffer), workspace_bytes,
        "the gradient pass" if write_w else "the loss pass",
    )
    return cfg, w_dtype, rows, layout


def panel_grid(rows: int, n: int, cfg: dict) -> tuple[int, int]:
    """(row blocks, column blocks) of one launch of the gradient pass: one program per tile of S."""
    return -(-rows // cfg["BLOCK_M"]), -(-n // cfg["BLOCK_N"])


def panel_bytes(rows, n, d, dtype, device, image_grad, text_grad, grad_dtype) -> int:
    """Workspace bytes that panel_pass uses for a panel of `rows` rows against n columns."""
    cfg = tile_config(d, dtype, device)
    return _panel_layout(rows, n, d, cfg, _w_dtype(dtype), image_grad or text_grad,
                         image_grad and grad_dtype != torch.float32).nbytes


def panel_workspace(m, n, d, dtype, device, image_grad, text_grad, grad_dtype, workspace_bytes) -> int:
    """Rows per panel of panel_pass; raises ValueError (naming the minimum) if the workspace is too small."""
    return panel_plan(m, n, d, dtype, device, image_grad, text_grad, grad_dtype, workspace_bytes)[2]


def check_call_workspace(m: int, n: int, d: int, dtype, device, workspace_bytes: int, *, stats: bool = False,
                         columns: bool = True, panel: tuple | None = None) -> None:
    """Raise ValueError unless the workspace holds one block of rows in every pass that a call runs:
    clip_stats (`stats`, with or without `columns`) and panel_pass (`panel` = (image_grad, text_grad,
    grad_dtype)). The minimum named is the largest over those passes, so that the size named works
    for the whole call (a pass checked alone would name its own, too small for the next pass)."""
    cfg = tile_config(d, dtype, device)
    rows = min(cfg["BLOCK_M"], m)
    if rows == 0:
        return
    needs = {}
    if stats:
        needs["the CLIP statistics" if columns else "the row statistics"] = _stats_layout(rows, n, cfg, columns).nbytes
    if panel is not None:
        image_grad, text_grad, grad_dtype = panel
        write_w = image_grad or text_grad
        layout = _panel_layout(rows, n, d, cfg, _w_dtype(dtype), write_w, image_grad and grad_dtype != torch.float32)
        needs["the gradient pass" if write_w else "the loss pass"] = layout.nbytes
    need = max([0, *needs.values()])
    if need > workspace_bytes:
        raise ValueError(
            f"expected workspace_bytes >= {need} (one block of {rows} rows of S for {' and '.join(needs)}), "
            f"got {workspace_bytes}"
        )
