"""Pure-PyTorch references of every hot-path op of the FLUX student, and their tangents written out by hand.

Each op ``<op>(...)`` computes exactly what the reference system (T2I-Distill on diffusers FLUX) computes, in the
same dtype order (reference-spec §2.4, §3.5–3.7): it *is* the parity oracle for the Triton kernels, which share its
signature (``t2i_kernels.<op>``). Because it uses the same torch ops, it also behaves the same under
``torch.autocast`` (e.g. ``softmax``/``layer_norm`` return fp32 there), so it reproduces the reference's JVP pass
when called inside the same context.

Each ``<op>_jvp(x, tx, ...) -> (y, ty)`` is the forward-mode derivative written analytically (no autograd), in the
dtype order of the primal outside autocast. ``tests/t2i_kernels/test_reference.py`` proves in float64 that it equals
``torch.func.jvp`` of ``<op>`` to 1e-10. Tangent arguments documented as optional may be ``None`` (= zero tangent).

``upcast=True`` computes in fp32 (fp64 stays fp64) and casts the result back to the input dtype: the "same math at
higher precision" comparison of flash-attention's tests. Float64 truth is obtained by passing float64 inputs.

Tangent formulas (x̂ the normalised input, ρ = rsqrt(mean(x²) + ε), σ the LayerNorm std):

==================  ===============================================  ==============================================
op                  primal                                           tangent
==================  ===============================================  ==============================================
attention           S = (Q·Kᵀ)·scale, P = softmax(S), O = P·V         tS = (tQ·Kᵀ + Q·tKᵀ)·scale, μ = rowsum(P⊙tS),
                                                                     tO = (P⊙(tS − μ))·V + P·tV
rms_norm            y = (x·ρ)·w                                      ty = (tx·ρ − x·ρ³·mean(x⊙tx))·w
layer_norm_modulate y = x̂·(1 + scale) + shift                        tx̂ = (tx − mean(tx) − x̂·mean(x̂⊙tx))/σ,
                                                                     ty = tx̂·(1 + scale) + x̂·tscale + tshift
rope                y = x·cos + rot(x)·sin                           ty = tx·cos + rot(tx)·sin (cos/sin constant)
gelu_tanh           y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³)    ty = [½(1 + tanh u) + ½x(1 − tanh²u)·u′]·tx
gated_residual      y = x + gate[:, None]·r                           ty = tx + tgate[:, None]·r + gate[:, None]·tr
==================  ===============================================  ==============================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "attention_jvp",
    "gated_residual",
    "gated_residual_jvp",
    "gelu_tanh",
    "gelu_tanh_jvp",
    "layer_norm_modulate",
    "layer_norm_modulate_jvp",
    "rms_norm",
    "rms_norm_jvp",
    "rope",
    "rope_jvp",
]

_HALF = (torch.float16, torch.bfloat16)
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the reference uses for 'fp32' statistics: fp32, except that float64 inputs stay float64 (so the
    float64 truth is exact; for fp16/bf16/fp32 inputs this is exactly the reference's ``.float()``)."""
    return torch.promote_types(x.dtype, torch.float32)


def _upcast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(_stat_dtype(t)) for t in tensors]


def _zero_if_none(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else t


# ---------------------------------------------------------------------------------------------------------------
# Attention (reference processor `FluxAttnProcessor2_0_vanilla`: matmul -> scale -> (+0 bias) -> softmax -> matmul)
# ---------------------------------------------------------------------------------------------------------------
def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *, upcast: bool = False
) -> torch.Tensor:
    """Vanilla attention on (B, H, N, D): ``softmax((q @ kᵀ) · scale) @ v``, ``scale`` = 1/√D by default.

    The O(N²) path the reference runs in every student pass. The reference also adds a zero [N, N] bias and a
    p=0 dropout; both are exact identities and are left out.
    """
    if upcast:
        out = attention(*_upcast(q, k, v), scale=_default_scale(q, scale))
        return out.to(q.dtype)
    scale = _default_scale(q, scale)
    s = (q @ k.transpose(-2, -1)) * scale
    p = torch.softmax(s, dim=-1)
    return p @ v


def attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor | None,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    scale: float | None = None,
    *,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its tangent: ``tO = (P ⊙ (tS − rowsum(P ⊙ tS)))·V + P·tV`` with ``tS = (tQ·Kᵀ + Q·tKᵀ)·scale``."""
    if upcast:
        o, to = attention_jvp(*_upcast(q, k, v, tq, tk, tv), scale=_default_scale(q, scale))
        return o.to(q.dtype), to.to(q.dtype)
    scale = _default_scale(q, scale)
    tq, tk, tv = _zero_if_none(tq, q), _zero_if_none(tk, k), _zero_if_none(tv, v)
    s = (q @ k.transpose(-2, -1)) * scale
    p = torch.softmax(s, dim=-1)
    ts = (tq @ k.transpose(-2, -1) + q @ tk.transpose(-2, -1)) * scale
    mu = (p * ts).sum(dim=-1, keepdim=True)
    tp = p * (ts - mu)
    return p @ v, tp @ v + p @ tv


# ---------------------------------------------------------------------------------------------------------------
# qk RMSNorm (diffusers `RMSNorm` as used by the reference's FLUX attention; eps 1e-6, D = 128)
# ---------------------------------------------------------------------------------------------------------------
def _rms_output_cast(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # The reference casts the normalised value to the weight's dtype when the weight is half precision and
    # otherwise keeps the promoted (fp32) value.
    return h.to(weight.dtype) if weight.dtype in _HALF else h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, upcast: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim: variance in fp32, ``x·rsqrt(var + eps)``, cast back, ``× weight``."""
    if upcast:
        xc, wc = _upcast(x, weight)
        return rms_norm(xc, wc, eps).to(x.dtype)
    variance = x.to(_stat_dtype(x)).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(variance + eps)
    return _rms_output_cast(h, weight) * weight


