"""Inference pipelines (reference-spec §4): the sCM and MeanFlow few-step samplers and the FLUX teacher baseline.

* :class:`FluxSCMPipeline`: 1–N sCM steps (``SCMScheduler``; 2 steps = [π/2, 1.3, 0]), fresh noise between steps.
* :class:`FluxMeanFlowPipeline`: 1–N MeanFlow jumps over FLUX's resolution-shifted sigmas, (t, t − r) per step.
* :func:`load_pipeline`: ``"teacher"`` (stock ``FluxPipeline``), ``"scm"`` or ``"meanflow"`` from the teacher folder
  plus a ``transformer_<step>.safetensors`` / ``.pt`` student checkpoint.
* :mod:`~t2i_distill.pipelines.schedules`: the schedules as pure functions; :mod:`~t2i_distill.pipelines.flops`:
  per-image FLOP counts.
"""

import importlib

from t2i_distill.pipelines.loading import DEFAULT_STEPS, METHODS, load_pipeline

# The pipeline classes subclass diffusers' FluxPipeline: import them (and diffusers) only when asked, so the command
# line (which registers `sample`/`geneval` through this package) stays light.
_LAZY = {"OUTPUT_TYPES": "base", "FewStepFluxPipeline": "base", "FluxMeanFlowPipeline": "meanflow",
         "FluxSCMPipeline": "scm"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"t2i_distill.pipelines.{_LAZY[name]}"), name)
    raise AttributeError(f"module 't2i_distill.pipelines' has no attribute {name!r}")


__all__ = [
    "DEFAULT_STEPS",
    "METHODS",
    "OUTPUT_TYPES",
    "FewStepFluxPipeline",
    "FluxMeanFlowPipeline",
    "FluxSCMPipeline",
    "load_pipeline",
]
