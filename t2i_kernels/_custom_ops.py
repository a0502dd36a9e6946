"""Launching Triton inside ``torch.func`` transforms: why every launcher is a ``torch.library`` custom op.

The problem. Under ``torch.func.jvp`` (and ``torch.func.grad``/``vjp``), the ``jvp`` and ``backward`` staticmethods
of an ``autograd.Function`` receive functorch ``TensorWrapper`` objects: the saved primals and the tangents are
wrapped at the transform's level. A Triton launch needs raw device pointers, and asking a wrapper for one fails with
``NotImplementedError: Cannot access storage of TensorWrapper``. (``torch.autograd.forward_ad`` passes plain tensors,
which is why a Function can pass ``gradcheck(check_forward_ad=True)`` and still fail inside ``torch.func.jvp``.)

The fix. Each launcher is registered as a ``torch.library.custom_op`` (no autograd of its own). When a custom op is
called on wrapped tensors, the functorch dispatcher unwraps them level by level and runs the op's implementation on
the plain tensors underneath, then re-wraps the outputs at the right level. So Triton only ever sees real storage,
the outputs come back as correct functorch citizens, and nothing is copied. The alternative, unwrapping by hand with
``torch._C._functorch.get_unwrapped`` and allocating under ``torch._C._DisableFuncTorch()``, relies on private APIs
and leaves re-wrapping the outputs at the right transform level to hand-written code. Custom ops also give
``torch.compile`` an opaque, fake-tensor-aware node (each op registers a fake implementation).

The custom ops have no autograd formula on purpose: the autograd ``Function`` around them owns ``jvp`` and
``backward``. Differentiating *through* a tangent (backward of a JVP) is not supported: sCM and MeanFlow detach every
tangent, and the explicit ``*_jvp`` APIs mark their tangent outputs non-differentiable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["LIBRARY", "grad_or_placeholder", "kernel_op"]

#: The ``torch.library`` namespace of every kernel op (``torch.ops.t2i_kernels.<name>``).
LIBRARY = "t2i_kernels"


def kernel_op(name: str, fake: Callable[..., object]) -> Callable[[Callable[..., object]], object]:
    """Register the decorated launcher as ``torch.ops.t2i_kernels.<name>`` with ``fake`` as its meta function.

    Type hints on the launcher define the schema (``torch.Tensor``, ``torch.Tensor | None``, ``bool``, ``float``...);
    launchers never mutate their inputs and never return an input (custom ops may not alias).
    """

    def decorate(fn: Callable[..., object]) -> object:
        op = torch.library.custom_op(f"{LIBRARY}::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return decorate


def grad_or_placeholder(like: torch.Tensor, needed: bool) -> torch.Tensor:
    """An uninitialised gradient shaped like ``like``, or an empty (0,) placeholder when it is not needed: custom ops
    cannot return None, so backward ops return this and the autograd Function maps placeholders back to None."""
    return torch.empty(like.shape if needed else (0,), dtype=like.dtype, device=like.device)
