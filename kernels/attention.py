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
  the LSE; ``jvp`` runs a tangent kernel that reuses the LSE (no online rescaling); ``backward`` runs the Triton
  backward (a Δ pre-pass, a dK/dV kernel looping over queries and a dQ kernel looping over keys: deterministic, no
  atomics). It works under ``torch.func.jvp`` (launchers are ``torch.library`` custom ops, see
  :mod:`kernels._custom_ops`), ``torch.autograd.forward_ad``, ordinary backward, and backward through the primal
  output of a ``torch.func.jvp`` call made with grad enabled.

Precision. Accumulation is fp32. For **bf16** inputs the P·V-side products (P, P⊙tS against V, tV) take **fp16**
operands: P ∈ [0, 1] and fp16 carries 3 more mantissa bits than bf16, which takes the kernel's own error on the
tangent well below bf16's output rounding (a bf16-operand kernel like rCM's lands at 2.3e-3 relative, the rounding
floor is ~1.7e-3). fp16's range ends at 65504: if any such operand overflows (|V|, |tV| or |P⊙tS| ≥ 65504), the
program sees a non-finite accumulator and recomputes its rows with bf16 operands, so huge values cost time, never
accuracy. fp32 inputs use IEEE fp32 products (no TF32). Outputs are rounded once, to the input dtype.

Layout and shapes: any strides with a unit last stride, so ``(B, N, H, D).transpose(1, 2)`` views work without
copies; ``o``/``to`` are returned as (B, H, Nq, D) views of (B, Nq, H, D) memory (what FLUX flattens next, for free),
gradients take their input's layout, ``lse`` is (B, H, Nq) fp32. B, H, Nq and Nk are runtime values: the autotune key
is (head dim, dtype, power-of-two buckets of Nq and Nk) and lengths are not specialised, so a new batch size or
resolution never recompiles. Nq ≠ Nk is supported; no masks, no GQA, no dropout.

