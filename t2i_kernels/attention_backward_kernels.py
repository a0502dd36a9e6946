"""The Triton kernels of attention's FA2-style backward (launched by :func:`t2i_kernels.attention._attention_bwd`), and
the row helpers the forward kernel shares.

With g = dL/dO and P recomputed from the saved LSE: Δ = rowsum(g ⊙ O) (a pre-pass), dV = Pᵀ·g, dS = P ⊙ (g·Vᵀ − Δ),
dK = dSᵀ·Q·scale (a kernel per key block, looping over query blocks) and dQ = dS·K·scale (a kernel per query block,
looping over key blocks): deterministic, no atomics.
"""

from __future__ import annotations

from t2i_kernels._runtime import tl, triton

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


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
