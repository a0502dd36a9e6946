"""Launchers of the Triton attention kernels: tuning, the one input check, and the forward/backward launches.

Split from :mod:`t2i_kernels.attention` (the custom ops, autograd Functions and public API) so that both that module and
:mod:`t2i_kernels.attention_gluon` (whose overflow fallback recomputes with the Triton forward) build on it without
importing each other. The math, precision and layout rules are in :mod:`t2i_kernels.attention`'s docstring.
"""

from __future__ import annotations

import math

import torch

from t2i_kernels import attention_tuning as tuning
from t2i_kernels._checks import HALF_AND_FLOAT_DTYPES, InputChecks
from t2i_kernels._runtime import HAS_TRITON, check_launchable, is_interpreted, tl, triton
from t2i_kernels.attention_backward_kernels import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_preprocess_kernel,
)
from t2i_kernels.attention_forward_kernels import GUARD_FIXUP, GUARD_NONE, GUARD_RECORD, _attn_fwd_kernel

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


def _launch_bwd(grad_o, q, k, v, o, lse, scale):
    """``(dq, dk, dv)``, each in its input's layout: a Δ pre-pass, then the dK/dV and dQ kernels."""
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
