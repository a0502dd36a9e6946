"""Rotary position embedding in FLUX's interleaved-pair convention, with its tangent and its backward, in Triton.

Where FLUX uses it: on Q and K of every attention, after the qk-norm (reference-spec §3.5 step 5, §3.6 step 3;
diffusers ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)``). The fused :mod:`t2i_kernels.qk_norm_rope` does
RMSNorm + RoPE + head transpose in one pass; this file is the stand-alone op and holds the shared rotation.

Math (x (B, H, N, D), D even, pairs (a, b) = (x₂ᵢ, x₂ᵢ₊₁); cos, sin (N, D) constant tables; fp32 math, fp64 when an
input is fp64, rounded once to x's dtype as the reference)::

    y = x·cos + rot(x)·sin,  rot(a, b) = (−b, a)   i.e.  y₂ᵢ = a·cos₂ᵢ − b·sin₂ᵢ,  y₂ᵢ₊₁ = b·cos₂ᵢ₊₁ + a·sin₂ᵢ₊₁
    ty = y(tx)                                       (RoPE is linear in x; cos/sin carry no tangent)
    dx = Rᵀ·g:  dx₂ᵢ = g₂ᵢ·cos₂ᵢ + g₂ᵢ₊₁·sin₂ᵢ₊₁,  dx₂ᵢ₊₁ = g₂ᵢ₊₁·cos₂ᵢ₊₁ − g₂ᵢ·sin₂ᵢ   (the transposed rotation;
                                                     with FLUX's per-pair-repeated tables, RoPE with sin negated)

API:

* :func:`rope` ``(x, cos, sin) -> y`` — an autograd Function usable under ``torch.func.jvp``,
  ``torch.autograd.forward_ad`` and ordinary backward (gradient w.r.t. x only).
* :func:`rope_jvp` ``(x, tx, cos, sin) -> (y, ty)`` — primal and tangent from **one** kernel (cos/sin read once for
  both); ``y`` is differentiable, ``ty`` is marked non-differentiable.

cos/sin are constants: passing tables that require grad raises ``ValueError``, and so does a tangent on them under
forward AD (silently dropping a derivative would be wrong; FLUX builds its tables from token ids, never
differentiated).

Limits: D even (pairs); any strides for x (e.g. a ``(B, N, H, D).transpose(1, 2)`` view is read in place) and for
cos/sin; outputs are row-major (B, H, N, D). Programs are ordered heads-fastest so the H programs that reuse one tile
of cos/sin run back to back (it stays in L2 instead of being re-read from memory per head). Verified on the CPU
interpreter in fp32/fp64; fp16/bf16 parity is GPU-only (``pytest -m gpu``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from t2i_kernels import reference
from t2i_kernels._checks import FLOAT_DTYPES, InputChecks, describe
from t2i_kernels._custom_ops import kernel_op
from t2i_kernels._runtime import check_launchable, tl, triton
from t2i_kernels._utils import accumulator_dtype, elementwise_tile

__all__ = ["RoPEFunction", "RoPEJVPFunction", "rope", "rope_jvp"]

#: The pure-PyTorch reference with the same signature (kept beside the kernel, as the house style asks).
rope_ref = reference.rope
rope_jvp_ref = reference.rope_jvp


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def rotate_pairs(x, cos, sin, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr):
    """RoPE of a (BLOCK_N, BLOCK_D) tile whose columns start at an even index: x·cos + rot(x)·sin, or with TRANSPOSE
    the transposed map (the backward). The partner of each element comes from splitting the tile into (even, odd)
    pairs in registers, so the loads stay contiguous."""
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_N, BLOCK_D // 2, 2)))
    sin_even, sin_odd = tl.split(tl.reshape(sin, (BLOCK_N, BLOCK_D // 2, 2)))
    if TRANSPOSE:
        rot_even = x_odd * sin_odd
        rot_odd = -(x_even * sin_even)
    else:
        rot_even = -(x_odd * sin_even)
        rot_odd = x_even * sin_odd
    return x * cos + tl.reshape(tl.join(rot_even, rot_odd), (BLOCK_N, BLOCK_D))


@triton.jit
def _rope_fwd_kernel(
    X, TX, COS, SIN,  # pointers to x (B, H, N, D), its tangent (unused without WRITE_TANGENT), cos and sin (N, D)
    Y, TY,  # pointers to the outputs (row-major (B, H, N, D))
    H, N, D,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_txb, stride_txh, stride_txn, stride_txd,
    stride_cn, stride_cd,
    stride_sn, stride_sd,
    stride_yb, stride_yh, stride_yn,
    WRITE_TANGENT: tl.constexpr, TRANSPOSE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_D) tile of head h of sample b: y = RoPE(x) (Rᵀ·x with TRANSPOSE) and ty = RoPE(tx)."""
    # Heads vary fastest over program_id(0) (which, unlike axes 1 and 2, has no 65535 limit): the H programs that
    # share one tile of cos/sin run back to back.
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    offs_n = (pid // H).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)

    cos = tl.load(COS + offs_n[:, None] * stride_cn + offs_d[None, :] * stride_cd, mask=mask, other=0.0).to(ACC)
    sin = tl.load(SIN + offs_n[:, None] * stride_sn + offs_d[None, :] * stride_sd, mask=mask, other=0.0).to(ACC)
    x = tl.load(
        X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
        mask=mask, other=0.0,
    ).to(ACC)
    y_offs = b * stride_yb + h * stride_yh + offs_n[:, None] * stride_yn + offs_d[None, :]
    tl.store(Y + y_offs, rotate_pairs(x, cos, sin, BLOCK_N, BLOCK_D, TRANSPOSE).to(Y.dtype.element_ty), mask=mask)
    if WRITE_TANGENT:
        tx = tl.load(
            TX + b * stride_txb + h * stride_txh + offs_n[:, None] * stride_txn + offs_d[None, :] * stride_txd,
            mask=mask, other=0.0,
        ).to(ACC)
        ty = rotate_pairs(tx, cos, sin, BLOCK_N, BLOCK_D, TRANSPOSE)
        tl.store(TY + y_offs, ty.to(TY.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and launchers
# ----------------------------------------------------------------------------------------------------------------
def check_rope_tables(checks: InputChecks, cos: object, sin: object, n: int | None, d: int | None) -> None:
    """cos and sin are constant (N, D) tables (shared with :mod:`t2i_kernels.qk_norm_rope`)."""
    for name, table in (("cos", cos), ("sin", sin)):
        if not checks.tensor(name, table, ndim=2, layout="(N, D)", dtypes=FLOAT_DTYPES):
            continue
        if n is not None and d is not None:
            checks.shape(name, table, (n, d), "(N, D) of x")  # type: ignore[arg-type]
        if table.requires_grad:  # type: ignore[union-attr]
            checks.value_problem(
                f"`{name}`: expected a constant table (requires_grad=False: RoPE tables carry no gradient or "
                f"tangent), got requires_grad=True {describe(table)}"
            )


def _check_rope_inputs(op: str, x: object, cos: object, sin: object, tx: object = False) -> None:
    """Raise one ValueError/TypeError listing every problem: kinds, ranks, shapes, dtypes, devices.

    ``tx`` is only checked when given (the explicit ``rope_jvp``); ``False`` means "no tangent argument".
    """
    checks = InputChecks(op)
    ok_x = checks.tensor("x", x, ndim=4, layout="(B, H, N, D)", dtypes=FLOAT_DTYPES)
    n = d = None
    if ok_x:
        n, d = x.shape[2], x.shape[3]  # type: ignore[union-attr]
        if d % 2:
            checks.value_problem(f"`x`: expected an even last dim D (RoPE rotates pairs), got {describe(x)}")
    check_rope_tables(checks, cos, sin, n, d)
    named: dict[str, object] = {"x": x, "cos": cos, "sin": sin}
    if tx is not False:
        if checks.tensor("tx", tx, ndim=4, layout="(B, H, N, D)", dtypes=FLOAT_DTYPES) and ok_x:
            checks.shape("tx", tx, x.shape, "the shape of its primal `x`")  # type: ignore[union-attr, arg-type]
            checks.same_dtype({"x": x, "tx": tx}, "a tangent has its primal's dtype")  # type: ignore[dict-item]
        named["tx"] = tx
    if all(isinstance(t, torch.Tensor) for t in named.values()):
        checks.same_device(named)  # type: ignore[arg-type]
    checks.raise_if_any()


def _launch(
    x: torch.Tensor, tx: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, transpose: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_launchable("rope", _rope_fwd_kernel, x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ty = torch.empty(x.shape, dtype=x.dtype, device=x.device) if tx is not None else None
    if x.numel() == 0:
        return y, ty
    batch, heads, n, d = x.shape
    block_n, block_d, num_warps = elementwise_tile(d)
    grid = (heads * triton.cdiv(n, block_n), triton.cdiv(d, block_d), batch)
    any_fp64 = torch.float64 in (x.dtype, cos.dtype, sin.dtype)
    _rope_fwd_kernel[grid](
        x, x if tx is None else tx, cos, sin, y, y if ty is None else ty,
        heads, n, d,
        *x.stride(), *(x if tx is None else tx).stride(), *cos.stride(), *sin.stride(),
        y.stride(0), y.stride(1), y.stride(2),
        WRITE_TANGENT=tx is not None, TRANSPOSE=transpose,
        ACC=accumulator_dtype(torch.float64 if any_fp64 else torch.float32),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y, ty


def _fake_like_x(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@kernel_op("rope_fwd", _fake_like_x)
def _rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rot(x)·sin`` (also the tangent: RoPE is linear)."""
    return _launch(x, None, cos, sin, False)[0]


def _fake_fwd_jvp(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    return _fake_like_x(x), _fake_like_x(x)


@kernel_op("rope_fwd_jvp", _fake_fwd_jvp)
def _rope_fwd_jvp(
    x: torch.Tensor, tx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal and tangent from one kernel (cos/sin read once for both)."""
    return _launch(x, tx, cos, sin, False)  # type: ignore[return-value]


@kernel_op("rope_bwd", _fake_like_x)
def _rope_bwd(grad_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``dx = Rᵀ·g`` (the transposed rotation)."""
    return _launch(grad_out, None, cos, sin, True)[0]


# ----------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------------------------
def reject_table_tangents(op: str, tcos: torch.Tensor | None, tsin: torch.Tensor | None) -> None:
    """Forward AD gave cos/sin a tangent: refuse rather than drop a derivative (shared with qk_norm_rope)."""
    given = [name for name, t in (("cos", tcos), ("sin", tsin)) if t is not None]
    if given:
        raise ValueError(
            f"{op}: expected no tangent on {' and '.join(f'`{n}`' for n in given)} (RoPE tables are constants), "
            "got one; pass the tables as constants (closed over, not as differentiated inputs)"
        )


class RoPEGrads(NamedTuple):
    """Gradients of :class:`RoPEFunction`; the tables get none (they are constants)."""

    dx: torch.Tensor | None
    dcos: None
    dsin: None


class RoPEFunction(torch.autograd.Function):
    """``y = x·cos + rot(x)·sin`` on x (B, H, N, D), constant cos/sin (N, D). ``jvp`` and ``backward`` are Triton."""

    @staticmethod
    def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return _rope_fwd(x, cos, sin)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, cos, sin = inputs
        ctx.set_materialize_grads(False)  # absent tangents/grads arrive as None, not as zero tensors
        ctx.save_for_forward(cos, sin)  # jvp reads them; saving references costs no memory
        ctx.need_dx = ctx.needs_input_grad[0]
        if ctx.need_dx:  # nothing is kept alive under no_grad (the JVP pass)
            ctx.save_for_backward(cos, sin)

    @staticmethod
    def jvp(ctx, tx, tcos, tsin) -> torch.Tensor:
        reject_table_tangents("rope", tcos, tsin)
        cos, sin = ctx.saved_tensors
        return _rope_fwd(tx, cos, sin)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> RoPEGrads:
        if grad_out is None or not ctx.need_dx:
            return RoPEGrads(None, None, None)
        cos, sin = ctx.saved_tensors
        return RoPEGrads(_rope_bwd(grad_out, cos, sin), None, None)


class RoPEJVPGrads(NamedTuple):
    """Gradients of :class:`RoPEJVPFunction`: x only (tangents and tables get none)."""

    dx: torch.Tensor | None
    dtx: None
    dcos: None
    dsin: None


class RoPEJVPFunction(torch.autograd.Function):
    """``(y, ty)`` from one kernel. ``y`` is differentiable w.r.t. x; ``ty`` is non-differentiable."""

    @staticmethod
    def forward(x, tx, cos, sin):
        return _rope_fwd_jvp(x, tx, cos, sin)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, tx, cos, sin = inputs
        ctx.set_materialize_grads(False)  # absent tangents/grads arrive as None, not as zero tensors
        ctx.mark_non_differentiable(output[1])
        ctx.y_shape, ctx.y_dtype = output[0].shape, output[0].dtype
        ctx.save_for_forward(cos, sin)
        ctx.need_dx = ctx.needs_input_grad[0]
        if ctx.need_dx:
            ctx.save_for_backward(cos, sin)

    @staticmethod
    def jvp(ctx, dx, dtx, dcos, dsin):
        # d(y) = RoPE(dx) (zero when only tx carries a tangent: forward AD wants a tensor for a differentiable output);
        # `ty` is non-differentiable in both modes.
        reject_table_tangents("rope_jvp", dcos, dsin)
        cos, sin = ctx.saved_tensors
        if dx is None:
            return torch.zeros(ctx.y_shape, dtype=ctx.y_dtype, device=cos.device), None
        return _rope_fwd(dx, cos, sin), None

    @staticmethod
    def backward(ctx, grad_y, grad_ty) -> RoPEJVPGrads:
        if grad_y is None or not ctx.need_dx:
            return RoPEJVPGrads(None, None, None, None)
        cos, sin = ctx.saved_tensors
        return RoPEJVPGrads(_rope_bwd(grad_y, cos, sin), None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------------
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, H, N, D) with constant tables cos, sin (N, D), FLUX's interleaved pairs.

    fp32 math (fp64 for fp64 inputs), output in x's dtype, row-major. Differentiable w.r.t. x and
    forward-differentiable, including inside ``torch.func.jvp``.
    """
    _check_rope_inputs("rope", x, cos, sin)
    return RoPEFunction.apply(x, cos, sin)


def rope_jvp(
    x: torch.Tensor, tx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, ty)`` = RoPE of x and of its tangent tx in one pass; ``ty`` is returned non-differentiable."""
    _check_rope_inputs("rope_jvp", x, cos, sin, tx=tx)
    return RoPEJVPFunction.apply(x, tx, cos, sin)
