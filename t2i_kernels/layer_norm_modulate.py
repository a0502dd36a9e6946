"""LayerNorm (no affine) + AdaLN modulation ``y = x̂·(1 + scale) + shift`` with its tangent and backward, in Triton.

Where FLUX uses it: ``norm1``/``norm1_context`` and ``norm2``/``norm2_context`` of every double block, ``norm`` of
every single block and ``norm_out`` (eps 1e-6, D = 3072, scale/shift per sample (B, D) from the AdaLN linear;
reference-spec §3.5 steps 1, 9, 10, §3.6 step 1, §3.7).

Math (x (B, N, D); scale, shift (B, D) per sample or (D,) shared; μ, σ = mean and std of a row over D; one pass over
the row in registers, sums in fp32, fp64 when an input is fp64, rounded once at the store)::

    x̂   = (x − μ)/σ,   σ = sqrt(mean((x − μ)²) + eps)
    y   = x̂·(1 + scale) + shift
    tx̂  = (tx − mean(tx) − x̂·mean(x̂⊙tx))/σ
    ty  = tx̂·(1 + scale) + x̂·tscale + tshift                     (tangent; any of tx, tscale, tshift may be absent)
    dx  = (g_x̂ − mean(g_x̂) − x̂·mean(g_x̂⊙x̂))/σ,  g_x̂ = g·(1 + scale)   (backward, g = dL/dy)
    dscale = Σ_n g·x̂,   dshift = Σ_n g                            (per sample; also over B for the (D,) form)

Dtypes: x, scale, shift may differ (e.g. fp32 hidden states, bf16 modulation); the output has their promoted dtype,
as the reference's ``LayerNorm(x)·(1 + scale) + shift`` outside autocast (the reference also rounds x̂ to x's dtype
in between; the kernel rounds once, which is at least as accurate). Each tangent has its primal's dtype, each
gradient its input's.

API:

* :func:`layer_norm_modulate` ``(x, scale, shift, eps=1e-6) -> y`` — an autograd Function usable under
  ``torch.func.jvp``, ``torch.autograd.forward_ad`` and ordinary backward.
* :func:`layer_norm_modulate_jvp` ``(x, tx, scale, tscale, shift, tshift, eps=1e-6) -> (y, ty)`` — primal and
  tangent from **one** kernel; ``tscale``/``tshift`` may be ``None`` (zero). ``y`` is differentiable, ``ty`` is not.

Launchers are ``torch.library`` custom ops so that Triton never sees functorch wrappers (see
:mod:`t2i_kernels._custom_ops`).

Limits and tiling: D ≤ 8192 (:data:`t2i_kernels._utils.MAX_FUSED_D`; wider rows raise ``RuntimeError``: at 12288 the
backward's four row tensors (g, x and the dscale/dshift partials) spill past the 128 registers a thread has at 16
warps: 32 B of stack, 8 spill stores, 14 reloads in the sm_90 compile report under triton 3.9).
:func:`t2i_kernels._utils.row_tile` holds a row as ``CHUNKS`` register tiles of ``BLOCK_D`` power-of-two lanes, the
fewest that cover D: FLUX's D = 3072 is 3 × 1024 lanes on 4 warps (24 values per thread per row tensor, no masked
lane; one block of 4096 lanes masked a quarter of them), D = 128 one chunk in a 32-row tile. sm_90 compile report
(project CPU machine, no GPU; triton 3.9 / 3.6) at D = 3072: no spills, 103 / 110 registers for the forward with
tangent, 168 / 163 for the backward, 128-bit loads. Any strides for every input (no copies); outputs are row-major.
The backward recomputes μ, σ from x (read anyway) instead of saving them, and reduces dscale/dshift
deterministically (2-D per-program partials summed over rows once after the loop, then one ordered sum). Verified on
the CPU interpreter in fp32/fp64; fp16/bf16 parity is GPU-only (``pytest -m gpu``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from t2i_kernels import reference
from t2i_kernels._checks import FLOAT_DTYPES, InputChecks, describe
from t2i_kernels._custom_ops import grad_or_placeholder, kernel_op
from t2i_kernels._runtime import check_launchable, tl, triton
from t2i_kernels._utils import (
    MAX_CHUNKS,
    accumulator_dtype,
    chunk_mask,
    load_chunks,
    load_vector_chunks,
    reduction_split,
    row_dot,
    row_sum,
    row_tile,
    store_chunk,
    zero_chunks,
)
from t2i_kernels.rms_norm import check_eps

__all__ = [
    "LayerNormModulateFunction",
    "LayerNormModulateJVPFunction",
    "layer_norm_modulate",
    "layer_norm_modulate_jvp",
]

#: The pure-PyTorch reference with the same signature (kept beside the kernel, as the house style asks).
layer_norm_modulate_ref = reference.layer_norm_modulate
layer_norm_modulate_jvp_ref = reference.layer_norm_modulate_jvp


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _normalize_rows(x, row_mask, D, eps, CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(x̂, 1/σ) of each row of a tile held as CHUNKS (BLOCK_ROWS, BLOCK_D) tensors whose masked lanes hold 0 (x̂ is 0
    there too)."""
    mean = row_sum(x, CHUNKS) / D
    xc = ()
    for c in tl.static_range(CHUNKS):
        xc = xc + (tl.where(chunk_mask(row_mask, D, c, BLOCK_D), x[c] - mean[:, None], 0.0),)
    rstd = tl.rsqrt(row_dot(xc, xc, CHUNKS) / D + eps)  # two-pass variance: the row is in registers, so it is free
    xhat = ()
    for c in tl.static_range(CHUNKS):
        xhat = xhat + (xc[c] * rstd[:, None],)
    return xhat, rstd


