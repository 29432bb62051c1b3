"""Tile sizes and grids of the region kernels (kernels.py), as launch.py launches them.

On the CPU (Triton's interpreter) the tiles are small enough that the tests cross every block edge.
"""
from __future__ import annotations

import torch

from mmkernels.ops._common import triton


def _region_blocks(n_regions: int, dim: int, device: torch.device) -> dict:
    """region_mask's fwd and bwd tiles: CHUNK regions per step of the min_masked scan (fwd only),
    BLOCK_R rows by BLOCK_D features per step of the row stream, and num_warps."""
    if device.type != "cuda":
        return dict(CHUNK=16, BLOCK_R=8, BLOCK_D=64, num_warps=4)
    block_d = min(512, triton.next_power_of_2(dim))
    block_r = min(max(1, 4096 // block_d), triton.next_power_of_2(n_regions))
    chunk = min(1024, triton.next_power_of_2(n_regions))
    return dict(CHUNK=chunk, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


def _region_grid(n_samples: int, dim: int, cfg: dict) -> tuple:
    """region_mask's fwd and bwd grid: one program per (sample, BLOCK_D slice of D)."""
    return (n_samples, triton.cdiv(dim, cfg["BLOCK_D"]))


def _scatter_blocks(block_d: int, on_cuda: bool) -> dict:
    """BLOCK_R and BLOCK_D of the "bert" scatter kernel, given region_mask's BLOCK_D."""
    # 8 x 256 on the GPU: a 64 x 512 tile spilled 1-4 KB per thread (ptxas, sm_80 and sm_90), and
    # 16 x 64 bf16 8-12 bytes on sm_80, whose bf16 atomic add is a compare-and-swap loop
    return dict(BLOCK_R=8 if on_cuda else 4, BLOCK_D=min(256, block_d))


def _scatter_grid(n_rows: int, dim: int, blocks: dict) -> tuple:
    """The scatter kernel's grid: one program per (BLOCK_R flat rows, BLOCK_D slice of D)."""
    return (triton.cdiv(n_rows, blocks["BLOCK_R"]), triton.cdiv(dim, blocks["BLOCK_D"]))


def _loss_blocks(dim: int, device: torch.device) -> dict:
    """masked_region_loss's tiles: BLOCK_R regions by BLOCK_K entries of K, and num_warps."""
    if device.type != "cuda":
        return dict(BLOCK_R=8, BLOCK_K=64, num_warps=4)
    return dict(BLOCK_R=4, BLOCK_K=min(512, triton.next_power_of_2(dim)), num_warps=4)


def _loss_fwd_grid(n_rows: int, cfg: dict) -> tuple:
    """One program per BLOCK_R regions (each streams the whole of K)."""
    return (triton.cdiv(n_rows, cfg["BLOCK_R"]),)


def _loss_bwd_grid(n_rows: int, dim: int, cfg: dict) -> tuple:
    """One program per (BLOCK_R regions, BLOCK_K slice of K) tile."""
    return (triton.cdiv(n_rows, cfg["BLOCK_R"]), triton.cdiv(dim, cfg["BLOCK_K"]))
