"""RMSNorm over the last dim ``y = (x·ρ)·w`` with its tangent and its backward, in Triton.

Where FLUX uses it: the qk-norm of every attention (``norm_q``, ``norm_k``, ``norm_added_q``, ``norm_added_k``; weight
(128,), eps 1e-6) over B·H·N rows of D = 128 (reference-spec §3.5 step 3, §3.6 step 3).

Math (x (..., D), weight w (D,); ρ = rsqrt(mean(x²) + eps) per row; sums in fp32, fp64 when an input is fp64)::

    n  = x·ρ,  n_w = n rounded to w's dtype when w is fp16/bf16 (the reference's dtype order), else n
    y  = n_w · w
    ty = round_w(tx·ρ − x·ρ³·mean(x⊙tx)) · w + n_w · tw          (tangent; tw only when the weight has one)
    dx = ρ·(g_n − n·mean(g_n⊙n)),  g_n = g·w                       (backward, g = dL/dy; the rounding passes g through)
    dw = Σ_rows g · n_w

Output dtype is the reference's: w's dtype when w is fp16/bf16, else ``promote(promote(x, fp32), w)`` (bf16 x with an
fp32 weight gives fp32). The tangent has the output's dtype; ``dx`` has x's, ``dw`` the weight's.

API:

* :func:`rms_norm` ``(x, weight, eps=1e-6) -> y`` — an autograd Function usable under ``torch.func.jvp``,
  ``torch.autograd.forward_ad`` and ordinary backward.
* :func:`rms_norm_jvp` ``(x, tx, weight, eps=1e-6) -> (y, ty)`` — primal and tangent from **one** kernel (x, tx read
  once each); ``y`` is differentiable, ``ty`` is marked non-differentiable (sCM and MeanFlow never differentiate a
  tangent).

Launchers are ``torch.library`` custom ops so that Triton never sees functorch wrappers (see
:mod:`t2i_kernels._custom_ops`).

Limits and tiling: D ≤ 12288 (:data:`t2i_kernels._utils.MAX_FUSED_D_CHUNKED`; a row lives in registers, so statistics
take no second pass; wider rows raise ``RuntimeError``). :func:`t2i_kernels._utils.row_tile` holds a row as ``CHUNKS``
register tiles of ``BLOCK_D`` power-of-two lanes, the fewest lanes that cover D: FLUX's D = 3072 is 3 × 1024 lanes
on 4 warps and 12288 is 3 × 4096 on 16 warps, 24 values per thread per row tensor and no masked lane (one block of
4096 lanes masked a quarter of them); other widths mask at most the tail of the last chunk. Narrow rows use the
multi-row tile (FLUX's D = 128: 32 rows per program, one chunk). sm_90 compile report (project CPU machine, no GPU;
triton 3.9 and 3.6): no spills at D = 128, 3072, 12288; 127–128 registers for the backward at 3072 and 12288 (its
128-register cap at 16 warps), 80 for the forward with tangent at 3072; 128-bit loads throughout. x may have any
rank ≥ 1 and any strides whose leading dims merge into three (every rank ≤ 4 view, e.g. ``(B, N, H, D).transpose(1,
2)``); anything else raises ``ValueError`` instead of copying. Outputs are row-major. ``dw`` is reduced
deterministically (2-D per-program partials summed over rows once after the loop, then one ordered sum).
Verified on the CPU interpreter in fp32/fp64; fp16/bf16 parity is GPU-only (``pytest -m gpu``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from t2i_kernels import reference
from t2i_kernels._checks import FLOAT_DTYPES, InputChecks
from t2i_kernels._custom_ops import grad_or_placeholder, kernel_op
from t2i_kernels._runtime import check_launchable, tl, triton
from t2i_kernels._utils import (
    MAX_CHUNKS,
    MAX_FUSED_D_CHUNKED,
    accumulator_dtype,
    check_row_count,
    load_chunks,
    load_vector_chunks,
    reduction_split,
    row_dot,
    row_layout,
    row_offsets,
    row_tile,
    shared_row_layout,
    store_chunk,
    zero_chunks,
)

__all__ = ["RMSNormFunction", "RMSNormJVPFunction", "rms_norm", "rms_norm_jvp"]

#: The pure-PyTorch reference with the same signature (kept beside the kernel, as the house style asks).
rms_norm_ref = reference.rms_norm
rms_norm_jvp_ref = reference.rms_norm_jvp

#: Weight dtypes the reference rounds the normalised value to before × weight.
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def rms_stats(x, D):
    """mean(x²) per row of a (rows, BLOCK_D) tile whose masked lanes hold 0 (the caller adds eps and takes rsqrt)."""
    return tl.sum(x * x, axis=1) / D


@triton.jit
def _rms_norm_fwd_kernel(
    X, TX, W, TW,  # pointers to x, its tangent, weight (D,), weight tangent (a T* pointer is unused without HAS_*)
    Y, TY,  # pointers to the outputs (row-major (rows, D); unused when WRITE_PRIMAL / WRITE_TANGENT is False)
    n_rows, R1, R2, D,
    stride_x0, stride_x1, stride_x2, stride_xd,
    stride_tx0, stride_tx1, stride_tx2, stride_txd,
    stride_wd, stride_twd,
    eps,
    WRITE_PRIMAL: tl.constexpr, WRITE_TANGENT: tl.constexpr,
    HAS_TX: tl.constexpr, HAS_TW: tl.constexpr, ROUND_TO_W: tl.constexpr,
    ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr,
):
    """BLOCK_ROWS whole rows: y = round_w(x·ρ)·w and/or ty = round_w(tx·ρ − x·ρ³·mean(x⊙tx))·w + round_w(x·ρ)·tw.

    A row is CHUNKS register tensors of BLOCK_D lanes (:func:`t2i_kernels._utils.row_tile`; 3 × 1024 for D = 3072)."""
    # int64 offsets: B·H·N·D exceeds 2³¹ elements at large batch × 1024 px.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    x_offs = row_offsets(rows, R1, R2, stride_x0, stride_x1, stride_x2)
    x = load_chunks(X, x_offs, row_mask, stride_xd, D, ACC, CHUNKS, BLOCK_D)
    rho = tl.rsqrt(row_dot(x, x, CHUNKS) / D + eps)
    w = load_vector_chunks(W, stride_wd, D, ACC, CHUNKS, BLOCK_D)
    n = ()
    for c in tl.static_range(CHUNKS):
        n_c = x[c] * rho[:, None]
        if ROUND_TO_W:
            # The reference casts the normalised value to a half-precision weight's dtype before × weight.
            n_c = n_c.to(W.dtype.element_ty).to(ACC)
        n = n + (n_c,)
    y_offs = rows * D

    if WRITE_PRIMAL:
        for c in tl.static_range(CHUNKS):
            store_chunk(Y, y_offs, row_mask, D, n[c] * w[c][None, :], c, BLOCK_D)
    if WRITE_TANGENT:
        if HAS_TX:
            tx_offs = row_offsets(rows, R1, R2, stride_tx0, stride_tx1, stride_tx2)
            tx = load_chunks(TX, tx_offs, row_mask, stride_txd, D, ACC, CHUNKS, BLOCK_D)
            rho3_x_dot_tx = rho * rho * rho * (row_dot(x, tx, CHUNKS) / D)
        if HAS_TW:
            tw = load_vector_chunks(TW, stride_twd, D, ACC, CHUNKS, BLOCK_D)
        for c in tl.static_range(CHUNKS):
            ty = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=ACC)
            if HAS_TX:
                tn = tx[c] * rho[:, None] - x[c] * rho3_x_dot_tx[:, None]
                if ROUND_TO_W:
                    tn = tn.to(W.dtype.element_ty).to(ACC)
                ty += tn * w[c][None, :]
            if HAS_TW:
                ty += n[c] * tw[c][None, :]
            store_chunk(TY, y_offs, row_mask, D, ty, c, BLOCK_D)


@triton.jit
def _rms_norm_bwd_kernel(
    G, X, W,  # pointers to dL/dy (rows, D), x (rows, D), weight (D,)
    DX, DW_PART,  # pointers to dx (row-major) and fp32/fp64 partial sums of dw (programs, D)
    n_rows, R1, R2, D,
    stride_g0, stride_g1, stride_g2, stride_gd,
    stride_x0, stride_x1, stride_x2, stride_xd,
    stride_wd, stride_p,
    eps, tiles_per_program,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, ROUND_TO_W: tl.constexpr,
    ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr,
):
    """A contiguous range of row tiles: dx = ρ·(g_n − n·mean(g_n⊙n)) per row; this program's share of dw = Σ g·n_w."""
    pid = tl.program_id(0)
    w = load_vector_chunks(W, stride_wd, D, ACC, CHUNKS, BLOCK_D)
    # dw partials stay 2-D across the loop and are reduced over rows once at the end: a per-tile tl.sum(axis=0)
    # crosses warps (shared memory + a barrier every tile) for rows spread over several warps.
    dw = zero_chunks(BLOCK_ROWS, ACC, CHUNKS, BLOCK_D)
    tile_start = pid.to(tl.int64) * tiles_per_program  # int64 start: the loop index (and row offsets) are int64
    tile_end = tl.minimum(tile_start + tiles_per_program, tl.cdiv(n_rows, BLOCK_ROWS))
    for tile in range(tile_start, tile_end):
        rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        g = load_chunks(G, row_offsets(rows, R1, R2, stride_g0, stride_g1, stride_g2), row_mask, stride_gd, D,
                        ACC, CHUNKS, BLOCK_D)
        x = load_chunks(X, row_offsets(rows, R1, R2, stride_x0, stride_x1, stride_x2), row_mask, stride_xd, D,
                        ACC, CHUNKS, BLOCK_D)
        rho = tl.rsqrt(row_dot(x, x, CHUNKS) / D + eps)  # recomputed: x is read anyway, so statistics cost no traffic
        n = ()
        for c in tl.static_range(CHUNKS):
            n = n + (x[c] * rho[:, None],)
        if NEED_DW:
            new_dw = ()
            for c in tl.static_range(CHUNKS):
                n_w = n[c]
                if ROUND_TO_W:
                    n_w = n_w.to(W.dtype.element_ty).to(ACC)
                new_dw = new_dw + (dw[c] + g[c] * n_w,)
            dw = new_dw
        if NEED_DX:
            g_n = ()
            for c in tl.static_range(CHUNKS):
                g_n = g_n + (g[c] * w[c][None, :],)
            mean_gn_n = row_dot(g_n, n, CHUNKS) / D
            for c in tl.static_range(CHUNKS):
                dx = rho[:, None] * (g_n[c] - n[c] * mean_gn_n[:, None])
                store_chunk(DX, rows * D, row_mask, D, dx, c, BLOCK_D)
    if NEED_DW:
        for c in tl.static_range(CHUNKS):
            offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
            tl.store(DW_PART + pid * stride_p + offs_d, tl.sum(dw[c], axis=0), mask=offs_d < D)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and launchers
