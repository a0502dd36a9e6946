"""Fused attention + forward-mode tangent (JVP) as a Gluon kernel for Hopper (sm_90): TMA, mbarriers, async wgmma.

**Opt-in and unverified: no GPU has run this kernel.** Gluon kernels cannot run in the Triton interpreter, so on the
project's machines it is only compiled (for sm_90, see the figures below); its parity tests are GPU-marked and skip.
Select it with :func:`attention_jvp_gluon` or ``T2I_ATTENTION_BACKEND=gluon`` (routes the fused launcher of
:func:`t2i_kernels.attention_jvp`; everything else keeps the Triton kernels). Make it a default only after
``pytest -m gpu tests/t2i_kernels/test_attention_gluon.py`` passed on an H100/H200 and it measured faster.

Math: exactly :mod:`t2i_kernels.attention`'s fused mode (same outputs O, tO, LSE)::

    S = Q·Kᵀ·scale, P = softmax(S), O = P·V,  tS = (tQ·Kᵀ + Q·tKᵀ)·scale,  μ = rowsum(P ⊙ tS)
    tO = [Σ_j e_j (tS_j·V_j + tV_j)] / l − (Σ_j e_j tS_j / l) · O

streamed over K/V tiles with the online softmax in base 2 (log2(e)·scale folded into one multiplier), the merged
tangent accumulator acc_t = Σ e·(tS·V + tV), the scalar Σ e·tS, fp32 accumulation, and fp16 P·V-side operands for
bf16 inputs (P, P⊙tS, V, tV; V and tV are re-rounded bf16 → fp16 in shared memory, wgmma needs one operand dtype).
Six wgmma per tile: Q·Kᵀ, tQ·Kᵀ, Q·tKᵀ (shared-memory operands), P·V, (P⊙tS)·V, P·tV (P from registers).
If an fp16 operand overflows (|V|, |tV| or |P⊙tS| ≥ 65504) the kernel flags the row, and the launcher recomputes
the call with the Triton kernel (which has its own fix-up pass); the flag check costs one host sync per bf16 call.

Design. One program = BLOCK_M = 128 query rows of one (batch, head), 8 warps = two warpgroups of 64 rows each.

* Buffers (shared memory): Q and tQ (one tile each, reused to stage O and tO for the TMA stores); a STAGES-deep
  ring of K, tK, V, tV tiles (BLOCK_N × D); for bf16, one fp16 V and tV tile each. All tiles come from 4-D
  (B, H, N, D) TMA descriptors with block (1, 1, rows, D): any strides with a unit last stride (FLUX's (B, N, H, D)
  memory, no copies), rows past N zero-filled on load and clipped on store per (batch, head), so ragged Nq and Nk
  need no padding; the last key tile's logits past N_K are masked to −inf (every tile: see below).
* Barriers: one mbarrier for Q/tQ, and per ring stage one "K ready" (K and tK, one expect-tx of both) and one
  "V ready" (V and tV), so Q·Kᵀ can start before V has landed.
* Pipelining (software, in each warpgroup): tile j issues its three Q·Kᵀ-side wgmma, then tile j−1's three P·V-side
  wgmma, then waits with ``warpgroup_mma_wait(3)``: the K side has retired and the P·V side stays in flight while
  tile j's softmax runs on the CUDA cores; ``warpgroup_mma_wait(0)`` then retires it and rescales the accumulators
  (FA3's intra-warpgroup overlap). Measured in SASS (bf16; MUFU.EX2 between ``WARPGROUP.DEPBAR.LE gsb0, 0x3`` and
  ``0x0``, of BLOCK_N/2 + 2 per tile; ptxas of triton 3.9 / 3.6): head dim 128 with 16-key tiles 10/10 and 10/10,
  with 32-key tiles 18/18 but 0/18 (hence 16 by default: the GPU image has 3.6); head dim 64 with 64-key tiles
  18/34 and 34/34. An ``if`` on the last tile around the mask made ptxas retire the P·V wgmmas before the softmax
  (the branch sits between issue and wait), so the mask is applied to every tile.
* Loads, default variant: the compute warps refill a stage once both warpgroups have retired the wgmmas reading it
  (a CTA barrier, then TMA) with the tile STAGES tiles ahead.
* ``warp_specialize=True`` variant: ``gl.warp_specialize`` with a one-warp load partition (24 registers) that fills
  the ring and waits on per-stage "empty" mbarriers, which the compute partition (8 warps, 240 registers after
  setmaxnreg; kernel maxnreg 168) arrives on after a partition barrier. Its register cap costs overlap: ptxas
  retires the P·V wgmmas after 5/10 and 6/10 exponentials (head dim 128; triton 3.9 / 3.6) and 0/34 (head dim
  64), so the default variant is the one to try first.

Measured compile figures (project CPU machine, 2 cores, no GPU; ``bench/compile_report.py --only attention_gluon``,
sm_90 compile via Triton 3.9.0 / 3.6.0; bf16, FLUX shapes; registers per thread, spills, shared memory in bytes,
HGMMA instructions, deepest wgmma wait)::

    variant        head dim  BLOCK_N  STAGES  regs 3.9 / 3.6   spills  smem     HGMMA  pendings
    default        128       16       4       220 / 199        0       139400   54     3
    default        64        64       3       224 / 222        0       147592   48     3
    warp-spec.     128       16       4       168* / 168*      0       139708   54     3
    warp-spec.     64        64       3       168* / 168*      0       147900   48     3
    (* the kernel-wide cap of 12 warps; the compute warps run at 240 after setmaxnreg)

``block_n=32`` at head dim 128 (3 stages) compiles too: 253 / 242 registers, no spills, 180360 B. fp16 inputs
compile too (no fp16 copies of V and tV: 8 to 16 KiB less shared memory). ``tests/t2i_kernels/test_attention_gluon.py``
compiles every variant and asserts no spills, shared memory ≤ 232,448 B, HGMMA only, pendings = 3, and (default
variant) exponentials between the two waits in SASS. No timing exists: the issue's targets (≥ 600 TFLOP/s fused
at [2, 24, 1536, 128] and [1, 24, 4608, 128]) are untested.

API differences handled: triton 3.6 names the TMA copies ``async_copy_global_to_shared`` /
``async_copy_shared_to_global`` and the CTA barrier ``thread_barrier``; 3.9 ``async_load`` / ``async_store`` /
``barrier`` (the 3.6 names raise there). Both compile the same source.

Limits: CUDA sm_90 only (a clear error elsewhere, incl. the CPU); fp16/bf16; head dim 64 or 128; 16-byte aligned
base and strides (TMA); not differentiable (gradients: :func:`t2i_kernels.attention_jvp`); tangents given as ``None``
are materialised as zeros. Gluon API usage follows the Triton Gluon tutorials (triton-lang/triton
``python/tutorials/gluon/04-tma.py``, ``05-wgmma.py``, ``08-warp-specialization.py``); the kernel is our own.
"""

