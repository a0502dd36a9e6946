"""Fused Triton kernels with forward-mode (JVP) rules for the FLUX student's hot paths.

Every op has a pure-PyTorch reference of the same signature in :mod:`t2i_kernels.reference`, an autograd Function that
works under ``torch.func.jvp``, ``torch.autograd.forward_ad`` and ordinary backward, and an explicit
``<op>_jvp(primal..., tangent...) -> (out, tout)`` that computes primal and tangent in one pass.

This package knows nothing of FLUX, diffusers or training; it imports without Triton or a GPU (kernels then raise
an error that says what to install or set).

Why not ``kernels`` (the design card's name for this layer): Hugging Face's ``kernels`` distribution owns that import
name, and transformers (≥ 5.25) requires and imports it; a second top-level ``kernels`` would shadow it or be
shadowed by it. The custom ops' ``torch.library`` namespace has the same name as this package: ``t2i_kernels``.
"""

from t2i_kernels import reference
from t2i_kernels._double_diff import DoubleDifferentiationError
from t2i_kernels._double_diff import install as _install_double_diff_refusals
from t2i_kernels._runtime import HAS_TRITON, KernelUnavailableError
from t2i_kernels.attention import AttentionFunction, AttentionJVPFunction, attention, attention_jvp
from t2i_kernels.gated_residual import (
    GatedResidualFunction,
    GatedResidualJVPFunction,
    gated_residual,
    gated_residual_jvp,
)
from t2i_kernels.gelu_tanh import GeluTanhFunction, GeluTanhJVPFunction, gelu_tanh, gelu_tanh_jvp
from t2i_kernels.layer_norm_modulate import (
    LayerNormModulateFunction,
    LayerNormModulateJVPFunction,
    layer_norm_modulate,
    layer_norm_modulate_jvp,
)
from t2i_kernels.qk_norm_rope import QKNormRoPEFunction, QKNormRoPEJVPFunction, qk_norm_rope, qk_norm_rope_jvp
from t2i_kernels.rms_norm import RMSNormFunction, RMSNormJVPFunction, rms_norm, rms_norm_jvp
from t2i_kernels.rope import RoPEFunction, RoPEJVPFunction, rope, rope_jvp

_install_double_diff_refusals()  # every op and Function above refuses double differentiation by name

__version__ = "0.1.0"

__all__ = [
    "AttentionFunction",
    "AttentionJVPFunction",
    "DoubleDifferentiationError",
    "HAS_TRITON",
    "GatedResidualFunction",
    "GatedResidualJVPFunction",
    "GeluTanhFunction",
    "GeluTanhJVPFunction",
    "KernelUnavailableError",
    "LayerNormModulateFunction",
    "LayerNormModulateJVPFunction",
    "QKNormRoPEFunction",
    "QKNormRoPEJVPFunction",
    "RMSNormFunction",
    "RMSNormJVPFunction",
    "RoPEFunction",
    "RoPEJVPFunction",
    "attention",
    "attention_jvp",
    "gated_residual",
    "gated_residual_jvp",
    "gelu_tanh",
    "gelu_tanh_jvp",
    "layer_norm_modulate",
    "layer_norm_modulate_jvp",
    "qk_norm_rope",
    "qk_norm_rope_jvp",
    "reference",
    "rms_norm",
    "rms_norm_jvp",
    "rope",
    "rope_jvp",
]
