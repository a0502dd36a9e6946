"""One entry point for the three samplers: the teacher (stock FLUX) and the two distilled students.

``load_pipeline(method, teacher_folder, student_checkpoint=...)``:

* ``"teacher"``: diffusers' ``FluxPipeline`` of the folder (28 Euler steps, guidance 3.5 by default at call
  time). A stock folder without a checkpoint keeps its own transformer (×1000, as the reference's ``test_flux8b.py``).
  A ×1 folder (``t2i-distill rescale``'s output) or ``student_checkpoint`` (the rescaled ×1 teacher the students were
  distilled from) gives ``load_student(kind="flow")`` at the scale the weights were trained at; FluxPipeline drives
  it unchanged (it passes ``t/1000`` and the raw guidance, and the model applies its own scale).
* ``"scm"``: :class:`FluxSCMPipeline` with ``load_student(kind="trigflow", rescaled_checkpoint=ckpt)`` and
  ``SCMScheduler(prediction_type="trigflow", sigma_data=0.5)``.
* ``"meanflow"``: :class:`FluxMeanFlowPipeline` with ``load_student(kind="meanflow", rescaled_checkpoint=ckpt)`` and
  the folder's ``FlowMatchEulerDiscreteScheduler``.

Checkpoints are what the trainers write (``transformer_<step>.safetensors``), the reference's ``transformer_<step>.pt``
(``{"module": state_dict}``), a diffusers transformer folder or sharded safetensors. They are taken strictly
(:func:`t2i_distill.models.check_load`): a checkpoint of another kind than ``method`` needs, or with keys missing or
unexpected, is refused, and a student sampler without a student (no checkpoint, and a folder whose transformer is not
one) is refused: nothing ever falls back to base weights. Each model runs at the time scale its weights were trained at.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["DEFAULT_STEPS", "METHODS", "check_pipeline", "load_pipeline"]

logger = logging.getLogger(__name__)

#: The samplers, and their default step counts (teacher: FLUX's 28; sCM: 2; MeanFlow: 4).
METHODS = ("teacher", "scm", "meanflow")
DEFAULT_STEPS = {"teacher": 28, "scm": 2, "meanflow": 4}

_STUDENT_KIND = {"teacher": "flow", "scm": "trigflow", "meanflow": "meanflow"}
_FLAGS = {"checkpoint": "--student_checkpoint"}


def check_pipeline(method: str, pretrained_model_name_or_path: str | os.PathLike,
                   student_checkpoint: str | os.PathLike | None = None, revision: str | None = None):
    """Every refusal :func:`load_pipeline` would make, from configs and file headers only (nothing loads).

    Returns the :class:`~t2i_distill.models.loading.LoadCheck` of the transformer, or ``None`` when the folder's
    stock transformer is used as it is (``teacher`` on a stock folder).
    """
    from t2i_distill.models.checkpoint_files import describe_kind, read_checkpoint
    from t2i_distill.models.loading import check_load
    from t2i_distill.models.time_scale import STOCK_TIME_SCALE, config_time_scale, read_transformer_config

    if method not in METHODS:
        raise ValueError(f"`method`: expected one of {METHODS}, got {method!r}")
    kind = _STUDENT_KIND[method]
    path = os.fspath(pretrained_model_name_or_path)
    flags = {**_FLAGS, "kind": f"--method {method}"}
    config = read_transformer_config(path, revision=revision)  # a folder that does not exist is named first
    if student_checkpoint is None:
        if method == "teacher":
            if config_time_scale(config, repr(path))[0] == STOCK_TIME_SCALE:
                return None
        else:  # the folder itself must hold this sampler's student
            local = os.path.join(path, "transformer")
            own = read_checkpoint(local, tensors=False).kind if os.path.isdir(local) else None
            if own != kind:
                from t2i_distill.errors import ConfigurationError

                raise ConfigurationError(
                    f"--method {method} needs a student: give --student_checkpoint (transformer_<step>.safetensors or "
                    f"the reference's .pt), or a --pretrained_model_name_or_path whose transformer is "
                    f"{describe_kind(kind)}; {path!r} holds "
                    f"{describe_kind(own) if own else 'no readable local transformer'}, and sampling it would "
                    "produce the untrained base model's images"
                )
    return check_load(path, kind=kind, checkpoint=student_checkpoint, accepted_kinds=(kind,), revision=revision,
                      flags=flags)


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
    Raises ``ValueError`` for an unknown method, a missing student, or a checkpoint that does not fit
    (:func:`check_pipeline`).
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
    if transformer is None:
        check = check_pipeline(method, path, student_checkpoint, revision=revision)
        if check is not None:
            kind = _STUDENT_KIND[method]
            transformer, report = load_student(path, kind=kind, rescaled_checkpoint=student_checkpoint,
                                               accepted_kinds=(kind,), flags={**_FLAGS, "kind": f"--method {method}"},
                                               torch_dtype=torch_dtype, **kw)
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
