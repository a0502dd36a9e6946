"""Gated residual: ours vs the eager PyTorch reference, per mode.

Bytes moved (for GB/s): fwd reads x, y (B·N·D each) and gate, writes out; fwd+jvp also reads tx, ty and writes tout.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from bench.conftest import DEVICE, HAS_CUDA
from kernels import reference as ref

# FLUX widths on the GPU; a tiny shape under the interpreter.
SHAPES = [(1, 1536, 3072), (2, 4608, 3072)] if HAS_CUDA else [(2, 80, 64)]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def _reference_jvp(x, tx, gate, tgate, y, ty):
    """What a user of the reference gets today: torch.func.jvp through the eager expression."""
    return torch.func.jvp(ref.gated_residual, (x, gate, y), (tx, tgate, ty))


PROVIDERS = {
    "reference": (ref.gated_residual, _reference_jvp),
    "ours": (kernels.gated_residual, kernels.gated_residual_jvp),
}


def _bytes(shape, mode):
    b, n, d = shape
    element = torch.tensor([], dtype=DTYPE).element_size()
    big = b * n * d * element
    return {"fwd": 3 * big, "fwd+jvp": 6 * big, "fwd+bwd": 3 * big + 4 * big}[mode]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+jvp", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual(timed, provider, mode, shape):
    b, n, d = shape
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE)  # noqa: E731
    x, tx, gate, tgate, y, ty = mk(b, n, d), mk(b, n, d), mk(b, d), mk(b, d), mk(b, n, d), mk(b, n, d)
    primal, explicit_jvp = PROVIDERS[provider]
    if mode == "fwd":
        fn = lambda: primal(x, gate, y)  # noqa: E731
    elif mode == "fwd+jvp":
        fn = lambda: explicit_jvp(x, tx, gate, tgate, y, ty)  # noqa: E731
    else:
        leaves = [t.clone().requires_grad_() for t in (x, gate, y)]
        grad = mk(b, n, d)
        fn = lambda: primal(*leaves).backward(grad)  # noqa: E731
    timed(fn, op="gated_residual", provider=provider, mode=mode, shape=list(shape), dtype=str(DTYPE),
          bytes=_bytes(shape, mode))
