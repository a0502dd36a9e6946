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
  :mod:`kernels._custom_ops`), ``torch.autograd.forward_ad``, ordinary backward, and backward through the primal
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

Tuning: :mod:`kernels.attention_tuning` (per-mode candidates measured spill-free by ``bench/compile_report.py``),
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

import math
import os
from typing import NamedTuple

import torch

from kernels import attention_tuning as tuning
from kernels import reference
from kernels._checks import HALF_AND_FLOAT_DTYPES, InputChecks
from kernels._custom_ops import kernel_op
from kernels._runtime import HAS_TRITON, check_launchable, is_interpreted, tl, triton
from kernels.attention_backward_kernels import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from kernels.attention_forward_kernels import GUARD_FIXUP, GUARD_NONE, GUARD_RECORD, _attn_fwd_kernel

__all__ = ["AttentionFunction", "AttentionJVPFunction", "SUPPORTED_HEAD_DIMS", "attention", "attention_jvp"]

#: Pure-PyTorch references with the same signatures (vanilla attention, as the reference system computes it).
attention_ref = reference.attention
attention_jvp_ref = reference.attention_jvp

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)


# ----------------------------------------------------------------------------------------------------------------
# Tuning: a pruned autotune on GPUs (key: head dim, dtypes, length buckets), one fixed config when interpreting
# ----------------------------------------------------------------------------------------------------------------
# Under the interpreter every program is Python-level numpy: fewer, larger tiles run much faster, and 64 still
# leaves ragged lengths (17, 100, 257, 1000) with partial and multiple tiles.
_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}
#: The forward loop variant the interpreter runs (``tuning.VARIANTS``; tests set it to check each one). On GPUs the
#: variant is an autotune dimension instead.
_INTERPRETER_VARIANT = "plain"


_KEY = ["HEAD_DIM", "N_Q_BUCKET", "N_K_BUCKET"]  # + the dtypes of all tensor arguments, which triton always adds
# The forward kernel's modes differ in registers and shared memory (two accumulators and three more tiles with a
# tangent), so each mode gets its own tuning entry; the fix-up pass (GUARD) too, it is timed on different work.
_FWD_MODE_KEY = ["WRITE_TO", "FIXED_LSE", "HAS_TQ", "HAS_TK", "HAS_TV", "ROUND_F16", "GUARD", "MERGE_OK"]


def _tuned(kernel, kind, key):
    if not HAS_TRITON or is_interpreted(kernel):
        return None
    return triton.autotune(configs=tuning.configs(), key=key,
                           prune_configs_by={"early_config_prune": tuning.pruner(kind)})(kernel)


_attn_fwd_tuned = _tuned(_attn_fwd_kernel, "fwd", _KEY + _FWD_MODE_KEY)
_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv_kernel, "dkdv", _KEY)
_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq_kernel, "dq", _KEY)


def _launch(kernel, tuned, grid_of_meta, *args, variant=None, **kwargs):
    """Launch ``tuned`` (GPU) or ``kernel`` with the fixed interpreter config (plus the forward kernel's loop
    ``variant`` flags); map resource failures to an error."""
    if tuned is None:
        meta = dict(_INTERPRETER_CONFIG, **(variant or {}))
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


def _delta(t: torch.Tensor | None, base: torch.Tensor) -> int:
    """Element offset from ``base`` to its tangent ``t`` (the MERGE variant loads both tiles as one); 0 if unused."""
    return 0 if t is None else (t.data_ptr() - base.data_ptr()) // t.element_size()


def _pv_operands(v: torch.Tensor, tv: torch.Tensor | None, guard: bool, round_f16: bool):
    """V and tV as the guarded pass reads them: fp16 copies for bf16 inputs (strides kept), fp32 rounded through
    fp16 under the ``round_f16`` emulation (tests), else the inputs themselves."""
    if not guard:
        return v, tv
    if round_f16:
        return tuple(None if t is None else t.to(torch.float16).to(t.dtype) for t in (v, tv))
    return tuple(None if t is None else t.to(torch.float16) for t in (v, tv))


def _precision(dtype: torch.dtype, round_f16: bool) -> dict[str, object]:
    """PV operand dtype, whether the fp16 overflow guard runs, and tl.dot precision for an input dtype (see the
    module docstring). ``round_f16`` (tests) emulates the fp16 operands of bf16 inputs with fp32 arithmetic."""
    # input_precision only matters for fp32 operands; None keeps Triton's default for half-precision dots.
    if dtype == torch.bfloat16:
        return {"PV_DTYPE": tl.float16, "guard": True, "ROUND_F16": False, "INPUT_PRECISION": None}
    if dtype == torch.float16:
        return {"PV_DTYPE": tl.float16, "guard": False, "ROUND_F16": False, "INPUT_PRECISION": None}
    return {"PV_DTYPE": tl.float32, "guard": round_f16, "ROUND_F16": round_f16, "INPUT_PRECISION": "ieee"}


