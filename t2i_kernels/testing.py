"""The one tolerance table of the project, and the parity rule every kernel test and benchmark applies.

The rule (flash-attention's "no worse than PyTorch", per element)::

    |ours − truth| ≤ k · err_torch + atol + rtol · max|truth|      with err_torch = max |torch_same_precision − truth|

``truth`` is the reference computed in float64 (for tangents: the analytic ``<op>_jvp`` or ``torch.func.jvp`` of the
reference, in float64); ``torch_same_precision`` is the reference run in the kernel's dtype. So a kernel may be at
most ``k`` times less accurate than PyTorch itself, plus a noise floor that matters only where PyTorch happens to be
exact. Tests look their bounds up here, keyed by ``(op, quantity, dtype)``, and never hard-code numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["TOLERANCES", "ParityReport", "Tolerance", "assert_parity", "parity_report", "tolerance"]


@dataclass(frozen=True)
class Tolerance:
    """``k`` × PyTorch's own error, plus ``atol`` + ``rtol`` · max|truth| of headroom."""

    atol: float
    rtol: float = 0.0
    k: float = 2.0


# Noise floors. fp64 kernels must agree with the float64 truth to rounding; fp32 floors are a few ulps of O(1)
# values (CPU interpreter); fp16/bf16 floors are one ulp at O(1) (GPU), since both PyTorch and the kernel round
# their outputs to the storage dtype. Reductions (dgate sums over the sequence) get an rtol because their rounding
# grows with the length summed.
_ELEMENTWISE = {
    torch.float64: Tolerance(atol=1e-12),
    torch.float32: Tolerance(atol=1e-6),
    torch.float16: Tolerance(atol=1e-3),
    torch.bfloat16: Tolerance(atol=8e-3),
}
_REDUCTION = {
    torch.float64: Tolerance(atol=1e-12, rtol=1e-12),
    torch.float32: Tolerance(atol=1e-6, rtol=1e-6),
    torch.float16: Tolerance(atol=1e-3, rtol=1e-3),
    torch.bfloat16: Tolerance(atol=8e-3, rtol=8e-3),
}

#: ``(op, quantity, dtype) -> Tolerance``. Quantities: ``out``, ``tangent``, and ``d<input>`` for gradients.
TOLERANCES: dict[tuple[str, str, torch.dtype], Tolerance] = {
    **{("gated_residual", q, dt): tol for q in ("out", "tangent", "dx", "dy") for dt, tol in _ELEMENTWISE.items()},
    **{("gated_residual", "dgate", dt): tol for dt, tol in _REDUCTION.items()},
    # Norms, RoPE, GELU-tanh: outputs, tangents and dx are per-element values of O(1) (row statistics round like one
    # more op); the parameter gradients sum over every row, so they get the reduction rtol.
    **{
        (op, q, dt): tol
        for op in ("rms_norm", "layer_norm_modulate", "rope", "qk_norm_rope", "gelu_tanh")
        for q in ("out", "tangent", "dx")
        for dt, tol in _ELEMENTWISE.items()
    },
    **{
        (op, q, dt): tol
        for op, q in (("rms_norm", "dweight"), ("qk_norm_rope", "dweight"), ("layer_norm_modulate", "dscale"),
                      ("layer_norm_modulate", "dshift"))
        for dt, tol in _REDUCTION.items()
    },
}

# Attention (fp32 on the CPU interpreter, half precision on GPUs): outputs are O(1) weighted means, gradients and
# tangents sum over the sequence, so every quantity gets a small rtol on top of a few-ulp floor.
_ATTENTION = {
    torch.float32: Tolerance(atol=2e-6, rtol=1e-6),
    torch.float16: Tolerance(atol=1e-3, rtol=1e-3),
    torch.bfloat16: Tolerance(atol=8e-3, rtol=8e-3),
}
TOLERANCES.update({
    ("attention", q, dt): tol
    for q in ("out", "tangent", "lse", "dq", "dk", "dv") for dt, tol in _ATTENTION.items()
})

# Whole FLUX models (patched vs unpatched, explicit dual forward vs torch.func.jvp): errors compound over blocks, so
# the factor is flash-attention's model-level 3× (house style rule 17); parameter gradients get a reduction rtol.
_MODEL = {
    torch.float32: Tolerance(atol=1e-5, rtol=1e-6, k=3.0),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3, k=3.0),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=1.6e-2, k=3.0),
}
TOLERANCES.update({("flux_model", q, dt): tol for q in ("out", "tangent", "dparam") for dt, tol in _MODEL.items()})

#: GPU acceptance bound of the issue: ‖tO_bf16 − tO_fp32‖ / ‖tO_fp32‖ for bf16 inputs (the bf16 math path's own
#: error; rCM's kernel reaches 2.3e-3), measured at FLUX shapes by tests/t2i_kernels/test_attention.py and gpu_check.
ATTENTION_BF16_TANGENT_REL_ERROR = 1.7e-3

#: Analytic tangent formulas of :mod:`t2i_kernels.reference` vs ``torch.func.jvp`` of the reference, float64.
REFERENCE_JVP_ATOL = 1e-10


def tolerance(op: str, quantity: str, dtype: torch.dtype) -> Tolerance:
    """The table entry for ``(op, quantity, dtype)``; a missing entry is an error, never a silent default."""
    try:
        return TOLERANCES[(op, quantity, dtype)]
    except KeyError:
        known = sorted({f"{o}/{q}" for o, q, _ in TOLERANCES})
        raise KeyError(
            f"no tolerance for op={op!r}, quantity={quantity!r}, dtype={dtype}; add one to t2i_kernels/testing.py "
            f"(known op/quantity pairs: {', '.join(known)})"
        ) from None


@dataclass
class ParityReport:
    """Errors of the kernel and of same-precision PyTorch against float64 truth, and the verdict."""

    op: str
    quantity: str
    dtype: torch.dtype
    kernel_error: float
    torch_error: float
    bound: float
    mismatches: int
    numel: int
    first_bad: list[tuple[tuple[int, ...], float, float]] = field(default_factory=list)
    non_finite: int = 0
    label: str = ""  # what was measured, when the quantity alone does not say (e.g. "tangent via forward_ad")

    @property
    def passed(self) -> bool:
        return self.mismatches == 0 and self.non_finite == 0

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        text = (
            f"{verdict} {self.op}/{self.label or self.quantity} [{str(self.dtype).removeprefix('torch.')}]: "
            f"max|ours-truth| = {self.kernel_error:.3e}, max|torch-truth| = {self.torch_error:.3e}, "
            f"bound = {self.bound:.3e}"
        )
        if self.non_finite:
            text += f"; {self.non_finite} non-finite values in ours"
        if self.mismatches:
            shown = ", ".join(f"{idx}: ours={o:.6g} truth={t:.6g}" for idx, o, t in self.first_bad)
            text += f"; {self.mismatches}/{self.numel} elements out of bound, first: {shown}"
        return text


def parity_report(
    op: str,
    quantity: str,
    ours: torch.Tensor,
    same_precision: torch.Tensor,
    truth: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    max_listed: int = 5,
    label: str = "",
) -> ParityReport:
    """Apply the parity rule to ``ours`` with the table entry for ``(op, quantity, dtype or ours.dtype)``."""
    dtype = ours.dtype if dtype is None else dtype
    if ours.shape != truth.shape or same_precision.shape != truth.shape:
        raise ValueError(
            f"{op}/{quantity}: shapes differ: ours {tuple(ours.shape)}, torch {tuple(same_precision.shape)}, "
            f"truth {tuple(truth.shape)}"
        )
    tol = tolerance(op, quantity, dtype)
    truth64 = truth.detach().to(torch.float64).cpu()
    ours64 = ours.detach().to(torch.float64).cpu()
    err = (ours64 - truth64).abs()
    torch_error = (same_precision.detach().to(torch.float64).cpu() - truth64).abs()
    torch_max = float(torch_error.max()) if torch_error.numel() else 0.0
    scale = float(truth64.abs().max()) if truth64.numel() else 0.0
    bound = tol.k * torch_max + tol.atol + tol.rtol * scale
    non_finite = int((~torch.isfinite(ours64)).sum())
    bad = ~(err <= bound)  # NaN errors count as bad
    bad_idx = bad.nonzero()[:max_listed].tolist()
    first_bad = [(tuple(i), float(ours64[tuple(i)]), float(truth64[tuple(i)])) for i in bad_idx]
    return ParityReport(
        op=op,
        quantity=quantity,
        dtype=dtype,
        kernel_error=float(err.max()) if err.numel() else 0.0,
        torch_error=torch_max,
        bound=bound,
        mismatches=int(bad.sum()),
        numel=err.numel(),
        first_bad=first_bad,
        non_finite=non_finite,
        label=label,
    )


def assert_parity(
    op: str,
    quantity: str,
    ours: torch.Tensor,
    same_precision: torch.Tensor,
    truth: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
) -> ParityReport:
    """Print the report (both errors, always) and raise ``AssertionError`` with it when the rule fails."""
    report = parity_report(op, quantity, ours, same_precision, truth, dtype=dtype)
    print(report)
    if not report.passed:
        raise AssertionError(str(report))
    return report
