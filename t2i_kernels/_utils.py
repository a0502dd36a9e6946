"""Shared launcher helpers: block-size heuristics and dtype maps (no autotune for memory-bound ops)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from t2i_kernels._runtime import tl, triton

__all__ = [
    "MAX_FUSED_D",
    "MAX_CHUNKS",
    "MAX_FUSED_D_CHUNKED",
    "MAX_PER_THREAD",
    "MAX_ROWS",
    "RowLayout",
    "RowTile",
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

#: Widest row a fused row kernel (norms, RoPE) holds in registers by default: one program owns whole rows, so the
#: statistics of a row need no second pass over memory. 8192 fp32 values is 16 per thread at 16 warps.
MAX_FUSED_D = 8192
#: The limit for a kernel that opts in (rms_norm): 12288 (FLUX's MLP width) is 3 chunks of 4096, 24 fp32 values per
#: thread per row tensor at 16 warps. At 16 warps a thread has at most 128 registers: the sm_90 compile report shows
#: rms_norm's backward (two row tensors and a partial) within them, layer_norm_modulate's (two more partials)
#: spilling, so that op keeps :data:`MAX_FUSED_D`.
MAX_FUSED_D_CHUNKED = 12288
#: Elements of one row tile per thread that :func:`row_tile` allows when it trades warps for load width.
MAX_PER_THREAD = 24


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


class RowTile(NamedTuple):
    """How a row kernel tiles whole rows: ``BLOCK_ROWS`` rows × ``CHUNKS`` register chunks of ``BLOCK_D`` lanes."""

    block_rows: int
    block_d: int
    chunks: int
    num_warps: int


#: Narrowest chunk :func:`_chunking` splits a row into: below it the unrolled code per chunk outweighs the lanes it
#: saves (rows that narrow already share a program in the multi-row tile).
MIN_CHUNK_D = 128
#: At most this many register chunks per row (each chunk is unrolled code; 3 covers FLUX's 3072 and 12288).
MAX_CHUNKS = 8


def _chunking(n_cols: int, max_chunks: int) -> tuple[int, int]:
    """``(BLOCK_D, CHUNKS)``: the fewest power-of-two lanes ``CHUNKS·BLOCK_D ≥ n_cols`` (fewer chunks on ties)."""
    best = (triton.next_power_of_2(max(n_cols, 1)), 1)
    for chunks in range(2, max_chunks + 1):
        block = triton.next_power_of_2(triton.cdiv(n_cols, chunks))
        if block < MIN_CHUNK_D or triton.cdiv(n_cols, block) < chunks:  # too narrow, or the last chunk is empty
            continue
        if block * chunks < best[0] * best[1]:
            best = (block, chunks)
    return best


def row_tile(n_cols: int, op: str, max_elements: int = 4096, max_chunks: int = 1, max_d: int = MAX_FUSED_D) -> RowTile:
    """The :class:`RowTile` of a kernel that keeps whole rows of ``n_cols`` in registers.

    ``tl.arange`` needs power-of-two sizes, so a row is held as ``CHUNKS`` tensors of ``BLOCK_D`` lanes (a Triton
    tuple, unrolled): the fewest lanes that cover the row (:func:`_chunking`), so D = 3072 is 3 × 1024 and 12288 is
    3 × 4096 with no masked lane, where one power-of-two block (4096, 16384) masks a quarter of them. ``max_chunks =
    1`` (a kernel without chunk loops) gives ``BLOCK_D = next_power_of_2(n_cols)``, masked past ``n_cols``.
    ``BLOCK_ROWS`` (a power of two) fills the tile to about ``max_elements`` (the multi-row variant for narrow rows
    such as FLUX's qk-norm, D = 128: one program per row would leave most lanes idle). ``num_warps`` is the fewest
    (4 to 16) giving at most 16 elements per thread (24 at 16 warps for D = 12288), halved while a chunk has fewer
    than 8 per thread and the whole tile stays within :data:`MAX_PER_THREAD` per thread (why: 8 bf16 lanes make one
    128-bit load; Triton's coalescing narrows the vector when a chunk has fewer elements per thread). Only
    ``n_cols`` shapes the tile, so row counts never trigger a recompile. Raises ``RuntimeError`` above ``max_d`` (at
    most :data:`MAX_FUSED_D_CHUNKED`, and only with chunks above :data:`MAX_FUSED_D`: one block of 16384 lanes would
    be 32 values per thread).
    """
    assert max_d <= (MAX_FUSED_D_CHUNKED if max_chunks > 1 else MAX_FUSED_D)
    if n_cols > max_d:
        raise RuntimeError(
            f"{op}: the last dim D = {n_cols} exceeds the fused limit of {max_d} (a row must fit in one "
            f"program's registers); use the reference `t2i_kernels.reference` for wider rows"
        )
    block_d, chunks = _chunking(n_cols, max_chunks)
    block_rows = _prev_power_of_2(max(1, max_elements // (block_d * chunks)))
    per_chunk = block_rows * block_d
    num_warps = max(4, min(16, triton.next_power_of_2(triton.cdiv(per_chunk * chunks, 512))))
    # Halve while a chunk gives a thread fewer than 8 elements and the halved count (16·num_warps threads) keeps the
    # whole tile within MAX_PER_THREAD per thread.
    while num_warps > 4 and per_chunk < 8 * 32 * num_warps and per_chunk * chunks <= MAX_PER_THREAD * 16 * num_warps:
        num_warps //= 2
    return RowTile(block_rows, block_d, chunks, num_warps)


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


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


# ----------------------------------------------------------------------------------------------------------------
# Rows held as CHUNKS register tensors (see row_tile): a Triton tuple, unrolled at compile time
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def chunk_mask(row_mask, D, c: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rows, BLOCK_D) mask of chunk ``c``: a valid row and a column below D (false only in the last chunk's tail)."""
    offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    return row_mask[:, None] & (offs_d < D)[None, :]


@triton.jit
def load_chunks(ptr, row_offs, row_mask, stride_d, D, ACC: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows starting at ``ptr + row_offs`` (element stride ``stride_d``) as a tuple of CHUNKS (rows, BLOCK_D) tensors
    in ACC, chunk c holding columns [c·BLOCK_D, (c + 1)·BLOCK_D); masked rows and columns past D hold 0."""
    out = ()
    for c in tl.static_range(CHUNKS):
        offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = chunk_mask(row_mask, D, c, BLOCK_D)
        out = out + (tl.load(ptr + row_offs[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(ACC),)
    return out


@triton.jit
def load_vector_chunks(ptr, stride_d, D, ACC: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (D,) vector (a weight, a per-sample modulation row) as a tuple of CHUNKS (BLOCK_D,) tensors; 0 past D."""
    out = ()
    for c in tl.static_range(CHUNKS):
        offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        out = out + (tl.load(ptr + offs_d * stride_d, mask=offs_d < D, other=0.0).to(ACC),)
    return out


@triton.jit
def store_chunk(ptr, row_offs, row_mask, D, value, c: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store chunk ``c`` of rows starting at ``ptr + row_offs`` with unit column stride (outputs are row-major)."""
    offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    tl.store(ptr + row_offs[:, None] + offs_d[None, :], value.to(ptr.dtype.element_ty),
             mask=chunk_mask(row_mask, D, c, BLOCK_D))


@triton.jit
def row_sum(a, CHUNKS: tl.constexpr):
    """Σ over a row held as chunks. The chunks share one layout, so they are added lane by lane first and reduced
    once (why: each tl.sum over a row spread across warps is a shared-memory round trip and a barrier)."""
    total = a[0]
    for c in tl.static_range(1, CHUNKS):
        total += a[c]
    return tl.sum(total, axis=1)


@triton.jit
def row_dot(a, b, CHUNKS: tl.constexpr):
    """Σ a⊙b over a row held as chunks (one cross-warp reduction, as :func:`row_sum`)."""
    total = a[0] * b[0]
    for c in tl.static_range(1, CHUNKS):
        total += a[c] * b[c]
    return tl.sum(total, axis=1)


@triton.jit
def zero_chunks(BLOCK_ROWS: tl.constexpr, ACC: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr):
    """CHUNKS zero (BLOCK_ROWS, BLOCK_D) tensors: the loop-carried 2-D partial sums of a backward."""
    out = ()
    for c in tl.static_range(CHUNKS):
        out = out + (tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=ACC),)
    return out
