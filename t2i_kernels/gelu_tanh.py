"""GELU with the tanh approximation, with its tangent and its backward, in Triton.

Where FLUX uses it: the activation of every feed-forward (``ff``, ``ff_context``: Linear D→4D → GELU-tanh) and of the
single blocks' ``proj_mlp`` (reference-spec §3.5 step 9, §3.6 step 2), on (B, L, 12288).

Math (elementwise; computed in fp32, fp64 for fp64 inputs, rounded once to x's dtype)::

    u  = √(2/π)·(x + 0.044715·x³),   s = σ(2u) = ½(1 + tanh u)
    y  = x·s                                   (= ½x(1 + tanh u))
    y' = s + 2x·s·(1 − s)·u′,   u′ = √(2/π)·(1 + 3·0.044715·x²)   (= ½(1 + tanh u) + ½x(1 − tanh²u)·u′)
    ty = y'·tx      (tangent)            dx = y'·g      (backward; the same kernel with g in place of tx)

Why σ(2u) and not 1 + tanh u: σ(2u) and 1 − σ(2u) are both computed from e = exp(−2|u|) ∈ (0, 1] without
cancellation or overflow, so y keeps full relative precision for large negative x (where 1 + tanh u cancels) and y'
never forms inf·0.

API:

* :func:`gelu_tanh` ``(x) -> y`` — an autograd Function usable under ``torch.func.jvp``, ``torch.autograd.forward_ad``
  and ordinary backward.
* :func:`gelu_tanh_jvp` ``(x, tx) -> (y, ty)`` — primal and tangent from **one** kernel (x read once for both); ``y``
  is differentiable, ``ty`` is marked non-differentiable.

Limits: any shape; any strides whose leading dims merge into three (every rank ≤ 4 view); anything else raises
``ValueError`` instead of copying. Outputs are row-major, in x's dtype. Verified on the CPU interpreter in fp32/fp64;
fp16/bf16 parity is GPU-only (``pytest -m gpu``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from t2i_kernels import reference
from t2i_kernels._checks import FLOAT_DTYPES, InputChecks
from t2i_kernels._custom_ops import kernel_op
from t2i_kernels._runtime import check_launchable, tl, triton
from t2i_kernels._utils import (
    accumulator_dtype,
    check_row_count,
    elementwise_tile,
    row_layout,
    row_offsets,
    shared_row_layout,
)

__all__ = ["GeluTanhFunction", "GeluTanhJVPFunction", "gelu_tanh", "gelu_tanh_jvp"]

#: The pure-PyTorch reference with the same signature (kept beside the kernel, as the house style asks).
gelu_tanh_ref = reference.gelu_tanh
gelu_tanh_jvp_ref = reference.gelu_tanh_jvp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _gelu_tanh_kernel(
    X, T,  # pointers to x and to the vector y' multiplies (tx for the tangent, g for the backward; unused if absent)
    Y, TY,  # pointers to the outputs (row-major; unused when WRITE_PRIMAL / WRITE_TANGENT is False)
    n_rows, R1, R2, D,
    stride_x0, stride_x1, stride_x2, stride_xd,
    stride_t0, stride_t1, stride_t2, stride_td,
    SQRT_2_OVER_PI: tl.constexpr, CUBIC: tl.constexpr,
    WRITE_PRIMAL: tl.constexpr, WRITE_TANGENT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_ROWS, BLOCK_D) tile: y = x·σ(2u) and/or ty = y'(x)·t."""
    # int64 offsets: B·L·4D exceeds 2³¹ elements at large batch × 1024 px.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < D)

    x_offs = row_offsets(rows, R1, R2, stride_x0, stride_x1, stride_x2)[:, None] + offs_d[None, :] * stride_xd
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(ACC)
    u = SQRT_2_OVER_PI * (x + CUBIC * x * x * x)
    e = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]: no overflow, and σ(±2u) below need no subtraction
    p = 1.0 / (1.0 + e)  # σ(2|u|)
    q = e * p  # σ(−2|u|) = 1 − σ(2|u|)
    s = tl.where(u >= 0, p, q)  # σ(2u)
    y_offs = rows[:, None] * D + offs_d[None, :]

    if WRITE_PRIMAL:
        tl.store(Y + y_offs, (x * s).to(Y.dtype.element_ty), mask=mask)
    if WRITE_TANGENT:
        one_minus_s = tl.where(u >= 0, q, p)
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x)
        dgelu = s + 2.0 * x * s * one_minus_s * du
        t_offs = row_offsets(rows, R1, R2, stride_t0, stride_t1, stride_t2)[:, None] + offs_d[None, :] * stride_td
        t = tl.load(T + t_offs, mask=mask, other=0.0).to(ACC)
        tl.store(TY + y_offs, (dgelu * t).to(TY.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and launchers
# ----------------------------------------------------------------------------------------------------------------
def _check_gelu_tanh_inputs(op: str, x: object, tx: object = False) -> None:
    """Raise one ValueError/TypeError listing every problem: kinds, shapes, dtypes, devices, strides.

    ``tx`` is only checked when given (the explicit ``gelu_tanh_jvp``); ``False`` means "no tangent argument".
    """
    checks = InputChecks(op)
    ok_x = checks.tensor("x", x, dtypes=FLOAT_DTYPES)
    tensors = [x]
    if tx is not False:
        if checks.tensor("tx", tx, dtypes=FLOAT_DTYPES) and ok_x:
            checks.shape("tx", tx, x.shape, "the shape of its primal `x`")  # type: ignore[union-attr, arg-type]
            checks.same_dtype({"x": x, "tx": tx}, "a tangent has its primal's dtype")  # type: ignore[dict-item]
            checks.same_device({"x": x, "tx": tx})  # type: ignore[dict-item]
        tensors.append(tx)
    if checks.ok and x.dim() > 0 and row_layout(x.shape, *tensors) is None:  # type: ignore[union-attr, arg-type]
        strides = ", ".join(f"{name} {t.stride()}" for name, t in zip(("x", "tx"), tensors))  # type: ignore[union-attr]
        checks.value_problem(
            "`x`/`tx`: expected leading dims that merge into at most 3 strided dims (call `.contiguous()` first), "
            f"got {strides} for shape {tuple(x.shape)}"  # type: ignore[union-attr]
        )
    checks.raise_if_any()


def _launch(
    x: torch.Tensor, t: torch.Tensor | None, write_primal: bool, write_tangent: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    check_launchable("gelu_tanh", _gelu_tanh_kernel, x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if write_primal else None
    ty = torch.empty(x.shape, dtype=x.dtype, device=x.device) if write_tangent else None
    if x.numel() == 0:
        return y, ty
    x2, t2 = (x.reshape(1), None if t is None else t.reshape(1)) if x.dim() == 0 else (x, t)  # 0-d: one row of one
    layout, (x2, t_or_x) = shared_row_layout(x2, x2 if t2 is None else t2)
    check_row_count("gelu_tanh", layout.n_rows)
    (_, r1, r2), (sx, st) = layout.sizes, layout.strides
    d = x2.shape[-1]
    block_rows, block_d, num_warps = elementwise_tile(d)
    dense = y if y is not None else ty
    _gelu_tanh_kernel[(triton.cdiv(layout.n_rows, block_rows), triton.cdiv(d, block_d))](
        x2, t_or_x, dense if y is None else y, dense if ty is None else ty,
        layout.n_rows, r1, r2, d,
        *sx, *st,
        SQRT_2_OVER_PI=_SQRT_2_OVER_PI, CUBIC=_CUBIC,
        WRITE_PRIMAL=write_primal, WRITE_TANGENT=write_tangent,
        ACC=accumulator_dtype(x.dtype), BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y, ty


def _fake_like_x(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@kernel_op("gelu_tanh_fwd", _fake_like_x)
def _gelu_tanh_fwd(x: torch.Tensor) -> torch.Tensor:
    """Primal only: ``x·σ(2u)``."""
    return _launch(x, None, True, False)[0]


@kernel_op("gelu_tanh_tangent", _fake_like_x)
def _gelu_tanh_tangent(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``gelu'(x)·t``: the tangent (t = tx) and the backward (t = g) alike."""
    return _launch(x, t, False, True)[1]


def _fake_fwd_jvp(x: torch.Tensor, tx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _fake_like_x(x), _fake_like_x(x)


@kernel_op("gelu_tanh_fwd_jvp", _fake_fwd_jvp)
def _gelu_tanh_fwd_jvp(x: torch.Tensor, tx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal and tangent from one kernel (x read once for both)."""
    return _launch(x, tx, True, True)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------------------------
class GeluTanhGrads(NamedTuple):
    """Gradient of :class:`GeluTanhFunction`."""

    dx: torch.Tensor | None


class GeluTanhFunction(torch.autograd.Function):
    """``y = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))`` elementwise, any shape. ``jvp`` and ``backward`` are Triton."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _gelu_tanh_fwd(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        ctx.set_materialize_grads(False)  # absent tangents/grads arrive as None, not as zero tensors
        ctx.save_for_forward(x)  # jvp reads it; saving a reference costs no memory
        if ctx.needs_input_grad[0]:  # nothing is kept alive under no_grad (the JVP pass)
            ctx.save_for_backward(x)

    @staticmethod
    def jvp(ctx, tx) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _gelu_tanh_tangent(x, tx)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> GeluTanhGrads:
        if grad_out is None or not ctx.needs_input_grad[0]:
            return GeluTanhGrads(None)
        (x,) = ctx.saved_tensors
        return GeluTanhGrads(_gelu_tanh_tangent(x, grad_out))


class GeluTanhJVPGrads(NamedTuple):
    """Gradients of :class:`GeluTanhJVPFunction`; the tangent input gets none."""

    dx: torch.Tensor | None
    dtx: None


class GeluTanhJVPFunction(torch.autograd.Function):
    """``(y, ty)`` from one kernel. ``y`` is differentiable w.r.t. x; ``ty`` is non-differentiable."""

    @staticmethod
    def forward(x, tx):
        return _gelu_tanh_fwd_jvp(x, tx)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, tx = inputs
        ctx.set_materialize_grads(False)  # absent tangents/grads arrive as None, not as zero tensors
        ctx.mark_non_differentiable(output[1])
        ctx.y_shape, ctx.y_dtype = output[0].shape, output[0].dtype
        ctx.save_for_forward(x)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x)

    @staticmethod
    def jvp(ctx, dx, dtx):
        # d(y) = gelu'(x)·dx (zero when only tx carries a tangent: forward AD wants a tensor for a differentiable
        # output); `ty` is non-differentiable in both modes.
        (x,) = ctx.saved_tensors
        if dx is None:
            return torch.zeros(ctx.y_shape, dtype=ctx.y_dtype, device=x.device), None
        return _gelu_tanh_tangent(x, dx), None

    @staticmethod
    def backward(ctx, grad_y, grad_ty) -> GeluTanhJVPGrads:
        if grad_y is None or not ctx.needs_input_grad[0]:
            return GeluTanhJVPGrads(None, None)
        (x,) = ctx.saved_tensors
        return GeluTanhJVPGrads(_gelu_tanh_tangent(x, grad_y), None)


# ----------------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------------
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` for any floating x: fp32 math, output in x's dtype, row-major.

    Differentiable (Triton backward) and forward-differentiable (Triton tangent), including inside
    ``torch.func.jvp``.
    """
    _check_gelu_tanh_inputs("gelu_tanh", x)
    return GeluTanhFunction.apply(x)


def gelu_tanh_jvp(x: torch.Tensor, tx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, ty)`` = GELU-tanh and its tangent ``gelu'(x)·tx`` in one pass; ``ty`` is returned non-differentiable."""
    _check_gelu_tanh_inputs("gelu_tanh_jvp", x, tx=tx)
    return GeluTanhJVPFunction.apply(x, tx)
