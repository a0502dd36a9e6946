"""One entry point for the three samplers: the teacher (stock FLUX) and the two distilled students.

``load_pipeline(method, teacher_folder, student_checkpoint=...)``:

* ``"teacher"``: diffusers' stock ``FluxPipeline`` of the folder (28 Euler steps, guidance 3.5 by default at call
  time). Without a checkpoint the folder's own transformer is used (stock ×1000 time inputs, as the reference's
  ``test_flux8b.py``). With ``student_checkpoint`` (the rescaled ×1 teacher the students were distilled from) the
  transformer is ``load_student(kind="flow")``: a ×1 :class:`FluxStudent`, which FluxPipeline drives unchanged
  (it passes ``t/1000`` and the raw guidance, exactly what a ×1 model expects).
* ``"scm"``: :class:`FluxSCMPipeline` with ``load_student(kind="trigflow", rescaled_checkpoint=ckpt)`` and
  ``SCMScheduler(prediction_type="trigflow", sigma_data=0.5)``.
* ``"meanflow"``: :class:`FluxMeanFlowPipeline` with ``load_student(kind="meanflow", rescaled_checkpoint=ckpt)`` and
  the folder's ``FlowMatchEulerDiscreteScheduler``.

Checkpoints are what the trainers write (``transformer_<step>.safetensors``) or the reference's
``transformer_<step>.pt`` (``{"module": state_dict}``).
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["DEFAULT_STEPS", "METHODS", "load_pipeline"]

logger = logging.getLogger(__name__)

#: The samplers, and their default step counts (teacher: FLUX's 28; sCM: 2; MeanFlow: 4).
METHODS = ("teacher", "scm", "meanflow")
DEFAULT_STEPS = {"teacher": 28, "scm": 2, "meanflow": 4}

_STUDENT_KIND = {"teacher": "flow", "scm": "trigflow", "meanflow": "meanflow"}


def load_pipeline(
    method: str,
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    student_checkpoint: str | os.PathLike | None = None,
    transformer: torch.nn.Module | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    revision: str | None = None,
    variant: str | None = None,
):
    """The ``method``'s pipeline on the teacher folder, in ``torch_dtype`` on ``device`` (``None``: CPU).

    ``transformer`` passes a student already in memory (e.g. straight from the trainer) instead of loading one.
    Raises ``ValueError`` for an unknown method or a checkpoint that does not fit (see :func:`load_student`).
    """
    from diffusers import FluxPipeline, SCMScheduler

    from t2i_distill.models.loading import load_student
    from t2i_distill.pipelines.meanflow import FluxMeanFlowPipeline
    from t2i_distill.pipelines.scm import FluxSCMPipeline

    if method not in METHODS:
        raise ValueError(f"`method`: expected one of {METHODS}, got {method!r}")
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise TypeError(f"`torch_dtype`: expected a floating torch.dtype, got {torch_dtype!r}")
    if transformer is not None and student_checkpoint is not None:
        raise ValueError("give either `transformer` or `student_checkpoint`, not both")
    path = os.fspath(pretrained_model_name_or_path)
    kw = {"revision": revision, "variant": variant}
    if transformer is None and (method != "teacher" or student_checkpoint is not None):
        if student_checkpoint is None:
            logger.warning("no `student_checkpoint` for %s: the student is the folder's transformer at ×1 time "
                           "inputs (untrained for this sampler)", method)
        transformer, report = load_student(path, kind=_STUDENT_KIND[method], rescaled_checkpoint=student_checkpoint,
                                           torch_dtype=torch_dtype, **kw)
        logger.info("%s", report)
    if transformer is not None and transformer.dtype != torch_dtype:  # diffusers warns on a no-op `.to(dtype)`
        transformer = transformer.to(torch_dtype)
    components = {} if transformer is None else {"transformer": transformer}
    if method == "teacher":
        pipe = FluxPipeline.from_pretrained(path, dtype=torch_dtype, **components, **kw)
    elif method == "scm":
        scheduler = SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
        pipe = FluxSCMPipeline.from_pretrained(path, dtype=torch_dtype, scheduler=scheduler, **components, **kw)
    else:
        pipe = FluxMeanFlowPipeline.from_pretrained(path, dtype=torch_dtype, **components, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe
