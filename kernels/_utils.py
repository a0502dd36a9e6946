"""Shared launcher helpers: block-size heuristics and dtype maps (no autotune for memory-bound ops)."""

from __future__ import annotations

import torch

from kernels._runtime import tl, triton

__all__ = ["accumulator_dtype", "elementwise_tile", "empty_like_contiguous"]


def accumulator_dtype(dtype: torch.dtype):
    """The Triton dtype a kernel computes in: fp32 for fp16/bf16/fp32 inputs (why: one rounding at the store instead
    of one per op, and the Triton interpreter computes fp16/bf16 arithmetic wrongly), fp64 for fp64 inputs (so tests
    can compare against float64 truth at full precision)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def elementwise_tile(n_cols: int, max_elements: int = 4096) -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS, num_warps)`` for a 2-D elementwise tile over rows of ``n_cols`` elements.

    A tile holds about ``max_elements`` elements: enough bytes in flight per program for a bandwidth-bound op, few
    enough registers to avoid spills. ``n_cols`` only sets the *shape* of the tile (powers of two, so a handful of
    compiled variants cover every width); row counts are runtime arguments and never trigger a recompile.
    """
    block_cols = min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    block_rows = max(1, max_elements // block_cols)
    num_warps = 8 if block_rows * block_cols >= 4096 else 4
    return block_rows, block_cols, num_warps


def empty_like_contiguous(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A fresh row-major output with ``like``'s dtype and device (outputs are always dense, whatever the inputs)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)
