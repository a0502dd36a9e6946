"""Timing cases of the memory-bound row ops (RMSNorm, LayerNorm + modulation, RoPE, qk-norm + RoPE, GELU-tanh).

Each ``<op>_timing_cases(shape, device, dtype)`` returns :class:`t2i_distill.kernel_checks.TimingCase` callables for
every (mode, provider) of :func:`modes_and_providers`, with the bytes one call must move: **each input read once and
each output written once** (the issue's bandwidth target: fused fwd+tangent ≥ 80 % of copy bandwidth, backward
≥ 70 %). O(D) parameter and O(B·D) modulation traffic is counted; it is noise at FLUX shapes.

Providers: ``reference`` (the eager PyTorch reference; for ``fwd+jvp``, ``torch.func.jvp`` through it: what a user
of the reference gets today), ``ours``, and on GPUs ``torch.compile`` (of the reference, and for ``fwd+jvp`` of its
explicit tangent formula ``reference.<op>_jvp``: the ≥ 1.5× target). Compiling on the CPU would cost minutes per
benchmark run for no meaningful figure (the kernels are interpreted there), so that provider is GPU-only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import kernels
from kernels import reference as ref
from kernels.qk_norm_rope import qk_norm_rope_jvp_ref, qk_norm_rope_ref
from t2i_distill.kernel_checks import TimingCase

MODES = ("fwd", "fwd+jvp", "fwd+bwd")


def providers(has_cuda: bool) -> tuple[str, ...]:
    return ("reference", "ours", "torch.compile") if has_cuda else ("reference", "ours")


def modes_and_providers(has_cuda: bool) -> list[tuple[str, str]]:
    return [(m, p) for m in MODES for p in providers(has_cuda)]


def _randn(shape, device, dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _fwd_bwd(fn: Callable[..., torch.Tensor], leaves_in, constants, grad: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``fn(*leaves, *constants)``; the gradients of the previous call are dropped first."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves_in]

    def run() -> None:
        for t in leaves:
            t.grad = None
        fn(*leaves, *constants).backward(grad)

    return run


def _lazily_compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, built at the first call (the warm-up round): listing a case compiles nothing."""
    compiled: Callable | None = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args)

    return call


def _cases(op, shape, primal, explicit_jvp, reference, reference_jvp, leaves_in, constants, tangents, grad,
           bytes_by_mode) -> list[TimingCase]:
    """The (mode, provider) grid for one op. ``primal(*leaves, *constants)``, ``explicit_jvp`` (ours, fused) and
    ``reference_jvp`` (the analytic reference formula) take the op's own argument order via closures."""
    primals = (*leaves_in, *constants)
    # One compiled callable per case list, so nothing (no tensors in closures) outlives the benchmark.
    compiled_reference, compiled_reference_jvp = _lazily_compiled(reference), _lazily_compiled(reference_jvp)

    def func_jvp_reference() -> object:
        return torch.func.jvp(lambda *p: reference(*p, *constants), tuple(leaves_in), tuple(tangents))

    cases = [
        TimingCase(op, "fwd", "reference", shape, lambda: reference(*primals), bytes=bytes_by_mode["fwd"]),
        TimingCase(op, "fwd", "ours", shape, lambda: primal(*primals), bytes=bytes_by_mode["fwd"]),
        TimingCase(op, "fwd", "torch.compile", shape, lambda: compiled_reference(*primals),
                   bytes=bytes_by_mode["fwd"]),
        TimingCase(op, "fwd+jvp", "reference", shape, func_jvp_reference, bytes=bytes_by_mode["fwd+jvp"]),
        TimingCase(op, "fwd+jvp", "ours", shape, explicit_jvp, bytes=bytes_by_mode["fwd+jvp"]),
        TimingCase(op, "fwd+jvp", "torch.compile", shape, compiled_reference_jvp,
                   bytes=bytes_by_mode["fwd+jvp"]),
        TimingCase(op, "fwd+bwd", "reference", shape, _fwd_bwd(reference, leaves_in, constants, grad),
                   bytes=bytes_by_mode["fwd+bwd"]),
        TimingCase(op, "fwd+bwd", "ours", shape, _fwd_bwd(primal, leaves_in, constants, grad),
                   bytes=bytes_by_mode["fwd+bwd"]),
        TimingCase(op, "fwd+bwd", "torch.compile", shape, _fwd_bwd(compiled_reference, leaves_in, constants, grad),
                   bytes=bytes_by_mode["fwd+bwd"]),
    ]
    return cases


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- RMSNorm ----------------------------------------------------------------------------------------------------
def rms_norm_timing_cases(shape, device, dtype, seed: int = 0) -> list[TimingCase]:
    """x (..., D), weight (D,). Bytes: fwd x → y = 2|x|; fwd+jvp x, tx → y, ty = 4|x|; fwd+bwd adds g, x → dx
    (3|x|) = 5|x|; plus weight/dweight."""
    gen = torch.Generator().manual_seed(seed)
    x, tx, grad = (_randn(shape, device, dtype, gen) for _ in range(3))
    weight = _randn(shape[-1:], device, dtype, gen)
    big, w = _nbytes(x), _nbytes(weight)
    return _cases(
        "rms_norm", shape, kernels.rms_norm, lambda: kernels.rms_norm_jvp(x, tx, weight), ref.rms_norm,
        lambda: ref.rms_norm_jvp(x, tx, weight), (x, weight), (), (tx, torch.zeros_like(weight)), grad,
        {"fwd": 2 * big + w, "fwd+jvp": 4 * big + w, "fwd+bwd": 5 * big + 3 * w},
    )


