"""Per-kernel parity checks and timing cases, shared by the demo report, the GPU check and the microbenchmarks.

For each op: an input factory, ``<op>_parity(shape, device, dtype)`` returning :class:`kernels.testing.ParityReport`
rows (output, tangent through every front end, every gradient) against a higher-precision truth, and
``<op>_timing_cases(shape, device, dtype)`` returning :class:`TimingCase` callables for each (mode, provider) with
the FLOP or byte count that turns a time into TFLOP/s or GB/s. One definition of "what we compare", three consumers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels import reference as ref
from kernels.testing import ParityReport, parity_report


@dataclass
class TimingCase:
    """One timed callable. ``flops``/``bytes`` count the work of one call (None where the measure does not apply)."""

    op: str
    mode: str  # fwd | fwd+jvp | fwd+bwd
    provider: str  # reference | sdpa | ours | ours (torch.func.jvp) ...
    shape: tuple[int, ...]
    fn: Callable[[], object]
    flops: float | None = None
    bytes: float | None = None


def truth_dtype_for(device: torch.device) -> torch.dtype:
    """float64 truth on the CPU; fp32 on GPUs (the reference the anchors use; fp64 matmuls would dominate)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def _randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _up(tensors, dtype: torch.dtype) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().to(dtype) for t in tensors]


def _grads(fn: Callable[..., torch.Tensor], inputs, grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    fn(*leaves).backward(grad.to(leaves[0].dtype))
    return [t.grad for t in leaves]


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs, grad: torch.Tensor) -> Callable[[], None]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def run() -> None:
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)

    return run


# ---- gated residual ---------------------------------------------------------------------------------------------
def gated_residual_inputs(shape, device, dtype, seed: int = 0):
    """x, tx, gate, tgate, y, ty for x (B, N, D)."""
    b, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    big, small = (b, n, d), (b, d)
    return [_randn(s, device, dtype, gen) for s in (big, big, small, small, big, big)]


def gated_residual_parity(shape, device, dtype) -> list[ParityReport]:
    x, tx, gate, tgate, y, ty = gated_residual_inputs(shape, device, dtype)
    truth_out, truth_t = ref.gated_residual_jvp(*_up((x, tx, gate, tgate, y, ty), truth_dtype_for(device)))
    same_out, same_t = ref.gated_residual_jvp(x, tx, gate, tgate, y, ty)
    op = "gated_residual"
    out, tout = kernels.gated_residual_jvp(x, tx, gate, tgate, y, ty)
    _, func_t = torch.func.jvp(kernels.gated_residual, (x, gate, y), (tx, tgate, ty))
    with fwAD.dual_level():
        dual = kernels.gated_residual(fwAD.make_dual(x, tx), fwAD.make_dual(gate, tgate), fwAD.make_dual(y, ty))
        fwad_t = fwAD.unpack_dual(dual).tangent
    reports = [
        parity_report(op, "out", kernels.gated_residual(x, gate, y), same_out, truth_out),
        parity_report(op, "tangent", tout, same_t, truth_t, label="tangent (gated_residual_jvp)"),
        parity_report(op, "tangent", func_t, same_t, truth_t, label="tangent (torch.func.jvp)"),
        parity_report(op, "tangent", fwad_t, same_t, truth_t, label="tangent (forward_ad)"),
    ]
    grad = torch.randn_like(x)
    truth = _grads(ref.gated_residual, _up((x, gate, y), truth_dtype_for(device)), grad)
    same = _grads(ref.gated_residual, (x, gate, y), grad)
    ours = _grads(kernels.gated_residual, (x, gate, y), grad)
    for name, o, s, t in zip(("dx", "dgate", "dy"), ours, same, truth):
        reports.append(parity_report(op, name, o, s, t))
    return reports


def gated_residual_timing_cases(shape, device, dtype) -> list[TimingCase]:
    """Bytes: x, y read and out written (fwd); plus tx, ty read and tout written (fwd+jvp); plus g read and dy
    written in the backward (dx aliases g, gate traffic is O(B·D))."""
    x, tx, gate, tgate, y, ty = gated_residual_inputs(shape, device, dtype)
    grad = torch.randn_like(x)
    big = x.numel() * x.element_size()
    op = "gated_residual"
    return [
        TimingCase(op, "fwd", "reference", shape, lambda: ref.gated_residual(x, gate, y), bytes=3 * big),
        TimingCase(op, "fwd", "ours", shape, lambda: kernels.gated_residual(x, gate, y), bytes=3 * big),
        TimingCase(op, "fwd+jvp", "reference", shape,
                   lambda: torch.func.jvp(ref.gated_residual, (x, gate, y), (tx, tgate, ty)), bytes=6 * big),
        TimingCase(op, "fwd+jvp", "ours", shape, lambda: kernels.gated_residual_jvp(x, tx, gate, tgate, y, ty),
                   bytes=6 * big),
        TimingCase(op, "fwd+bwd", "reference", shape, _fwd_bwd(ref.gated_residual, (x, gate, y), grad),
                   bytes=7 * big),
        TimingCase(op, "fwd+bwd", "ours", shape, _fwd_bwd(kernels.gated_residual, (x, gate, y), grad),
                   bytes=7 * big),
    ]


