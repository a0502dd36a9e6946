"""t2i-distill: few-step sCM and MeanFlow distillation of FLUX, with fused JVP kernels on the student's hot paths.

The Triton kernels live in the sibling package :mod:`t2i_kernels` (FLUX-agnostic); this package owns the FLUX
integration, the trainers, pipelines and data code, and the command line (``t2i-distill``).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The FLUX integration imports diffusers; load it only when asked, so `t2i-distill env` stays light.
    if name in ("apply_kernels_to_flux", "revert_kernels_on_flux"):
        from t2i_distill.models import flux_patch

        return getattr(flux_patch, name)
    raise AttributeError(f"module 't2i_distill' has no attribute {name!r}")


__all__ = ["apply_kernels_to_flux", "revert_kernels_on_flux"]