# ---- LayerNorm + AdaLN modulation ---------------------------------------------------------------------------------
def layer_norm_modulate_timing_cases(shape, device, dtype, seed: int = 0) -> list[TimingCase]:
    """x (B, N, D), scale/shift (B, D). Bytes: fwd x → y = 2|x|; fwd+jvp x, tx → y, ty = 4|x|; fwd+bwd adds g, x → dx
    = 5|x|; plus the (B, D) modulation tensors and their tangents/gradients."""
    b, _, d = shape
    gen = torch.Generator().manual_seed(seed)
    x, tx, grad = (_randn(shape, device, dtype, gen) for _ in range(3))
    scale, tscale, shift, tshift = (_randn((b, d), device, dtype, gen) for _ in range(4))
    big, mod = _nbytes(x), _nbytes(scale)
    return _cases(
        "layer_norm_modulate", shape, kernels.layer_norm_modulate,
        lambda: kernels.layer_norm_modulate_jvp(x, tx, scale, tscale, shift, tshift), ref.layer_norm_modulate,
        lambda: ref.layer_norm_modulate_jvp(x, tx, scale, tscale, shift, tshift), (x, scale, shift), (),
        (tx, tscale, tshift), grad,
        {"fwd": 2 * big + 2 * mod, "fwd+jvp": 4 * big + 4 * mod, "fwd+bwd": 5 * big + 5 * mod},
    )


# ---- RoPE -------------------------------------------------------------------------------------------------------
def _tables(n: int, d: int, device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's fp32 tables (one angle per pair, repeated), whatever the model dtype."""
    angles = torch.rand(n, d // 2, generator=gen, dtype=torch.float64) * 6.3
    return (angles.cos().repeat_interleave(2, 1).to(device=device, dtype=torch.float32),
            angles.sin().repeat_interleave(2, 1).to(device=device, dtype=torch.float32))


def rope_timing_cases(shape, device, dtype, seed: int = 0) -> list[TimingCase]:
    """x (B, H, N, D), cos/sin (N, D) fp32. Bytes: fwd x → y = 2|x|; fwd+jvp x, tx → y, ty = 4|x|; fwd+bwd adds
    g → dx = 4|x|; plus the tables once per pass (they are shared by B·H rows and served from L2)."""
    _, _, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    x, tx, grad = (_randn(shape, device, dtype, gen) for _ in range(3))
    cos, sin = _tables(n, d, device, gen)
    big, tables = _nbytes(x), _nbytes(cos) + _nbytes(sin)
    return _cases(
        "rope", shape, kernels.rope, lambda: kernels.rope_jvp(x, tx, cos, sin), ref.rope,
        lambda: ref.rope_jvp(x, tx, cos, sin), (x,), (cos, sin), (tx,), grad,
        {"fwd": 2 * big + tables, "fwd+jvp": 4 * big + tables, "fwd+bwd": 4 * big + 2 * tables},
    )


# ---- qk-RMSNorm + RoPE + head transpose ---------------------------------------------------------------------------
def qk_norm_rope_timing_cases(shape, device, dtype, seed: int = 0) -> list[TimingCase]:
    """shape = (B, N, H, D): x (B, N, H·D) as the projection emits it → y (B, H, N, D). Bytes: fwd x → y = 2|x|;
    fwd+jvp x, tx → y, ty = 4|x|; fwd+bwd adds g, x → dx = 5|x|; plus weight and tables once per pass."""
    b, n, h, d = shape
    gen = torch.Generator().manual_seed(seed)
    x, tx = (_randn((b, n, h * d), device, dtype, gen) for _ in range(2))
    grad = _randn((b, h, n, d), device, dtype, gen)
    weight = _randn((d,), device, dtype, gen)
    cos, sin = _tables(n, d, device, gen)
    big, small = _nbytes(x), _nbytes(weight) + _nbytes(cos) + _nbytes(sin)
    return _cases(
        "qk_norm_rope", shape, kernels.qk_norm_rope, lambda: kernels.qk_norm_rope_jvp(x, tx, weight, cos, sin),
        qk_norm_rope_ref, lambda: qk_norm_rope_jvp_ref(x, tx, weight, cos, sin),
        (x, weight), (cos, sin), (tx, torch.zeros_like(weight)), grad,
        {"fwd": 2 * big + small, "fwd+jvp": 4 * big + small, "fwd+bwd": 5 * big + 2 * small},
    )


# ---- GELU-tanh --------------------------------------------------------------------------------------------------
def gelu_tanh_timing_cases(shape, device, dtype, seed: int = 0) -> list[TimingCase]:
    """Any shape. Bytes: fwd x → y = 2|x|; fwd+jvp x, tx → y, ty = 4|x|; fwd+bwd adds g, x → dx = 5|x|."""
    gen = torch.Generator().manual_seed(seed)
    x, tx, grad = (_randn(shape, device, dtype, gen) for _ in range(3))
    big = _nbytes(x)
    return _cases(
        "gelu_tanh", shape, kernels.gelu_tanh, lambda: kernels.gelu_tanh_jvp(x, tx), ref.gelu_tanh,
        lambda: ref.gelu_tanh_jvp(x, tx), (x,), (), (tx,), grad,
        {"fwd": 2 * big, "fwd+jvp": 4 * big, "fwd+bwd": 5 * big},
    )
