"""``torch.compile`` of the patched FLUX model and of the explicit dual forward.

Dynamo refuses to trace an ``autograd.Function`` that defines a custom ``jvp`` ("Unsupported custom jvp"), and every
kernel's Function does (that is what makes ``torch.func.jvp`` work). :func:`allow_kernels_in_graph` marks each public
kernel function (``t2i_kernels.attention``, ``t2i_kernels.attention_jvp``, ...) with
``torch.compiler.allow_in_graph``: Dynamo then records the call as one node instead of tracing into it, and
AOTAutograd traces through it with fake tensors, where the Triton launchers are ``torch.library`` custom ops with fake
implementations. The result is one graph per block (no graph break inside a block) for aot_eager and inductor;
inductor keeps each custom op as an extern call.

What compiles (all tested on the CPU, see ``tests/t2i_distill/test_compile.py``):

======================================================  ==============================================================
training pass of the patched model (forward + backward)  compiles, no graph break inside a block
explicit dual forward (``flux_forward_jvp``)             compiles, no graph break inside a block
``torch.func.jvp`` of the patched model (the func path)  compiles: ``torch.func.jvp`` is traced by Dynamo, the
                                                         kernels' ``jvp`` rules are traced by AOTAutograd
======================================================  ==============================================================

:func:`apply_kernels_to_flux` calls :func:`allow_kernels_in_graph`, so nothing else is needed before
``torch.compile``. Eager behaviour is unchanged by it.
"""

from __future__ import annotations

import torch

import t2i_kernels

__all__ = ["COMPILABLE_KERNELS", "allow_kernels_in_graph"]

#: The public kernel functions the patched model and the dual forward call.
COMPILABLE_KERNELS = (
    "attention", "attention_jvp", "gated_residual", "gated_residual_jvp", "gelu_tanh", "gelu_tanh_jvp",
    "layer_norm_modulate", "layer_norm_modulate_jvp", "qk_norm_rope", "qk_norm_rope_jvp", "rms_norm",
    "rms_norm_jvp", "rope", "rope_jvp",
)


def allow_kernels_in_graph() -> None:
    """Let Dynamo put every kernel call into the graph as one node (idempotent)."""
    for name in COMPILABLE_KERNELS:
        torch.compiler.allow_in_graph(getattr(t2i_kernels, name))
