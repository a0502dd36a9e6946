"""The parity helper and the tolerance table."""

from __future__ import annotations

import pytest
import torch

from t2i_kernels import testing


def test_every_table_entry_is_sane():
    assert testing.TOLERANCES
    for (op, quantity, dtype), tol in testing.TOLERANCES.items():
        assert isinstance(op, str) and isinstance(quantity, str) and dtype.is_floating_point
        assert tol.atol >= 0 and tol.rtol >= 0 and tol.k >= 1


def test_missing_entry_is_an_error_not_a_default():
    with pytest.raises(KeyError, match="no tolerance for op='nope'"):
        testing.tolerance("nope", "out", torch.float32)


def test_passes_when_no_worse_than_twice_torch():
    truth = torch.linspace(-1, 1, 101, dtype=torch.float64)
    torch_result = truth + 1e-3
    ours = truth - 1.9e-3  # error 1.9e-3 <= 2 * 1e-3 + atol
    report = testing.parity_report("gated_residual", "out", ours.float(), torch_result.float(), truth)
    assert report.passed, str(report)
    assert "PASS" in str(report)


def test_fails_and_lists_first_bad_indices():
    truth = torch.zeros(4, 5, dtype=torch.float64)
    torch_result = truth + 1e-7
    ours = truth.clone()
    ours[2, 3] = 0.5
    ours[3, 0] = float("nan")
    report = testing.parity_report("gated_residual", "out", ours.float(), torch_result.float(), truth)
    assert not report.passed
    assert report.mismatches == 2 and report.non_finite == 1
    text = str(report)
    assert "FAIL" in text and "(2, 3)" in text and "(3, 0)" in text and "2/20" in text
    with pytest.raises(AssertionError, match=r"\(2, 3\)"):
        testing.assert_parity("gated_residual", "out", ours.float(), torch_result.float(), truth)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="shapes differ"):
        testing.parity_report("gated_residual", "out", torch.zeros(3), torch.zeros(3), torch.zeros(4))
