"""The MeanFlow loss of T2I-Distill (reference-spec §2.3), as a function of models, a batch and explicit draws.

Convention: t = 1 is noise, t = 0 data; z_t = α_t·x0 + σ_t·ε, v = α'_t·x0 + σ'_t·ε; x0 = latents (not σ_d-scaled).
One call, with draws (ε, g, (r, t), r = t mask, prompt-dropout mask):

1. Dropped samples get the " " prompt (``null_condition``) for every model call.
2. Student with grad: u = u_θ(z_t, t, t − r); teacher (``no_grad`` + autocast on CUDA): v_T = v(z_t, t).
3. CFG-MeanFlow (``use_cfg_meanflow``) on C = {t ∈ [t_min, t_max], prompt kept}: u_c, u_u = student with the
   prompt and with " " (``no_grad``) at (t, t) (``cfg_velocity_at="t"``) or (r, t) (``"r_t"``, B1);
   ṽ = ω·v_T + κ·u_c + (1 − ω − κ)·u_u.
4. du/dt = JVP of (z, r, t) ↦ u_θ(z, t, t − r) along (ṽ on C, else v_T (``tangent="teacher"``) or v (``"data"``,
   B2); 0; 1) — a unit tangent on t feeds 1 into both time inputs.
5. u_tgt = (ṽ on C, else v_T) − (t − r)·du/dt; e = u − sg(u_tgt); L_b = Σ e² per sample; adaptive weighting
   w_b = 1/(sg(L_b) + eps)^p; loss = mean_b(w_b·L_b).

The statements follow ``train_meanflow.py:MeanFlowLoss.__call__`` in order and dtype (all in the weight dtype; the
JVPs of ``reference``/``func`` run per subset, C first, as the reference). ``dual`` instead runs one
:func:`~t2i_distill.models.dual_forward.flux_forward_jvp` pass with grad over the whole batch (per-sample tangents),
which gives u with its graph and du/dt: no separate JVP and student passes. The loss never toggles gradient
checkpointing (B4, which the reference does after every JVP).
"""

from __future__ import annotations

import numpy as np
import torch

from t2i_distill.conditioning import pack_latents
from t2i_distill.losses.common import (
    check_mode_and_patch,
    grad_context,
    jvp_context,
    no_grad_attention,
    no_phases,
    prepare_batch,
    teacher_autocast,
    unwrap,
)
from t2i_distill.losses.config import MeanFlowConfig
from t2i_distill.losses.draws import MeanFlowDraws, draw_meanflow

__all__ = ["interpolant", "meanflow_loss"]


def interpolant(t: torch.Tensor, path_type: str):
    """(α_t, σ_t, α'_t, σ'_t) of the path, as the reference (constants as Python numbers for the linear path)."""
    if path_type == "linear":
        return 1 - t, t, -1, 1
    if path_type == "cosine":
        return (torch.cos(t * np.pi / 2), torch.sin(t * np.pi / 2), -np.pi / 2 * torch.sin(t * np.pi / 2),
                np.pi / 2 * torch.cos(t * np.pi / 2))
    raise ValueError(f"`path_type`: expected 'linear' or 'cosine', got {path_type!r}")


def _check_models(student, teacher) -> None:
    from t2i_distill.models import FluxStudent, TrigFlowStudent

    s, t = unwrap(student), unwrap(teacher)
    if not isinstance(s, FluxStudent) or isinstance(s, TrigFlowStudent) or not s.config.dual_timestep:
        raise TypeError(f"`student`: expected FluxStudent(dual_timestep=True), got {type(s).__name__}"
                        f"{'' if not isinstance(s, FluxStudent) else f'(dual_timestep={s.config.dual_timestep})'}")
    if not isinstance(t, FluxStudent) or isinstance(t, TrigFlowStudent) or t.config.dual_timestep:
        raise TypeError(f"`teacher`: expected FluxStudent(dual_timestep=False), got {type(t).__name__}")


def _null(null_condition, data) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(null_condition, (tuple, list)) or len(null_condition) != 2:
        raise TypeError("`null_condition`: expected (null_prompt_embeds (1, T, joint dim), null_pooled (1, pooled "
                        f"dim)), the ' ' prompt's embeddings; got {type(null_condition).__name__}")
    embeds, pooled = null_condition
    want_e, want_p = (1, *data.prompt_embeds.shape[1:]), (1, data.pooled.shape[1])
    for name, value, want in (("null_prompt_embeds", embeds, want_e), ("null_pooled", pooled, want_p)):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"`null_condition` {name}: expected shape {want}, got {got}")
    move = {"device": data.device, "dtype": data.dtype}
    return embeds.to(**move), pooled.to(**move)