from __future__ import annotations

import torch

from t2i_kernels._runtime import HAS_TRITON, triton
from t2i_kernels.attention_launch import _check_attention_inputs, _empty_bnhd, _launch_fwd, _scale_of

try:  # Gluon ships with triton >= 3.5; the module must import cleanly without it (CPU-only installs)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAS_GLUON = HAS_TRITON
except ImportError as exc:  # pragma: no cover - depends on the installed triton
    HAS_GLUON = False
    _GLUON_ERROR: BaseException | None = exc
else:
    _GLUON_ERROR = None

__all__ = ["HAS_GLUON", "SUPPORTED_HEAD_DIMS", "attention_jvp_gluon"]

SUPPORTED_HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634


if HAS_GLUON:
    # triton 3.6 names the CTA-wide barrier thread_barrier, 3.9 renames it barrier.
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    # 3.9 renames the TMA copies async_load/async_store (the 3.6 names raise there).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

    @gluon.constexpr_function
    def _copy_layout(head_dim, num_warps):
        """A blocked register layout for a (rows, HEAD_DIM) 16-bit tile: 16-byte vectors along the head dim."""
        cols = min(head_dim // 8, 32)
        return gl.BlockedLayout([1, 8], [32 // cols, cols], [num_warps, 1], [1, 0])

    @gluon.jit
    def _issue_pair(desc_a, desc_b, smem_a, smem_b, bar, b, h, row, pred):
        """TMA-load one (row, HEAD_DIM) tile of each of two same-shaped tensors; both arrive on ``bar``."""
        mbarrier.expect(bar, 2 * desc_a.block_type.nbytes, pred=pred)
        _tma_load(desc_a, [b, h, row, 0], bar, smem_a, pred=pred)
        _tma_load(desc_b, [b, h, row, 0], bar, smem_b, pred=pred)

    @gluon.jit
    def _k_side(q_s, tq_s, k_s, tk_s, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """Issue S = Q·Kᵀ and tS = tQ·Kᵀ + Q·tKᵀ as three async wgmma groups (results are tokens until waited)."""
        zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        kt = k_s.permute((1, 0))
        s = warpgroup_mma(q_s, kt, zero, use_acc=False, is_async=True)
        ts = warpgroup_mma(tq_s, kt, zero, use_acc=False, is_async=True)
        ts = warpgroup_mma(q_s, tk_s.permute((1, 0)), ts, is_async=True)
        return s, ts

    @gluon.jit
    def _v_side(acc_o, acc_t, p_op, pts_op, v_s, tv_s, v16_s, tv16_s,
                PV_F16: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, num_warps: gl.constexpr):
        """Issue O += P·V and tO += (P⊙tS)·V + P·tV as three async wgmma groups. With PV_F16 (bf16 inputs) V and
        tV are first rounded to fp16 into their own buffers: wgmma needs both operands in one dtype, and P in fp16
        keeps 3 more mantissa bits than bf16 (see t2i_kernels.attention)."""
        if PV_F16:
            copy: gl.constexpr = _copy_layout(HEAD_DIM, num_warps)
            v16_s.store(v_s.load(copy).to(gl.float16))
            tv16_s.store(tv_s.load(copy).to(gl.float16))
            fence_async_shared()  # generic-proxy stores, then async-proxy (wgmma) reads
            _cta_barrier()  # both warpgroups read all of V
            v_op = v16_s
            tv_op = tv16_s
        else:
            v_op = v_s
            tv_op = tv_s
        acc_o = warpgroup_mma(p_op, v_op, acc_o, is_async=True)
        acc_t = warpgroup_mma(pts_op, v_op, acc_t, is_async=True)
        acc_t = warpgroup_mma(p_op, tv_op, acc_t, is_async=True)
        return acc_o, acc_t

    @gluon.jit
    def _softmax(s, ts, m_i, l_i, mu_i, start_n, N_K, qk_scale, sm_scale,
                 BLOCK_N: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr, PV_DTYPE: gl.constexpr):
        """Online-softmax update for one key tile (base 2); returns P and P⊙tS as wgmma register operands."""
        # Keys past N_K were zero-filled by TMA: they must not count. Masked on every tile, not under an `if` on the
        # last one: a branch here makes ptxas retire the in-flight P·V wgmmas before the softmax (measured in SASS).
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < N_K, 0), s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        pts = p * (ts * sm_scale)
        mu_i = mu_i * alpha + gl.sum(pts, 1)
        p_op = gl.convert_layout(p.to(PV_DTYPE), p_layout)
        pts_op = gl.convert_layout(pts.to(PV_DTYPE), p_layout)
        return p_op, pts_op, m_new, l_i, mu_i, alpha

    @gluon.jit
    def _load_partition(descs, bufs, bars, empties, b, h, start_m, n_tiles):
        """Warp-specialised producer (one warp): Q and tQ once, then every K/tK and V/tV tile into the ring, each
        stage as soon as the compute warps release it (``empties``; a fresh mbarrier counts as released)."""
        q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc = descs
        q_buf, tq_buf, k_buf, tk_buf, v_buf, tv_buf = bufs
        q_bar, k_bar, v_bar = bars
        k_empty, v_empty = empties
        STAGES: gl.constexpr = k_buf.type.shape[0]
        BLOCK_N: gl.constexpr = k_buf.type.shape[3]
        _issue_pair(q_desc, tq_desc, q_buf, tq_buf, q_bar, b, h, start_m, True)
        for t in range(n_tiles):
            stage = t % STAGES
            phase = (t // STAGES) & 1
            mbarrier.wait(k_empty.index(stage), phase ^ 1)
            _issue_pair(k_desc, tk_desc, k_buf.index(stage), tk_buf.index(stage), k_bar.index(stage), b, h,
                        t * BLOCK_N, True)
            mbarrier.wait(v_empty.index(stage), phase ^ 1)
            _issue_pair(v_desc, tv_desc, v_buf.index(stage), tv_buf.index(stage), v_bar.index(stage), b, h,
                        t * BLOCK_N, True)

    @gluon.jit
    def _release(WS: gl.constexpr, desc_a, desc_b, buf_a, buf_b, bar, empty, stage, b, h, tile, n_tiles,
                 BLOCK_N: gl.constexpr):
        """A ring stage is consumed by both warpgroups: hand it to the load partition (WS), or refill it with
        tile ``tile`` ourselves."""
        _cta_barrier()  # every warp's wgmmas (and shared loads) on this stage have retired
        if WS:
            mbarrier.arrive(empty.index(stage), count=1)
        else:
            _issue_pair(desc_a, desc_b, buf_a.index(stage), buf_b.index(stage), bar.index(stage), b, h,
                        tile * BLOCK_N, tile < n_tiles)

    @gluon.jit
    def _compute_partition(descs, bufs, bars, empties, v16_s, tv16_s, o_descs, LSE, ROW_FLAGS, b, h, bh, start_m,
                           N_Q, N_K, n_tiles, qk_scale, sm_scale, PV_F16: gl.constexpr, WS: gl.constexpr,
                           num_warps: gl.constexpr):
        """Two warpgroups of 64 query rows each: the online-softmax loop over K/V tiles and the epilogue."""
        q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc = descs
        q_buf, tq_buf, k_buf, tk_buf, v_buf, tv_buf = bufs
        q_bar, k_bar, v_bar = bars
        k_empty, v_empty = empties
        o_desc, to_desc = o_descs
        dtype: gl.constexpr = q_buf.dtype
        PV_DTYPE: gl.constexpr = gl.float16 if PV_F16 else dtype
        STAGES: gl.constexpr = k_buf.type.shape[0]
        BLOCK_M: gl.constexpr = q_buf.type.shape[2]
        BLOCK_N: gl.constexpr = k_buf.type.shape[3]
        HEAD_DIM: gl.constexpr = q_buf.type.shape[3]
        # One warpgroup per 64 rows; instruction N = the whole tile width (largest wgmma).
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        if not WS:  # no load partition: this partition fills the ring itself, STAGES tiles ahead
            _issue_pair(q_desc, tq_desc, q_buf, tq_buf, q_bar, b, h, start_m, True)
            for i in gl.static_range(STAGES):
                _issue_pair(k_desc, tk_desc, k_buf.index(i), tk_buf.index(i), k_bar.index(i), b, h, i * BLOCK_N,
                            i < n_tiles)
                _issue_pair(v_desc, tv_desc, v_buf.index(i), tv_buf.index(i), v_bar.index(i), b, h, i * BLOCK_N,
                            i < n_tiles)
        q_s = q_buf.reshape([BLOCK_M, HEAD_DIM])
        tq_s = tq_buf.reshape([BLOCK_M, HEAD_DIM])

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
        mu_i = gl.zeros([BLOCK_M], gl.float32, row_s)
        acc_o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        acc_t = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

        # Tile 0 (peeled: no P·V of a previous tile to overlap with).
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bar.index(0), 0)
        s, ts = _k_side(q_s, tq_s, k_buf.index(0).reshape([BLOCK_N, HEAD_DIM]),
                        tk_buf.index(0).reshape([BLOCK_N, HEAD_DIM]), BLOCK_M, BLOCK_N, s_layout)
        s, ts = warpgroup_mma_wait(0, deps=(s, ts))
        _release(WS, k_desc, tk_desc, k_buf, tk_buf, k_bar, k_empty, 0, b, h, STAGES, n_tiles, BLOCK_N)
        p_op, pts_op, m_i, l_i, mu_i, alpha = _softmax(s, ts, m_i, l_i, mu_i, 0, N_K, qk_scale, sm_scale,
                                                       BLOCK_N, s_layout, p_layout, PV_DTYPE)

        # Steady state, tile j: issue tile j's Q·Kᵀ side, then tile j-1's P·V side; wait for the first three
        # groups only (pendings = 3), so the P·V wgmmas run under tile j's softmax; then retire them and rescale.
        for j in range(1, n_tiles):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_bar.index(stage), (j // STAGES) & 1)
            s, ts = _k_side(q_s, tq_s, k_buf.index(stage).reshape([BLOCK_N, HEAD_DIM]),
                            tk_buf.index(stage).reshape([BLOCK_N, HEAD_DIM]), BLOCK_M, BLOCK_N, s_layout)
            mbarrier.wait(v_bar.index(prev), ((j - 1) // STAGES) & 1)
            acc_o, acc_t = _v_side(acc_o, acc_t, p_op, pts_op, v_buf.index(prev).reshape([BLOCK_N, HEAD_DIM]),
                                   tv_buf.index(prev).reshape([BLOCK_N, HEAD_DIM]), v16_s, tv16_s,
                                   PV_F16, BLOCK_N, HEAD_DIM, num_warps)
            s, ts = warpgroup_mma_wait(3, deps=(s, ts))
            # K/tK of tile j are consumed: their stage takes tile j + STAGES.
            _release(WS, k_desc, tk_desc, k_buf, tk_buf, k_bar, k_empty, stage, b, h, j + STAGES, n_tiles, BLOCK_N)
            p_prev = p_op
            pts_prev = pts_op
            p_op, pts_op, m_i, l_i, mu_i, alpha = _softmax(s, ts, m_i, l_i, mu_i, j * BLOCK_N, N_K, qk_scale,
                                                           sm_scale, BLOCK_N, s_layout, p_layout, PV_DTYPE)
            # The in-flight wgmmas read tile j-1's P and P⊙tS from registers: they stay alive until retired.
            acc_o, acc_t, p_prev, pts_prev = warpgroup_mma_wait(0, deps=(acc_o, acc_t, p_prev, pts_prev))
            # V/tV of tile j-1 are consumed: their stage takes tile j-1 + STAGES.
            _release(WS, v_desc, tv_desc, v_buf, tv_buf, v_bar, v_empty, prev, b, h, j - 1 + STAGES, n_tiles,
                     BLOCK_N)
            alpha_o = gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            acc_o = acc_o * alpha_o
            acc_t = acc_t * alpha_o

        last = (n_tiles - 1) % STAGES
        mbarrier.wait(v_bar.index(last), ((n_tiles - 1) // STAGES) & 1)
        acc_o, acc_t = _v_side(acc_o, acc_t, p_op, pts_op, v_buf.index(last).reshape([BLOCK_N, HEAD_DIM]),
                               tv_buf.index(last).reshape([BLOCK_N, HEAD_DIM]), v16_s, tv16_s,
                               PV_F16, BLOCK_N, HEAD_DIM, num_warps)
        acc_o, acc_t, p_op, pts_op = warpgroup_mma_wait(0, deps=(acc_o, acc_t, p_op, pts_op))

        inv_l = gl.expand_dims(gl.convert_layout(1.0 / l_i, row_o), 1)
        mu_l = gl.expand_dims(gl.convert_layout(mu_i / l_i, row_o), 1)
        o = acc_o * inv_l
        to = acc_t * inv_l - mu_l * o
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=row_o)
        mask_m = offs_m < N_Q
        if PV_F16:
            # An fp16 operand overflowed (|V|, |tV| or |P⊙tS| ≥ 65504) iff a row's accumulator is non-finite.
            finite = (gl.abs(acc_o) < float("inf")) & (gl.abs(acc_t) < float("inf"))
            bad = gl.sum(gl.where(finite, 0, 1), 1)
            gl.store(ROW_FLAGS + bh * N_Q + offs_m, bad, mask=mask_m)
        lse = (gl.convert_layout(m_i, row_o) + gl.log2(gl.convert_layout(l_i, row_o))) * 0.6931471805599453
        gl.store(LSE + bh * N_Q + offs_m, lse, mask=mask_m)
        # Q and tQ are dead: their buffers stage O and tO for the TMA stores (rows past N_Q are clipped by TMA).
        q_s.store(o.to(dtype))
        tq_s.store(to.to(dtype))
        fence_async_shared()  # every thread's generic stores, then the async-proxy TMA reads of one thread
        _cta_barrier()
        _tma_store(o_desc, [b, h, start_m, 0], q_buf)
        _tma_store(to_desc, [b, h, start_m, 0], tq_buf)
        tma.store_wait(0)

    @gluon.jit(do_not_specialize=["N_Q", "N_K"])  # a new length never recompiles (as t2i_kernels.attention)
    def _attn_jvp_gluon_kernel(
        q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc,  # TMA descriptors over (B, H, N, D), block (1, 1, ·, D)
        o_desc, to_desc,  # TMA descriptors of the outputs O and tO (same block as q)
        LSE,  # pointer to the (B·H, Nq) fp32 LSE
        ROW_FLAGS,  # pointer to (B·H, Nq) int32: non-finite accumulator per row (fp16 operand overflow), PV_F16 only
        H, N_Q, N_K, qk_scale, sm_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        PV_F16: gl.constexpr, WARP_SPECIALIZE: gl.constexpr, num_warps: gl.constexpr,
    ):
        """One BLOCK_M block of query rows of one (batch, head): O, tO (input dtype) and the LSE (fp32)."""
        dtype: gl.constexpr = q_desc.dtype
        n_mblocks = gl.cdiv(N_Q, BLOCK_M)
        pid = gl.program_id(0)
        bh = pid // n_mblocks  # query-block fastest: neighbouring programs share a head's K/V in L2
        start_m = (pid % n_mblocks) * BLOCK_M
        b = bh // H
        h = bh % H
        n_tiles = gl.cdiv(N_K, BLOCK_N)

        # Shared memory: Q, tQ once; a STAGES-deep ring of K, tK (one barrier per stage) and V, tV (another).
        q_buf = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
        tq_buf = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
        k_buf = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
        tk_buf = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_buf = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
        tv_buf = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
        if PV_F16:
            tile2d: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
            v16_s = gl.allocate_shared_memory(gl.float16, [BLOCK_N, HEAD_DIM], tile2d)
            tv16_s = gl.allocate_shared_memory(gl.float16, [BLOCK_N, HEAD_DIM], tile2d)
        else:
            v16_s = v_buf
            tv16_s = tv_buf
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(i), count=1)
            mbarrier.init(v_bar.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=1)
        fence_async_shared()  # the initialised barriers, visible to the TMA unit ...
        _cta_barrier()  # ... and to every warp before any waits on them

        descs = (q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc)
        bufs = (q_buf, tq_buf, k_buf, tk_buf, v_buf, tv_buf)
        bars = (q_bar, k_bar, v_bar)
        empties = (k_empty, v_empty)
        o_descs = (o_desc, to_desc)
        if WARP_SPECIALIZE:
            # One producer warp (24 registers) issues every TMA load; the 8 compute warps get the rest.
            gl.warp_specialize([
                (_compute_partition, (descs, bufs, bars, empties, v16_s, tv16_s, o_descs, LSE, ROW_FLAGS, b, h, bh,
                                      start_m, N_Q, N_K, n_tiles, qk_scale, sm_scale, PV_F16, True, num_warps)),
                (_load_partition, (descs, bufs, bars, empties, b, h, start_m, n_tiles)),
            ], [1], [24])
        else:
            _compute_partition(descs, bufs, bars, empties, v16_s, tv16_s, o_descs, LSE, ROW_FLAGS, b, h, bh, start_m,
                               N_Q, N_K, n_tiles, qk_scale, sm_scale, PV_F16, False, num_warps)
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bar.index(i))
            mbarrier.invalidate(v_bar.index(i))
            mbarrier.invalidate(k_empty.index(i))
            mbarrier.invalidate(v_empty.index(i))




# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
#: BLOCK_N each head dim may use, and the ring depth that goes with it (shared memory, see the module docstring).
#: BLOCK_M is 128 (two warpgroups of 64 rows, 8 warps) throughout.
_STAGES = {128: {16: 4, 32: 3}, 64: {32: 4, 64: 3}}
#: Default BLOCK_N. Head dim 128 takes 16-key tiles: with 32 ptxas of triton 3.6 (the GPU image's) retires the
#: P·V wgmmas before the softmax (0 of 18 exponentials overlapped; 3.9: 18 of 18); with 16 both overlap all 10.
#: Warp-specialised (240 registers for the compute warps), 32-key tiles spilled under 3.9 as well.
_BLOCK_N = {128: 16, 64: 64}
_WS_MAXNREG = 168  # 168 · 12 warps · 32 lanes ≤ 65536 registers per SM (one CTA)


class GluonUnavailableError(RuntimeError):
    """The Gluon kernel cannot run here: no Gluon in this triton, not a CUDA tensor, or not an sm_90 GPU."""


def check_launchable(op: str, kernel, device: torch.device) -> None:
    """Raise :class:`GluonUnavailableError` unless ``device`` is a CUDA GPU of compute capability 9.0 (Hopper).

    Named like :func:`t2i_kernels._runtime.check_launchable` on purpose: ``bench/compile_report.py`` swaps every
    ``check_launchable`` of a kernel module for a no-op while it captures launches from empty CPU tensors.
    """
    if not HAS_GLUON:
        raise GluonUnavailableError(f"{op}: triton.experimental.gluon is not importable ({_GLUON_ERROR}); "
                                    "install triton >= 3.6")
    if device.type != "cuda":
        raise GluonUnavailableError(
            f"{op}: the Gluon kernel runs only on CUDA sm_90 (H100/H200) GPUs; the inputs are on `{device}`. "
            "Gluon kernels cannot run in the Triton interpreter: use t2i_kernels.attention_jvp on the CPU")
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        raise GluonUnavailableError(
            f"{op}: the Gluon kernel is written for sm_90 (wgmma, TMA); this GPU is sm_{cap[0]}{cap[1]} "
            f"({torch.cuda.get_device_name(device)}); use t2i_kernels.attention_jvp")


def _check_gluon_inputs(op: str, tensors: dict[str, torch.Tensor]) -> None:
    """What the Gluon kernel adds to t2i_kernels.attention's checks: half dtypes, head dim, TMA alignment."""
    problems = []
    q = tensors["q"]
    if q.dtype not in (torch.float16, torch.bfloat16):
        problems.append(f"`q`: the Gluon kernel takes float16 or bfloat16 (wgmma operands), got "
                        f"{str(q.dtype).removeprefix('torch.')}; use t2i_kernels.attention_jvp for float32")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        problems.append(f"`q`: the Gluon kernel supports head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]} "
                        f"(shape {tuple(q.shape)}); use t2i_kernels.attention_jvp")
    for name, t in tensors.items():
        # TMA descriptors: 16-byte aligned base address and strides (the last stride is 1, checked already).
        if t.data_ptr() % 16 or any((s * t.element_size()) % 16 for s in t.stride()[:-1]):
            problems.append(f"`{name}`: TMA needs a 16-byte aligned base and strides, got stride {t.stride()} "
                            f"at address {t.data_ptr():#x}; call `.contiguous()`")
    if problems:
        raise ValueError(f"{op}: " + "; ".join(problems))


def _descriptor(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """A 4-D (B, H, N, D) TMA descriptor, block (1, 1, block_rows, D): rows past N are zero-filled on load and
    clipped on store, per (batch, head), so ragged lengths need no padding and no masks on memory."""
    block = [1, 1, block_rows, t.shape[-1]]
    # fp16 and bf16 share it: the 128-byte swizzle depends only on the element width
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def attention_jvp_gluon(q, k, v, tq, tk, tv, scale=None, *, overflow_fallback: bool = True,
                        warp_specialize: bool = False, block_n: int | None = None):
    """``(o, to, lse)`` of attention and its tangent from the Gluon sm_90 kernel (opt-in; not verified on a GPU).

    Same contract as ``t2i_kernels.attention_jvp(..., return_lse=True)``: q, tq (B, H, Nq, D), k, v, tk, tv
    (B, H, Nk, D) in fp16 or bf16 with unit last stride; a tangent given as ``None`` counts as zero (it is
    materialised as zeros here). Returns ``o``, ``to`` as (B, H, Nq, D) views of (B, Nq, H, D) memory and ``lse``
    (B, H, Nq) fp32. Not differentiable (use t2i_kernels.attention_jvp for gradients). Raises
    :class:`GluonUnavailableError` off sm_90 GPUs and ``ValueError`` on bad inputs.

    bf16 inputs take fp16 P·V-side operands (as t2i_kernels.attention). If one overflowed (|V|, |tV| or |P⊙tS| ≥
    65504) the kernel flags its rows; with ``overflow_fallback`` (default) a flagged call is recomputed by the
    Triton kernel (t2i_kernels.attention_jvp, bf16-operand fix-up), at the price of one host sync per bf16 call to read
    the flags. ``overflow_fallback=False`` skips the sync and leaves flagged rows non-finite.

    ``warp_specialize`` selects the variant with a TMA producer warp; ``block_n`` (keys per tile: 16 or 32 at head
    dim 128, 32 or 64 at head dim 64) overrides the default tile, for measuring on a GPU.
    """
    check_launchable("attention_jvp_gluon", _attn_jvp_gluon_kernel if HAS_GLUON else None, q.device)
    _check_attention_inputs("attention_jvp_gluon", q, k, v, tq, tk, tv, scale=scale)
    tq = torch.zeros_like(q) if tq is None else tq
    tk = torch.zeros_like(k) if tk is None else tk
    tv = torch.zeros_like(v) if tv is None else tv
    named = dict(q=q, k=k, v=v, tq=tq, tk=tk, tv=tv)
    _check_gluon_inputs("attention_jvp_gluon", named)
    if block_n is not None and block_n not in _STAGES[q.shape[-1]]:
        raise ValueError(f"attention_jvp_gluon: `block_n` must be one of {sorted(_STAGES[q.shape[-1]])} at head dim "
                         f"{q.shape[-1]}, got {block_n!r}")
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    o, to = _empty_bnhd(q, n_q), _empty_bnhd(q, n_q)
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return o, to, lse
    block_m, num_warps = 128, 8
    block_n = _BLOCK_N[d] if block_n is None else block_n
    stages = _STAGES[d][block_n]
    pv_f16 = q.dtype == torch.bfloat16
    flags = torch.empty((b, h, n_q), dtype=torch.int32, device=q.device) if pv_f16 else lse
    sm_scale = _scale_of(q, scale)
    descs = [_descriptor(named[name], block_m if name.endswith("q") else block_n)
             for name in ("q", "tq", "k", "tk", "v", "tv")]  # the kernel's argument order
    grid = (b * h * triton.cdiv(n_q, block_m),)
    # Warp-specialised: 8 compute warps + a 4-warp group for the load warp share the 64 K registers per lane, so the
    # kernel-wide cap must leave room for both (the compute warps then get WS_MAXNREG·12/8 − 12 after setmaxnreg).
    extra = {"maxnreg": _WS_MAXNREG} if warp_specialize else {}
    _attn_jvp_gluon_kernel[grid](
        *descs, _descriptor(o, block_m), _descriptor(to, block_m), lse, flags,
        h, n_q, n_k, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, PV_F16=pv_f16,
        WARP_SPECIALIZE=warp_specialize, num_warps=num_warps, **extra,
    )
    if pv_f16 and overflow_fallback and bool(flags.any()):  # rare: recompute with the Triton kernel's fix-up pass
        return _launch_fwd(q, k, v, tq, tk, tv, None, None, sm_scale, True, True, True)
    return o, to, lse
