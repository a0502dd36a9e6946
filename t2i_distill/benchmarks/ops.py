"""Every kernel as an :class:`OpSpec`: how to make its inputs, its reference, and what each benchmark compares.

One definition per op serves the parity checks (:func:`op_parity`), the timing cases (:func:`op_timing_cases`) and
the shapes, for the demo report, ``bench/gpu_check.py`` and the pytest-benchmark files alike.

Parity (per op, against a truth in float64 on the CPU / fp32 on GPUs, with the rule of :mod:`t2i_kernels.testing`):
the output; the tangent through the explicit ``<op>_jvp``, ``torch.func.jvp`` and ``torch.autograd.forward_ad``;
every gradient. Timing providers: ``reference`` (eager PyTorch; ``torch.func.jvp`` of it for ``fwd+jvp``, i.e. what
a user of the reference runs), ``ours``, on GPUs ``torch.compile`` of the reference (of its explicit tangent formula
for ``fwd+jvp``); for attention also ``sdpa``, ``ours (torch.func.jvp)`` and, when installed, the PyPI
``jvp-flash-attention`` anchor.

Work counts: attention in FLOPs (rCM's convention: forward 4·B·H·N²·D, forward + tangent 12·B·H·N²·D, forward +
backward 14·B·H·N²·D); memory-bound ops in bytes, each input read once and each output written once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import t2i_kernels
from t2i_distill.benchmarks.common import (
    TimingCase,
    fwd_bwd,
    grads_of,
    lazily_compiled,
    nbytes,
    randn,
    truth_dtype_for,
    upcast,
)
from t2i_kernels import reference as ref
from t2i_kernels.qk_norm_rope import qk_norm_rope_jvp_ref, qk_norm_rope_ref
from t2i_kernels.testing import ParityReport, parity_report

__all__ = ["OPS", "OpInputs", "OpSpec", "attention_rel_tangent_error", "op_case_pairs", "op_parity",
           "op_timing_cases"]

MODES = ("fwd", "fwd+jvp", "fwd+bwd")


@dataclass
class OpInputs:
    """Positional arguments of an op, which of them carry a tangent, which receive gradients, the output gradient."""

    args: list[torch.Tensor]
    tangents: dict[int, torch.Tensor]
    grad_idx: tuple[int, ...]
    grad_out: torch.Tensor


@dataclass
class OpSpec:
    name: str
    arg_names: tuple[str, ...]  # gradient quantities are "d" + name (the tolerance table's keys)
    make: Callable[[tuple[int, ...], torch.device, torch.dtype, torch.Generator], OpInputs]
    ours: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    ours_jvp: Callable[[list[torch.Tensor], dict[int, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    reference_jvp: Callable[[list[torch.Tensor], dict[int, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    work: Callable[[OpInputs, tuple[int, ...]], dict[str, dict[str, float]]]  # mode -> {"flops" | "bytes": n}
    cpu_shapes: list[tuple[int, ...]]
    gpu_shapes: list[tuple[int, ...]]
    extra_cases: Callable[[OpInputs, tuple[int, ...]], list[TimingCase]] = field(default=lambda inputs, shape: [])
    extra_pairs: Callable[[], list[tuple[str, str]]] = field(default=lambda: [])  # (mode, provider) of extra_cases


def op_case_pairs(spec: "OpSpec", compile_provider: bool) -> list[tuple[str, str]]:
    """The (mode, provider) pairs :func:`op_timing_cases` returns, without building any input."""
    providers = ("reference", "ours", "torch.compile") if compile_provider else ("reference", "ours")
    return [(m, p) for m in MODES for p in providers] + spec.extra_pairs()


def _close_over(fn: Callable[..., torch.Tensor], args: list[torch.Tensor], idx: list[int]) -> Callable:
    """``fn`` as a function of the arguments at ``idx`` only (the others are constants, as in the student)."""

    def closed(*moving: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for i, t in zip(idx, moving):
            full[i] = t
        return fn(*full)

    return closed


def op_parity(spec: OpSpec, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> list[ParityReport]:
    """Output, tangent (explicit, ``torch.func.jvp``, ``forward_ad``) and gradients of ``spec`` vs the truth."""
    inputs = spec.make(shape, device, dtype, torch.Generator().manual_seed(0))
    args, idx = inputs.args, sorted(inputs.tangents)
    tangents = [inputs.tangents[i] for i in idx]
    truth_args = upcast(args, truth_dtype_for(device))
    truth_out, truth_t = torch.func.jvp(_close_over(spec.reference, truth_args, idx),
                                        tuple(truth_args[i] for i in idx),
                                        tuple(upcast(tangents, truth_dtype_for(device))))
    same_out, same_t = torch.func.jvp(_close_over(spec.reference, args, idx), tuple(args[i] for i in idx),
                                      tuple(tangents))
    op = spec.name
    explicit_out, explicit_t = spec.ours_jvp(args, inputs.tangents)
    _, func_t = torch.func.jvp(_close_over(spec.ours, args, idx), tuple(args[i] for i in idx), tuple(tangents))
    with fwAD.dual_level():
        duals = list(args)
        for i in idx:
            duals[i] = fwAD.make_dual(args[i], inputs.tangents[i])
        fwad_t = fwAD.unpack_dual(spec.ours(*duals)).tangent
    reports = [
        parity_report(op, "out", spec.ours(*args), same_out, truth_out),
        parity_report(op, "out", explicit_out, same_out, truth_out, label=f"out ({op}_jvp)"),
        parity_report(op, "tangent", explicit_t, same_t, truth_t, label=f"tangent ({op}_jvp)"),
        parity_report(op, "tangent", func_t, same_t, truth_t, label="tangent (torch.func.jvp)"),
        parity_report(op, "tangent", fwad_t, same_t, truth_t, label="tangent (forward_ad)"),
    ]
    del truth_t, same_t
    grad = inputs.grad_out
    truth_g = grads_of(spec.reference, truth_args, inputs.grad_idx, grad)
    same_g = grads_of(spec.reference, args, inputs.grad_idx, grad)
    ours_g = grads_of(spec.ours, args, inputs.grad_idx, grad)
    for i, o, s, t in zip(inputs.grad_idx, ours_g, same_g, truth_g):
        reports.append(parity_report(op, "d" + spec.arg_names[i], o, s, t))
    return reports


def op_timing_cases(spec: OpSpec, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                    compile_provider: bool | None = None) -> list[TimingCase]:
    """(mode, provider) cases of one op at one shape; ``torch.compile`` cases only on GPUs by default (on the CPU
    they would compile for minutes to time interpreted kernels against nothing meaningful)."""
    inputs = spec.make(shape, device, dtype, torch.Generator().manual_seed(0))
    args, idx = inputs.args, sorted(inputs.tangents)
    tangents = [inputs.tangents[i] for i in idx]
    work = spec.work(inputs, shape)
    with_compile = device.type == "cuda" if compile_provider is None else compile_provider
    op = spec.name

    def case(mode: str, provider: str, fn: Callable[[], object]) -> TimingCase:
        return TimingCase(op, mode, provider, tuple(shape), fn, **work[mode])

    reference_closed = _close_over(spec.reference, args, idx)
    cases = [
        case("fwd", "reference", lambda: spec.reference(*args)),
        case("fwd", "ours", lambda: spec.ours(*args)),
        case("fwd+jvp", "reference",
             lambda: torch.func.jvp(reference_closed, tuple(args[i] for i in idx), tuple(tangents))),
        case("fwd+jvp", "ours", lambda: spec.ours_jvp(args, inputs.tangents)),
        case("fwd+bwd", "reference", fwd_bwd(spec.reference, args, inputs.grad_idx, inputs.grad_out)),
        case("fwd+bwd", "ours", fwd_bwd(spec.ours, args, inputs.grad_idx, inputs.grad_out)),
    ]
    if with_compile:
        compiled, compiled_jvp = lazily_compiled(spec.reference), lazily_compiled(
            lambda *a: spec.reference_jvp(list(a[:len(args)]), dict(zip(idx, a[len(args):]))))
        cases += [
            case("fwd", "torch.compile", lambda: compiled(*args)),
            case("fwd+jvp", "torch.compile", lambda: compiled_jvp(*args, *tangents)),
            case("fwd+bwd", "torch.compile", fwd_bwd(compiled, args, inputs.grad_idx, inputs.grad_out)),
        ]
    return cases + spec.extra_cases(inputs, tuple(shape))


# ---- inputs -----------------------------------------------------------------------------------------------------
def _rope_tables(n: int, d: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's fp32 tables (one angle per pair, repeated), whatever the model dtype."""
    angles = torch.rand(n, d // 2, generator=gen, dtype=torch.float64) * 6.3
    return (angles.cos().repeat_interleave(2, 1).to(device=device, dtype=torch.float32),
            angles.sin().repeat_interleave(2, 1).to(device=device, dtype=torch.float32))


def _gated_residual_inputs(shape, device, dtype, gen) -> OpInputs:
    b, n, d = shape
    x, y, gate = randn(shape, device, dtype, gen), randn(shape, device, dtype, gen), randn((b, d), device, dtype, gen)
    tangents = {0: randn(shape, device, dtype, gen), 1: randn((b, d), device, dtype, gen),
                2: randn(shape, device, dtype, gen)}
    return OpInputs([x, gate, y], tangents, (0, 1, 2), randn(shape, device, dtype, gen))


def _attention_inputs(shape, device, dtype, gen) -> OpInputs:
    b, h, n, d = shape
    # (B, N, H, D) memory viewed as (B, H, N, D): the layout FLUX's projections produce.
    q, k, v, tq, tk, tv, g = (randn((b, n, h, d), device, dtype, gen).transpose(1, 2) for _ in range(7))
    return OpInputs([q, k, v], {0: tq, 1: tk, 2: tv}, (0, 1, 2), g)


def _rms_norm_inputs(shape, device, dtype, gen) -> OpInputs:
    x, tx, g = (randn(shape, device, dtype, gen) for _ in range(3))
    return OpInputs([x, randn(shape[-1:], device, dtype, gen)], {0: tx}, (0, 1), g)


def _layer_norm_modulate_inputs(shape, device, dtype, gen) -> OpInputs:
    b, _, d = shape
    x, tx, g = (randn(shape, device, dtype, gen) for _ in range(3))
    scale, tscale, shift, tshift = (randn((b, d), device, dtype, gen) for _ in range(4))
    return OpInputs([x, scale, shift], {0: tx, 1: tscale, 2: tshift}, (0, 1, 2), g)


def _rope_inputs(shape, device, dtype, gen) -> OpInputs:
    _, _, n, d = shape
    x, tx, g = (randn(shape, device, dtype, gen) for _ in range(3))
    cos, sin = _rope_tables(n, d, device, gen)
    return OpInputs([x, cos, sin], {0: tx}, (0,), g)


def _qk_norm_rope_inputs(shape, device, dtype, gen) -> OpInputs:
    """shape = (B, N, H, D): x is the projection output (B, N, H·D); the output is (B, H, N, D)."""
    b, n, h, d = shape
    x, tx = (randn((b, n, h * d), device, dtype, gen) for _ in range(2))
    weight = randn((d,), device, dtype, gen)
    cos, sin = _rope_tables(n, d, device, gen)
    return OpInputs([x, weight, cos, sin], {0: tx}, (0, 1), randn((b, h, n, d), device, dtype, gen))


def _gelu_inputs(shape, device, dtype, gen) -> OpInputs:
    x, tx, g = (randn(shape, device, dtype, gen) for _ in range(3))
    return OpInputs([x], {0: tx}, (0,), g)


# ---- work counts ------------------------------------------------------------------------------------------------
def _row_bytes(fwd_in: int, jvp_extra: int, bwd_extra: int, small: int = 0):
    """Bytes of a memory-bound op: the forward moves ``fwd_in`` activations' worth, the tangent pass ``jvp_extra``
    more, the forward + backward ``bwd_extra`` more (plus O(D)/O(B·D) ``small`` traffic)."""

    def work(inputs: OpInputs, shape) -> dict[str, dict[str, float]]:
        big = nbytes(inputs.args[0])
        return {"fwd": {"bytes": fwd_in * big + small}, "fwd+jvp": {"bytes": (fwd_in + jvp_extra) * big + small},
                "fwd+bwd": {"bytes": (fwd_in + bwd_extra) * big + small}}

    return work


def _attention_work(inputs: OpInputs, shape) -> dict[str, dict[str, float]]:
    b, h, n, d = shape
    unit = b * h * n * n * d
    return {"fwd": {"flops": 4 * unit}, "fwd+jvp": {"flops": 12 * unit}, "fwd+bwd": {"flops": 14 * unit}}


def _attention_extra_cases(inputs: OpInputs, shape) -> list[TimingCase]:
    q, k, v = inputs.args
    tq, tk, tv = (inputs.tangents[i] for i in range(3))
    work = _attention_work(inputs, shape)
    cases = [
        TimingCase("attention", "fwd", "sdpa", shape, lambda: F.scaled_dot_product_attention(q, k, v),
                   **work["fwd"]),
        TimingCase("attention", "fwd+bwd", "sdpa", shape,
                   fwd_bwd(F.scaled_dot_product_attention, [q, k, v], (0, 1, 2), inputs.grad_out), **work["fwd+bwd"]),
        TimingCase("attention", "fwd+jvp", "ours (torch.func.jvp)", shape,
                   lambda: torch.func.jvp(t2i_kernels.attention, (q, k, v), (tq, tk, tv)), **work["fwd+jvp"]),
        TimingCase("attention", "fwd+jvp", "math sdpa (torch.func.jvp)", shape,
                   lambda: _math_sdpa_jvp(q, k, v, tq, tk, tv), **work["fwd+jvp"]),
    ]
    if importlib.util.find_spec("jvp_flash_attention") is not None:  # the PyPI anchor, when installed
        from jvp_flash_attention.jvp_attention import attention as jvp_fa

        cases.append(TimingCase("attention", "fwd+jvp", "jvp-flash-attention (PyPI)", shape,
                                lambda: torch.func.jvp(jvp_fa, (q, k, v), (tq, tk, tv)), **work["fwd+jvp"]))
    return cases


def _attention_extra_pairs() -> list[tuple[str, str]]:
    pairs = [("fwd", "sdpa"), ("fwd+bwd", "sdpa"), ("fwd+jvp", "ours (torch.func.jvp)"),
             ("fwd+jvp", "math sdpa (torch.func.jvp)")]
    if importlib.util.find_spec("jvp_flash_attention") is not None:
        pairs.append(("fwd+jvp", "jvp-flash-attention (PyPI)"))
    return pairs


def _math_sdpa_jvp(q, k, v, tq, tk, tv):
    """What the reference runs: math attention is the only SDPA backend with forward AD."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv))


def _explicit(fn: Callable, order: tuple[int | str, ...]):
    """An explicit ``<op>_jvp`` taking (args, tangents) in its own argument order: ints index args, "t<i>" tangents."""

    def call(args: list[torch.Tensor], tangents: dict[int, torch.Tensor]):
        picked = [args[o] if isinstance(o, int) else tangents.get(int(o[1:])) for o in order]
        return fn(*picked)

    return call


OPS: dict[str, OpSpec] = {
    "gated_residual": OpSpec(
        "gated_residual", ("x", "gate", "y"), _gated_residual_inputs, t2i_kernels.gated_residual, ref.gated_residual,
        _explicit(t2i_kernels.gated_residual_jvp, (0, "t0", 1, "t1", 2, "t2")),
        _explicit(ref.gated_residual_jvp, (0, "t0", 1, "t1", 2, "t2")),
        _row_bytes(3, 3, 4), cpu_shapes=[(2, 37, 48)], gpu_shapes=[(2, 1536, 3072), (1, 4608, 3072)],
    ),
    "attention": OpSpec(
        "attention", ("q", "k", "v"), _attention_inputs, t2i_kernels.attention, ref.attention,
        _explicit(t2i_kernels.attention_jvp, (0, 1, 2, "t0", "t1", "t2")),
        _explicit(ref.attention_jvp, (0, 1, 2, "t0", "t1", "t2")),
        _attention_work, cpu_shapes=[(1, 2, 70, 32)],
        # FLUX's 512/1024 px at 256 and 512 text tokens, and issue 12's head-dim-64 anchor shape (the best public Triton
        # JVP kernel's, docs/anchors.md).
        gpu_shapes=[(2, 24, 1280, 128), (2, 24, 1536, 128), (1, 24, 4352, 128), (1, 24, 4608, 128), (1, 32, 8192, 64)],
        extra_cases=_attention_extra_cases, extra_pairs=_attention_extra_pairs,
    ),
    "rms_norm": OpSpec(
        "rms_norm", ("x", "weight"), _rms_norm_inputs, t2i_kernels.rms_norm, ref.rms_norm,
        _explicit(t2i_kernels.rms_norm_jvp, (0, "t0", 1)), _explicit(ref.rms_norm_jvp, (0, "t0", 1)),
        _row_bytes(2, 2, 3), cpu_shapes=[(2, 3, 17, 128)], gpu_shapes=[(2, 24, 1536, 128), (1, 24, 4352, 128)],
    ),
    "layer_norm_modulate": OpSpec(
        "layer_norm_modulate", ("x", "scale", "shift"), _layer_norm_modulate_inputs, t2i_kernels.layer_norm_modulate,
        ref.layer_norm_modulate, _explicit(t2i_kernels.layer_norm_modulate_jvp, (0, "t0", 1, "t1", 2, "t2")),
        _explicit(ref.layer_norm_modulate_jvp, (0, "t0", 1, "t1", 2, "t2")),
        _row_bytes(2, 2, 3), cpu_shapes=[(2, 19, 48)], gpu_shapes=[(2, 1536, 3072), (1, 4608, 3072)],
    ),
    "rope": OpSpec(
        "rope", ("x", "cos", "sin"), _rope_inputs, t2i_kernels.rope, ref.rope,
        _explicit(t2i_kernels.rope_jvp, (0, "t0", 1, 2)), _explicit(ref.rope_jvp, (0, "t0", 1, 2)),
        _row_bytes(2, 2, 2), cpu_shapes=[(2, 3, 17, 32)], gpu_shapes=[(2, 24, 1536, 128), (1, 24, 4352, 128)],
    ),
    "qk_norm_rope": OpSpec(
        "qk_norm_rope", ("x", "weight", "cos", "sin"), _qk_norm_rope_inputs, t2i_kernels.qk_norm_rope,
        qk_norm_rope_ref, _explicit(t2i_kernels.qk_norm_rope_jvp, (0, "t0", 1, 2, 3)),
        _explicit(qk_norm_rope_jvp_ref, (0, "t0", 1, 2, 3)),
        _row_bytes(2, 2, 3), cpu_shapes=[(1, 17, 2, 32)], gpu_shapes=[(2, 1536, 24, 128), (1, 4352, 24, 128)],
    ),
    "gelu_tanh": OpSpec(
        "gelu_tanh", ("x",), _gelu_inputs, t2i_kernels.gelu_tanh, ref.gelu_tanh,
        _explicit(t2i_kernels.gelu_tanh_jvp, (0, "t0")), _explicit(ref.gelu_tanh_jvp, (0, "t0")),
        _row_bytes(2, 2, 3), cpu_shapes=[(2, 19, 96)], gpu_shapes=[(2, 1536, 12288), (1, 4608, 12288)],
    ),
}


def attention_rel_tangent_error(shape, device, dtype) -> float:
    """‖tO − tO_truth‖ / ‖tO_truth‖ of the fused kernel: the figure the bf16 bound (1.7e-3) is about."""
    inputs = _attention_inputs(shape, device, dtype, torch.Generator().manual_seed(0))
    q, k, v = inputs.args
    tq, tk, tv = (inputs.tangents[i] for i in range(3))
    _, truth_t = ref.attention_jvp(*upcast((q, k, v, tq, tk, tv), truth_dtype_for(device)))
    _, to = t2i_kernels.attention_jvp(q, k, v, tq, tk, tv)
    return ((to.to(truth_t.dtype) - truth_t).norm() / truth_t.norm()).item()

