"""The Triton kernels of attention's forward modes (launched by :func:`t2i_kernels.attention._launch_fwd`): primal
(O and the LSE), fused primal + tangent (O, tO and the LSE from one pass over K/V), and tangent only from the saved
LSE and O. The math, precision and tuning notes are in :mod:`t2i_kernels.attention`.
"""

from __future__ import annotations

from t2i_kernels._runtime import tl, triton
from t2i_kernels.attention_backward_kernels import _load_rows, _tile_coords  # row helpers shared with the backward

# Globals a kernel reads must be constexprs.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _pv_operand(x, PV_DTYPE: tl.constexpr, ROUND_F16: tl.constexpr):
    """Cast an operand of the P·V-side products. ROUND_F16 (tests only) rounds fp32 through fp16 and back, so the
    interpreter exercises the fp16 overflow fallback with fp32 arithmetic."""
    if ROUND_F16:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x.to(PV_DTYPE)
    return y


@triton.jit
def _load_pair(BASE, delta, offs_n, stride_row, offs_d, mask_n, ROWS_FIRST: tl.constexpr):
    """Two same-layout tensors' tiles in one load (``delta``: the element offset from the first to the second).
    ROWS_FIRST: (BLOCK_N, 2·D) = [X | Y] (the K-dim concatenation of tS's operand); else (2·BLOCK_N, D) = [X ; Y]."""
    pair = tl.arange(0, 2).to(tl.int64) * delta
    if ROWS_FIRST:
        offs = offs_n[:, None, None] * stride_row + pair[None, :, None] + offs_d[None, None, :]
        x = tl.load(BASE + offs, mask=mask_n[:, None, None], other=0.0)
        out = tl.reshape(x, [offs_n.shape[0], 2 * offs_d.shape[0]])
    else:
        offs = pair[:, None, None] + offs_n[None, :, None] * stride_row + offs_d[None, None, :]
        x = tl.load(BASE + offs, mask=mask_n[None, :, None], other=0.0)
        out = tl.reshape(x, [2 * offs_n.shape[0], offs_d.shape[0]])
    return out