def rms_norm_jvp(
    x: torch.Tensor, tx: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, upcast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm and its tangent ``ty = (tx·ρ − x·ρ³·mean(x⊙tx))·w`` (the weight carries no tangent)."""
    if upcast:
        xc, txc, wc = _upcast(x, tx, weight)
        y, ty = rms_norm_jvp(xc, txc, wc, eps)
        return y.to(x.dtype), ty.to(x.dtype)
    xs, txs = x.to(_stat_dtype(x)), tx.to(_stat_dtype(x))
    rho = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
    h = xs * rho
    th = txs * rho - xs * rho.pow(3) * (xs * txs).mean(-1, keepdim=True)
    return _rms_output_cast(h, weight) * weight, _rms_output_cast(th, weight) * weight


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm (no affine, eps 1e-6) + AdaLN modulation, per-sample (B, D) or shared (D,) scale/shift
# ---------------------------------------------------------------------------------------------------------------
def _per_sample(t: torch.Tensor | None) -> torch.Tensor | None:
    """(B, D) modulation broadcasts over the sequence as (B, 1, D); (D,) broadcasts as is."""
    return t[:, None] if t is not None and t.dim() == 2 else t


def layer_norm_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = 1e-6,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """``LayerNorm(x)·(1 + scale) + shift`` on x (B, N, D), scale/shift (B, D) or (D,): diffusers'
    ``AdaLayerNormZero``/``norm2`` + modulation."""
    if upcast:
        return layer_norm_modulate(*_upcast(x, scale, shift), eps).to(x.dtype)
    xn = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return xn * (1 + _per_sample(scale)) + _per_sample(shift)


def layer_norm_modulate_jvp(
    x: torch.Tensor,
    tx: torch.Tensor,
    scale: torch.Tensor,
    tscale: torch.Tensor | None,
    shift: torch.Tensor,
    tshift: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm + modulation and its tangent; ``tscale``/``tshift`` may be ``None`` (no tangent)."""
    if upcast:
        y, ty = layer_norm_modulate_jvp(*_upcast(x, tx, scale, tscale, shift, tshift), eps)
        return y.to(x.dtype), ty.to(x.dtype)
    xs, txs = x.to(_stat_dtype(x)), tx.to(_stat_dtype(x))
    mean = xs.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xs - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (xs - mean) * rstd
    txhat = rstd * (txs - txs.mean(-1, keepdim=True) - xhat * (xhat * txs).mean(-1, keepdim=True))
    # LayerNorm returns the input dtype (outside autocast); modulation then follows type promotion.
    xhat, txhat = xhat.to(x.dtype), txhat.to(x.dtype)
    scale_b, shift_b = _per_sample(scale), _per_sample(shift)
    y = xhat * (1 + scale_b) + shift_b
    ty = txhat * (1 + scale_b)
    if tscale is not None:
        ty = ty + xhat * _per_sample(tscale)
    if tshift is not None:
        ty = ty + _per_sample(tshift)
    return y, ty


# ---------------------------------------------------------------------------------------------------------------
# RoPE, FLUX's interleaved-pair convention (diffusers `apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`)
# ---------------------------------------------------------------------------------------------------------------
def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(a, b) pairs of the last dim -> (−b, a)."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([-x_imag, x_real], dim=-1).flatten(-2)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """RoPE on x (B, H, N, D) with cos/sin (N, D) (each value repeated per pair): fp32 math, cast back.

    ``upcast`` changes nothing here (the reference already computes in fp32); it exists for a uniform signature.
    """
    del upcast
    xs = x.to(_stat_dtype(x))
    return (xs * cos + _rotate_pairs(xs) * sin).to(x.dtype)


def rope_jvp(
    x: torch.Tensor, tx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, upcast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE is linear in x and cos/sin carry no tangent: ``ty = rope(tx)``."""
    del upcast
    return rope(x, cos, sin), rope(tx, cos, sin)


# ---------------------------------------------------------------------------------------------------------------
# GELU, tanh approximation (FeedForward "gelu-approximate" and the single block's proj_mlp activation)
# ---------------------------------------------------------------------------------------------------------------
def gelu_tanh(x: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` (computed in fp32 internally by PyTorch and rounded once)."""
    if upcast:
        return gelu_tanh(x.to(_stat_dtype(x))).to(x.dtype)
    return F.gelu(x, approximate="tanh")


def gelu_tanh_jvp(x: torch.Tensor, tx: torch.Tensor, *, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU-tanh and ``ty = gelu'(x)·tx``, the derivative evaluated in fp32 and rounded once."""
    del upcast  # the tangent is already computed at fp32 or better
    xs, txs = x.to(_stat_dtype(x)), tx.to(_stat_dtype(x))
    u = _GELU_C * (xs + _GELU_A * xs.pow(3))
    th = torch.tanh(u)
    du = _GELU_C * (1 + 3 * _GELU_A * xs.pow(2))
    dgelu = 0.5 * (1 + th) + 0.5 * xs * (1 - th.pow(2)) * du
    return gelu_tanh(x), (dgelu * txs).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Gated residual `x + gate[:, None]·y` (after attention, FF and the single block's proj_out)
# ---------------------------------------------------------------------------------------------------------------
def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """``x + gate.unsqueeze(1) * y`` on x, y (B, N, D) and gate (B, D), rounding after the product as the reference."""
    if upcast:
        return gated_residual(*_upcast(x, gate, y)).to(x.dtype)
    return x + gate.unsqueeze(1) * y


def gated_residual_jvp(
    x: torch.Tensor,
    tx: torch.Tensor | None,
    gate: torch.Tensor,
    tgate: torch.Tensor | None,
    y: torch.Tensor,
    ty: torch.Tensor | None,
    *,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual and ``t = tx + tgate[:, None]·y + gate[:, None]·ty`` (any tangent may be ``None``)."""
    if upcast:
        out, tout = gated_residual_jvp(*_upcast(x, tx, gate, tgate, y, ty))
        return out.to(x.dtype), tout.to(x.dtype)
    tout = _zero_if_none(tx, x)
    if tgate is not None:
        tout = tout + tgate.unsqueeze(1) * y
    if ty is not None:
        tout = tout + gate.unsqueeze(1) * ty
    return gated_residual(x, gate, y), tout
