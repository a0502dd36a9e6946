"""The sCM and MeanFlow distillation losses of T2I-Distill as importable functions (no global ``args``; H6).

::

    from t2i_distill.losses import SCMConfig, scm_loss, MeanFlowConfig, meanflow_loss
    batch = {"latents": (B, 16, h, w), "prompt_embeds": (B, T, 4096), "pooled_prompt_embeds": (B, 768)}
    loss, logs = scm_loss(student, teacher, batch, step=global_step, config=SCMConfig(), jvp_mode="dual")
    loss, logs = meanflow_loss(student, teacher, batch, config=MeanFlowConfig(), null_condition=(e, p))

Every random draw can be passed in (:class:`SCMDraws`, :class:`MeanFlowDraws`), which makes a loss call a
deterministic function of models, batch and draws; without draws the loss draws them in the reference's RNG order
(:func:`draw_scm`, :func:`draw_meanflow`).

JVP modes (``JVP_MODES``), which give the same loss and gradients within the project's tolerance table:

* ``"dual"``: the explicit dual forward (:mod:`t2i_distill.models.dual_forward`): with grad enabled, one pass gives
  the prediction with its graph and the detached tangent (no separate JVP pass and grad forward);
* ``"func"``: ``torch.func.jvp`` under ``no_grad`` (+ bf16 autocast on CUDA) over the kernel-patched student (the
  caller patches it with :func:`t2i_distill.apply_kernels_to_flux`), then the student's forward with grad;
* ``"reference"``: the same over the *unpatched* student with math attention, as T2I-Distill (reference-spec §3.3).
"""

from t2i_distill.losses.common import PhaseTimer
from t2i_distill.losses.config import JVP_MODES, MeanFlowConfig, SCMConfig, config_fields
from t2i_distill.losses.draws import MeanFlowDraws, SCMDraws, draw_meanflow, draw_scm
from t2i_distill.losses.meanflow import meanflow_loss
from t2i_distill.losses.scm import scm_loss

__all__ = [
    "JVP_MODES",
    "MeanFlowConfig",
    "MeanFlowDraws",
    "PhaseTimer",
    "SCMConfig",
    "SCMDraws",
    "config_fields",
    "draw_meanflow",
    "draw_scm",
    "meanflow_loss",
    "scm_loss",
]