@triton.jit
def _cat_cols(a, b):
    """[a | b] along the last (matmul K) dimension, through registers."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [a.shape[0], 2 * a.shape[1]])


@triton.jit
def _tile_scores(
    q, tq, q_cat, K_BH, TK_BH, stride_kn, stride_tkn, tk_delta, start_n, offs_d, n_k,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, WANT_TS: tl.constexpr, MERGED_TS: tl.constexpr,
    SPLIT_TS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Raw (unscaled, unmasked) Q·Kᵀ and tS pieces of the key tile at ``start_n``: ``(s, ts, ts2)`` with
    tS = ts + ts2 when SPLIT_TS (tQ·Kᵀ and Q·tKᵀ as two independent dots), else ts2 unused. Nothing here reads a
    dot's result, so under PIPELINE every one of them can stay in flight until the next iteration's softmax
    (Triton makes a wgmma "properly async" only if its result goes straight to the loop's yield, and a chained
    ``dot(q, tk, ts)`` reads ts)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_k
    k = _load_rows(K_BH, offs_n, stride_kn, offs_d, mask_n)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    ts = s
    ts2 = s
    if WANT_TS:
        if MERGED_TS:  # tS = [tQ | Q]·[K | tK]ᵀ: one dot with K-dim 2·D
            k_cat = _load_pair(K_BH, tk_delta, offs_n, stride_kn, offs_d, mask_n, True)
            ts = tl.dot(q_cat, tl.trans(k_cat), input_precision=INPUT_PRECISION)
        elif SPLIT_TS:
            ts = tl.dot(tq, tl.trans(k), input_precision=INPUT_PRECISION)
            tk = _load_rows(TK_BH, offs_n, stride_tkn, offs_d, mask_n)
            ts2 = tl.dot(q, tl.trans(tk), input_precision=INPUT_PRECISION)
        else:
            ts = tl.zeros_like(s)
            if HAS_TQ:
                ts = tl.dot(tq, tl.trans(k), ts, input_precision=INPUT_PRECISION)
            if HAS_TK:
                tk = _load_rows(TK_BH, offs_n, stride_tkn, offs_d, mask_n)
                ts = tl.dot(q, tl.trans(tk), ts, input_precision=INPUT_PRECISION)
    return s, ts, ts2


@triton.jit
def _tile_softmax(
    s, ts, ts2, acc_o, acc_t, m_i, l_i, mu_i, start_n, n_k, qk_scale, sm_scale,
    HAS_TS: tl.constexpr, WANT_TANGENT: tl.constexpr, FIXED_LSE: tl.constexpr, SPLIT_TS: tl.constexpr,
    MERGED_PV: tl.constexpr, PV_DTYPE: tl.constexpr, ROUND_F16: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax update of one key tile from its raw scores; returns the P·V-side A operands ``(p, a_t)``
    (a_t: P⊙tS, or [P⊙tS | P] when MERGED_PV) and the rescaled state."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s = tl.where((offs_n < n_k)[None, :], s * qk_scale, float("-inf"))
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
    p_op = _pv_operand(p, PV_DTYPE, ROUND_F16)
    a_t = p_op
    if WANT_TANGENT and HAS_TS:
        if SPLIT_TS:
            ts = ts + ts2
        p_ts = p * (ts * sm_scale)
        mu_i += tl.sum(p_ts, 1)
        if MERGED_PV:
            a_t = _pv_operand(_cat_cols(p_ts, p), PV_DTYPE, ROUND_F16)
        else:
            a_t = _pv_operand(p_ts, PV_DTYPE, ROUND_F16)
    return p_op, a_t, acc_o, acc_t, m_i, l_i, mu_i


@triton.jit
def _tile_products(
    p_op, a_t, acc_o, acc_t, V_BH, TV_BH, stride_vn, stride_tvn, tv_delta, start_n, offs_d, n_k,
    HAS_TS: tl.constexpr, HAS_TV: tl.constexpr, WANT_TANGENT: tl.constexpr, FIXED_LSE: tl.constexpr,
    MERGED_PV: tl.constexpr, PV_DTYPE: tl.constexpr, ROUND_F16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, FROM_BEHIND: tl.constexpr,
):
    """acc_o += P·V and acc_t += (P⊙tS)·V + P·tV for the value tile at ``start_n`` (rows outside [0, Nk) read 0)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_k
    if FROM_BEHIND:  # PIPELINE's first trip multiplies a zero P with the tile at −BLOCK_N: read nothing there
        mask_n = mask_n & (offs_n >= 0)
    NEED_V: tl.constexpr = (not FIXED_LSE) or (WANT_TANGENT and HAS_TS and not MERGED_PV)
    if NEED_V:
        v = _pv_operand(_load_rows(V_BH, offs_n, stride_vn, offs_d, mask_n), PV_DTYPE,
                        ROUND_F16)
        if not FIXED_LSE:
            acc_o = tl.dot(p_op, v, acc_o, input_precision=INPUT_PRECISION)
    if WANT_TANGENT:
        if MERGED_PV:  # [P⊙tS | P]·[V ; tV]: one dot with K-dim 2·BLOCK_N
            v_cat = _pv_operand(_load_pair(V_BH, tv_delta, offs_n, stride_vn, offs_d, mask_n, False), PV_DTYPE,
                                ROUND_F16)
            acc_t = tl.dot(a_t, v_cat, acc_t, input_precision=INPUT_PRECISION)
        else:
            if HAS_TS:
                acc_t = tl.dot(a_t, v, acc_t, input_precision=INPUT_PRECISION)
            if HAS_TV:
                tv = _pv_operand(_load_rows(TV_BH, offs_n, stride_tvn, offs_d, mask_n),
                                 PV_DTYPE, ROUND_F16)
                acc_t = tl.dot(p_op, tv, acc_t, input_precision=INPUT_PRECISION)
    return acc_o, acc_t


