"""The sCM loss of T2I-Distill (reference-spec §2.2), as a function of models, a batch, a step and explicit draws.

One call, on latents x0 = σ_d·latents (B, C, h, w) and the draws (ε, t, g):

1. z = σ_d·ε; x_t = cos t·x0 + sin t·z, packed to (B, N, 4C); x̂ = x_t/σ_d.
2. Teacher (``no_grad``, no autocast): F_T = F_teacher(x̂, t, g); dxt_dt = σ_d·F_T.
3. Tangent along the teacher's ODE: (v_x, v_t) = (cos t·sin t·dxt_dt/σ_d, cos t·sin t); Ḟ = JVP of the student
   at (x̂, t) along it (see ``jvp_mode``); the student with grad gives F_θ and logvar; F⁻ = sg(F_θ).
4. r = min(1, step/W); g = −cos²t·(σ_d·F⁻ − dxt_dt) − r·(cos t·sin t·x_t + σ_d·Ḟ); g ← g/(‖g‖ + c) per sample.
5. w = 1/(σ_d·tan t); loss = λ·mean[(w/e^logvar)·(F_θ − F⁻ − g)² + logvar].

The statements follow ``train_sCM.py:sCMLoss.__call__`` in order and dtype: t is cast to the weight dtype before
cos/sin; in ``reference`` mode on CUDA Ḟ comes out fp32 from the autocast JVP, which promotes g and the loss to fp32;
the other modes upcast Ḟ to (at least) fp32 so the loss arithmetic has the same dtypes.

JVP modes: ``dual`` — one :func:`~t2i_distill.models.dual_forward.trigflow_forward_jvp` pass with grad gives F_θ
(with its graph), Ḟ (detached) and logvar; ``func`` — ``torch.func.jvp`` (``no_grad``, autocast on CUDA) over the
kernel-patched student, then its forward with grad; ``reference`` — the same over the unpatched student with math
attention, as T2I-Distill. The loss never toggles gradient checkpointing (B4): the student's own setting applies to
its grad forward in ``func``/``reference`` (the dual pass does not checkpoint).
"""

from __future__ import annotations

import torch

from t2i_distill.conditioning import pack_latents
from t2i_distill.losses.common import (
    check_mode_and_patch,
    grad_context,
    jvp_context,
    no_phases,
    prepare_batch,
    unwrap,
)
from t2i_distill.losses.config import SCMConfig
from t2i_distill.losses.draws import SCMDraws, draw_scm

__all__ = ["scm_loss"]


def _check_models(student, teacher) -> None:
    from t2i_distill.models import TrigFlowStudent

    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(unwrap(model), TrigFlowStudent):
            raise TypeError(f"`{name}`: expected a TrigFlowStudent (optionally wrapped), got {type(model).__name__}")