@triton.jit
def _layer_norm_modulate_fwd_kernel(
    X, TX, SCALE, TSCALE, SHIFT, TSHIFT,  # pointers to the inputs (a T* pointer is unused when its HAS_* is False)
    Y, TY,  # pointers to the outputs (row-major (B, N, D); unused when WRITE_PRIMAL / WRITE_TANGENT is False)
    N, D,
    stride_xb, stride_xn, stride_xd,
    stride_txb, stride_txn, stride_txd,
    stride_scb, stride_scd,  # stride_scb = 0 for a (D,) scale shared by every sample
    stride_tscb, stride_tscd,
    stride_shb, stride_shd,
    stride_tshb, stride_tshd,
    stride_yb, stride_yn,
    eps,
    WRITE_PRIMAL: tl.constexpr, WRITE_TANGENT: tl.constexpr,
    HAS_TX: tl.constexpr, HAS_TSCALE: tl.constexpr, HAS_TSHIFT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr,
):
    """BLOCK_ROWS whole rows of sample b: y = x̂·(1 + scale) + shift and/or ty = tx̂·(1 + scale) + x̂·tscale + tshift.

    A row is CHUNKS register tensors of BLOCK_D lanes (:func:`t2i_kernels._utils.row_tile`; 3 × 1024 for D = 3072)."""
    # int64 offsets: B·N·D exceeds 2³¹ elements at large batch × 1024 px.
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = offs_n < N

    x = load_chunks(X + b * stride_xb, offs_n * stride_xn, row_mask, stride_xd, D, ACC, CHUNKS, BLOCK_D)
    xhat, rstd = _normalize_rows(x, row_mask, D, eps, CHUNKS, BLOCK_D)
    scale = load_vector_chunks(SCALE + b * stride_scb, stride_scd, D, ACC, CHUNKS, BLOCK_D)
    y_offs = b * stride_yb + offs_n * stride_yn

    if WRITE_PRIMAL:
        shift = load_vector_chunks(SHIFT + b * stride_shb, stride_shd, D, ACC, CHUNKS, BLOCK_D)
        for c in tl.static_range(CHUNKS):
            store_chunk(Y, y_offs, row_mask, D, xhat[c] * (1.0 + scale[c][None, :]) + shift[c][None, :], c, BLOCK_D)
    if WRITE_TANGENT:
        if HAS_TX:
            tx = load_chunks(TX + b * stride_txb, offs_n * stride_txn, row_mask, stride_txd, D, ACC, CHUNKS, BLOCK_D)
            tx_mean = row_sum(tx, CHUNKS) / D
            xhat_dot_tx = row_dot(xhat, tx, CHUNKS) / D
        if HAS_TSCALE:
            tscale = load_vector_chunks(TSCALE + b * stride_tscb, stride_tscd, D, ACC, CHUNKS, BLOCK_D)
        if HAS_TSHIFT:
            tshift = load_vector_chunks(TSHIFT + b * stride_tshb, stride_tshd, D, ACC, CHUNKS, BLOCK_D)
        for c in tl.static_range(CHUNKS):
            ty = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=ACC)
            if HAS_TX:
                txhat = tx[c] - tx_mean[:, None] - xhat[c] * xhat_dot_tx[:, None]
                txhat = rstd[:, None] * tl.where(chunk_mask(row_mask, D, c, BLOCK_D), txhat, 0.0)
                ty += txhat * (1.0 + scale[c][None, :])
            if HAS_TSCALE:
                ty += xhat[c] * tscale[c][None, :]
            if HAS_TSHIFT:
                ty += tshift[c][None, :]
            store_chunk(TY, y_offs, row_mask, D, ty, c, BLOCK_D)


