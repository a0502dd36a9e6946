"""Flash attention with a fused forward-mode tangent (JVP), its own FA2-style backward, in Triton.

Math (per batch b and head h; Q (Nq, D), K and V (Nk, D); scale defaults to 1/√D)::

    S = Q·Kᵀ·scale,  P = softmax(S),  O = P·V,  LSE = logsumexp(S)                      (rows of S)
    tS = (tQ·Kᵀ + Q·tKᵀ)·scale,  μ = rowsum(P ⊙ tS)
    tO = (P ⊙ (tS − μ))·V + P·tV  =  [Σ_j e_j (tS_j·V_j + tV_j)] / l − (Σ_j e_j tS_j / l) · O
    backward (g = dL/dO):  Δ = rowsum(g ⊙ O),  dV = Pᵀ·g,  dS = P ⊙ (g·Vᵀ − Δ),  dQ = dS·K·scale,  dK = dSᵀ·Q·scale

The second form of tO is what streams: one pass over K/V keeps the online-softmax state (running max m, sum l) and
three fp32 accumulators, ``Σ e·V``, ``Σ e·(tS·V + tV)`` (one merged accumulator: only the sum is ever used) and the
scalar row sum ``Σ e·tS``; everything is normalised once at the end. Per K/V tile that is six matmuls (QKᵀ, tQKᵀ, QtKᵀ,
PV, (P⊙tS)V, PtV): 12·B·H·Nq·Nk·D FLOPs for primal + tangent. Softmax runs in base 2 with log2(e)·scale folded into
one multiplier. Memory is O(N): nothing of size Nq × Nk is ever materialised.

API (layout (B, H, N, D) as ``F.scaled_dot_product_attention``):

* :func:`attention_jvp` ``(q, k, v, tq, tk, tv, scale=None, return_lse=False) -> (o, to[, lse])``: the fused kernel.
  ``o`` is differentiable (FA2 backward below); ``to`` and ``lse`` are non-differentiable (sCM/MeanFlow never
  differentiate a tangent). A tangent given as ``None`` counts as zero.
* :func:`attention` ``(q, k, v, scale=None) -> o``: an autograd Function. ``forward`` runs the primal kernel and saves
  the LSE; ``jvp`` runs a tangent kernel that reuses the LSE and O (no online rescaling, and no P·V: five matmuls per
  tile instead of six, one fp32 accumulator instead of two); ``backward`` runs the Triton
  backward (a Δ pre-pass, a dK/dV kernel looping over queries and a dQ kernel looping over keys: deterministic, no
  atomics). It works under ``torch.func.jvp`` (launchers are ``torch.library`` custom ops, see
  :mod:`t2i_kernels._custom_ops`), ``torch.autograd.forward_ad``, ordinary backward, and backward through the primal
  output of a ``torch.func.jvp`` call made with grad enabled.

Precision. Accumulation is fp32. For **bf16** inputs the P·V-side products (P, P⊙tS against V, tV) take **fp16**
operands: P ∈ [0, 1] and fp16 carries 3 more mantissa bits than bf16, which takes the kernel's own error on the
tangent well below bf16's output rounding (a bf16-operand kernel like rCM's lands at 2.3e-3 relative, the rounding
floor is ~1.7e-3). fp16's range ends at 65504: if any such operand overflows (|V|, |tV| or |P⊙tS| ≥ 65504), a
row's accumulator goes non-finite; the kernel flags that row, and a second, fix-up launch of the same kernel with
bf16 operands recomputes only the flagged rows (its other programs skip the loop). So huge values cost time, never
accuracy, and the inner loop exists once per kernel (the earlier in-kernel retry compiled it twice: 12 wgmma sites
and ~2× the SASS). Emulated on the CPU (fp64 math with the kernel's roundings, B1·H4·N2048·D128 randn, relative
L2 error of tO vs fp32 truth): output rounding alone 1.661e-3, fp16 operands 1.675e-3, bf16 operands 2.353e-3,
bf16 hi/lo-split P 1.661e-3 at 1.5× the P·V-side FLOPs; the tangent kernel's use of the saved (bf16) O adds
2e-6. fp16 operands are kept: within the 1.7e-3 bound at no extra FLOPs (GPU confirmation pending). V and tV are
converted to fp16 once per call by the launcher (the same rounding as in-kernel): converting them per tile in
registers kept the P·V-side wgmmas synchronous; with fp16 tensors their tiles feed wgmma from the pipelined shared
buffers (sm_90 compile report: async wgmma 0 → 1-2 and up to 12 % less SASS in most configs, see
``bench/results/attention_variants_sm90.md``). The cost is one memory-bound copy of V and tV (~1-2 % at FLUX shapes,
estimated from bytes, not measured).
fp32 inputs use IEEE fp32 products (no TF32). Outputs are rounded once, to the input dtype.

Layout and shapes: any strides with a unit last stride, so ``(B, N, H, D).transpose(1, 2)`` views work without
copies; ``o``/``to`` are returned as (B, H, Nq, D) views of (B, Nq, H, D) memory (what FLUX flattens next, for free),
gradients take their input's layout, ``lse`` is (B, H, Nq) fp32. B, H, Nq and Nk are runtime values: the autotune key
is (head dim, dtype, power-of-two buckets of Nq and Nk) and lengths are not specialised, so a new batch size or
resolution never recompiles. Nq ≠ Nk is supported; no masks, no GQA, no dropout.

Tuning: :mod:`t2i_kernels.attention_tuning` (per-mode candidates measured spill-free by ``bench/compile_report.py``),
including forward loop variants (software-pipelined S wgmmas; merged tS / tangent-accumulator dots) as extra
candidates where they compiled clean: on a GPU the autotuner's timing picks, under the interpreter
``_INTERPRETER_VARIANT`` does (tests). Measurements: ``bench/results/attention_variants_sm90.md``.

Limits: head dim 32, 64, 128 or 256 (256 only where the GPU's shared memory fits the tiles, else a clear error; on
Hopper it fits but spills registers);
q/k/v (and tangents) of one dtype in {fp16, bf16, fp32}. On the CPU (Triton interpreter) only fp32 runs: the
interpreter computes fp16/bf16 ``tl.dot`` wrongly, so those dtypes are rejected there with an explanation.
GPU parity and timing live in ``bench/gpu_check.py``. Design notes: the merged tangent accumulator and exp2 folding
follow the analysis of rCM's kernel (NVlabs/rcm ``rcm/utils/flash_attention_jvp_triton.py``); the loop structure
follows the Triton fused-attention tutorial; the code is our own.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from t2i_kernels import reference
from t2i_kernels._custom_ops import kernel_op
from t2i_kernels.attention_forward_kernels import _attn_fwd_kernel  # noqa: F401  (re-exported: the compile report)
from t2i_kernels.attention_launch import (  # noqa: F401  (SUPPORTED_HEAD_DIMS and _pv_operands: re-exported)
    SUPPORTED_HEAD_DIMS,
    _check_attention_inputs,
    _empty_bnhd,
    _launch_bwd,
    _launch_fwd,
    _pv_operands,
    _scale_of,
)

__all__ = ["AttentionFunction", "AttentionJVPFunction", "SUPPORTED_HEAD_DIMS", "attention", "attention_jvp"]

#: Pure-PyTorch references with the same signatures (vanilla attention, as the reference system computes it).
attention_ref = reference.attention
attention_jvp_ref = reference.attention_jvp

def _fake_fwd(q, k, v, scale, round_f16=False):
    return _empty_bnhd(q, q.shape[2]), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


@kernel_op("attention_fwd", _fake_fwd)
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, round_f16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal: ``(o, lse)``."""
    o, _, lse = _launch_fwd(q, k, v, None, None, None, None, None, scale, True, False, True, round_f16)
    return o, lse