def meanflow_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict,
    *,
    config: MeanFlowConfig | None = None,
    null_condition: tuple[torch.Tensor, torch.Tensor],
    draws: MeanFlowDraws | None = None,
    jvp_mode: str = "dual",
    phases=no_phases,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MeanFlow loss of one micro-batch and its logged scalars.

    Args:
        student: :class:`~t2i_distill.models.FluxStudent` with ``dual_timestep=True`` (or a wrapper with ``.module``).
        teacher: frozen :class:`~t2i_distill.models.FluxStudent` (one time input); run under ``no_grad``.
        batch: ``latents`` (B, C, h, w) FLUX latents (z − shift)·scale; ``prompt_embeds`` (B, T, joint dim);
            ``pooled_prompt_embeds`` (B, pooled dim). Cast to the student's dtype and device.
        config: the constants (default :class:`MeanFlowConfig`).
        null_condition: ``(null_prompt_embeds (1, T, joint dim), null_pooled (1, pooled dim))``, the " " prompt.
        draws: the randomness (default: :func:`draw_meanflow` in the reference's RNG order).
        jvp_mode: ``"dual"``, ``"func"``, ``"reference"`` or ``"fd"`` (see :mod:`t2i_distill.losses`).
        phases: phase hook wrapped around ``"student"``, ``"teacher"``, ``"cfg"``, ``"jvp"`` (``"dual"`` in dual
            mode) and ``"loss"``.

    Returns:
        ``(loss, logs)``: the 0-dim loss in the weights' dtype, and detached 0-dim ``loss``, ``loss_mean_ref``
        (mean e²) and ``cfg_fraction`` (share of the batch that got the CFG-MeanFlow target; 0 when off).
    """
    config = MeanFlowConfig() if config is None else config
    if not isinstance(config, MeanFlowConfig):
        raise TypeError(f"`config`: expected a MeanFlowConfig, got {type(config).__name__}")
    _check_models(student, teacher)
    core = unwrap(student)
    mode = check_mode_and_patch(jvp_mode, core)
    data = prepare_batch(batch, core)
    bsz, dtype, device = data.size, data.dtype, data.device
    null_embeds, null_pooled = _null(null_condition, data)
    if draws is None:
        draws = draw_meanflow({"latents": data.latents}, config, dtype=dtype)
    if not isinstance(draws, MeanFlowDraws):
        raise TypeError(f"`draws`: expected MeanFlowDraws, got {type(draws).__name__}")
    draws.validate(tuple(data.latents.shape))

    guidance = draws.guidance.to(device)
    dropped = draws.dropout_mask.to(device)
    prompt_embeds = torch.where(dropped[:, None, None], null_embeds, data.prompt_embeds)
    pooled = torch.where(dropped[:, None], null_pooled, data.pooled)
    r, t = (x.to(device=device, dtype=dtype) for x in draws.times())
    noises = draws.noise.to(device=device, dtype=dtype)
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(t.view(-1, 1, 1, 1), config.path_type)
    z_t = pack_latents(alpha_t * data.latents + sigma_t * noises)
    v_t = pack_latents(d_alpha_t * data.latents + d_sigma_t * noises)
    time_diff = (t - r).view(-1, 1, 1)
    ids = {"txt_ids": data.txt_ids, "img_ids": data.img_ids}
    kwargs = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled, "guidance": guidance, **ids}

    u = None
    if mode != "dual":
        with phases("student"), grad_context(mode, core):
            u = student(hidden_states=z_t, timestep=t, timestep2=time_diff.reshape([bsz]), return_dict=False,
                        **kwargs)[0]
    with phases("teacher"), torch.no_grad(), teacher_autocast(device, dtype):
        v_teacher = teacher(hidden_states=z_t, timestep=t, return_dict=False, **kwargs)[0]

    cfg_mask = (t >= config.cfg_min_t) & (t <= config.cfg_max_t) & ~dropped
    split = cfg_groups(cfg_mask) if config.use_cfg_meanflow else None
    use_cfg = split is not None
    tangent = (v_teacher if config.tangent == "teacher" else v_t).clone()
    velocity = v_teacher.clone()  # the target's velocity term: ṽ on the CFG subset, v_T elsewhere
    groups: list[torch.Tensor | None] = [None]
    if use_cfg:
        cfg_idx, rest_idx = split
        groups = [cfg_idx, rest_idx]
        with phases("cfg"), torch.no_grad(), no_grad_attention(mode):
            v_tilde = _cfg_velocity(core, config, cfg_idx, z_t, t, time_diff, v_teacher, prompt_embeds, pooled,
                                    null_embeds, null_pooled, guidance, ids)
        tangent[cfg_idx] = v_tilde.to(tangent.dtype)
        velocity[cfg_idx] = v_tilde.to(velocity.dtype)

    if mode == "dual":
        from t2i_distill.models.dual_forward import flux_forward_jvp

        with phases("dual"):
            ones = torch.ones_like(t)
            u, dudt = flux_forward_jvp(core, z_t, tangent, timestep=t, t_timestep=ones, timestep2=time_diff.reshape(
                [bsz]), t_timestep2=ones, **kwargs)
    elif mode == "fd":  # (u(z + ε·ż, r, t + ε) − u(z, r, t)) / ε: r fixed, so t − r grows by ε too
        eps = config.fd_epsilon
        with phases("jvp"), jvp_context(mode, device, dtype):
            u_ahead = core(hidden_states=z_t + eps * tangent.to(z_t.dtype), timestep=t + eps,
                           timestep2=time_diff.reshape([bsz]) + eps, return_dict=False, **kwargs)[0]
        dudt = (u_ahead.float() - u.detach().float()) / eps
    else:
        with phases("jvp"):
            dudt = _grouped_jvp(core, mode, groups, z_t, r, t, tangent, kwargs)

    with phases("loss"):
        u_target = (velocity - time_diff * dudt).to(dtype)
        error = u - u_target.detach()
        loss_mid = torch.sum((error**2).reshape(error.shape[0], -1), dim=-1)
        if config.weighting == "adaptive":
            loss = 1.0 / (loss_mid.detach() + config.adaptive_eps).pow(config.adaptive_p) * loss_mid
        else:
            loss = loss_mid
        loss_mean_ref = torch.mean(error**2)
        loss = loss.mean()
        cfg_fraction = cfg_mask.float().mean() if use_cfg else torch.zeros((), device=device)
        logs = {"loss": loss.detach(), "loss_mean_ref": loss_mean_ref.detach(), "cfg_fraction": cfg_fraction}
    return loss, logs


def cfg_groups(cfg_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(indices in C, the others)``, or None when C is empty. The one data-dependent decision of the loss: under fake
    tensors (``t2i-distill plan``) it is replaced by its worst case for memory, the whole batch in C."""
    if not bool(cfg_mask.any()):
        return None
    return torch.where(cfg_mask)[0], torch.where(~cfg_mask)[0]


def _cfg_velocity(core, config, idx, z_t, t, time_diff, v_teacher, prompt_embeds, pooled, null_embeds, null_pooled,
                  guidance, ids) -> torch.Tensor:
    """ṽ = ω·v_T + κ·u_cond + (1 − ω − κ)·u_uncond on the samples ``idx``: one batch of 2·|C| (prompt, " ")."""
    n = idx.numel()
    second_time = time_diff.reshape(-1)[idx] if config.cfg_velocity_at == "r_t" else torch.zeros_like(t[idx])
    combined = core(
        hidden_states=torch.cat([z_t[idx], z_t[idx]], dim=0),
        timestep=torch.cat([t[idx], t[idx]], dim=0),
        timestep2=torch.cat([second_time, second_time], dim=0),
        encoder_hidden_states=torch.cat([prompt_embeds[idx], null_embeds.expand(n, -1, -1)], dim=0),
        pooled_projections=torch.cat([pooled[idx], null_pooled.expand(n, -1)], dim=0),
        guidance=torch.cat([guidance[idx], guidance[idx]], dim=0),
        return_dict=False,
        **ids,
    )[0]
    u_cond, u_uncond = torch.chunk(combined, 2, dim=0)
    return (config.cfg_omega * v_teacher[idx] + config.cfg_kappa * u_cond
            + (1 - config.cfg_omega - config.cfg_kappa) * u_uncond)


def _grouped_jvp(core, mode, groups, z_t, r, t, tangent, kwargs) -> torch.Tensor:
    """du/dt by ``torch.func.jvp`` of (z, r, t) ↦ u(z, t, t − r) along (tangent, 0, 1), one call per subset
    (the CFG subset first, then the rest; the whole batch when CFG is off), as the reference."""
    dudt = None
    for group in groups:
        if group is not None and group.numel() == 0:
            continue

        def pick(x, group=group):
            return x if group is None else x[group]

        sub = {k: (pick(v) if k in ("encoder_hidden_states", "pooled_projections", "guidance") else v)
               for k, v in kwargs.items()}

        def fn(z, cur_r, cur_t, sub=sub):
            return core(hidden_states=z, timestep=cur_t, timestep2=cur_t - cur_r, return_dict=False, **sub)[0]

        primals = (pick(z_t), pick(r), pick(t))
        tangents = (pick(tangent), torch.zeros_like(primals[1]), torch.ones_like(primals[2]))
        with jvp_context(mode, z_t.device, z_t.dtype):
            _, part = torch.func.jvp(fn, primals, tangents)
        if group is None:
            return part
        if dudt is None:
            dudt = torch.empty(z_t.shape, dtype=part.dtype, device=part.device)
        dudt[group] = part
    return dudt
