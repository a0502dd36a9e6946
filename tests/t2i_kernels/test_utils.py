"""t2i_kernels/_utils.py: row layouts put unused leading dims last as size 1 (Triton turns those into constants, so
row_offsets compiles without divisions for row-major tensors), and row counts beyond 32-bit indexing are refused."""

from __future__ import annotations

import pytest
import torch

from t2i_kernels._utils import (
    MAX_CHUNKS,
    MAX_FUSED_D,
    MAX_FUSED_D_CHUNKED,
    MAX_PER_THREAD,
    MAX_ROWS,
    check_row_count,
    row_layout,
    row_tile,
)


def _row_start(layout, i, r):
    """Where row r starts in tensor i, by the RowLayout formula."""
    (_, r1, r2), (s0, s1, s2, _) = layout.sizes, layout.strides[i]
    return (r // (r1 * r2)) * s0 + (r // r2 % r1) * s1 + (r % r2) * s2


def test_row_major_tensor_is_one_leading_dim_padded_at_the_end():
    x = torch.empty(2, 3, 4, 5)
    layout = row_layout(x.shape, x)
    assert layout.sizes == (24, 1, 1) and layout.strides == [(5, 0, 0, 1)]


@pytest.mark.parametrize("make", [
    lambda: torch.empty(2, 7, 3, 4).transpose(1, 2),  # FLUX's (B, N, H, D) viewed as (B, H, N, D): three dims
    lambda: torch.empty(1, 7, 3, 4).transpose(1, 2),  # batch 1: two dims
    lambda: torch.empty(5, 6, 8)[:, :, :4],  # sliced last dim: rows of 4 with row stride 8
])
def test_every_row_is_found_where_the_tensor_keeps_it(make):
    x = make()
    layout = row_layout(x.shape, x)
    flat = torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).reshape(-1, x.dim() - 1)  # row-major order
    assert layout.n_rows == len(flat)
    for r, idx in enumerate(flat):
        expected = sum(int(i) * s for i, s in zip(idx, x.stride()[:-1]))
        assert _row_start(layout, 0, r) == expected, (r, idx)
    assert layout.sizes[-1] == 1 or len([s for s in x.shape[:-1] if s > 1]) == 3  # padding goes last


def test_row_counts_beyond_32_bit_indexing_are_refused():
    check_row_count("op", MAX_ROWS)
    with pytest.raises(ValueError, match=r"op: expected at most 2147483647 rows .* got 2147483648"):
        check_row_count("op", MAX_ROWS + 1)


@pytest.mark.parametrize("d, tile", [
    (128, (32, 128, 1, 8)),  # FLUX's qk-norm: the multi-row tile, unchanged by chunking
    (3072, (1, 1024, 3, 4)),  # FLUX's hidden width: 3 chunks of 1024, 8 bf16 lanes (128 bits) per thread per chunk
    (12288, (1, 4096, 3, 16)),  # FLUX's MLP width: 3 chunks of 4096
    (384, (8, 128, 3, 4)),  # 3 chunks of 128 in a multi-row tile (rows rounded down to a power of two)
    (4096, (1, 4096, 1, 8)),  # a power of two needs one chunk
])
def test_row_tile_covers_flux_widths_without_masked_lanes(d, tile):
    assert tuple(row_tile(d, "op", max_chunks=MAX_CHUNKS, max_d=MAX_FUSED_D_CHUNKED)) == tile


def test_row_tile_without_chunks_is_one_power_of_two_block():
    assert tuple(row_tile(3072, "op")) == (1, 4096, 1, 8)
    assert tuple(row_tile(128, "op")) == (32, 128, 1, 8)


@pytest.mark.parametrize("d", list(range(1, 600, 7)) + list(range(600, MAX_FUSED_D_CHUNKED + 1, 997)) + [5120, 7168])
def test_row_tile_invariants_at_every_width(d):
    t = row_tile(d, "op", max_chunks=MAX_CHUNKS, max_d=MAX_FUSED_D_CHUNKED)
    lanes = t.block_d * t.chunks
    for n in (t.block_rows, t.block_d, t.num_warps):
        assert n & (n - 1) == 0  # tl.arange and num_warps need powers of two
    assert lanes >= d and (t.chunks - 1) * t.block_d < d  # covers the row; no chunk entirely past D
    assert 4 <= t.num_warps <= 16 and t.chunks <= MAX_CHUNKS
    per_thread = t.block_rows * lanes // (32 * t.num_warps)
    assert per_thread <= MAX_PER_THREAD
    if d <= MAX_FUSED_D:  # never more lanes than the unchunked block
        assert lanes <= row_tile(d, "op").block_d


def test_row_tile_refuses_rows_above_its_limit():
    with pytest.raises(RuntimeError, match=f"D = {MAX_FUSED_D + 1} exceeds the fused limit of {MAX_FUSED_D}"):
        row_tile(MAX_FUSED_D + 1, "op", max_chunks=MAX_CHUNKS)
    with pytest.raises(RuntimeError, match=f"fused limit of {MAX_FUSED_D_CHUNKED}"):
        row_tile(MAX_FUSED_D_CHUNKED + 1, "op", max_chunks=MAX_CHUNKS, max_d=MAX_FUSED_D_CHUNKED)