# ----------------------------------------------------------------------------------------------------------------
def rms_output_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The reference's output dtype: a half-precision weight's dtype, else the promotion of fp32 statistics with w."""
    if w_dtype in HALF_DTYPES:
        return w_dtype
    return torch.promote_types(torch.promote_types(x_dtype, torch.float32), w_dtype)


def _acc(*dtypes: torch.dtype):
    return accumulator_dtype(torch.float64 if torch.float64 in dtypes else torch.float32)


def check_eps(checks: InputChecks, eps: object) -> None:
    """``eps`` is a non-negative real number (shared by the norm ops)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        checks.type_problem(f"`eps`: expected a float ≥ 0, got {type(eps).__name__} {eps!r}")
    elif not eps >= 0:
        checks.value_problem(f"`eps`: expected a float ≥ 0, got {eps!r}")


def _check_rms_norm_inputs(op: str, x: object, weight: object, eps: object, tx: object = False) -> None:
    """Raise one ValueError/TypeError listing every problem: kinds, ranks, shapes, dtypes, devices, strides.

    ``tx`` is only checked when given (the explicit ``*_jvp`` API); ``False`` means "no tangent argument".
    """
    checks = InputChecks(op)
    ok_x = checks.tensor("x", x, layout="(..., D)", dtypes=FLOAT_DTYPES)
    if ok_x and x.dim() == 0:  # type: ignore[union-attr]
        checks.value_problem(f"`x`: expected a tensor of rank ≥ 1 (..., D), got a 0-d tensor of shape {x.shape}")
        ok_x = False
    ok_w = checks.tensor("weight", weight, ndim=1, layout="(D,)", dtypes=FLOAT_DTYPES)
    if ok_x and ok_w:
        checks.shape("weight", weight, (x.shape[-1],), "(D,) with D = x.shape[-1]")  # type: ignore[union-attr]
    check_eps(checks, eps)
    named: dict[str, object] = {"x": x, "weight": weight}
    ok_tx = True
    if tx is not False:
        ok_tx = checks.tensor("tx", tx, layout="(..., D)", dtypes=FLOAT_DTYPES)
        if ok_tx and ok_x:
            checks.shape("tx", tx, x.shape, "the shape of its primal `x`")  # type: ignore[union-attr]
            checks.same_dtype({"x": x, "tx": tx}, "a tangent has its primal's dtype")  # type: ignore[dict-item]
        named["tx"] = tx
    if ok_x and ok_tx and checks.ok:
        tensors = [x] + ([tx] if tx is not False else [])
        if row_layout(x.shape, *tensors) is None:  # type: ignore[union-attr, arg-type]
            checks.value_problem(
                "`x`/`tx`: expected leading dims that merge into at most 3 strided dims (call `.contiguous()` "
                f"first), got x {x.stride()}"  # type: ignore[union-attr]
                + (f", tx {tx.stride()}" if tx is not False else "")  # type: ignore[union-attr]
                + f" for shape {tuple(x.shape)}"  # type: ignore[union-attr]
            )
    if all(isinstance(t, torch.Tensor) for t in named.values()):
        checks.same_device(named)  # type: ignore[arg-type]
    checks.raise_if_any()


