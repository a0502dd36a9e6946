"""Inference pipelines (reference-spec §4): the sCM and MeanFlow few-step samplers and the FLUX teacher baseline.

* :class:`FluxSCMPipeline`: 1–N sCM steps (``SCMScheduler``; 2 steps = [π/2, 1.3, 0]), fresh noise between steps.
* :class:`FluxMeanFlowPipeline`: 1–N MeanFlow jumps over FLUX's resolution-shifted sigmas, (t, t − r) per step.
* :func:`load_pipeline`: ``"teacher"`` (stock ``FluxPipeline``), ``"scm"`` or ``"meanflow"`` from the teacher folder
  plus a ``transformer_<step>.safetensors`` / ``.pt`` student checkpoint.
* :mod:`~t2i_distill.pipelines.schedules`: the schedules as pure functions; :mod:`~t2i_distill.pipelines.flops`:
  per-image FLOP counts.
"""

from t2i_distill.pipelines.base import OUTPUT_TYPES, FewStepFluxPipeline
from t2i_distill.pipelines.loading import DEFAULT_STEPS, METHODS, load_pipeline
from t2i_distill.pipelines.meanflow import FluxMeanFlowPipeline
from t2i_distill.pipelines.scm import FluxSCMPipeline

__all__ = [
    "DEFAULT_STEPS",
    "METHODS",
    "OUTPUT_TYPES",
    "FewStepFluxPipeline",
    "FluxMeanFlowPipeline",
    "FluxSCMPipeline",
    "load_pipeline",
]
