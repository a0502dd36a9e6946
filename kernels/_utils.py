"""Shared launcher helpers: block-size heuristics and dtype maps (no autotune for memory-bound ops)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kernels._runtime import tl, triton

__all__ = [
    "MAX_FUSED_D",
    "MAX_ROWS",
    "RowLayout",
    "accumulator_dtype",
    "check_row_count",
    "elementwise_tile",
    "empty_like_contiguous",
    "reduction_split",
    "row_layout",
    "row_offsets",
    "row_tile",
    "shared_row_layout",
]

#: Widest row a fused row kernel (norms, RoPE) holds in registers: one program owns whole rows, so the statistics of
#: a row need no second pass over memory. 8192 fp32 values is 16 per thread at 16 warps; wider rows would spill.
MAX_FUSED_D = 8192


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


def row_tile(n_cols: int, op: str, max_elements: int = 4096) -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_D, num_warps)`` for a kernel that keeps whole rows of ``n_cols`` in registers.

    ``BLOCK_D = next_power_of_2(n_cols)`` (one row per tile row, masked past ``n_cols``); ``BLOCK_ROWS`` fills the
    tile to about ``max_elements`` (the multi-row variant for narrow rows such as FLUX's qk-norm, D = 128: one program
    per row would leave most lanes idle); 16 elements per thread sets ``num_warps`` (4 to 16). Only ``n_cols`` shapes
    the tile, so row counts never trigger a recompile. Raises ``RuntimeError`` above :data:`MAX_FUSED_D`.
    """
    if n_cols > MAX_FUSED_D:
        raise RuntimeError(
            f"{op}: the last dim D = {n_cols} exceeds the fused limit of {MAX_FUSED_D} (a row must fit in one "
            f"program's registers); use the reference `kernels.reference` for wider rows"
        )
    block_d = triton.next_power_of_2(max(n_cols, 1))
    block_rows = max(1, max_elements // block_d)
    num_warps = max(4, min(16, block_rows * block_d // 512))
    return block_rows, block_d, num_warps


#: Programs per reduction when there is no GPU to size for (the interpreter runs programs one after another).
_CPU_REDUCTION_PROGRAMS = 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_split(n_tiles: int, groups: int, device: torch.device) -> tuple[int, int]:
    """``(programs per group, tiles per program)`` for a backward that also reduces a parameter gradient.

    Each program loops over a contiguous range of row tiles and writes *one* partial sum per group (sample), so the
    partial buffer is about 4 × (SM count) rows of D instead of one row per tile (which would double the backward's
    memory traffic). The split depends on the device, not on timing: the ordered sum of the partials is deterministic
    run to run on one device.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = 4 * _sm_count(index)
    else:
        target = _CPU_REDUCTION_PROGRAMS
    n_tiles = max(n_tiles, 1)
    per_group = max(1, min(n_tiles, triton.cdiv(target, max(groups, 1))))
    tiles_per_program = triton.cdiv(n_tiles, per_group)
    return triton.cdiv(n_tiles, tiles_per_program), tiles_per_program


class RowLayout:
    """The rows of ``shape[:-1]`` as three leading dims ``(R0, R1, R2)``, and each tensor's strides over them.

    Row ``r`` of ``R0·R1·R2`` sits at ``(r // (R1·R2)) · s0 + (r // R2 % R1) · s1 + (r % R2) · s2`` and its element
    ``d`` at ``d · sd``: any view whose leading dims merge into at most three (every rank ≤ 4 tensor, and e.g. a
    (B, N, H, D).transpose(1, 2) view) is read in place, without a copy.
    """

    def __init__(self, sizes: tuple[int, int, int], strides: list[tuple[int, int, int, int]]) -> None:
        self.sizes = sizes
        self.strides = strides

    @property
    def n_rows(self) -> int:
        return self.sizes[0] * self.sizes[1] * self.sizes[2]


def row_layout(shape: Sequence[int], *tensors: torch.Tensor, max_leading: int = 3) -> RowLayout | None:
    """A :class:`RowLayout` shared by ``tensors`` (all of ``shape``), or ``None`` when their leading dims do not merge
    into ``max_leading`` dims (the caller then reports the strides as unsupported; nothing is copied silently).

    Two adjacent leading dims merge when every tensor steps over them as over one dim (``stride[i] == stride[i+1] ·
    size[i+1]``); size-1 dims are dropped (their stride is never used). Unused dims are padded at the *end* as size 1
    (``(n_rows, 1, 1)`` for a row-major tensor): Triton specialises an integer argument equal to 1 into a constant,
    so :func:`row_offsets` compiles without a single division for the common single-dim layout.
    """
    merged: list[tuple[int, list[int]]] = []
    for dim in range(len(shape) - 1):
        size = shape[dim]
        if size == 1:
            continue
        strides = [t.stride(dim) for t in tensors]
        if merged and all(prev == s * size for prev, s in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * size, strides)
        else:
            merged.append((size, strides))
    if len(merged) > max_leading:
        return None
    pad = max_leading - len(merged)
    sizes = tuple(size for size, _ in merged) + (1,) * pad
    per_tensor = [
        tuple(strides[i] for _, strides in merged) + (0,) * pad + ((t.stride(-1) if t.dim() else 1),)
        for i, t in enumerate(tensors)
    ]
    return RowLayout(sizes, per_tensor)  # type: ignore[arg-type]


def shared_row_layout(*tensors: torch.Tensor) -> tuple[RowLayout, tuple[torch.Tensor, ...]]:
    """The shared :class:`RowLayout` of ``tensors`` (one shape) and the tensors to launch on.

    Public APIs check their inputs have one (and raise otherwise); only a tensor PyTorch hands to a ``jvp`` or
    ``backward`` (a tangent, a gradient) can lack it, and those are made contiguous rather than failing.
    """
    layout = row_layout(tensors[0].shape, *tensors)
    if layout is None:
        tensors = tuple(t.contiguous() for t in tensors)
        layout = row_layout(tensors[0].shape, *tensors)
    assert layout is not None  # contiguous tensors of one shape always share a layout
    return layout, tensors


@triton.jit
def row_offsets(rows, R1, R2, stride_0, stride_1, stride_2):
    """int64 offsets of flat row indices in a (R0, R1, R2) leading-dim layout (see :class:`RowLayout`).

    The index arithmetic is 32-bit (row counts stay below 2³¹: launchers check with :func:`check_row_count`): a
    64-bit integer division is a ~70-instruction subroutine per row on NVIDIA GPUs, a 32-bit one a few instructions,
    and R1 = R2 = 1 (constants after Triton's specialisation) needs none. Only the products with strides are int64.
    """
    r = rows.to(tl.int32)
    i2 = r % R2
    i01 = r // R2
    return (i01 // R1).to(tl.int64) * stride_0 + (i01 % R1).to(tl.int64) * stride_1 + i2.to(tl.int64) * stride_2


#: Largest row (or tile) count a launcher may pass to kernels that index rows in 32-bit arithmetic.
MAX_ROWS = 2**31 - 1


def check_row_count(op: str, n_rows: int) -> None:
    """Raise ``ValueError`` when ``n_rows`` exceeds :data:`MAX_ROWS` (32-bit row indices in the kernels)."""
    if n_rows > MAX_ROWS:
        raise ValueError(f"{op}: expected at most {MAX_ROWS} rows (product of the leading dims), got {n_rows}")