Limits: head dim 32, 64, 128 or 256 (256 only where the GPU's shared memory fits the tiles; otherwise a clear error);
q/k/v (and tangents) of one dtype in {fp16, bf16, fp32}. On the CPU (Triton interpreter) only fp32 runs: the
interpreter computes fp16/bf16 ``tl.dot`` wrongly, so those dtypes are rejected there with an explanation.
GPU parity and timing live in ``bench/gpu_check.py``. Design notes: the merged tangent accumulator and exp2 folding
follow the analysis of rCM's kernel (NVlabs/rcm ``rcm/utils/flash_attention_jvp_triton.py``); the loop structure
follows the Triton fused-attention tutorial; the code is our own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kernels import reference
from kernels._checks import HALF_AND_FLOAT_DTYPES, InputChecks
from kernels._custom_ops import kernel_op
from kernels._runtime import HAS_TRITON, check_launchable, is_interpreted, tl, triton

__all__ = ["AttentionFunction", "AttentionJVPFunction", "SUPPORTED_HEAD_DIMS", "attention", "attention_jvp"]

#: Pure-PyTorch references with the same signatures (vanilla attention, as the reference system computes it).
attention_ref = reference.attention
attention_jvp_ref = reference.attention_jvp

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
# Globals a kernel reads must be constexprs.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _pv_operand(x, PV_DTYPE: tl.constexpr, ROUND_F16: tl.constexpr):
    """Cast an operand of the P·V-side products. ROUND_F16 (tests only) rounds fp32 through fp16 and back, so the
    interpreter exercises the fp16 overflow fallback with fp32 arithmetic."""
    if ROUND_F16:
        return x.to(tl.float16).to(tl.float32)
    return x.to(PV_DTYPE)


@triton.jit
def _attn_fwd_inner(
    acc_o, acc_t, m_i, l_i, mu_i,
    q, tq,
    K_BH, TK_BH, V_BH, TV_BH,  # pointers to this (batch, head)'s K, tK, V, tV
    stride_kn, stride_tkn, stride_vn, stride_tvn,
    offs_d, N_K, qk_scale, sm_scale,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, WANT_TANGENT: tl.constexpr,
    FIXED_LSE: tl.constexpr, PV_DTYPE: tl.constexpr, ROUND_F16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Stream all K/V tiles for one block of query rows; returns the updated accumulators and softmax state.

    Online mode (FIXED_LSE False): m_i is the running max of S·log2(e)·scale, l_i the running Σ exp2(·−m_i).
    Fixed mode: m_i already holds LSE·log2(e), l_i is 1 and nothing is rescaled (the tangent-only kernel).
    """
    HAS_TS: tl.constexpr = HAS_TQ or HAS_TK
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_K
        k = _load_rows(K_BH, offs_n, stride_kn, offs_d, mask_n)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        if FIXED_LSE:
            p = tl.math.exp2(s - m_i[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc_o = acc_o * alpha[:, None]
            if WANT_TANGENT:
                acc_t = acc_t * alpha[:, None]
                mu_i = mu_i * alpha
            m_i = m_new
        v = _pv_operand(_load_rows(V_BH, offs_n, stride_vn, offs_d, mask_n), PV_DTYPE, ROUND_F16)
        p_op = _pv_operand(p, PV_DTYPE, ROUND_F16)
        acc_o = tl.dot(p_op, v, acc_o, input_precision=INPUT_PRECISION)
        if WANT_TANGENT:
            if HAS_TS:
                ts = tl.zeros_like(s)
                if HAS_TQ:
                    ts = tl.dot(tq, tl.trans(k), ts, input_precision=INPUT_PRECISION)
                if HAS_TK:
                    tk = _load_rows(TK_BH, offs_n, stride_tkn, offs_d, mask_n)
                    ts = tl.dot(q, tl.trans(tk), ts, input_precision=INPUT_PRECISION)
                p_ts = p * (ts * sm_scale)
                mu_i += tl.sum(p_ts, 1)
                acc_t = tl.dot(_pv_operand(p_ts, PV_DTYPE, ROUND_F16), v, acc_t, input_precision=INPUT_PRECISION)
            if HAS_TV:
                tv = _pv_operand(_load_rows(TV_BH, offs_n, stride_tvn, offs_d, mask_n), PV_DTYPE, ROUND_F16)
                acc_t = tl.dot(p_op, tv, acc_t, input_precision=INPUT_PRECISION)
    return acc_o, acc_t, m_i, l_i, mu_i


@triton.jit
def _count_non_finite(x):
    return tl.sum(tl.where(tl.abs(x) < float("inf"), 0, 1))


@triton.jit
def _tile_coords(N, H, BLOCK: tl.constexpr):
    """(batch, head, first row) of this program on a 1-D grid of B·H·cdiv(N, BLOCK) row tiles, tiles of one head
    adjacent (they share that head's K/V, or Q/dO, in L2); int64 batch and head for the stride products."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(N, BLOCK)
    bh = pid // num_tiles
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), (pid % num_tiles) * BLOCK, bh.to(tl.int64)


@triton.jit
def _load_rows(BASE, offs, stride_row, offs_d, mask):
    """A (rows, HEAD_DIM) tile of a head's rows (unit stride along D); masked rows read as 0."""
    return tl.load(BASE + offs[:, None] * stride_row + offs_d[None, :], mask=mask[:, None], other=0.0)


@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _attn_fwd_kernel(
    Q, K, V, TQ, TK, TV,  # pointers to the inputs (a T* pointer is unused when its HAS_* flag is False)
    OUT, TOUT, LSE,  # pointers to O, tO and the LSE; LSE is read instead of written when FIXED_LSE
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_tqb, stride_tqh, stride_tqn,
    stride_tkb, stride_tkh, stride_tkn,
    stride_tvb, stride_tvh, stride_tvn,
    stride_ob, stride_oh, stride_on,  # OUT and TOUT share one layout
    H, N_Q, N_K, sm_scale,
    N_Q_BUCKET, N_K_BUCKET,  # autotune key only (power-of-two buckets of the lengths)
    HEAD_DIM: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    WRITE_O: tl.constexpr, WRITE_TO: tl.constexpr, WRITE_LSE: tl.constexpr, FIXED_LSE: tl.constexpr,
    PV_DTYPE: tl.constexpr, GUARD_PV: tl.constexpr, ROUND_F16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One BLOCK_M block of query rows of one (batch, head): O, tO and/or LSE.

    Modes: primal (WRITE_O, WRITE_LSE), fused primal + tangent (all three writes), tangent only from a saved LSE
    (FIXED_LSE, WRITE_TO). Programs are ordered query-block-fastest so neighbours share a head's K/V in L2.
    """
    WANT_TANGENT: tl.constexpr = WRITE_TO
    b, h, start_m, bh = _tile_coords(N_Q, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N_Q
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, mask_m)
    tq = q
    if WANT_TANGENT and HAS_TQ:
        tq = _load_rows(TQ + b * stride_tqb + h * stride_tqh, offs_m, stride_tqn, offs_d, mask_m)
    K_BH = K + b * stride_kb + h * stride_kh
    V_BH = V + b * stride_vb + h * stride_vh
    TK_BH = TK + b * stride_tkb + h * stride_tkh
    TV_BH = TV + b * stride_tvb + h * stride_tvh
    qk_scale = sm_scale * LOG2E  # the softmax runs in base 2

    acc_o = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    mu_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if FIXED_LSE:
        m_i = tl.load(LSE + bh * N_Q + offs_m, mask=mask_m, other=0.0) * LOG2E
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_0 = m_i
    l_0 = l_i

    acc_o, acc_t, m_i, l_i, mu_i = _attn_fwd_inner(
        acc_o, acc_t, m_i, l_i, mu_i, q, tq, K_BH, TK_BH, V_BH, TV_BH,
        stride_kn, stride_tkn, stride_vn, stride_tvn, offs_d, N_K, qk_scale, sm_scale,
        HAS_TQ, HAS_TK, HAS_TV, WANT_TANGENT, FIXED_LSE, PV_DTYPE, ROUND_F16, INPUT_PRECISION, BLOCK_N,
    )
    if GUARD_PV:
        # An fp16 operand overflowed (|V|, |tV| or |P⊙tS| ≥ 65504) iff an accumulator is non-finite (inf·0 = NaN,
        # inf + x = inf): redo these rows with operands in the input dtype. Rare, and only this program pays.
        bad = _count_non_finite(acc_o)
        if WANT_TANGENT:
            bad += _count_non_finite(acc_t)
        if bad > 0:
            acc_o, acc_t, m_i, l_i, mu_i = _attn_fwd_inner(
                tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32),
                m_0, l_0, tl.zeros([BLOCK_M], dtype=tl.float32), q, tq, K_BH, TK_BH, V_BH, TV_BH,
                stride_kn, stride_tkn, stride_vn, stride_tvn, offs_d, N_K, qk_scale, sm_scale,
                HAS_TQ, HAS_TK, HAS_TV, WANT_TANGENT, FIXED_LSE, Q.dtype.element_ty, False, INPUT_PRECISION,
                BLOCK_N,
            )

    inv_l = 1.0 / l_i
    o = acc_o * inv_l[:, None]
    out_offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    if WRITE_O:
        tl.store(OUT + out_offs, o.to(OUT.dtype.element_ty), mask=mask_m[:, None])
    if WRITE_TO:
        to = acc_t * inv_l[:, None] - (mu_i * inv_l)[:, None] * o
        tl.store(TOUT + out_offs, to.to(TOUT.dtype.element_ty), mask=mask_m[:, None])
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * LN2  # back to natural log
        tl.store(LSE + bh * N_Q + offs_m, lse, mask=mask_m)


@triton.jit(do_not_specialize=["N_Q"])
def _attn_bwd_preprocess_kernel(
    OUT, DO, DELTA,  # pointers to O, dL/dO (B, H, Nq, D) and Δ (B·H, Nq) fp32
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Δ = rowsum(dO ⊙ O) in fp32, the softmax-backward correction shared by the dK/dV and dQ kernels."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N_Q, BLOCK_M)
    bh = (pid // num_m).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < N_Q
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA,  # pointers to inputs; LSE and Δ are (B·H, Nq) fp32
    DK, DV,  # pointers to outputs
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, N_Q, N_K, sm_scale,
    N_Q_BUCKET, N_K_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK and dV for one BLOCK_N block of keys, looping over all query blocks (P recomputed from the LSE)."""
    b, h, start_n, bh = _tile_coords(N_K, H, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < N_K
    k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, offs_d, mask_n)
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, stride_vn, offs_d, mask_n)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    Q_BH = Q + b * stride_qb + h * stride_qh
    DO_BH = DO + b * stride_dob + h * stride_doh
    row = bh * N_Q
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_Q
        q = _load_rows(Q_BH, offs_m, stride_qn, offs_d, mask_m)
        do = _load_rows(DO_BH, offs_m, stride_don, offs_d, mask_m)
        lse2 = tl.load(LSE + row + offs_m, mask=mask_m, other=0.0) * LOG2E
        delta = tl.load(DELTA + row + offs_m, mask=mask_m, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M) = Sᵀ
        p_t = tl.where(mask_m[None, :], tl.math.exp2(s_t - lse2[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA,  # pointers to inputs; LSE and Δ are (B·H, Nq) fp32
    DQ,  # pointer to the output
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N_Q, N_K, sm_scale,
    N_Q_BUCKET, N_K_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ for one BLOCK_M block of queries, looping over all key blocks."""
    b, h, start_m, bh = _tile_coords(N_Q, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N_Q
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, mask_m)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_don, offs_d, mask_m)
    row = bh * N_Q
    lse2 = tl.load(LSE + row + offs_m, mask=mask_m, other=0.0) * LOG2E
    delta = tl.load(DELTA + row + offs_m, mask=mask_m, other=0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    K_BH = K + b * stride_kb + h * stride_kh
    V_BH = V + b * stride_vb + h * stride_vh
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_K
        k = _load_rows(K_BH, offs_n, stride_kn, offs_d, mask_n)
        v = _load_rows(V_BH, offs_n, stride_vn, offs_d, mask_n)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.where(mask_n[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_m[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Tuning: a pruned autotune on GPUs (key: head dim, dtypes, length buckets), one fixed config when interpreting
# ----------------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Eight candidates, not a grid: every candidate costs a compile per
# kernel mode on first use, and a lent GPU's minutes are few. They span the tile shapes FA2-style kernels win with on
# Ampere/Hopper at head dims 64-128, plus small tiles for head dim 256 and short sequences.
_CANDIDATES = (
    (64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 8, 3), (64, 128, 8, 2),
    (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
)


def _configs() -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in _CANDIDATES]


def _keep_fwd(configs, named_args, **kwargs):
    """Drop configs that cannot fit or cannot win: big tiles at head dim 256, tiles longer than the sequence."""
    head_dim = named_args["HEAD_DIM"] if "HEAD_DIM" in named_args else kwargs["HEAD_DIM"]
    n_q, n_k = named_args["N_Q_BUCKET"], named_args["N_K_BUCKET"]
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if head_dim >= 256 and (bm * bn > 64 * 32 or c.num_stages > 2):
            continue
        if bm > max(64, n_q) or bn > max(32, n_k):
            continue
        kept.append(c)
    return kept or configs[:1]


# Under the interpreter every program is Python-level numpy: fewer, larger tiles run much faster, and 64 still
# leaves ragged lengths (17, 100, 257, 1000) with partial and multiple tiles.
_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}


_KEY = ["HEAD_DIM", "N_Q_BUCKET", "N_K_BUCKET"]  # + the dtypes of all tensor arguments, which triton always adds
# The forward kernel's modes differ in registers and shared memory (two accumulators and three more tiles with a
# tangent), so each mode gets its own tuning entry.
_FWD_MODE_KEY = ["WRITE_TO", "FIXED_LSE", "HAS_TQ", "HAS_TK", "HAS_TV", "ROUND_F16"]


def _tuned(kernel, keep, key):
    if not HAS_TRITON or is_interpreted(kernel):
        return None
    return triton.autotune(configs=_configs(), key=key, prune_configs_by={"early_config_prune": keep})(kernel)


_attn_fwd_tuned = _tuned(_attn_fwd_kernel, _keep_fwd, _KEY + _FWD_MODE_KEY)
_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv_kernel, _keep_fwd, _KEY)
_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq_kernel, _keep_fwd, _KEY)


def _launch(kernel, tuned, grid_of_meta, *args, **kwargs):
    """Launch ``tuned`` (GPU) or ``kernel`` with the fixed interpreter config; map resource failures to an error."""
    if tuned is None:
        meta = dict(_INTERPRETER_CONFIG)
        kernel[grid_of_meta(meta)](*args, **kwargs, **meta)
        return
    try:
        tuned[grid_of_meta](*args, **kwargs)
    except Exception as exc:  # triton raises OutOfResources (or a compile error) when no config fits
        if type(exc).__name__ in {"OutOfResources", "CompilationError"} and kwargs.get("HEAD_DIM", 0) >= 256:
            raise ValueError(
                f"attention: head dim {kwargs['HEAD_DIM']} does not fit this GPU's shared memory/registers "
                f"({exc}); supported head dims that fit everywhere: 32, 64, 128"
            ) from exc
        raise


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


# ----------------------------------------------------------------------------------------------------------------
# Input checks and launchers
# ----------------------------------------------------------------------------------------------------------------
_NAMES = ("q", "k", "v", "tq", "tk", "tv")


def _check_attention_inputs(op: str, q, k, v, tq=None, tk=None, tv=None, scale=None) -> None:
    """One ValueError/TypeError listing every problem: kinds, ranks, dtypes, devices, shapes, head dims, strides."""
    checks = InputChecks(op)
    tensors = dict(zip(_NAMES, (q, k, v, tq, tk, tv)))
    present = {}
    for name, t in tensors.items():
        if t is None and name.startswith("t"):
            continue
        if checks.tensor(name, t, ndim=4, layout="(B, H, N, D)", dtypes=HALF_AND_FLOAT_DTYPES):
            present[name] = t
            checks.unit_last_stride(name, t)
    if not checks.ok:
        checks.raise_if_any()
    checks.same_dtype(present)
    checks.same_device(present)
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h:
        checks.value_problem(f"`k`: expected batch and heads ({b}, {h}) of q, got {tuple(k.shape)}")
    if k.shape[-1] != d:
        checks.value_problem(f"`k`: expected head dim {d} of q, got {tuple(k.shape)}")
    checks.shape("v", v, k.shape, "the shape of k (B, H, Nk, D)")
    if d not in SUPPORTED_HEAD_DIMS:
        checks.value_problem(f"`q`: expected head dim in {SUPPORTED_HEAD_DIMS}, got {d} (shape {tuple(q.shape)})")
    if k.shape[2] == 0:
        checks.value_problem(f"`k`: expected at least one key (Nk ≥ 1), got {tuple(k.shape)}")
    for name in ("tq", "tk", "tv"):
        if name in present:
            checks.shape(name, present[name], present[name[1:]].shape, f"the shape of its primal `{name[1:]}`")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            checks.type_problem(f"`scale`: expected a float or None, got {type(scale).__name__} {scale!r}")
        elif not math.isfinite(scale):
            checks.value_problem(f"`scale`: expected a finite float, got {scale!r}")
    if is_interpreted(_attn_fwd_kernel) and q.dtype != torch.float32:
        checks.value_problem(
            f"`q`: the Triton interpreter (CPU) computes {str(q.dtype).removeprefix('torch.')} tl.dot wrongly "
            "(triton#11584); use float32 on the CPU, or run on a GPU"
        )
    checks.raise_if_any()


def _scale_of(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _strides3(t: torch.Tensor | None, fallback: torch.Tensor) -> tuple[int, int, int]:
    s = (fallback if t is None else t).stride()
    return s[0], s[1], s[2]


def _precision(dtype: torch.dtype, round_f16: bool) -> dict[str, object]:
    """PV operand dtype, guard flag and tl.dot precision for an input dtype (see the module docstring)."""
    # input_precision only matters for fp32 operands; None keeps Triton's default for half-precision dots.
    if dtype == torch.bfloat16:
        return {"PV_DTYPE": tl.float16, "GUARD_PV": True, "ROUND_F16": False, "INPUT_PRECISION": None}
    if dtype == torch.float16:
        return {"PV_DTYPE": tl.float16, "GUARD_PV": False, "ROUND_F16": False, "INPUT_PRECISION": None}
    return {"PV_DTYPE": tl.float32, "GUARD_PV": round_f16, "ROUND_F16": round_f16, "INPUT_PRECISION": "ieee"}


def _empty_bnhd(q: torch.Tensor, n_q: int) -> torch.Tensor:
    """A (B, H, Nq, D) view of (B, Nq, H, D) memory: FLUX's next step flattens heads, which is then free."""
    b, h, _, d = q.shape
    return torch.empty((b, n_q, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def _launch_fwd(q, k, v, tq, tk, tv, lse_in, scale, write_o, write_to, write_lse, round_f16=False):
    check_launchable("attention", _attn_fwd_kernel, q.device)
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    o = _empty_bnhd(q, n_q) if write_o else None
    to = _empty_bnhd(q, n_q) if write_to else None
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device) if write_lse else lse_in
    if q.numel() == 0:
        return o, to, lse
    dense = o if o is not None else to
    lse_buf = lse if lse is not None else dense
    _launch(
        _attn_fwd_kernel, _attn_fwd_tuned,
        lambda meta: (b * h * triton.cdiv(n_q, meta["BLOCK_M"]),),
        q, k, v, q if tq is None else tq, k if tk is None else tk, v if tv is None else tv,
        dense if o is None else o, dense if to is None else to, lse_buf,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *_strides3(tq, q), *_strides3(tk, k), *_strides3(tv, v),
        *dense.stride()[:3],
        h, n_q, n_k, scale, _bucket(n_q), _bucket(n_k),
        HEAD_DIM=d, HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None,
        WRITE_O=write_o, WRITE_TO=write_to, WRITE_LSE=write_lse, FIXED_LSE=lse_in is not None,
        **_precision(q.dtype, round_f16),
    )
    return o, to, lse


def _fake_fwd(q, k, v, scale, round_f16=False):
    return _empty_bnhd(q, q.shape[2]), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


@kernel_op("attention_fwd", _fake_fwd)
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, round_f16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal: ``(o, lse)``."""
    o, _, lse = _launch_fwd(q, k, v, None, None, None, None, scale, True, False, True, round_f16)
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
    return _launch_fwd(q, k, v, tq, tk, tv, None, scale, True, True, True, round_f16)  # type: ignore[return-value]


def _fake_tangent(q, k, v, tq, tk, tv, lse, scale, round_f16=False):
    return _empty_bnhd(q, q.shape[2])


@kernel_op("attention_tangent", _fake_tangent)
def _attention_tangent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None, tk: torch.Tensor | None,
    tv: torch.Tensor | None, lse: torch.Tensor, scale: float, round_f16: bool = False,
) -> torch.Tensor:
    """Tangent only, from the LSE saved by the primal forward (probabilities exact from the start, no rescaling)."""
    _, to, _ = _launch_fwd(q, k, v, tq, tk, tv, lse, scale, False, True, False, round_f16)
    return to


def _fake_bwd(grad_o, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@kernel_op("attention_bwd", _fake_bwd)
def _attention_bwd(
    grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, each in its input's layout."""
    check_launchable("attention backward", _attn_bwd_dq_kernel, q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    if n_q == 0 or b * h == 0:
        return dq, dk.zero_(), dv.zero_()
    if grad_o.stride(-1) != 1:
        grad_o = grad_o.contiguous()  # autograd hands us whatever the consumer produced; the kernels need unit stride
    delta = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    pre_block = 64
    _attn_bwd_preprocess_kernel[(b * h * triton.cdiv(n_q, pre_block),)](
        o, grad_o, delta, *o.stride()[:3], *grad_o.stride()[:3], h, n_q, HEAD_DIM=d, BLOCK_M=pre_block,
    )
    precision = _precision(q.dtype, False)["INPUT_PRECISION"]
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_o.stride()[:3])
    _launch(
        _attn_bwd_dkdv_kernel, _attn_bwd_dkdv_tuned,
        lambda meta: (b * h * triton.cdiv(n_k, meta["BLOCK_N"]),),
        q, k, v, grad_o, lse, delta, dk, dv, *common, *dk.stride()[:3], *dv.stride()[:3],
        h, n_q, n_k, scale, _bucket(n_q), _bucket(n_k), HEAD_DIM=d, INPUT_PRECISION=precision,
    )
    _launch(
        _attn_bwd_dq_kernel, _attn_bwd_dq_tuned,
        lambda meta: (b * h * triton.cdiv(n_q, meta["BLOCK_M"]),),
        q, k, v, grad_o, lse, delta, dq, *common, *dq.stride()[:3],
        h, n_q, n_k, scale, _bucket(n_q), _bucket(n_k), HEAD_DIM=d, INPUT_PRECISION=precision,
    )
    return dq, dk, dv


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
        ctx.save_for_forward(q, k, v, lse)
        ctx.primal_needs_grad = tuple(ctx.needs_input_grad[:3])
        if any(ctx.primal_needs_grad):  # nothing is kept alive in the no_grad JVP pass
            ctx.save_for_backward(q, k, v, o, lse)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tscale, _tround):
        q, k, v, lse = ctx.saved_tensors
        return _attention_tangent(q, k, v, tq, tk, tv, lse, ctx.scale, ctx.round_f16), None

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
        ctx.save_for_forward(q, k, v, lse)
        ctx.primal_needs_grad = tuple(ctx.needs_input_grad[:3])
        if any(ctx.primal_needs_grad):
            ctx.save_for_backward(q, k, v, o, lse)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _dtq, _dtk, _dtv, _dscale, _dround):
        # d(o) is attention's tangent; `to` and `lse` are non-differentiable in both modes.
        q, k, v, lse = ctx.saved_tensors
        return _attention_tangent(q, k, v, dq, dk, dv, lse, ctx.scale, ctx.round_f16), None, None

    @staticmethod
    def backward(ctx, grad_o, _grad_to, _grad_lse) -> AttentionJVPGrads:
        return AttentionJVPGrads(*_primal_backward(ctx, grad_o), None, None, None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Flash attention ``softmax(q·kᵀ·scale)·v`` for q (B, H, Nq, D), k and v (B, H, Nk, D).

    Differentiable (Triton FA2 backward) and forward-differentiable (Triton tangent kernel reusing the saved LSE),
    including inside ``torch.func.jvp``. Returns (B, H, Nq, D) in (B, Nq, H, D) memory.
    """
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
    _check_attention_inputs("attention_jvp", q, k, v, tq, tk, tv, scale=scale)
    o, to, lse = AttentionJVPFunction.apply(q, k, v, tq, tk, tv, _scale_of(q, scale), False)
    return (o, to, lse) if return_lse else (o, to)
