"""Fused qk-RMSNorm + RoPE + head transpose, with its tangent and its backward, in Triton.

Where FLUX uses it: on the Q and K projections of every attention (reference-spec §3.5 steps 2–5, §3.6 step 3): the
projection output (B, N, H·D) is viewed as heads, RMS-normalised over D = 128 (``norm_q``/``norm_k``), rotated
(RoPE) and laid out (B, H, N, D) for attention. Unfused that is ≥ 4 passes over Q and K (norm, rope's fp32 upcast and
rotated copy, cast back, transpose copy), each once more for the tangent; here it is one read of x (and tx) and one
write of y (and ty).

Math (x viewed as (B, N, H, D), weight w (D,), cos/sin (N, D) constant; same dtype order as the reference
``rope(rms_norm(x.unflatten(-1, (H, D)), w).transpose(1, 2), cos, sin)``: statistics in fp32 (fp64 for fp64 inputs),
the normalised value rounded to a half-precision weight's dtype, × w, rounded to the RMSNorm output dtype, RoPE in
fp32, rounded once more)::

    r  = round_out(round_w(x·ρ)·w),                ρ = rsqrt(mean(x²) + eps) per row of D
    y  = RoPE(r)                                    written as (B, H, N, D), row-major
    ty = RoPE(round_out(round_w(tx·ρ − x·ρ³·mean(x⊙tx))·w + round_w(x·ρ)·tw))   (tw only if the weight has a tangent)
    g_r = Rᵀ·g (the transposed rotation),  dx = ρ·(g_n − n·mean(g_n⊙n)), g_n = g_r·w,  dw = Σ g_r·round_w(x·ρ)

Output dtype: the RMSNorm output's (w's dtype when w is fp16/bf16, else ``promote(promote(x, fp32), w)``); dx has
x's dtype and shape, dw the weight's.

API:

* :func:`qk_norm_rope` ``(x, weight, cos, sin, eps=1e-6) -> y`` with x (B, N, H·D) or (B, N, H, D) (D = len(weight))
  and y (B, H, N, D) — an autograd Function usable under ``torch.func.jvp``, ``torch.autograd.forward_ad`` and
  ordinary backward (gradients w.r.t. x and weight; cos/sin are constants, as in :mod:`t2i_kernels.rope`).
* :func:`qk_norm_rope_jvp` ``(x, tx, weight, cos, sin, eps=1e-6) -> (y, ty)`` — primal and tangent from **one**
  kernel; ``y`` is differentiable, ``ty`` is marked non-differentiable.

Limits: D even and ≤ 8192; any strides for x (its last dim included), cos and sin; y is row-major (B, H, N, D). The
text/image concatenation of the double blocks (writing each stream at its sequence offset) is not fused: concatenate
the outputs, or the inputs before the call. ``dw`` is reduced deterministically. Verified on the CPU interpreter in
fp32/fp64; fp16/bf16 parity is GPU-only (``pytest -m gpu``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from t2i_kernels import reference
from t2i_kernels._checks import FLOAT_DTYPES, InputChecks, describe
from t2i_kernels._custom_ops import grad_or_placeholder, kernel_op
from t2i_kernels._runtime import check_launchable, tl, triton
from t2i_kernels._utils import accumulator_dtype, check_row_count, reduction_split, row_tile
from t2i_kernels.rms_norm import HALF_DTYPES, check_eps, rms_output_dtype, rms_stats
from t2i_kernels.rope import check_rope_tables, reject_table_tangents, rotate_pairs

__all__ = ["QKNormRoPEFunction", "QKNormRoPEJVPFunction", "qk_norm_rope", "qk_norm_rope_jvp"]


def qk_norm_rope_ref(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The pure-PyTorch composition this op fuses (reference dtype order), with the same signature."""
    heads_x = x if x.dim() == 4 else x.unflatten(-1, (-1, weight.shape[0]))
    return reference.rope(reference.rms_norm(heads_x, weight, eps).transpose(1, 2), cos, sin)


