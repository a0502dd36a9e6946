"""Gated residual ``out = x + gate[:, None, :] · y`` with its tangent and its backward, in Triton.

Where FLUX uses it: after attention, after the feed-forward (double blocks) and after ``proj_out`` (single blocks),
with the AdaLN gate as ``gate`` (reference-spec §3.5 steps 8–10, §3.6 step 4).

Math (x, y: (B, N, D); gate: (B, D); every sum in fp32, fp64 for fp64 inputs, rounded once at the store)::

    out  = x + gate[:, None] · y
    tout = tx + tgate[:, None] · y + gate[:, None] · ty          (tangent; any of tx, tgate, ty may be absent)
    dx = g,   dy = gate[:, None] · g,   dgate = Σ_n g · y         (backward of the primal, g = dL/dout)

API:

* :func:`gated_residual` ``(x, gate, y) -> out`` — an autograd Function usable under ``torch.func.jvp``,
  ``torch.autograd.forward_ad`` and ordinary backward (also backward through the primal of a ``torch.func.jvp``).
* :func:`gated_residual_jvp` ``(x, tx, gate, tgate, y, ty) -> (out, tout)`` — primal and tangent from **one** kernel
  (x, tx, y, ty read once each), for hand-written dual forwards. ``out`` is differentiable (backward as above);
  ``tout`` is marked non-differentiable: sCM and MeanFlow never differentiate a tangent.

``torch.func`` and "Cannot access storage of TensorWrapper": inside ``torch.func.jvp`` the Function's ``jvp`` (and,
under ``torch.func.grad``, its ``backward``) receives functorch-wrapped tensors that have no storage, so a Triton launch
on them fails. Every launcher below is therefore a ``torch.library`` custom op (``@kernel_op``): the dispatcher unwraps
the functorch levels before the op body runs, so Triton only sees plain tensors, and re-wraps the results. Details
and the rejected alternative (manual unwrapping with private functorch APIs) in :mod:`t2i_kernels._custom_ops`.

Limits: one floating dtype per call (fp16, bf16, fp32; fp64 for tests); any strides (no copies; a unit last stride
is what makes the loads coalesced); outputs are row-major. The backward reduces ``dgate`` deterministically (per-tile
partial sums, then one ordered sum). Verified on the CPU interpreter; GPU parity lives in ``bench/gpu_check``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from t2i_kernels import reference
from t2i_kernels._checks import FLOAT_DTYPES, InputChecks
from t2i_kernels._custom_ops import grad_or_placeholder, kernel_op
from t2i_kernels._runtime import check_launchable, tl, triton
from t2i_kernels._utils import accumulator_dtype, elementwise_tile

__all__ = ["GatedResidualFunction", "GatedResidualJVPFunction", "gated_residual", "gated_residual_jvp"]

#: The pure-PyTorch reference with the same signature (kept beside the kernel, as the house style asks).
gated_residual_ref = reference.gated_residual
gated_residual_jvp_ref = reference.gated_residual_jvp


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _gated_residual_fwd_kernel(
    X, TX, GATE, TGATE, Y, TY,  # pointers to the inputs (a T* pointer is unused when its HAS_* flag is False)
    OUT, TOUT,  # pointers to the outputs (row-major (B, N, D); unused when WRITE_PRIMAL / WRITE_TANGENT is False)
    N, D,
    stride_xb, stride_xn, stride_xd,
    stride_txb, stride_txn, stride_txd,
    stride_gb, stride_gd,
    stride_tgb, stride_tgd,
    stride_yb, stride_yn, stride_yd,
    stride_tyb, stride_tyn, stride_tyd,
    stride_ob, stride_on,
    WRITE_PRIMAL: tl.constexpr, WRITE_TANGENT: tl.constexpr,
    HAS_TX: tl.constexpr, HAS_TGATE: tl.constexpr, HAS_TY: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_D) tile of one sample: out = x + gate·y and/or tout = tx + tgate·y + gate·ty."""
    # int64 offsets: B·N·D exceeds 2³¹ elements at large batch × 1024 px.
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_n[:, None] < N) & mask_d[None, :]

    gate = tl.load(GATE + b * stride_gb + offs_d * stride_gd, mask=mask_d, other=0.0).to(ACC)
    y = tl.load(
        Y + b * stride_yb + offs_n[:, None] * stride_yn + offs_d[None, :] * stride_yd, mask=mask, other=0.0
    ).to(ACC)
    out_offs = b * stride_ob + offs_n[:, None] * stride_on + offs_d[None, :]

    if WRITE_PRIMAL:
        x = tl.load(
            X + b * stride_xb + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=mask, other=0.0
        ).to(ACC)
        tl.store(OUT + out_offs, (x + gate[None, :] * y).to(OUT.dtype.element_ty), mask=mask)
    if WRITE_TANGENT:
        tout = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
        if HAS_TX:
            tout += tl.load(
                TX + b * stride_txb + offs_n[:, None] * stride_txn + offs_d[None, :] * stride_txd,
                mask=mask, other=0.0,
            ).to(ACC)
        if HAS_TGATE:
            tgate = tl.load(TGATE + b * stride_tgb + offs_d * stride_tgd, mask=mask_d, other=0.0).to(ACC)
            tout += tgate[None, :] * y
        if HAS_TY:
            ty = tl.load(
                TY + b * stride_tyb + offs_n[:, None] * stride_tyn + offs_d[None, :] * stride_tyd,
                mask=mask, other=0.0,
            ).to(ACC)
            tout += gate[None, :] * ty
        tl.store(TOUT + out_offs, tout.to(TOUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    G, GATE, Y,  # pointers to dL/dout (B, N, D), gate (B, D), y (B, N, D)
    DY, DGATE_PART,  # pointers to dy (row-major (B, N, D)) and fp32/fp64 partial sums (B, cdiv(N, BLOCK_N), D)
    N, D,
    stride_gob, stride_gon, stride_god,
    stride_gb, stride_gd,
    stride_yb, stride_yn, stride_yd,
    stride_dyb, stride_dyn,
    stride_pb, stride_pn,
    NEED_DY: tl.constexpr, NEED_DGATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dy = gate·g for one tile, and this tile's share of dgate = Σ_n g·y (summed over tiles by the launcher)."""
    b = tl.program_id(2).to(tl.int64)
    pid_n = tl.program_id(0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_n[:, None] < N) & mask_d[None, :]

    g = tl.load(
        G + b * stride_gob + offs_n[:, None] * stride_gon + offs_d[None, :] * stride_god, mask=mask, other=0.0
    ).to(ACC)
    if NEED_DY:
        gate = tl.load(GATE + b * stride_gb + offs_d * stride_gd, mask=mask_d, other=0.0).to(ACC)
        dy_offs = b * stride_dyb + offs_n[:, None] * stride_dyn + offs_d[None, :]
        tl.store(DY + dy_offs, (gate[None, :] * g).to(DY.dtype.element_ty), mask=mask)
    if NEED_DGATE:
        y = tl.load(
            Y + b * stride_yb + offs_n[:, None] * stride_yn + offs_d[None, :] * stride_yd, mask=mask, other=0.0
        ).to(ACC)
        partial = tl.sum(g * y, axis=0)
        tl.store(DGATE_PART + b * stride_pb + pid_n * stride_pn + offs_d, partial, mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and launchers
# ----------------------------------------------------------------------------------------------------------------
def _check_gated_residual_inputs(
    op: str,
    x: object,
    gate: object,
    y: object,
    tangents: dict[str, object] | None = None,
) -> None:
    """Raise one ValueError/TypeError listing every problem: kinds, ranks, shapes, dtypes, devices."""
    checks = InputChecks(op)
    ok_x = checks.tensor("x", x, ndim=3, layout="(B, N, D)", dtypes=FLOAT_DTYPES)
    ok_gate = checks.tensor("gate", gate, ndim=2, layout="(B, D)", dtypes=FLOAT_DTYPES)
    ok_y = checks.tensor("y", y, ndim=3, layout="(B, N, D)", dtypes=FLOAT_DTYPES)
    named: dict[str, torch.Tensor | None] = {"x": x, "gate": gate, "y": y}  # type: ignore[dict-item]
    if ok_x:
        if ok_y:
            checks.shape("y", y, x.shape, "the shape of x (B, N, D)")  # type: ignore[union-attr]
        if ok_gate:
            checks.shape("gate", gate, (x.shape[0], x.shape[2]), "(B, D) of x")  # type: ignore[union-attr]
    for name, tangent in (tangents or {}).items():
        if tangent is None:
            continue
        primal = named[name.removeprefix("t")]
        if checks.tensor(name, tangent, dtypes=FLOAT_DTYPES) and isinstance(primal, torch.Tensor):
            checks.shape(name, tangent, primal.shape, f"the shape of its primal `{name.removeprefix('t')}`")
        named[name] = tangent  # type: ignore[assignment]
    if all(isinstance(t, torch.Tensor) for t in named.values() if t is not None):
        checks.same_dtype(named)
        checks.same_device(named)
    checks.raise_if_any()


def _grid_and_tile(x: torch.Tensor) -> tuple[tuple[int, int, int], int, int, int]:
    batch, n, d = x.shape
    block_n, block_d, num_warps = elementwise_tile(d)
    return (triton.cdiv(n, block_n), triton.cdiv(d, block_d), batch), block_n, block_d, num_warps


def _strides3(t: torch.Tensor | None, fallback: torch.Tensor) -> tuple[int, int, int]:
    return tuple((fallback if t is None else t).stride())  # type: ignore[return-value]


def _strides2(t: torch.Tensor | None, fallback: torch.Tensor) -> tuple[int, int]:
    return tuple((fallback if t is None else t).stride())  # type: ignore[return-value]


def _launch_fwd(
    x: torch.Tensor,
    tx: torch.Tensor | None,
    gate: torch.Tensor,
    tgate: torch.Tensor | None,
    y: torch.Tensor,
    ty: torch.Tensor | None,
    write_primal: bool,
    write_tangent: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    check_launchable("gated_residual", _gated_residual_fwd_kernel, x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if write_primal else None
    tout = torch.empty(x.shape, dtype=x.dtype, device=x.device) if write_tangent else None
    if x.numel() == 0:
        return out, tout
    dense = out if out is not None else tout
    grid, block_n, block_d, num_warps = _grid_and_tile(x)
    _gated_residual_fwd_kernel[grid](
        x, x if tx is None else tx, gate, gate if tgate is None else tgate, y, y if ty is None else ty,
        dense if out is None else out, dense if tout is None else tout,
        x.shape[1], x.shape[2],
        *x.stride(), *_strides3(tx, x), *gate.stride(), *_strides2(tgate, gate), *y.stride(), *_strides3(ty, y),
        dense.stride(0), dense.stride(1),
        WRITE_PRIMAL=write_primal, WRITE_TANGENT=write_tangent,
        HAS_TX=tx is not None, HAS_TGATE=tgate is not None, HAS_TY=ty is not None,
        ACC=accumulator_dtype(x.dtype), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out, tout


def _fake_like_x(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@kernel_op("gated_residual_fwd", _fake_like_x)
def _gated_residual_fwd(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Primal only: ``x + gate[:, None]·y``."""
    out, _ = _launch_fwd(x, None, gate, None, y, None, True, False)
    return out


def _fake_tangent(
    x: torch.Tensor, tx: torch.Tensor | None, gate: torch.Tensor, tgate: torch.Tensor | None, y: torch.Tensor,
    ty: torch.Tensor | None,
) -> torch.Tensor:
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


@kernel_op("gated_residual_tangent", _fake_tangent)
def _gated_residual_tangent(
    x: torch.Tensor, tx: torch.Tensor | None, gate: torch.Tensor, tgate: torch.Tensor | None, y: torch.Tensor,
    ty: torch.Tensor | None,
) -> torch.Tensor:
    """Tangent only, ``tx + tgate·y + gate·ty`` (``x`` only fixes shape and dtype; it is not read)."""
    _, tout = _launch_fwd(x, tx, gate, tgate, y, ty, False, True)
    return tout


def _fake_fwd_jvp(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    return _fake_like_x(x), _fake_like_x(x)


@kernel_op("gated_residual_fwd_jvp", _fake_fwd_jvp)
def _gated_residual_fwd_jvp(
    x: torch.Tensor, tx: torch.Tensor | None, gate: torch.Tensor, tgate: torch.Tensor | None, y: torch.Tensor,
    ty: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal and tangent from one kernel (``gate`` and ``y`` read once for both)."""
    return _launch_fwd(x, tx, gate, tgate, y, ty, True, True)  # type: ignore[return-value]


def _fake_bwd(grad_out: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, need_dy: bool, need_dgate: bool):
    dy, dgate = grad_or_placeholder(y, need_dy), grad_or_placeholder(gate, need_dgate)
    return dy, dgate


@kernel_op("gated_residual_bwd", _fake_bwd)
def _gated_residual_bwd(
    grad_out: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, need_dy: bool, need_dgate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy, dgate)``; a gradient that is not needed comes back as an empty (0,) tensor (ops cannot return None)."""
    check_launchable("gated_residual backward", _gated_residual_bwd_kernel, grad_out.device)
    dy, dgate = _fake_bwd(grad_out, gate, y, need_dy, need_dgate)
    if grad_out.numel() == 0 or not (need_dy or need_dgate):
        return dy, dgate.zero_()
    grid, block_n, block_d, num_warps = _grid_and_tile(grad_out)
    part_dtype = torch.float64 if gate.dtype == torch.float64 else torch.float32
    partial = torch.empty(
        (grid[2], grid[0], gate.shape[1]) if need_dgate else (1, 1, 1), dtype=part_dtype, device=gate.device
    )
    dy_buf = dy if need_dy else grad_out  # never written when NEED_DY is False
    _gated_residual_bwd_kernel[grid](
        grad_out, gate, y, dy_buf, partial,
        grad_out.shape[1], grad_out.shape[2],
        *grad_out.stride(), *gate.stride(), *y.stride(),
        dy_buf.stride(0), dy_buf.stride(1),
        partial.stride(0), partial.stride(1),
        NEED_DY=need_dy, NEED_DGATE=need_dgate,
        ACC=accumulator_dtype(gate.dtype), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    if need_dgate:
        dgate = partial.sum(dim=1).to(gate.dtype)  # ordered tile sum: deterministic run to run
    return dy, dgate


# ----------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------------------------
class GatedResidualGrads(NamedTuple):
    """Gradients of :class:`GatedResidualFunction` (one slot per forward input)."""

    dx: torch.Tensor | None
    dgate: torch.Tensor | None
    dy: torch.Tensor | None


def _primal_backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    need_dx, need_dgate, need_dy = ctx.primal_needs_grad
    gate, y = ctx.saved_tensors
    dy = dgate = None
    if need_dy or need_dgate:
        dy_t, dgate_t = _gated_residual_bwd(grad_out, gate, y, need_dy, need_dgate)
        dy = dy_t if need_dy else None
        dgate = dgate_t if need_dgate else None
    return grad_out if need_dx else None, dgate, dy


class GatedResidualFunction(torch.autograd.Function):
    """``out = x + gate[:, None]·y``; x, y (B, N, D), gate (B, D), one dtype. ``jvp`` and ``backward`` are Triton."""

    @staticmethod
    def forward(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _gated_residual_fwd(x, gate, y)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, gate, y = inputs
        ctx.save_for_forward(gate, y)  # jvp reads them; saving references costs no memory
        # Save for backward only when a gradient is wanted: under no_grad (the JVP pass) nothing is kept alive.
        ctx.primal_needs_grad = tuple(ctx.needs_input_grad)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(gate, y)

    @staticmethod
    def jvp(ctx, tx, tgate, ty) -> torch.Tensor:
        gate, y = ctx.saved_tensors
        x_like = y  # shape/dtype carrier only
        return _gated_residual_tangent(x_like, tx, gate, tgate, y, ty)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> GatedResidualGrads:
        return GatedResidualGrads(*_primal_backward(ctx, grad_out))


class GatedResidualJVPGrads(NamedTuple):
    """Gradients of :class:`GatedResidualJVPFunction`; tangent inputs get none (tangents are never differentiated)."""

    dx: torch.Tensor | None
    dtx: None
    dgate: torch.Tensor | None
    dtgate: None
    dy: torch.Tensor | None
    dty: None


class GatedResidualJVPFunction(torch.autograd.Function):
    """``(out, tout)`` from one kernel. ``out`` is differentiable w.r.t. x, gate, y; ``tout`` is non-differentiable."""

    @staticmethod
    def forward(x, tx, gate, tgate, y, ty):
        return _gated_residual_fwd_jvp(x, tx, gate, tgate, y, ty)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, tx, gate, tgate, y, ty = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_forward(gate, y)
        needs = ctx.needs_input_grad
        ctx.primal_needs_grad = (needs[0], needs[2], needs[4])
        if any(ctx.primal_needs_grad):
            ctx.save_for_backward(gate, y)

    @staticmethod
    def jvp(ctx, dx, dtx, dgate, dtgate, dy, dty):
        # d(out) = dx + dgate·y + gate·dy. `tout` is non-differentiable in both modes (None here, no grad in
        # backward): a tangent of a tangent is never needed by sCM/MeanFlow.
        gate, y = ctx.saved_tensors
        return _gated_residual_tangent(y, dx, gate, dgate, y, dy), None

    @staticmethod
    def backward(ctx, grad_out, grad_tout) -> GatedResidualJVPGrads:
        # grad_tout is always None/zero: tout is non-differentiable by contract.
        dx, dgate, dy = _primal_backward(ctx, grad_out)
        return GatedResidualJVPGrads(dx, None, dgate, None, dy, None)


# ----------------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------------
def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[:, None, :] · y`` for x, y (B, N, D) and gate (B, D), all of one floating dtype.

    Differentiable (Triton backward) and forward-differentiable (Triton tangent), including inside
    ``torch.func.jvp``. Returns a new row-major (B, N, D) tensor.
    """
    _check_gated_residual_inputs("gated_residual", x, gate, y)
    return GatedResidualFunction.apply(x, gate, y)


def gated_residual_jvp(
    x: torch.Tensor,
    tx: torch.Tensor | None,
    gate: torch.Tensor,
    tgate: torch.Tensor | None,
    y: torch.Tensor,
    ty: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, tout)`` = gated residual and its tangent ``tx + tgate[:, None]·y + gate[:, None]·ty`` in one pass.

    A tangent given as ``None`` counts as zero. Gradients flow to x, gate and y through ``out`` only; ``tout`` is
    returned non-differentiable (sCM/MeanFlow detach every tangent).
    """
    _check_gated_residual_inputs("gated_residual_jvp", x, gate, y, {"tx": tx, "tgate": tgate, "ty": ty})
    return GatedResidualJVPFunction.apply(x, tx, gate, tgate, y, ty)