_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _empty_bnhd(q: torch.Tensor, n_q: int) -> torch.Tensor:
    """A (B, H, Nq, D) view of (B, Nq, H, D) memory: FLUX's next step flattens heads, which is then free."""
    b, h, _, d = q.shape
    return torch.empty((b, n_q, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def _launch_fwd(q, k, v, tq, tk, tv, lse_in, o_in, scale, write_o, write_to, write_lse, round_f16=False):
    """Primal, fused primal + tangent, or (``lse_in`` and ``o_in`` given) tangent only. bf16 inputs run twice:
    the fp16-operand pass flags the rows whose accumulators overflowed, a fix-up launch redoes just those."""
    check_launchable("attention", _attn_fwd_kernel, q.device)
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    fixed = lse_in is not None
    o = _empty_bnhd(q, n_q) if write_o else o_in
    to = _empty_bnhd(q, n_q) if write_to else None
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device) if write_lse else lse_in
    if q.numel() == 0:
        return (None if fixed else o), to, (None if fixed else lse)
    if _attn_fwd_tuned is not None:
        tuning.check_fits(d, q, fixed, write_to, tq is not None, tk is not None, tv is not None)
    precision = _precision(q.dtype, round_f16)
    guard = precision.pop("guard")
    flags = torch.empty((b, h, n_q), dtype=torch.int32, device=q.device) if guard else lse
    to_buf = to if to is not None else o

    def kernel_args(v, tv):
        merge_ok = tuning.merge_applicable(k, v, tk, tv)
        return merge_ok, (
            q, k, v, q if tq is None else tq, k if tk is None else tk, v if tv is None else tv, o, to_buf, lse, flags,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *_strides3(tq, q), *_strides3(tk, k), *_strides3(tv, v),
            *o.stride()[:3], *to_buf.stride()[:3],
            h, n_q, n_k, scale, _delta(tk, k), _delta(tv, v), _bucket(n_q), _bucket(n_k), int(merge_ok),
        )

    # The guarded pass reads V and tV as fp16 tensors converted once here (a memory-bound pass, ~1-2 % of the
    # attention's time at FLUX shapes) instead of converting every tile in registers: the P·V-side wgmmas then take
    # V straight from the shared-memory buffers the loads fill, which Triton can keep in flight (the in-register
    # conversion forced a register → shared round trip per tile and synchronous wgmmas; bench/results/
    # attention_variants_sm90.md). Same rounding (RTNE), so the same numbers; an overflow to inf still flags the
    # row, and the fix-up pass reads the original V and tV.
    merge_ok, args = kernel_args(*_pv_operands(v, tv, guard, round_f16))
    flags_kw = dict(HEAD_DIM=d, HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None,
                    WRITE_O=write_o, WRITE_TO=write_to, WRITE_LSE=write_lse, FIXED_LSE=fixed)

    def grid(meta):
        return (b * h * triton.cdiv(n_q, meta["BLOCK_M"]),)

    variant = tuning.variant_flags(_INTERPRETER_VARIANT, merge_ok)
    _launch(_attn_fwd_kernel, _attn_fwd_tuned, grid, *args, **flags_kw, **precision, variant=variant,
            GUARD=GUARD_RECORD if guard else GUARD_NONE)
    if guard:
        merge_ok, args = kernel_args(v, tv)
        variant = tuning.variant_flags(_INTERPRETER_VARIANT, merge_ok)
        fixup = dict(flags_kw, PV_DTYPE=_TL_DTYPE[q.dtype], GUARD=GUARD_FIXUP, ROUND_F16=False,
                     INPUT_PRECISION=precision["INPUT_PRECISION"])
        if _attn_fwd_tuned is None:
            _launch(_attn_fwd_kernel, None, grid, *args, **fixup, variant=variant)
        else:  # not autotuned: it rarely has work, and timing it would measure reading the flags
            meta = tuning.fixup_meta(d, q, flags_kw)
            _attn_fwd_kernel[grid(meta)](*args, **fixup, **meta)
    return (None if fixed else o), to, (None if fixed else lse)


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
    if os.environ.get("T2I_ATTENTION_BACKEND", "").strip().lower() == "gluon":  # opt-in, see kernels.attention_gluon
        from kernels.attention_gluon import attention_jvp_gluon  # not the default: no GPU has verified it yet

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
    check_launchable("attention backward", _attn_bwd_dq_kernel, q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    if n_q == 0 or b * h == 0:
        return dq, dk.zero_(), dv.zero_()
    if grad_o.stride(-1) != 1:
        grad_o = grad_o.contiguous()  # autograd hands us whatever the consumer produced; the kernels need unit stride
    for kind in ("dkdv", "dq"):
        if _attn_fwd_tuned is not None:
            tuning.check_fits(d, q, False, False, False, False, False, kind)
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
