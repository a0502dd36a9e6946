"""t2i-distill: few-step sCM and MeanFlow distillation of FLUX, with fused JVP kernels on the student's hot paths.

The Triton kernels live in the sibling package :mod:`kernels` (FLUX-agnostic); this package owns the FLUX
integration, the trainers, pipelines and data code, and the command line (``t2i-distill``).
"""

__version__ = "0.1.0"