def scm_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict,
    *,
    step: int,
    config: SCMConfig | None = None,
    draws: SCMDraws | None = None,
    jvp_mode: str = "dual",
    phases=no_phases,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The sCM loss of one micro-batch and its logged scalars.

    Args:
        student: :class:`~t2i_distill.models.TrigFlowStudent` being trained (or a wrapper with ``.module``).
        teacher: frozen :class:`~t2i_distill.models.TrigFlowStudent`; run under ``no_grad``.
        batch: ``latents`` (B, C, h, w) FLUX latents (z − shift)·scale, **not** σ_d-scaled (4C = the student's
            in_channels); ``prompt_embeds`` (B, T, joint dim); ``pooled_prompt_embeds`` (B, pooled dim). Cast to the
            student's dtype and device.
        step: the global optimisation step (the tangent warmup r = min(1, step / W)).
        config: the constants (default :class:`SCMConfig`).
        draws: the randomness (default: :func:`draw_scm` in the reference's RNG order).
        jvp_mode: ``"dual"``, ``"func"``, ``"reference"`` or ``"fd"`` (:data:`~t2i_distill.losses.JVP_MODES`).
        phases: a phase hook (``phases(name)`` is a context manager, e.g. :class:`~t2i_distill.losses.PhaseTimer`)
            wrapped around ``"teacher"``, ``"jvp"``, ``"student"`` (``"dual"`` in dual mode) and ``"loss"``.

    Returns:
        ``(loss, logs)``: the 0-dim loss (fp32 for bf16 weights, as the reference; the weights' dtype if wider) and
        detached 0-dim ``loss_sCM``, ``l2_loss`` (= mean g², since F_θ − F⁻ ≡ 0), ``g_norm`` (batch mean of ‖g‖
        before normalisation) and ``mean_weight`` (mean of 1/(σ_d tan t)).
    """
    config = SCMConfig() if config is None else config
    if not isinstance(config, SCMConfig):
        raise TypeError(f"`config`: expected an SCMConfig, got {type(config).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"`step`: expected the global step, an int >= 0, got {step!r}")
    _check_models(student, teacher)
    core = unwrap(student)
    mode = check_mode_and_patch(jvp_mode, core)
    data = prepare_batch(batch, core)
    bsz, dtype, device = data.size, data.dtype, data.device
    if draws is None:
        draws = draw_scm({"latents": data.latents}, config, dtype=dtype)
    if not isinstance(draws, SCMDraws):
        raise TypeError(f"`draws`: expected SCMDraws, got {type(draws).__name__}")
    draws.validate(tuple(data.latents.shape))
    sigma_data = config.sigma_data

    model_input = data.latents * sigma_data
    noise = draws.noise.to(device=device, dtype=dtype) * sigma_data
    u = draws.angles(config).to(device)
    t = u.view(-1, 1, 1, 1).to(dtype)
    noisy = torch.cos(t) * model_input + torch.sin(t) * noise
    x_t = pack_latents(noisy)  # (B, N, 4C), σ_d-scaled
    x_hat = x_t / sigma_data
    kwargs = {"encoder_hidden_states": data.prompt_embeds, "pooled_projections": data.pooled,
              "txt_ids": data.txt_ids, "img_ids": data.img_ids, "guidance": draws.guidance.to(device)}

    with phases("teacher"), torch.no_grad():
        dxt_dt = sigma_data * teacher(hidden_states=x_hat, timestep=t.reshape([bsz]), **kwargs)

    t_b11 = t.reshape([bsz, 1, 1])
    cos_t, sin_t = torch.cos(t_b11), torch.sin(t_b11)
    v_x = cos_t * sin_t * dxt_dt / sigma_data
    v_t = cos_t * sin_t
    if mode == "dual":
        with phases("dual"):
            f_theta, f_dot, logvar = _dual(core, x_hat, v_x, t_b11, v_t, kwargs)
    elif mode == "fd":  # (F(x̂ + ε·ẋ, t + ε·ṫ) − F(x̂, t)) / ε, the second forward being the grad one
        eps = config.fd_epsilon
        with phases("jvp"), jvp_context(mode, device, dtype):
            f_ahead = core(hidden_states=x_hat + eps * v_x, timestep=(t_b11 + eps * v_t).reshape([bsz]), **kwargs)
        with phases("student"), grad_context(mode, core):
            f_theta, logvar = student(hidden_states=x_hat, timestep=t.reshape([bsz]), return_logvar=True, **kwargs)
        f_dot = (_at_least_fp32(f_ahead) - _at_least_fp32(f_theta.detach())) / eps
    else:
        with phases("jvp"), jvp_context(mode, device, dtype):
            _, f_dot = torch.func.jvp(lambda x, tt: core(hidden_states=x, timestep=tt.reshape([bsz]), **kwargs),
                                      (x_hat, t_b11), (v_x, v_t))
        with phases("student"), grad_context(mode, core):
            f_theta, logvar = student(hidden_states=x_hat, timestep=t.reshape([bsz]), return_logvar=True, **kwargs)
        if mode == "func":
            f_dot = _at_least_fp32(f_dot)

    with phases("loss"):
        logvar = logvar.view(-1, 1, 1)
        f_dot = f_dot.detach()
        f_minus = f_theta.detach()
        r = config.tangent_warmup(step)
        g = -cos_t * cos_t * (sigma_data * f_minus - dxt_dt)
        g = g + -r * (cos_t * sin_t * x_t + sigma_data * f_dot)
        g_norm = torch.linalg.vector_norm(g, dim=(1, 2), keepdim=True)
        g = g / (g_norm + config.tangent_norm_constant)
        weight = 1 / (torch.tan(t_b11) * sigma_data)
        l2_loss = torch.square(f_theta - f_minus - g)
        loss_scm = ((weight / torch.exp(logvar)) * l2_loss + logvar).mean()
        total = config.scm_lambda * loss_scm
        logs = {"loss_sCM": loss_scm.detach(), "l2_loss": l2_loss.mean().detach(), "g_norm": g_norm.mean().detach(),
                "mean_weight": weight.mean().detach()}
    return total, logs


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """The reference's Ḟ is fp32 (autocast runs the TrigFlow maps' ``pow`` in fp32); match that for bf16 weights."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _dual(core, x_hat, v_x, t_b11, v_t, kwargs):
    from t2i_distill.models.dual_forward import trigflow_forward_jvp

    f_theta, f_dot, logvar = trigflow_forward_jvp(core, x_hat, v_x, timestep=t_b11, t_timestep=v_t,
                                                  return_logvar=True, **kwargs)
    return f_theta, _at_least_fp32(f_dot), logvar
