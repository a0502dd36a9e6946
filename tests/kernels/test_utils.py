"""kernels/_utils.py: row layouts put unused leading dims last as size 1 (Triton turns those into constants, so
row_offsets compiles without divisions for row-major tensors), and row counts beyond 32-bit indexing are refused."""

from __future__ import annotations

import pytest
import torch

from kernels._utils import MAX_ROWS, check_row_count, row_layout


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