@triton.jit
def _attn_fwd_inner(
    acc_o, acc_t, m_i, l_i, mu_i,
    q, tq,
    K_BH, TK_BH, V_BH, TV_BH,  # pointers to this (batch, head)'s K, tK, V, tV
    stride_kn, stride_tkn, stride_vn, stride_tvn, tk_delta, tv_delta,
    offs_d, n_k, qk_scale, sm_scale,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, WANT_TANGENT: tl.constexpr,
    FIXED_LSE: tl.constexpr, PV_DTYPE: tl.constexpr, ROUND_F16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, PIPELINE: tl.constexpr, MERGE: tl.constexpr,
):
    """Stream all K/V tiles for one block of query rows; returns the updated accumulators and softmax state.

    Online mode (FIXED_LSE False): m_i is the running max of S·log2(e)·scale, l_i the running Σ exp2(·−m_i).
    Fixed mode: m_i already holds LSE·log2(e), l_i is 1, nothing is rescaled and acc_o is not accumulated (the
    tangent kernel reads the primal's saved O instead: one matmul fewer per tile, one accumulator fewer).

    PIPELINE (software pipelining): trip j first runs tile j−1's P·V-side products (synchronous wgmmas: their
    accumulators are rescaled right after), then issues tile j+1's S/tS wgmmas, then tile j's softmax, which runs
    on the CUDA cores while those wgmmas are in flight (Triton's rule 3b: the scores are first read after the
    products' wait). One extra trip flushes the last tile's products; its softmax and look-ahead see fully masked
    tiles. Costs per program: two masked S (and tS) tiles and one zero-P product, no second copy of the loop body.
    MERGE: see the kernel's docstring.
    """
    HAS_TS: tl.constexpr = HAS_TQ or HAS_TK
    WANT_TS: tl.constexpr = WANT_TANGENT and HAS_TS
    MERGED_TS: tl.constexpr = MERGE and WANT_TANGENT and HAS_TQ and HAS_TK
    MERGED_PV: tl.constexpr = MERGE and WANT_TANGENT and HAS_TS and HAS_TV
    SPLIT_TS: tl.constexpr = PIPELINE and WANT_TANGENT and HAS_TQ and HAS_TK and not MERGED_TS
    q_cat = q
    if MERGED_TS:
        q_cat = _cat_cols(tq, q)  # once per program
    if PIPELINE:
        s, ts, ts2 = _tile_scores(q, tq, q_cat, K_BH, TK_BH, stride_kn, stride_tkn, tk_delta, 0,
                                  offs_d, n_k, HAS_TQ, HAS_TK, WANT_TS, MERGED_TS, SPLIT_TS,
                                  INPUT_PRECISION, BLOCK_N)
        p_op = _pv_operand(tl.zeros_like(s), PV_DTYPE, ROUND_F16)
        a_t = p_op
        if MERGED_PV:
            a_t = _cat_cols(p_op, p_op)
        hi = tl.where(n_k > 0, n_k + BLOCK_N, 0)  # the fix-up pass's idle programs (n_k = 0) skip the loop
        for start_n in range(0, hi, BLOCK_N):
            acc_o, acc_t = _tile_products(
                p_op, a_t, acc_o, acc_t, V_BH, TV_BH, stride_vn, stride_tvn, tv_delta,
                start_n - BLOCK_N, offs_d, n_k, HAS_TS, HAS_TV, WANT_TANGENT, FIXED_LSE, MERGED_PV,
                PV_DTYPE, ROUND_F16, INPUT_PRECISION, BLOCK_N, True)
            s_next, ts_next, ts2_next = _tile_scores(
                q, tq, q_cat, K_BH, TK_BH, stride_kn, stride_tkn, tk_delta, start_n + BLOCK_N,
                offs_d, n_k, HAS_TQ, HAS_TK, WANT_TS, MERGED_TS, SPLIT_TS, INPUT_PRECISION, BLOCK_N)
            p_op, a_t, acc_o, acc_t, m_i, l_i, mu_i = _tile_softmax(
                s, ts, ts2, acc_o, acc_t, m_i, l_i, mu_i, start_n, n_k, qk_scale, sm_scale, HAS_TS, WANT_TANGENT,
                FIXED_LSE, SPLIT_TS, MERGED_PV, PV_DTYPE, ROUND_F16, BLOCK_N)
            s, ts, ts2 = s_next, ts_next, ts2_next
    else:
        for start_n in range(0, n_k, BLOCK_N):
            s, ts, ts2 = _tile_scores(q, tq, q_cat, K_BH, TK_BH, stride_kn, stride_tkn, tk_delta,
                                      start_n, offs_d, n_k, HAS_TQ, HAS_TK, WANT_TS, MERGED_TS, SPLIT_TS,
                                      INPUT_PRECISION, BLOCK_N)
            p_op, a_t, acc_o, acc_t, m_i, l_i, mu_i = _tile_softmax(
                s, ts, ts2, acc_o, acc_t, m_i, l_i, mu_i, start_n, n_k, qk_scale, sm_scale, HAS_TS, WANT_TANGENT,
                FIXED_LSE, SPLIT_TS, MERGED_PV, PV_DTYPE, ROUND_F16, BLOCK_N)
            acc_o, acc_t = _tile_products(
                p_op, a_t, acc_o, acc_t, V_BH, TV_BH, stride_vn, stride_tvn, tv_delta, start_n,
                offs_d, n_k, HAS_TS, HAS_TV, WANT_TANGENT, FIXED_LSE, MERGED_PV, PV_DTYPE, ROUND_F16,
                INPUT_PRECISION, BLOCK_N, False)
    return acc_o, acc_t, m_i, l_i, mu_i