def qk_norm_rope_jvp_ref(
    x: torch.Tensor, tx: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference primal and tangent, composed from the analytic ``rms_norm_jvp`` and ``rope_jvp``."""
    split = (lambda t: t) if x.dim() == 4 else (lambda t: t.unflatten(-1, (-1, weight.shape[0])))
    r, tr = reference.rms_norm_jvp(split(x), split(tx), weight, eps)
    return reference.rope_jvp(r.transpose(1, 2), tr.transpose(1, 2), cos, sin)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _qk_norm_rope_fwd_kernel(
    X, TX, W, TW, COS, SIN,  # pointers to x (B, N, H, D), its tangent, weight (D,), weight tangent, cos/sin (N, D)
    Y, TY,  # pointers to the outputs (row-major (B, H, N, D); unused when WRITE_PRIMAL / WRITE_TANGENT is False)
    H, N, D,
    stride_xb, stride_xn, stride_xh, stride_xd,
    stride_txb, stride_txn, stride_txh, stride_txd,
    stride_wd, stride_twd,
    stride_cn, stride_cd,
    stride_sn, stride_sd,
    stride_yb, stride_yh, stride_yn,
    eps,
    WRITE_PRIMAL: tl.constexpr, WRITE_TANGENT: tl.constexpr,
    HAS_TX: tl.constexpr, HAS_TW: tl.constexpr, ROUND_TO_W: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_N whole rows (tokens) of head h of sample b: y = RoPE(RMSNorm(x)) and/or its tangent."""
    # Heads vary fastest over program_id(0) (no 65535 limit there): the H programs that share a tile of cos/sin run
    # back to back, so the tables are read from L2, not from memory, per head.
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    offs_n = (pid // H).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_n[:, None] < N) & mask_d[None, :]

    x = tl.load(
        X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
        mask=mask, other=0.0,
    ).to(ACC)
    rho = tl.rsqrt(rms_stats(x, D) + eps)
    n = x * rho[:, None]
    if ROUND_TO_W:
        n = n.to(W.dtype.element_ty).to(ACC)
    w = tl.load(W + offs_d * stride_wd, mask=mask_d, other=0.0).to(ACC)
    cos = tl.load(COS + offs_n[:, None] * stride_cn + offs_d[None, :] * stride_cd, mask=mask, other=0.0).to(ACC)
    sin = tl.load(SIN + offs_n[:, None] * stride_sn + offs_d[None, :] * stride_sd, mask=mask, other=0.0).to(ACC)
    y_offs = b * stride_yb + h * stride_yh + offs_n[:, None] * stride_yn + offs_d[None, :]

    if WRITE_PRIMAL:
        # The reference materialises the RMSNorm output in its dtype before RoPE: round there too.
        r = (n * w[None, :]).to(Y.dtype.element_ty).to(ACC)
        tl.store(Y + y_offs, rotate_pairs(r, cos, sin, BLOCK_N, BLOCK_D, False).to(Y.dtype.element_ty), mask=mask)
    if WRITE_TANGENT:
        tr = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
        if HAS_TX:
            tx = tl.load(
                TX + b * stride_txb + h * stride_txh + offs_n[:, None] * stride_txn + offs_d[None, :] * stride_txd,
                mask=mask, other=0.0,
            ).to(ACC)
            x_dot_tx = tl.sum(x * tx, axis=1) / D
            tn = tx * rho[:, None] - x * (rho * rho * rho * x_dot_tx)[:, None]
            if ROUND_TO_W:
                tn = tn.to(W.dtype.element_ty).to(ACC)
            tr += tn * w[None, :]
        if HAS_TW:
            tw = tl.load(TW + offs_d * stride_twd, mask=mask_d, other=0.0).to(ACC)
            tr += n * tw[None, :]
        tr = tr.to(TY.dtype.element_ty).to(ACC)
        tl.store(TY + y_offs, rotate_pairs(tr, cos, sin, BLOCK_N, BLOCK_D, False).to(TY.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    G, X, W, COS, SIN,  # pointers to dL/dy (B, H, N, D), x (B, N, H, D), weight (D,), cos/sin (N, D)
    DX, DW_PART,  # pointers to dx (row-major (B, N, H, D)) and fp32/fp64 partial sums of dw (programs, D)
    H, N, D,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_xb, stride_xn, stride_xh, stride_xd,
    stride_wd,
    stride_cn, stride_cd,
    stride_sn, stride_sd,
    stride_dxb, stride_dxn, stride_dxh,
    stride_p,
    eps, n_tiles, tiles_per_program,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, ROUND_TO_W: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """A contiguous range of (b, token block, head) tiles, heads fastest: g_r = Rᵀ·g, then the RMSNorm backward
    dx = ρ·(g_n − n·mean(g_n⊙n)) and this program's share of dw = Σ g_r·round_w(x·ρ)."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    w = tl.load(W + offs_d * stride_wd, mask=mask_d, other=0.0).to(ACC)
    # dw partials stay 2-D across the loop and are reduced over rows once at the end: a per-tile tl.sum(axis=0)
    # crosses warps (shared memory + a barrier every tile).
    dw = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    n_blocks = tl.cdiv(N, BLOCK_N)
    # Tile indices are 32-bit (the launcher checks n_tiles < 2³¹): a 64-bit division is a subroutine on NVIDIA
    # GPUs and this loop decomposes every tile index; only the offsets below are int64.
    tile_start = pid * tiles_per_program
    tile_end = tl.minimum(tile_start + tiles_per_program, n_tiles)
    for tile in range(tile_start, tile_end):
        h = (tile % H).to(tl.int64)
        offs_n = ((tile // H) % n_blocks * BLOCK_N).to(tl.int64) + tl.arange(0, BLOCK_N)
        b = (tile // H // n_blocks).to(tl.int64)
        mask = (offs_n[:, None] < N) & mask_d[None, :]
        g = tl.load(
            G + b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd,
            mask=mask, other=0.0,
        ).to(ACC)
        cos = tl.load(COS + offs_n[:, None] * stride_cn + offs_d[None, :] * stride_cd, mask=mask, other=0.0).to(ACC)
        sin = tl.load(SIN + offs_n[:, None] * stride_sn + offs_d[None, :] * stride_sd, mask=mask, other=0.0).to(ACC)
        g_r = rotate_pairs(g, cos, sin, BLOCK_N, BLOCK_D, True)
        x = tl.load(
            X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
            mask=mask, other=0.0,
        ).to(ACC)
        rho = tl.rsqrt(rms_stats(x, D) + eps)  # recomputed: x is read anyway, so statistics cost no traffic
        n = x * rho[:, None]
        if NEED_DW:
            n_w = n
            if ROUND_TO_W:
                n_w = n.to(W.dtype.element_ty).to(ACC)
            dw += g_r * n_w
        if NEED_DX:
            g_n = g_r * w[None, :]
            c = tl.sum(g_n * n, axis=1) / D
            dx = rho[:, None] * (g_n - n * c[:, None])
            dx_offs = b * stride_dxb + h * stride_dxh + offs_n[:, None] * stride_dxn + offs_d[None, :]
            tl.store(DX + dx_offs, dx.to(DX.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(DW_PART + pid * stride_p + offs_d, tl.sum(dw, axis=0), mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and launchers
# ----------------------------------------------------------------------------------------------------------------
def _check_qk_norm_rope_inputs(
    op: str, x: object, weight: object, cos: object, sin: object, eps: object, tx: object = False
) -> None:
    """Raise one ValueError/TypeError listing every problem: kinds, ranks, shapes, dtypes, devices.

    ``tx`` is only checked when given (the explicit ``*_jvp`` API); ``False`` means "no tangent argument".
    """
    checks = InputChecks(op)
    layout = "(B, N, H·D) or (B, N, H, D)"
    ok_x = checks.tensor("x", x, layout=layout, dtypes=FLOAT_DTYPES)
    if ok_x and x.dim() not in (3, 4):  # type: ignore[union-attr]
        checks.value_problem(f"`x`: expected a 3-d or 4-d tensor {layout}, got {describe(x)}")
        ok_x = False
    ok_w = checks.tensor("weight", weight, ndim=1, layout="(D,)", dtypes=FLOAT_DTYPES)
    n = d = None
    if ok_w:
        d = weight.shape[0]  # type: ignore[union-attr]
        if d % 2 or d == 0:
            checks.value_problem(
                f"`weight`: expected an even length D > 0 (RoPE rotates pairs), got {describe(weight)}"
            )
    if ok_x and ok_w:
        n, last = x.shape[1], x.shape[-1]  # type: ignore[union-attr]
        if x.dim() == 4 and last != d:  # type: ignore[union-attr]
            checks.value_problem(f"`x`: expected last dim D = len(weight) = {d}, got {describe(x)}")
        elif x.dim() == 3 and d and last % d:  # type: ignore[union-attr]
            checks.value_problem(
                f"`x`: expected a last dim H·D divisible by D = len(weight) = {d}, got {describe(x)}"
            )
    check_rope_tables(checks, cos, sin, n, d)
    check_eps(checks, eps)
    named: dict[str, object] = {"x": x, "weight": weight, "cos": cos, "sin": sin}
    if tx is not False:
        if checks.tensor("tx", tx, layout=layout, dtypes=FLOAT_DTYPES) and ok_x:
            checks.shape("tx", tx, x.shape, "the shape of its primal `x`")  # type: ignore[union-attr, arg-type]
            checks.same_dtype({"x": x, "tx": tx}, "a tangent has its primal's dtype")  # type: ignore[dict-item]
        named["tx"] = tx
    if all(isinstance(t, torch.Tensor) for t in named.values()):
        checks.same_device(named)  # type: ignore[arg-type]
    checks.raise_if_any()


def _heads(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x as a (B, N, H, D) view (no copy: splitting the last dim is always a view)."""
    return x if x.dim() == 4 else x.unflatten(-1, (-1, weight.shape[0]))


def _out_shape(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int]:
    batch, n = x.shape[0], x.shape[1]
    d = weight.shape[0]
    return batch, (x.shape[2] if x.dim() == 4 else x.shape[2] // d), n, d


def _acc(*dtypes: torch.dtype):
    return accumulator_dtype(torch.float64 if torch.float64 in dtypes else torch.float32)


def _launch_fwd(
    x: torch.Tensor,
    tx: torch.Tensor | None,
    weight: torch.Tensor,
    tweight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    write_primal: bool,
    write_tangent: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    check_launchable("qk_norm_rope", _qk_norm_rope_fwd_kernel, x.device)
    batch, heads, n, d = _out_shape(x, weight)
    block_n, block_d, _, num_warps = row_tile(d, "qk_norm_rope")
    out_dtype = rms_output_dtype(x.dtype, weight.dtype)
    y = torch.empty((batch, heads, n, d), dtype=out_dtype, device=x.device) if write_primal else None
    ty = torch.empty((batch, heads, n, d), dtype=out_dtype, device=x.device) if write_tangent else None
    if x.numel() == 0:
        return y, ty
    x4 = _heads(x, weight)
    tx4 = x4 if tx is None else _heads(tx, weight)
    dense = y if y is not None else ty
    _qk_norm_rope_fwd_kernel[(heads * triton.cdiv(n, block_n), batch)](
        x4, tx4, weight, weight if tweight is None else tweight, cos, sin,
        dense if y is None else y, dense if ty is None else ty,
        heads, n, d,
        *x4.stride(), *tx4.stride(),
        weight.stride(0), (weight if tweight is None else tweight).stride(0),
        *cos.stride(), *sin.stride(),
        dense.stride(0), dense.stride(1), dense.stride(2),
        eps,
        WRITE_PRIMAL=write_primal, WRITE_TANGENT=write_tangent,
        HAS_TX=tx is not None, HAS_TW=tweight is not None, ROUND_TO_W=weight.dtype in HALF_DTYPES,
        ACC=_acc(x.dtype, weight.dtype, cos.dtype, sin.dtype),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y, ty


def _fake_out(x: torch.Tensor, weight: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty(_out_shape(x, weight), dtype=rms_output_dtype(x.dtype, weight.dtype), device=x.device)


@kernel_op("qk_norm_rope_fwd", _fake_out)
def _qk_norm_rope_fwd(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    """Primal only: ``RoPE(RMSNorm(x))`` as (B, H, N, D)."""
    y, _ = _launch_fwd(x, None, weight, None, cos, sin, eps, True, False)
    return y


def _fake_tangent(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tx: torch.Tensor | None,
    tweight: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    return _fake_out(x, weight)


@kernel_op("qk_norm_rope_tangent", _fake_tangent)
def _qk_norm_rope_tangent(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tx: torch.Tensor | None,
    tweight: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """Tangent only (x is read for ρ; either tangent may be absent)."""
    _, ty = _launch_fwd(x, tx, weight, tweight, cos, sin, eps, False, True)
    return ty


def _fake_fwd_jvp(x: torch.Tensor, tx: torch.Tensor, weight: torch.Tensor, *args: object):
    return _fake_out(x, weight), _fake_out(x, weight)


@kernel_op("qk_norm_rope_fwd_jvp", _fake_fwd_jvp)
def _qk_norm_rope_fwd_jvp(
    x: torch.Tensor, tx: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal and tangent from one kernel (x, cos, sin read once for both)."""
    return _launch_fwd(x, tx, weight, None, cos, sin, eps, True, True)  # type: ignore[return-value]


def _fake_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              eps: float, need_dx: bool, need_dweight: bool):
    dx, dweight = grad_or_placeholder(x, need_dx), grad_or_placeholder(weight, need_dweight)
    return dx, dweight


@kernel_op("qk_norm_rope_bwd", _fake_bwd)
def _qk_norm_rope_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
    need_dx: bool, need_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)``, dx in x's shape; a gradient not needed comes back as an empty (0,) tensor."""
    check_launchable("qk_norm_rope backward", _qk_norm_rope_bwd_kernel, x.device)
    batch, heads, n, d = _out_shape(x, weight)
    # Half the forward's tile at 8 elements per thread (one 128-bit bf16 load per tensor): the 2-D dw partial then
    # fits in 64 registers under triton 3.6 and 3.9; the forward's 32 × 128 tile at 16 per thread spilled 8 B of
    # stack under 3.9 with it (sm_90 compile report).
    block_n, block_d, _, _ = row_tile(d, "qk_norm_rope backward", max_elements=2048)
    num_warps = max(4, min(16, block_n * block_d // 256))
    dx, dweight = _fake_bwd(grad_out, x, weight, cos, sin, eps, need_dx, need_dweight)
    if x.numel() == 0 or not (need_dx or need_dweight):
        return dx, dweight.zero_()
    n_tiles = batch * triton.cdiv(n, block_n) * heads
    check_row_count("qk_norm_rope backward", n_tiles)
    if need_dweight:
        programs, tiles_per_program = reduction_split(n_tiles, 1, x.device)
    else:  # no reduction: one tile per program
        programs, tiles_per_program = n_tiles, 1
    acc_dtype = torch.float64 if _acc(x.dtype, weight.dtype, cos.dtype, sin.dtype) == tl.float64 else torch.float32
    partial = torch.empty((programs, d) if need_dweight else (1, 1), dtype=acc_dtype, device=x.device)
    x4 = _heads(x, weight)
    dx4 = _heads(dx, weight) if need_dx else x4  # never written when NEED_DX is False
    _qk_norm_rope_bwd_kernel[(programs,)](
        grad_out, x4, weight, cos, sin, dx4, partial,
        heads, n, d,
        *grad_out.stride(), *x4.stride(), weight.stride(0), *cos.stride(), *sin.stride(),
        dx4.stride(0), dx4.stride(1), dx4.stride(2),
        partial.stride(0),
        eps, n_tiles, tiles_per_program,
        NEED_DX=need_dx, NEED_DW=need_dweight, ROUND_TO_W=weight.dtype in HALF_DTYPES,
        ACC=_acc(x.dtype, weight.dtype, cos.dtype, sin.dtype),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    if need_dweight:
        dweight = partial.sum(dim=0).to(weight.dtype)  # ordered sum of per-program partials: deterministic
    return dx, dweight


# ----------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------------------------
class QKNormRoPEGrads(NamedTuple):
    """Gradients of :class:`QKNormRoPEFunction` (the tables and eps get none)."""

    dx: torch.Tensor | None
    dweight: torch.Tensor | None
    dcos: None
    dsin: None
    deps: None


def _primal_backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    need_dx, need_dweight = ctx.primal_needs_grad
    if grad_out is None or not (need_dx or need_dweight):
        return None, None
    x, weight, cos, sin = ctx.saved_tensors
    dx, dweight = _qk_norm_rope_bwd(grad_out, x, weight, cos, sin, ctx.eps, need_dx, need_dweight)
    return (dx if need_dx else None), (dweight if need_dweight else None)


class QKNormRoPEFunction(torch.autograd.Function):
    """``y = RoPE(RMSNorm(x))`` as (B, H, N, D) from x (B, N, H·D) or (B, N, H, D). Triton jvp and backward."""

    @staticmethod
    def forward(x, weight, cos, sin, eps) -> torch.Tensor:
        return _qk_norm_rope_fwd(x, weight, cos, sin, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, cos, sin, eps = inputs
        ctx.set_materialize_grads(False)  # absent tangents/grads arrive as None, not as zero tensors
        ctx.eps = eps
        ctx.save_for_forward(x, weight, cos, sin)  # jvp reads them; saving references costs no memory
        # Save for backward only when a gradient is wanted: under no_grad (the JVP pass) nothing is kept alive.
        ctx.primal_needs_grad = tuple(ctx.needs_input_grad[:2])
        if any(ctx.primal_needs_grad):
            ctx.save_for_backward(x, weight, cos, sin)

    @staticmethod
    def jvp(ctx, tx, tweight, tcos, tsin, teps) -> torch.Tensor:
        reject_table_tangents("qk_norm_rope", tcos, tsin)
        x, weight, cos, sin = ctx.saved_tensors
        return _qk_norm_rope_tangent(x, weight, cos, sin, tx, tweight, ctx.eps)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> QKNormRoPEGrads:
        return QKNormRoPEGrads(*_primal_backward(ctx, grad_out), None, None, None)


class QKNormRoPEJVPGrads(NamedTuple):
    """Gradients of :class:`QKNormRoPEJVPFunction`: x and weight only."""

    dx: torch.Tensor | None
    dtx: None
    dweight: torch.Tensor | None
    dcos: None
    dsin: None
    deps: None


class QKNormRoPEJVPFunction(torch.autograd.Function):
    """``(y, ty)`` from one kernel. ``y`` is differentiable w.r.t. x and weight; ``ty`` is non-differentiable."""

    @staticmethod
    def forward(x, tx, weight, cos, sin, eps):
        return _qk_norm_rope_fwd_jvp(x, tx, weight, cos, sin, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, tx, weight, cos, sin, eps = inputs
        ctx.set_materialize_grads(False)  # absent tangents/grads arrive as None, not as zero tensors
        ctx.eps = eps
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_forward(x, weight, cos, sin)
        ctx.primal_needs_grad = (ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        if any(ctx.primal_needs_grad):
            ctx.save_for_backward(x, weight, cos, sin)

    @staticmethod
    def jvp(ctx, dx, dtx, dweight, dcos, dsin, deps):
        # d(y) from the tangents of x and weight; `ty` is non-differentiable in both modes.
        reject_table_tangents("qk_norm_rope_jvp", dcos, dsin)
        x, weight, cos, sin = ctx.saved_tensors
        return _qk_norm_rope_tangent(x, weight, cos, sin, dx, dweight, ctx.eps), None

    @staticmethod
    def backward(ctx, grad_y, grad_ty) -> QKNormRoPEJVPGrads:
        dx, dweight = _primal_backward(ctx, grad_y)
        return QKNormRoPEJVPGrads(dx, None, dweight, None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------------
def qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """RMSNorm over each head of x then RoPE, written as (B, H, N, D): the Q/K path from projection to attention.

    x (B, N, H·D) (the projection output; D = len(weight)) or (B, N, H, D); weight (D,); cos, sin (N, D) constant.
    Equals ``rope(rms_norm(x viewed (B, N, H, D), weight, eps).transpose(1, 2), cos, sin)`` in the reference's dtype
    order. Differentiable w.r.t. x and weight, forward-differentiable, including inside ``torch.func.jvp``.
    """
    _check_qk_norm_rope_inputs("qk_norm_rope", x, weight, cos, sin, eps)
    return QKNormRoPEFunction.apply(x, weight, cos, sin, float(eps))


def qk_norm_rope_jvp(
    x: torch.Tensor, tx: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, ty)`` = :func:`qk_norm_rope` of x and its tangent along tx, in one pass (weight and tables carry no
    tangent here). ``ty`` is returned non-differentiable."""
    _check_qk_norm_rope_inputs("qk_norm_rope_jvp", x, weight, cos, sin, eps, tx=tx)
    return QKNormRoPEJVPFunction.apply(x, tx, weight, cos, sin, float(eps))