@triton.jit
def _layer_norm_modulate_bwd_kernel(
    G, X, SCALE,  # pointers to dL/dy (B, N, D), x (B, N, D), scale ((B, D), or (D,) with stride_scb = 0)
    DX, DSCALE_PART, DSHIFT_PART,  # pointers to dx (row-major) and fp32/fp64 partial sums (B, programs, D)
    N, D,
    stride_gb, stride_gn, stride_gd,
    stride_xb, stride_xn, stride_xd,
    stride_scb, stride_scd,
    stride_dxb, stride_dxn,
    stride_pb, stride_pp,
    eps, tiles_per_program,
    NEED_DX: tl.constexpr, NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr,
):
    """A contiguous range of row tiles of sample b: dx per row, and this program's share of Σ_n g·x̂ and Σ_n g."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    scale = load_vector_chunks(SCALE + b * stride_scb, stride_scd, D, ACC, CHUNKS, BLOCK_D)
    # 2-D partials, reduced over rows once after the loop (a per-tile tl.sum(axis=0) crosses warps every tile).
    dscale = zero_chunks(BLOCK_ROWS, ACC, CHUNKS, BLOCK_D)
    dshift = zero_chunks(BLOCK_ROWS, ACC, CHUNKS, BLOCK_D)
    tile_start = pid.to(tl.int64) * tiles_per_program  # int64 start: the loop index (and row offsets) are int64
    tile_end = tl.minimum(tile_start + tiles_per_program, tl.cdiv(N, BLOCK_ROWS))
    for tile in range(tile_start, tile_end):
        offs_n = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = offs_n < N
        g = load_chunks(G + b * stride_gb, offs_n * stride_gn, row_mask, stride_gd, D, ACC, CHUNKS, BLOCK_D)
        x = load_chunks(X + b * stride_xb, offs_n * stride_xn, row_mask, stride_xd, D, ACC, CHUNKS, BLOCK_D)
        # Recomputed: x is read anyway, so statistics cost no traffic.
        xhat, rstd = _normalize_rows(x, row_mask, D, eps, CHUNKS, BLOCK_D)
        if NEED_DSCALE:
            new_dscale = ()
            for c in tl.static_range(CHUNKS):
                new_dscale = new_dscale + (dscale[c] + g[c] * xhat[c],)
            dscale = new_dscale
        if NEED_DSHIFT:
            new_dshift = ()
            for c in tl.static_range(CHUNKS):
                new_dshift = new_dshift + (dshift[c] + g[c],)
            dshift = new_dshift
        if NEED_DX:
            g_xhat = ()
            for c in tl.static_range(CHUNKS):
                g_xhat = g_xhat + (g[c] * (1.0 + scale[c][None, :]),)
            mean_g = row_sum(g_xhat, CHUNKS) / D
            mean_gx = row_dot(g_xhat, xhat, CHUNKS) / D
            for c in tl.static_range(CHUNKS):
                dx = rstd[:, None] * (g_xhat[c] - mean_g[:, None] - xhat[c] * mean_gx[:, None])
                store_chunk(DX, b * stride_dxb + offs_n * stride_dxn, row_mask, D, dx, c, BLOCK_D)
    part_offs = b * stride_pb + pid * stride_pp
    for c in tl.static_range(CHUNKS):
        offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        if NEED_DSCALE:
            tl.store(DSCALE_PART + part_offs + offs_d, tl.sum(dscale[c], axis=0), mask=offs_d < D)
        if NEED_DSHIFT:
            tl.store(DSHIFT_PART + part_offs + offs_d, tl.sum(dshift[c], axis=0), mask=offs_d < D)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and launchers
# ----------------------------------------------------------------------------------------------------------------
def _check_modulation(checks: InputChecks, name: str, value: object, x: object, ok_x: bool) -> bool:
    """``value`` is a (B, D) per-sample or (D,) shared modulation tensor for x (B, N, D)."""
    if not checks.tensor(name, value, layout="(B, D) or (D,)", dtypes=FLOAT_DTYPES):
        return False
    if not ok_x:
        return True
    batch, _, d = x.shape  # type: ignore[union-attr]
    if tuple(value.shape) not in ((batch, d), (d,)):  # type: ignore[union-attr]
        checks.value_problem(
            f"`{name}`: expected shape ({batch}, {d}) = (B, D) of x or ({d},) = (D,), got "
            f"{describe(value)}"
        )
        return False
    return True


def _check_layer_norm_modulate_inputs(
    op: str,
    x: object,
    scale: object,
    shift: object,
    eps: object,
    tangents: dict[str, object] | None = None,
) -> None:
    """Raise one ValueError/TypeError listing every problem: kinds, ranks, shapes, dtypes, devices."""
    checks = InputChecks(op)
    ok_x = checks.tensor("x", x, ndim=3, layout="(B, N, D)", dtypes=FLOAT_DTYPES)
    _check_modulation(checks, "scale", scale, x, ok_x)
    _check_modulation(checks, "shift", shift, x, ok_x)
    check_eps(checks, eps)
    named: dict[str, object] = {"x": x, "scale": scale, "shift": shift}
    for name, tangent in (tangents or {}).items():
        if tangent is None and name != "tx":
            continue
        primal = named[name.removeprefix("t")]
        if checks.tensor(name, tangent, dtypes=FLOAT_DTYPES) and isinstance(primal, torch.Tensor):
            checks.shape(name, tangent, primal.shape, f"the shape of its primal `{name.removeprefix('t')}`")
            checks.same_dtype({name.removeprefix("t"): primal, name: tangent}, "a tangent has its primal's dtype")
        named[name] = tangent
    if all(isinstance(t, torch.Tensor) for t in named.values() if t is not None):
        checks.same_device({k: v for k, v in named.items() if v is not None})  # type: ignore[misc]
    checks.raise_if_any()


def _output_dtype(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.dtype:
    """The reference's dtype: LayerNorm keeps x's dtype, then the modulation promotes with scale and shift."""
    return torch.promote_types(torch.promote_types(x.dtype, scale.dtype), shift.dtype)


def _acc(*tensors: torch.Tensor | None):
    return accumulator_dtype(
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _strides2(t: torch.Tensor | None, fallback: torch.Tensor) -> tuple[int, int]:
    """(stride_b, stride_d) of a modulation tensor; a (D,) one has stride_b = 0 (shared by every sample)."""
    t = fallback if t is None else t
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (0, t.stride(0))


def _launch_fwd(
    x: torch.Tensor,
    tx: torch.Tensor | None,
    scale: torch.Tensor,
    tscale: torch.Tensor | None,
    shift: torch.Tensor,
    tshift: torch.Tensor | None,
    eps: float,
    write_primal: bool,
    write_tangent: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    check_launchable("layer_norm_modulate", _layer_norm_modulate_fwd_kernel, x.device)
    batch, n, d = x.shape
    block_rows, block_d, chunks, num_warps = row_tile(d, "layer_norm_modulate", max_chunks=MAX_CHUNKS)
    out_dtype = _output_dtype(x, scale, shift)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device) if write_primal else None
    ty = torch.empty(x.shape, dtype=out_dtype, device=x.device) if write_tangent else None
    if x.numel() == 0:
        return y, ty
    dense = y if y is not None else ty
    _layer_norm_modulate_fwd_kernel[(triton.cdiv(n, block_rows), batch)](
        x, x if tx is None else tx, scale, scale if tscale is None else tscale,
        shift, shift if tshift is None else tshift,
        dense if y is None else y, dense if ty is None else ty,
        n, d,
        *x.stride(), *(x if tx is None else tx).stride(),
        *_strides2(scale, scale), *_strides2(tscale, scale), *_strides2(shift, shift), *_strides2(tshift, shift),
        dense.stride(0), dense.stride(1),
        eps,
        WRITE_PRIMAL=write_primal, WRITE_TANGENT=write_tangent,
        HAS_TX=tx is not None, HAS_TSCALE=tscale is not None, HAS_TSHIFT=tshift is not None,
        ACC=_acc(x, scale, shift), BLOCK_ROWS=block_rows, BLOCK_D=block_d, CHUNKS=chunks,
        num_warps=num_warps,
    )
    return y, ty


def _fake_out(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty(x.shape, dtype=_output_dtype(x, scale, shift), device=x.device)


@kernel_op("layer_norm_modulate_fwd", _fake_out)
def _layer_norm_modulate_fwd(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """Primal only: ``x̂·(1 + scale) + shift``."""
    y, _ = _launch_fwd(x, None, scale, None, shift, None, eps, True, False)
    return y


def _fake_tangent(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, tx: torch.Tensor | None, tscale: torch.Tensor | None,
    tshift: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    return _fake_out(x, scale, shift)


@kernel_op("layer_norm_modulate_tangent", _fake_tangent)
def _layer_norm_modulate_tangent(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, tx: torch.Tensor | None, tscale: torch.Tensor | None,
    tshift: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """Tangent only, ``tx̂·(1 + scale) + x̂·tscale + tshift`` (x is read for x̂; shift only fixes the dtype)."""
    _, ty = _launch_fwd(x, tx, scale, tscale, shift, tshift, eps, False, True)
    return ty


def _fake_fwd_jvp(
    x: torch.Tensor, tx: torch.Tensor, scale: torch.Tensor, tscale: torch.Tensor | None, shift: torch.Tensor,
    tshift: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fake_out(x, scale, shift), _fake_out(x, scale, shift)


@kernel_op("layer_norm_modulate_fwd_jvp", _fake_fwd_jvp)
def _layer_norm_modulate_fwd_jvp(
    x: torch.Tensor, tx: torch.Tensor, scale: torch.Tensor, tscale: torch.Tensor | None, shift: torch.Tensor,
    tshift: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal and tangent from one kernel (x, tx read once)."""
    return _launch_fwd(x, tx, scale, tscale, shift, tshift, eps, True, True)  # type: ignore[return-value]


