"""Fused Triton kernels with forward-mode (JVP) rules for the FLUX student's hot paths.

Every op has a pure-PyTorch reference of the same signature in :mod:`kernels.reference`, an autograd Function that
works under ``torch.func.jvp``, ``torch.autograd.forward_ad`` and ordinary backward, and an explicit
``<op>_jvp(primal..., tangent...) -> (out, tout)`` that computes primal and tangent in one pass.

This package knows nothing of FLUX, diffusers or training; it imports without Triton or a GPU (kernels then raise
an error that says what to install or set). Note: the import name ``kernels`` is shared with Hugging Face's unrelated
PyPI package ``kernels``; do not install both into one environment.
"""

from kernels import reference
from kernels._runtime import HAS_TRITON, KernelUnavailableError
from kernels.gated_residual import (
    GatedResidualFunction,
    GatedResidualJVPFunction,
    gated_residual,
    gated_residual_jvp,
)

__version__ = "0.1.0"

__all__ = [
    "HAS_TRITON",
    "GatedResidualFunction",
    "GatedResidualJVPFunction",
    "KernelUnavailableError",
    "gated_residual",
    "gated_residual_jvp",
    "reference",
]