def _launch_fwd(
    x: torch.Tensor,
    tx: torch.Tensor | None,
    weight: torch.Tensor,
    tweight: torch.Tensor | None,
    eps: float,
    write_primal: bool,
    write_tangent: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    check_launchable("rms_norm", _rms_norm_fwd_kernel, x.device)
    d = x.shape[-1]
    block_rows, block_d, chunks, num_warps = row_tile(d, "rms_norm", max_chunks=MAX_CHUNKS, max_d=MAX_FUSED_D_CHUNKED)
    out_dtype = rms_output_dtype(x.dtype, weight.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device) if write_primal else None
    ty = torch.empty(x.shape, dtype=out_dtype, device=x.device) if write_tangent else None
    if x.numel() == 0:
        return y, ty
    layout, (x, tx_or_x) = shared_row_layout(x, x if tx is None else tx)
    check_row_count("rms_norm", layout.n_rows)
    dense = y if y is not None else ty
    (_, r1, r2), (sx, stx) = layout.sizes, layout.strides
    _rms_norm_fwd_kernel[(triton.cdiv(layout.n_rows, block_rows),)](
        x, tx_or_x, weight, weight if tweight is None else tweight,
        dense if y is None else y, dense if ty is None else ty,
        layout.n_rows, r1, r2, d,
        *sx, *stx,
        weight.stride(0), (weight if tweight is None else tweight).stride(0),
        eps,
        WRITE_PRIMAL=write_primal, WRITE_TANGENT=write_tangent,
        HAS_TX=tx is not None, HAS_TW=tweight is not None, ROUND_TO_W=weight.dtype in HALF_DTYPES,
        ACC=_acc(x.dtype, weight.dtype), BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        CHUNKS=chunks, num_warps=num_warps,
    )
    return y, ty


def _fake_out(x: torch.Tensor, weight: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty(x.shape, dtype=rms_output_dtype(x.dtype, weight.dtype), device=x.device)


@kernel_op("rms_norm_fwd", _fake_out)
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Primal only: ``round_w(x·ρ)·w``."""
    y, _ = _launch_fwd(x, None, weight, None, eps, True, False)
    return y


def _fake_tangent(
    x: torch.Tensor, weight: torch.Tensor, tx: torch.Tensor | None, tweight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return _fake_out(x, weight)


@kernel_op("rms_norm_tangent", _fake_tangent)
def _rms_norm_tangent(
    x: torch.Tensor, weight: torch.Tensor, tx: torch.Tensor | None, tweight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Tangent only (x is read for ρ; either tangent may be absent)."""
    _, ty = _launch_fwd(x, tx, weight, tweight, eps, False, True)
    return ty


def _fake_fwd_jvp(x: torch.Tensor, tx: torch.Tensor, weight: torch.Tensor, eps: float):
    return _fake_out(x, weight), _fake_out(x, weight)


@kernel_op("rms_norm_fwd_jvp", _fake_fwd_jvp)
def _rms_norm_fwd_jvp(
    x: torch.Tensor, tx: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal and tangent from one kernel (x read once for both)."""
    return _launch_fwd(x, tx, weight, None, eps, True, True)  # type: ignore[return-value]


def _fake_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, need_dx: bool,
              need_dweight: bool):
    dx, dweight = grad_or_placeholder(x, need_dx), grad_or_placeholder(weight, need_dweight)
    return dx, dweight


@kernel_op("rms_norm_bwd", _fake_bwd)
def _rms_norm_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, need_dx: bool, need_dweight: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)``; a gradient that is not needed comes back as an empty (0,) tensor (ops cannot return None)."""
    check_launchable("rms_norm backward", _rms_norm_bwd_kernel, x.device)
    d = x.shape[-1]
    block_rows, block_d, chunks, num_warps = row_tile(
        d, "rms_norm backward", max_chunks=MAX_CHUNKS, max_d=MAX_FUSED_D_CHUNKED
    )
    dx, dweight = _fake_bwd(grad_out, x, weight, eps, need_dx, need_dweight)
    if x.numel() == 0 or not (need_dx or need_dweight):
        return dx, dweight.zero_()
    layout, (grad_out, x) = shared_row_layout(grad_out, x)
    check_row_count("rms_norm backward", layout.n_rows)
    (_, r1, r2), (sg, sx) = layout.sizes, layout.strides
    n_tiles = triton.cdiv(layout.n_rows, block_rows)
    programs, tiles_per_program = reduction_split(n_tiles if need_dweight else 1, 1, x.device)
    if not need_dweight:  # no reduction: one tile per program
        programs, tiles_per_program = n_tiles, 1
    acc_dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    partial = torch.empty((programs, d) if need_dweight else (1, 1), dtype=acc_dtype, device=x.device)
    dx_buf = dx if need_dx else grad_out  # never written when NEED_DX is False
    _rms_norm_bwd_kernel[(programs,)](
        grad_out, x, weight, dx_buf, partial,
        layout.n_rows, r1, r2, d,
        *sg, *sx,
        weight.stride(0), partial.stride(0),
        eps, tiles_per_program,
        NEED_DX=need_dx, NEED_DW=need_dweight, ROUND_TO_W=weight.dtype in HALF_DTYPES,
        ACC=_acc(x.dtype, weight.dtype), BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        CHUNKS=chunks, num_warps=num_warps,
    )
    if need_dweight:
        dweight = partial.sum(dim=0).to(weight.dtype)  # ordered sum of per-program partials: deterministic
    return dx, dweight


# ----------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------------------------
class RMSNormGrads(NamedTuple):
    """Gradients of :class:`RMSNormFunction` (one slot per forward input)."""

    dx: torch.Tensor | None
    dweight: torch.Tensor | None
    deps: None


def _primal_backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    need_dx, need_dweight = ctx.primal_needs_grad
    if grad_out is None or not (need_dx or need_dweight):
        return None, None
    x, weight = ctx.saved_tensors
    dx, dweight = _rms_norm_bwd(grad_out, x, weight, ctx.eps, need_dx, need_dweight)
    return (dx if need_dx else None), (dweight if need_dweight else None)


class RMSNormFunction(torch.autograd.Function):
    """``y = round_w(x·ρ)·w`` over the last dim of x (..., D), weight (D,). ``jvp`` and ``backward`` are Triton."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _rms_norm_fwd(x, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, eps = inputs
        ctx.set_materialize_grads(False)  # absent tangents/grads arrive as None, not as zero tensors
        ctx.eps = eps
        ctx.save_for_forward(x, weight)  # jvp reads them; saving references costs no memory
        # Save for backward only when a gradient is wanted: under no_grad (the JVP pass) nothing is kept alive.
        ctx.primal_needs_grad = tuple(ctx.needs_input_grad[:2])
        if any(ctx.primal_needs_grad):
            ctx.save_for_backward(x, weight)

    @staticmethod
    def jvp(ctx, tx, tweight, teps) -> torch.Tensor:
        x, weight = ctx.saved_tensors
        return _rms_norm_tangent(x, weight, tx, tweight, ctx.eps)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> RMSNormGrads:
        return RMSNormGrads(*_primal_backward(ctx, grad_out), None)


class RMSNormJVPGrads(NamedTuple):
    """Gradients of :class:`RMSNormJVPFunction`; the tangent input gets none (tangents are never differentiated)."""

    dx: torch.Tensor | None
    dtx: None
    dweight: torch.Tensor | None
    deps: None


class RMSNormJVPFunction(torch.autograd.Function):
    """``(y, ty)`` from one kernel. ``y`` is differentiable w.r.t. x and weight; ``ty`` is non-differentiable."""

    @staticmethod
    def forward(x, tx, weight, eps):
        return _rms_norm_fwd_jvp(x, tx, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, tx, weight, eps = inputs
        ctx.set_materialize_grads(False)  # absent tangents/grads arrive as None, not as zero tensors
        ctx.eps = eps
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_forward(x, weight)
        ctx.primal_needs_grad = (ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        if any(ctx.primal_needs_grad):
            ctx.save_for_backward(x, weight)

    @staticmethod
    def jvp(ctx, dx, dtx, dweight, deps):
        # d(y) from the tangents of x and weight; `ty` is non-differentiable in both modes (a tangent of a tangent
        # is never needed by sCM/MeanFlow).
        x, weight = ctx.saved_tensors
        return _rms_norm_tangent(x, weight, dx, dweight, ctx.eps), None

    @staticmethod
    def backward(ctx, grad_y, grad_ty) -> RMSNormJVPGrads:
        dx, dweight = _primal_backward(ctx, grad_y)
        return RMSNormJVPGrads(dx, None, dweight, None)


# ----------------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of x (..., D) over its last dim with weight (D,): ``round_w(x·rsqrt(mean(x²) + eps))·weight``.

    Statistics in fp32 (fp64 for fp64 inputs); output dtype as :func:`t2i_kernels.reference.rms_norm`. Differentiable
    (Triton backward) and forward-differentiable (Triton tangent), including inside ``torch.func.jvp``. Returns a new
    row-major tensor of x's shape.
    """
    _check_rms_norm_inputs("rms_norm", x, weight, eps)
    return RMSNormFunction.apply(x, weight, float(eps))


def rms_norm_jvp(
    x: torch.Tensor, tx: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, ty)`` = RMSNorm and its tangent ``round_w(tx·ρ − x·ρ³·mean(x⊙tx))·w`` in one pass.

    The weight carries no tangent here (it is a parameter of the student). Gradients flow to x and weight through
    ``y`` only; ``ty`` is returned non-differentiable.
    """
    _check_rms_norm_inputs("rms_norm_jvp", x, weight, eps, tx=tx)
    return RMSNormJVPFunction.apply(x, tx, weight, float(eps))