# ---- attention --------------------------------------------------------------------------------------------------
def attention_inputs(shape, device, dtype, seed: int = 0):
    """q, k, v, tq, tk, tv for shape (B, H, N, D), laid out as FLUX produces them: (B, N, H, D) memory."""
    b, h, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    return [_randn((b, n, h, d), device, dtype, gen).transpose(1, 2) for _ in range(6)]


def attention_parity(shape, device, dtype) -> list[ParityReport]:
    q, k, v, tq, tk, tv = attention_inputs(shape, device, dtype)
    up = _up((q, k, v, tq, tk, tv), truth_dtype_for(device))
    truth_o, truth_t = ref.attention_jvp(*up)
    same_o, same_t = ref.attention_jvp(q, k, v, tq, tk, tv)
    op = "attention"
    o, to = kernels.attention_jvp(q, k, v, tq, tk, tv)
    f_o, f_t = torch.func.jvp(kernels.attention, (q, k, v), (tq, tk, tv))
    with fwAD.dual_level():
        dual = kernels.attention(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))
        fwad_t = fwAD.unpack_dual(dual).tangent
    reports = [
        parity_report(op, "out", o, same_o, truth_o, label="out (attention_jvp)"),
        parity_report(op, "tangent", to, same_t, truth_t, label="tangent (attention_jvp)"),
        parity_report(op, "out", f_o, same_o, truth_o, label="out (attention)"),
        parity_report(op, "tangent", f_t, same_t, truth_t, label="tangent (torch.func.jvp)"),
        parity_report(op, "tangent", fwad_t, same_t, truth_t, label="tangent (forward_ad)"),
    ]
    del truth_t, same_t
    grad = torch.randn_like(o)
    truth = _grads(ref.attention, up[:3], grad)
    same = _grads(ref.attention, (q, k, v), grad)
    ours = _grads(kernels.attention, (q, k, v), grad)
    for name, a, s, t in zip(("dq", "dk", "dv"), ours, same, truth):
        reports.append(parity_report(op, name, a, s, t))
    return reports


def attention_rel_tangent_error(shape, device, dtype) -> float:
    """‖tO − tO_truth‖ / ‖tO_truth‖ of the fused kernel: the figure the issue's bf16 bound (1.7e-3) is about."""
    q, k, v, tq, tk, tv = attention_inputs(shape, device, dtype)
    _, truth_t = ref.attention_jvp(*_up((q, k, v, tq, tk, tv), truth_dtype_for(device)))
    _, to = kernels.attention_jvp(q, k, v, tq, tk, tv)
    return ((to.to(truth_t.dtype) - truth_t).norm() / truth_t.norm()).item()


def attention_timing_cases(shape, device, dtype) -> list[TimingCase]:
    """FLOPs (rCM's convention): forward 4·B·H·N²·D, forward + tangent 12·B·H·N²·D, forward + backward 14·B·H·N²·D."""
    b, h, n, d = shape
    q, k, v, tq, tk, tv = attention_inputs(shape, device, dtype)
    unit = b * h * n * n * d
    grad = torch.randn_like(q)
    op = "attention"

    def math_sdpa_jvp() -> None:  # what the reference does: math attention is the only SDPA with forward AD
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv))

    return [
        TimingCase(op, "fwd", "sdpa", shape, lambda: F.scaled_dot_product_attention(q, k, v), flops=4 * unit),
        TimingCase(op, "fwd", "ours", shape, lambda: kernels.attention(q, k, v), flops=4 * unit),
        TimingCase(op, "fwd+bwd", "sdpa", shape, _fwd_bwd(F.scaled_dot_product_attention, (q, k, v), grad),
                   flops=14 * unit),
        TimingCase(op, "fwd+bwd", "ours", shape, _fwd_bwd(kernels.attention, (q, k, v), grad), flops=14 * unit),
        TimingCase(op, "fwd+jvp", "reference", shape, math_sdpa_jvp, flops=12 * unit),
        TimingCase(op, "fwd+jvp", "ours", shape, lambda: kernels.attention_jvp(q, k, v, tq, tk, tv), flops=12 * unit),
        TimingCase(op, "fwd+jvp", "ours (torch.func.jvp)", shape,
                   lambda: torch.func.jvp(kernels.attention, (q, k, v), (tq, tk, tv)), flops=12 * unit),
    ]


#: op -> (parity, timing cases). Shapes are chosen by the caller (tiny on the CPU, FLUX's on a GPU).
CHECKS: dict[str, tuple[Callable[..., list[ParityReport]], Callable[..., list[TimingCase]]]] = {
    "gated_residual": (gated_residual_parity, gated_residual_timing_cases),
    "attention": (attention_parity, attention_timing_cases),
}