def _fake_fwd_jvp(q, k, v, tq, tk, tv, scale, round_f16=False):
    o, lse = _fake_fwd(q, k, v, scale)
    return o, _empty_bnhd(q, q.shape[2]), lse


@kernel_op("attention_fwd_jvp", _fake_fwd_jvp)
def _attention_fwd_jvp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None, tk: torch.Tensor | None,
    tv: torch.Tensor | None, scale: float, round_f16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused primal + tangent: ``(o, to, lse)`` from one pass over K/V."""
    # Opt-in, see t2i_kernels.attention_gluon (which builds on attention_launch, never on this module).
    if os.environ.get("T2I_ATTENTION_BACKEND", "").strip().lower() == "gluon":
        from t2i_kernels.attention_gluon import attention_jvp_gluon  # not the default: no GPU has verified it yet

        return attention_jvp_gluon(q, k, v, tq, tk, tv, scale)
    return _launch_fwd(q, k, v, tq, tk, tv, None, None, scale, True, True, True, round_f16)  # type: ignore


def _fake_tangent(q, k, v, o, tq, tk, tv, lse, scale, round_f16=False):
    return _empty_bnhd(q, q.shape[2])


@kernel_op("attention_tangent", _fake_tangent)
def _attention_tangent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, tq: torch.Tensor | None,
    tk: torch.Tensor | None, tv: torch.Tensor | None, lse: torch.Tensor, scale: float, round_f16: bool = False,
) -> torch.Tensor:
    """Tangent only, from the LSE and O saved by the primal forward: probabilities are exact from the start (no
    rescaling) and O is not recomputed (5 matmuls per tile instead of 6). Reading the rounded O costs ~2e-6 of
    relative tangent error in bf16 (|μ·O| is a few % of |tO|; measured by emulation, see the module docstring)."""
    if o.stride(-1) != 1:
        o = o.contiguous()
    _, to, _ = _launch_fwd(q, k, v, tq, tk, tv, lse, o, scale, False, True, False, round_f16)
    return to


def _fake_bwd(grad_o, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@kernel_op("attention_bwd", _fake_bwd)
def _attention_bwd(
    grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, each in its input's layout."""
    return _launch_bwd(grad_o, q, k, v, o, lse, scale)