def _fake_bwd(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
              need_dx: bool, need_dscale: bool, need_dshift: bool):
    return (grad_or_placeholder(x, need_dx), grad_or_placeholder(scale, need_dscale),
            grad_or_placeholder(shift, need_dshift))


@kernel_op("layer_norm_modulate_bwd", _fake_bwd)
def _layer_norm_modulate_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, need_dx: bool,
    need_dscale: bool, need_dshift: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dscale, dshift)``; a gradient not needed comes back as an empty (0,) tensor (ops cannot return None).
    ``shift`` is only read for its shape and dtype."""
    check_launchable("layer_norm_modulate backward", _layer_norm_modulate_bwd_kernel, x.device)
    batch, n, d = x.shape
    block_rows, block_d, chunks, num_warps = row_tile(d, "layer_norm_modulate backward", max_chunks=MAX_CHUNKS)
    dx, dscale, dshift = _fake_bwd(grad_out, x, scale, shift, eps, need_dx, need_dscale, need_dshift)
    if x.numel() == 0 or not (need_dx or need_dscale or need_dshift):
        return dx, dscale.zero_(), dshift.zero_()
    n_tiles = triton.cdiv(n, block_rows)
    if need_dscale or need_dshift:
        programs, tiles_per_program = reduction_split(n_tiles, batch, x.device)
    else:  # no reduction: one tile per program
        programs, tiles_per_program = n_tiles, 1
    acc_dtype = torch.float64 if _acc(x, scale, shift) == tl.float64 else torch.float32
    part_shape = (batch, programs, d)
    dscale_part = torch.empty(part_shape if need_dscale else (1, 1, 1), dtype=acc_dtype, device=x.device)
    dshift_part = torch.empty(part_shape if need_dshift else (1, 1, 1), dtype=acc_dtype, device=x.device)
    if need_dscale and need_dshift:
        assert dscale_part.stride() == dshift_part.stride()  # one pair of partial strides serves both buffers
    part = dscale_part if need_dscale else dshift_part
    dx_buf = dx if need_dx else grad_out  # never written when NEED_DX is False
    _layer_norm_modulate_bwd_kernel[(programs, batch)](
        grad_out, x, scale, dx_buf, dscale_part, dshift_part,
        n, d,
        *grad_out.stride(), *x.stride(), *_strides2(scale, scale),
        dx_buf.stride(0), dx_buf.stride(1),
        part.stride(0), part.stride(1),
        eps, tiles_per_program,
        NEED_DX=need_dx, NEED_DSCALE=need_dscale, NEED_DSHIFT=need_dshift,
        ACC=_acc(x, scale, shift), BLOCK_ROWS=block_rows, BLOCK_D=block_d, CHUNKS=chunks,
        num_warps=num_warps,
    )

    def reduce(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        per_sample = partial.sum(dim=1)  # ordered sums: deterministic run to run
        return (per_sample if like.dim() == 2 else per_sample.sum(dim=0)).to(like.dtype)

    if need_dscale:
        dscale = reduce(dscale_part, scale)
    if need_dshift:
        dshift = reduce(dshift_part, shift)
    return dx, dscale, dshift


# ----------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------------------------
class LayerNormModulateGrads(NamedTuple):
    """Gradients of :class:`LayerNormModulateFunction` (one slot per forward input)."""

    dx: torch.Tensor | None
    dscale: torch.Tensor | None
    dshift: torch.Tensor | None
    deps: None


def _primal_backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    need_dx, need_dscale, need_dshift = ctx.primal_needs_grad
    if grad_out is None or not (need_dx or need_dscale or need_dshift):
        return None, None, None
    x, scale, shift = ctx.saved_tensors
    grads = _layer_norm_modulate_bwd(grad_out, x, scale, shift, ctx.eps, need_dx, need_dscale, need_dshift)
    return tuple(g if need else None for g, need in zip(grads, ctx.primal_needs_grad))


class LayerNormModulateFunction(torch.autograd.Function):
    """``y = LayerNorm(x)·(1 + scale) + shift``; x (B, N, D), scale/shift (B, D) or (D,). Triton jvp and backward."""

    @staticmethod
    def forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
        return _layer_norm_modulate_fwd(x, scale, shift, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, scale, shift, eps = inputs
        ctx.set_materialize_grads(False)  # absent tangents/grads arrive as None, not as zero tensors
        ctx.eps = eps
        ctx.save_for_forward(x, scale, shift)  # jvp reads them; saving references costs no memory
        # Save for backward only when a gradient is wanted: under no_grad (the JVP pass) nothing is kept alive.
        ctx.primal_needs_grad = tuple(ctx.needs_input_grad[:3])
        if any(ctx.primal_needs_grad):
            ctx.save_for_backward(x, scale, shift)

    @staticmethod
    def jvp(ctx, tx, tscale, tshift, teps) -> torch.Tensor:
        x, scale, shift = ctx.saved_tensors
        return _layer_norm_modulate_tangent(x, scale, shift, tx, tscale, tshift, ctx.eps)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> LayerNormModulateGrads:
        return LayerNormModulateGrads(*_primal_backward(ctx, grad_out), None)


class LayerNormModulateJVPGrads(NamedTuple):
    """Gradients of :class:`LayerNormModulateJVPFunction`; tangent inputs get none."""

    dx: torch.Tensor | None
    dtx: None
    dscale: torch.Tensor | None
    dtscale: None
    dshift: torch.Tensor | None
    dtshift: None
    deps: None


class LayerNormModulateJVPFunction(torch.autograd.Function):
    """``(y, ty)`` from one kernel. ``y`` is differentiable w.r.t. x, scale, shift; ``ty`` is non-differentiable."""

    @staticmethod
    def forward(x, tx, scale, tscale, shift, tshift, eps):
        return _layer_norm_modulate_fwd_jvp(x, tx, scale, tscale, shift, tshift, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, tx, scale, tscale, shift, tshift, eps = inputs
        ctx.set_materialize_grads(False)  # absent tangents/grads arrive as None, not as zero tensors
        ctx.eps = eps
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_forward(x, scale, shift)
        needs = ctx.needs_input_grad
        ctx.primal_needs_grad = (needs[0], needs[2], needs[4])
        if any(ctx.primal_needs_grad):
            ctx.save_for_backward(x, scale, shift)

    @staticmethod
    def jvp(ctx, dx, dtx, dscale, dtscale, dshift, dtshift, deps):
        # d(y) from the tangents of x, scale, shift; `ty` is non-differentiable in both modes.
        x, scale, shift = ctx.saved_tensors
        return _layer_norm_modulate_tangent(x, scale, shift, dx, dscale, dshift, ctx.eps), None

    @staticmethod
    def backward(ctx, grad_y, grad_ty) -> LayerNormModulateJVPGrads:
        dx, dscale, dshift = _primal_backward(ctx, grad_y)
        return LayerNormModulateJVPGrads(dx, None, dscale, None, dshift, None, None)


# ----------------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------------
def layer_norm_modulate(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LayerNorm(x)·(1 + scale) + shift`` (no affine) for x (B, N, D) and scale, shift (B, D) or (D,).

    Differentiable (Triton backward) and forward-differentiable (Triton tangent), including inside
    ``torch.func.jvp``. Returns a new row-major (B, N, D) tensor of the promoted dtype of x, scale, shift.
    """
    _check_layer_norm_modulate_inputs("layer_norm_modulate", x, scale, shift, eps)
    return LayerNormModulateFunction.apply(x, scale, shift, float(eps))


def layer_norm_modulate_jvp(
    x: torch.Tensor,
    tx: torch.Tensor,
    scale: torch.Tensor,
    tscale: torch.Tensor | None,
    shift: torch.Tensor,
    tshift: torch.Tensor | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, ty)``: LayerNorm + modulation and its tangent ``tx̂·(1 + scale) + x̂·tscale + tshift`` in one pass.

    ``tscale``/``tshift`` given as ``None`` count as zero. Gradients flow to x, scale and shift through ``y`` only;
    ``ty`` is returned non-differentiable (sCM/MeanFlow detach every tangent).
    """
    _check_layer_norm_modulate_inputs(
        "layer_norm_modulate_jvp", x, scale, shift, eps, {"tx": tx, "tscale": tscale, "tshift": tshift}
    )
    return LayerNormModulateJVPFunction.apply(x, tx, scale, tscale, shift, tshift, float(eps))
