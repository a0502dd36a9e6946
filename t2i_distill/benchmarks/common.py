"""Building blocks of every benchmark: the timed-case record and small helpers shared by ops and steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["TimingCase", "fwd_bwd", "grads_of", "lazily_compiled", "nbytes", "randn", "truth_dtype_for", "upcast"]


@dataclass
class TimingCase:
    """One timed callable. ``flops``/``bytes`` count the work of one call (None where the measure does not apply)."""

    op: str
    mode: str  # fwd | fwd+jvp | fwd+bwd | jvp | step ...
    provider: str  # reference | ours | sdpa | torch.compile | patched | dual ...
    shape: tuple[int, ...]
    fn: Callable[[], object]
    flops: float | None = None
    bytes: float | None = None


def truth_dtype_for(device: torch.device) -> torch.dtype:
    """float64 truth on the CPU; fp32 on GPUs (the reference the anchors use; fp64 matmuls would dominate)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def randn(shape: Sequence[int], device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal samples drawn on the CPU (identical on every device), then moved."""
    return torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def upcast(tensors, dtype: torch.dtype) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().to(dtype) for t in tensors]


def grads_of(fn: Callable[..., torch.Tensor], args: Sequence, grad_idx: Sequence[int],
             grad: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``fn(*args)`` contracted with ``grad`` w.r.t. ``args[i]`` for ``i`` in ``grad_idx``."""
    args = list(args)
    leaves = {i: args[i].detach().clone().requires_grad_() for i in grad_idx}
    out = fn(*[leaves.get(i, a) for i, a in enumerate(args)])
    out.backward(grad.to(out.dtype))
    return [leaves[i].grad for i in grad_idx]


def fwd_bwd(fn: Callable[..., torch.Tensor], args: Sequence, grad_idx: Sequence[int],
            grad: torch.Tensor) -> Callable[[], None]:
    """A callable running one forward + backward of ``fn(*args)`` (gradients of the previous call dropped first)."""
    args = list(args)
    leaves = {i: args[i].detach().clone().requires_grad_() for i in grad_idx}
    call_args = [leaves.get(i, a) for i, a in enumerate(args)]

    def run() -> None:
        for t in leaves.values():
            t.grad = None
        fn(*call_args).backward(grad)

    return run


def lazily_compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, built at the first call (the warm-up): listing a case compiles nothing."""
    compiled: Callable | None = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args)

    return call