# ----------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------------------------
class AttentionGrads(NamedTuple):
    """Gradients of :class:`AttentionFunction` (one slot per forward input)."""

    dq: torch.Tensor | None
    dk: torch.Tensor | None
    dv: torch.Tensor | None
    dscale: None
    dround_f16: None


def _primal_backward(ctx, grad_o: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_o, q, k, v, o, lse, ctx.scale)
    need_q, need_k, need_v = ctx.primal_needs_grad
    return dq if need_q else None, dk if need_k else None, dv if need_v else None


class AttentionFunction(torch.autograd.Function):
    """``o = softmax(q·kᵀ·scale)·v`` on (B, H, N, D); Triton forward (saves the LSE), tangent and backward.

    Outputs ``(o, lse)``; ``lse`` (B, H, Nq) fp32 is non-differentiable.
    """

    @staticmethod
    def forward(q, k, v, scale, round_f16=False):
        return _attention_fwd(q, k, v, scale, round_f16)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, scale, round_f16 = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.scale, ctx.round_f16 = scale, round_f16
        ctx.save_for_forward(q, k, v, o, lse)
        ctx.primal_needs_grad = tuple(ctx.needs_input_grad[:3])
        if any(ctx.primal_needs_grad):  # nothing is kept alive in the no_grad JVP pass
            ctx.save_for_backward(q, k, v, o, lse)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tscale, _tround):
        q, k, v, o, lse = ctx.saved_tensors
        return _attention_tangent(q, k, v, o, tq, tk, tv, lse, ctx.scale, ctx.round_f16), None

    @staticmethod
    def backward(ctx, grad_o, _grad_lse) -> AttentionGrads:
        return AttentionGrads(*_primal_backward(ctx, grad_o), None, None)