@triton.jit
def _non_finite_per_row(x):
    return tl.sum(tl.where(tl.abs(x) < float("inf"), 0, 1), 1)


#: GUARD values of the forward kernel: no overflow guard; the guarded (fp16-operand) pass, which records per query
#: row whether an accumulator went non-finite; the fix-up pass, which recomputes only those rows with operands in
#: the input dtype. Two launches of one loop, instead of a second copy of the loop inside the kernel.
GUARD_NONE, GUARD_RECORD, GUARD_FIXUP = 0, 1, 2


@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _attn_fwd_kernel(
    Q, K, V, TQ, TK, TV,  # pointers to the inputs (a T* pointer is unused when its HAS_* flag is False)
    OUT, TOUT, LSE,  # pointers to O, tO and the LSE; O and the LSE are read instead of written when FIXED_LSE
    ROW_FLAGS,  # int32 (B·H, Nq): written by the GUARD_RECORD pass, read by the GUARD_FIXUP pass (else unused)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_tqb, stride_tqh, stride_tqn,
    stride_tkb, stride_tkh, stride_tkn,
    stride_tvb, stride_tvh, stride_tvn,
    stride_ob, stride_oh, stride_on,
    stride_tob, stride_toh, stride_ton,
    H, N_Q, N_K, sm_scale,
    # Element offsets tK − K and tV − V (same strides), read only by the MERGE variant. Specialised like any int
    # (÷16 or not, so the pair load stays vectorised); caching allocators align tensors, so it is ÷16 in practice.
    tk_delta, tv_delta,
    N_Q_BUCKET, N_K_BUCKET,  # autotune key only (power-of-two buckets of the lengths)
    MERGE_OK,  # autotune key only: 1 when tK, tV have the strides of K, V (MERGE candidates are pruned otherwise)
    HEAD_DIM: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    WRITE_O: tl.constexpr, WRITE_TO: tl.constexpr, WRITE_LSE: tl.constexpr, FIXED_LSE: tl.constexpr,
    PV_DTYPE: tl.constexpr, GUARD: tl.constexpr, ROUND_F16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PIPELINE: tl.constexpr = False, MERGE: tl.constexpr = False,
):
    """One BLOCK_M block of query rows of one (batch, head): O, tO and/or LSE.

    Modes: primal (WRITE_O, WRITE_LSE), fused primal + tangent (all three writes), tangent only from the saved LSE
    and O (FIXED_LSE, WRITE_TO). Programs are ordered query-block-fastest so neighbours share a head's K/V in L2.

    Loop variants (autotune candidates on GPUs, :data:`t2i_kernels.attention_tuning.VARIANTS`; every one computes the
    same math): PIPELINE (see :func:`_attn_fwd_inner`); MERGE: tS = [tQ | Q]·[K | tK]ᵀ as one dot of K-dim 2·D and
    the tangent accumulator as [P⊙tS | P]·[V ; tV], one dot of K-dim 2·BLOCK_N. The pairs are single 3-D loads at
    ``tk_delta``/``tv_delta`` (so tK, tV must have the strides of K, V: the launcher's MERGE_OK); wgmma is K = 16 per
    instruction, so HGMMA counts do not drop, only the dot/wait sites (6 → 4 fused, 5 → 3 tangent).
    """
    WANT_TANGENT: tl.constexpr = WRITE_TO
    b, h, start_m, bh = _tile_coords(N_Q, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N_Q
    n_k = N_K
    if GUARD == 2:
        # Fix-up pass: only rows the guarded pass flagged are recomputed and stored; a program without one skips
        # the loop (the common case: this launch costs little more than reading the flags).
        redo = tl.load(ROW_FLAGS + bh * N_Q + offs_m, mask=mask_m, other=0) != 0
        mask_m = mask_m & redo
        n_k = tl.where(tl.max(redo.to(tl.int32), 0) > 0, N_K, 0)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, mask_m)
    tq = q
    if WANT_TANGENT and HAS_TQ:
        tq = _load_rows(TQ + b * stride_tqb + h * stride_tqh, offs_m, stride_tqn, offs_d, mask_m)
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

    acc_o, acc_t, m_i, l_i, mu_i = _attn_fwd_inner(
        acc_o, acc_t, m_i, l_i, mu_i, q, tq,
        K + b * stride_kb + h * stride_kh, TK + b * stride_tkb + h * stride_tkh,
        V + b * stride_vb + h * stride_vh, TV + b * stride_tvb + h * stride_tvh,
        stride_kn, stride_tkn, stride_vn, stride_tvn, tk_delta, tv_delta, offs_d, n_k, qk_scale, sm_scale,
        HAS_TQ, HAS_TK, HAS_TV, WANT_TANGENT, FIXED_LSE, PV_DTYPE, ROUND_F16, INPUT_PRECISION, BLOCK_N,
        PIPELINE, MERGE,
    )
    if GUARD == 1:
        # An fp16 operand overflowed (|V|, |tV| or |P⊙tS| ≥ 65504) iff the row's accumulator is non-finite (inf·0 =
        # NaN, inf + x = inf). Rows are flagged individually, so the fix-up pass needs no knowledge of BLOCK_M.
        bad = _non_finite_per_row(acc_t)
        if not FIXED_LSE:
            bad += _non_finite_per_row(acc_o)
        tl.store(ROW_FLAGS + bh * N_Q + offs_m, bad, mask=mask_m)

    o_offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    if FIXED_LSE:
        o = tl.load(OUT + o_offs, mask=mask_m[:, None], other=0.0).to(tl.float32)
        inv_l = l_i  # = 1: probabilities were exact from the start
    else:
        inv_l = 1.0 / l_i
        o = acc_o * inv_l[:, None]
    if WRITE_O:
        tl.store(OUT + o_offs, o.to(OUT.dtype.element_ty), mask=mask_m[:, None])
    if WRITE_TO:
        to = acc_t * inv_l[:, None] - (mu_i * inv_l)[:, None] * o
        to_offs = b * stride_tob + h * stride_toh + offs_m[:, None] * stride_ton + offs_d[None, :]
        tl.store(TOUT + to_offs, to.to(TOUT.dtype.element_ty), mask=mask_m[:, None])
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * LN2  # back to natural log
        tl.store(LSE + bh * N_Q + offs_m, lse, mask=mask_m)