class AttentionJVPGrads(NamedTuple):
    """Gradients of :class:`AttentionJVPFunction`; tangents get none (they are never differentiated)."""

    dq: torch.Tensor | None
    dk: torch.Tensor | None
    dv: torch.Tensor | None
    dtq: None
    dtk: None
    dtv: None
    dscale: None
    dround_f16: None


class AttentionJVPFunction(torch.autograd.Function):
    """``(o, to, lse)`` from the fused kernel; ``o`` is differentiable w.r.t. q, k, v, ``to`` and ``lse`` are not."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, scale, round_f16=False):
        return _attention_fwd_jvp(q, k, v, tq, tk, tv, scale, round_f16)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, tq, tk, tv, scale, round_f16 = inputs
        o, to, lse = output
        ctx.mark_non_differentiable(to, lse)
        ctx.scale, ctx.round_f16 = scale, round_f16
        ctx.save_for_forward(q, k, v, o, lse)
        ctx.primal_needs_grad = tuple(ctx.needs_input_grad[:3])
        if any(ctx.primal_needs_grad):
            ctx.save_for_backward(q, k, v, o, lse)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _dtq, _dtk, _dtv, _dscale, _dround):
        # d(o) is attention's tangent; `to` and `lse` are non-differentiable in both modes.
        q, k, v, o, lse = ctx.saved_tensors
        return _attention_tangent(q, k, v, o, dq, dk, dv, lse, ctx.scale, ctx.round_f16), None, None

    @staticmethod
    def backward(ctx, grad_o, _grad_to, _grad_lse) -> AttentionJVPGrads:
        return AttentionJVPGrads(*_primal_backward(ctx, grad_o), None, None, None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------------
def _autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under ``torch.autocast`` attention runs in the autocast dtype, as SDPA does (a "lower precision" op there).

    Why: with fp32 master weights under bf16 autocast (the trainer's ``single``/``ddp`` mixed precision), the
    projections come out bf16 but FLUX's RMSNorm with an fp32 weight returns fp32, so q and k arrive fp32 and v bf16.
    SDPA casts all three to bf16 under autocast; this kernel takes one dtype per call, so it casts the same way."""
    ref = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if ref is None or ref.device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(ref.device.type):
        return tensors  # (bad inputs are named by the checks that follow)
    dtype = torch.get_autocast_dtype(ref.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Flash attention ``softmax(q·kᵀ·scale)·v`` for q (B, H, Nq, D), k and v (B, H, Nk, D).

    Differentiable (Triton FA2 backward) and forward-differentiable (Triton tangent kernel reusing the saved LSE),
    including inside ``torch.func.jvp``. Returns (B, H, Nq, D) in (B, Nq, H, D) memory.
    """
    q, k, v = _autocast_inputs(q, k, v)
    _check_attention_inputs("attention", q, k, v, scale=scale)
    return AttentionFunction.apply(q, k, v, _scale_of(q, scale), False)[0]


def attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor | None,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    scale: float | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Attention and its tangent ``tO = (P⊙(tS − μ))·V + P·tV`` from one Triton kernel streaming K/V once.

    Returns ``(o, to)`` or ``(o, to, lse)``. ``o`` carries gradients to q, k, v; ``to`` and ``lse`` are
    non-differentiable. A tangent given as ``None`` counts as zero.
    """
    q, k, v, tq, tk, tv = _autocast_inputs(q, k, v, tq, tk, tv)
    _check_attention_inputs("attention_jvp", q, k, v, tq, tk, tv, scale=scale)
    o, to, lse = AttentionJVPFunction.apply(q, k, v, tq, tk, tv, _scale_of(q, scale), False)
    return (o, to, lse) if return_lse else (o, to)
