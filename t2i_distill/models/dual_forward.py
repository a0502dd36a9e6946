"""The explicit dual forward of the FLUX student: (primal, tangent) pairs threaded through the fused kernels.

``torch.func.jvp`` over the model (what the reference does, and what the patched model accelerates) runs every
op's tangent rule separately. :func:`flux_forward_jvp` instead calls each fused ``t2i_kernels.*_jvp`` once per step, so
primal and tangent share one read of every activation, and handles linear layers itself: a linear map's tangent
is the same GEMM without bias, so without grad both go through **one** GEMM on ``[x; tx]``.

Math per block is the student's (reference-spec §3.5–3.7) with tangents (t·) of everything downstream of the
latents and the time inputs: AdaLN chunks get ``t emb = W·(silu'(temb) ⊙ t temb)``; LayerNorm + modulation, qk-norm +
RoPE, attention, GELU and gated residuals use their kernels' ``*_jvp``. The conditioning's tangent (time embeddings
are small MLPs) comes from ``torch.func.jvp`` of :meth:`FluxStudent.conditioning`.

Autograd: with grad enabled the primal keeps its graph (every ``*_jvp`` kernel's primal output is differentiable)
while the tangent is computed without one and returned detached, so one pass gives the prediction to train on *and*
the tangent, where the reference runs a separate JVP pass and forward pass. sCM/MeanFlow never differentiate the
tangent; this function relies on that. No gradient checkpointing happens inside this pass.

Limits: FLUX models in diffusers' layout (double + single blocks), head dims the attention kernel supports, no
attention masks, unfused QKV projections. LoRA (peft/diffusers ``add_adapter``) and other wrapped linears are
supported: see :func:`dual_linear`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import t2i_kernels
from t2i_distill.models.trigflow import flow_input_scale, flow_to_trigflow_velocity, trigflow_to_flow_time
from t2i_kernels.attention import SUPPORTED_HEAD_DIMS

__all__ = ["dual_linear", "flux_forward_jvp", "trigflow_forward_jvp"]

Pair = tuple[torch.Tensor, torch.Tensor]


def dual_linear(linear: torch.nn.Module, x: torch.Tensor, tx: torch.Tensor) -> Pair:
    """``(linear(x), W·tx)`` for x, tx (..., in) → (..., out) in x's dtype; the tangent carries no graph.

    A plain ``nn.Linear``: without grad one GEMM on ``[x; tx]`` (the weight is read once); with grad the primal GEMM
    records its graph and the tangent GEMM runs without one (a shared GEMM would backpropagate through the tangent
    rows too). Anything else in a linear's place (a peft/diffusers LoRA layer ``base(x) + s·B(A(drop(x)))``, a
    quantised or other wrapped linear) is differentiated as it computes: ``torch.func.jvp`` of the module, primal
    and tangent in one call so both see the same dropout mask; its ``.weight`` alone would drop the adapter.
    """
    if type(linear) is not torch.nn.Linear:
        y, ty = torch.func.jvp(linear, (x,), (tx.to(x.dtype),))
        return y, ty.detach()
    if torch.is_grad_enabled():
        y = linear(x)
        with torch.no_grad():
            ty = F.linear(tx.to(x.dtype), linear.weight)
        return y, ty
    both = F.linear(torch.cat([x, tx.to(x.dtype)], dim=0), linear.weight)
    y, ty = both.split(x.shape[0], dim=0)
    return (y + linear.bias if linear.bias is not None else y), ty


def _silu_jvp(x: torch.Tensor, tx: torch.Tensor) -> Pair:
    """SiLU and its tangent ``σ(x)(1 + x(1 − σ(x)))·tx``; the tangent without graph."""
    y = F.silu(x)
    with torch.no_grad():
        sig = torch.sigmoid(x)
        ty = sig * (1 + x * (1 - sig)) * tx
    return y, ty


def _adaln_chunks(norm: torch.nn.Module, temb: Pair, chunks: int, cast_to: torch.dtype | None = None):
    """The AdaLN linear of ``norm`` on ``silu(temb)``, split into ``chunks`` (primal, tangent) pairs."""
    s, ts = _silu_jvp(*temb)
    if cast_to is not None:  # AdaLayerNormContinuous casts the SiLU output to x's dtype
        s, ts = s.to(cast_to), ts.to(cast_to)
    emb, temb_t = dual_linear(norm.linear, s, ts)
    return list(zip(emb.chunk(chunks, dim=1), temb_t.chunk(chunks, dim=1)))


def _ln_modulate(norm_eps: float, x: Pair, scale: Pair, shift: Pair) -> Pair:
    return t2i_kernels.layer_norm_modulate_jvp(x[0], x[1], scale[0], scale[1], shift[0], shift[1], eps=norm_eps)


def _residual(x: Pair, gate: Pair, y: Pair) -> Pair:
    return t2i_kernels.gated_residual_jvp(x[0], x[1], gate[0], gate[1], y[0], y[1])


def _feed_forward(ff: torch.nn.Module, x: Pair) -> Pair:
    """diffusers FeedForward: GELU(proj) → dropout (p = 0 in FLUX, an identity) → linear."""
    h = dual_linear(ff.net[0].proj, *x)
    h = t2i_kernels.gelu_tanh_jvp(*h)
    return dual_linear(ff.net[2], *h)


def _attention(attn: torch.nn.Module, streams: list[tuple[Pair, torch.nn.Module, torch.nn.Module, tuple]],
               rotary: tuple[torch.Tensor, torch.Tensor]) -> Pair:
    """Joint attention over the concatenated streams [(x, norm_q, norm_k, (to_q, to_k, to_v)) ...] (text first).

    Returns the attention output and its tangent as (B, L, H·D)."""
    if attn.head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flux_forward_jvp: head dim {attn.head_dim} is not supported by the attention kernel "
                         f"{SUPPORTED_HEAD_DIMS}")
    if getattr(attn, "fused_projections", False):
        raise ValueError("flux_forward_jvp: fused QKV projections are not supported; call unfuse_qkv_projections()")
    cos, sin = rotary
    qs, tqs, ks, tks, vs, tvs, start = [], [], [], [], [], [], 0
    for x, norm_q, norm_k, (to_q, to_k, to_v) in streams:
        n = x[0].shape[1]
        c, s = cos[start:start + n], sin[start:start + n]
        q, tq = t2i_kernels.qk_norm_rope_jvp(*dual_linear(to_q, *x), norm_q.weight, c, s, eps=float(norm_q.eps))
        k, tk = t2i_kernels.qk_norm_rope_jvp(*dual_linear(to_k, *x), norm_k.weight, c, s, eps=float(norm_k.eps))
        v, tv = dual_linear(to_v, *x)
        qs.append(q), tqs.append(tq), ks.append(k), tks.append(tk), vs.append(v), tvs.append(tv)
        start += n

    def joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    heads_dim = (-1, attn.head_dim)
    v_B_H_L_D = joined(vs, 1).unflatten(-1, heads_dim).transpose(1, 2)
    tv_B_H_L_D = joined(tvs, 1).unflatten(-1, heads_dim).transpose(1, 2)
    o, to = t2i_kernels.attention_jvp(joined(qs, 2), joined(ks, 2), v_B_H_L_D,
                                      joined(tqs, 2), joined(tks, 2), tv_B_H_L_D)
    return o.transpose(1, 2).flatten(2), to.transpose(1, 2).flatten(2)


def double_block_jvp(block, hidden: Pair, encoder: Pair, temb: Pair, rotary) -> tuple[Pair, Pair]:
    """One ``FluxTransformerBlock`` on (image, text) streams with tangents; returns (encoder, hidden) pairs."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _adaln_chunks(block.norm1, temb, 6)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _adaln_chunks(
        block.norm1_context, temb, 6)
    norm_h = _ln_modulate(block.norm1.norm.eps, hidden, scale_msa, shift_msa)
    norm_c = _ln_modulate(block.norm1_context.norm.eps, encoder, c_scale_msa, c_shift_msa)
    attn = block.attn
    joint = _attention(attn, [
        (norm_c, attn.norm_added_q, attn.norm_added_k, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)),
        (norm_h, attn.norm_q, attn.norm_k, (attn.to_q, attn.to_k, attn.to_v)),
    ], rotary)
    text_len = encoder[0].shape[1]
    ctx_out = tuple(t[:, :text_len] for t in joint)
    img_out = tuple(t[:, text_len:] for t in joint)

    hidden = _residual(hidden, gate_msa, dual_linear(attn.to_out[0], *img_out))
    norm_h = _ln_modulate(block.norm2.eps, hidden, scale_mlp, shift_mlp)
    hidden = _residual(hidden, gate_mlp, _feed_forward(block.ff, norm_h))

    encoder = _residual(encoder, c_gate_msa, dual_linear(attn.to_add_out, *ctx_out))
    norm_c = _ln_modulate(block.norm2_context.eps, encoder, c_scale_mlp, c_shift_mlp)
    encoder = _residual(encoder, c_gate_mlp, _feed_forward(block.ff_context, norm_c))
    return encoder, hidden


def single_block_jvp(block, hidden: Pair, encoder: Pair, temb: Pair, rotary) -> tuple[Pair, Pair]:
    """One ``FluxSingleTransformerBlock`` on the joint [text; image] stream with tangents."""
    text_len = encoder[0].shape[1]
    x = (torch.cat([encoder[0], hidden[0]], dim=1), torch.cat([encoder[1], hidden[1]], dim=1))
    shift, scale, gate = _adaln_chunks(block.norm, temb, 3)
    norm_x = _ln_modulate(block.norm.norm.eps, x, scale, shift)
    mlp = t2i_kernels.gelu_tanh_jvp(*dual_linear(block.proj_mlp, *norm_x))
    attn = block.attn
    attn_out = _attention(attn, [(norm_x, attn.norm_q, attn.norm_k, (attn.to_q, attn.to_k, attn.to_v))], rotary)
    projected = dual_linear(block.proj_out, torch.cat([attn_out[0], mlp[0]], dim=2),
                            torch.cat([attn_out[1], mlp[1]], dim=2))
    out, tout = _residual(x, gate, projected)
    return (out[:, :text_len], tout[:, :text_len]), (out[:, text_len:], tout[:, text_len:])


def _block_pairs(step, block, h0, h1, e0, e1, t0, t1, rotary):
    """A block's dual pass with flat tensor arguments and results (what ``torch.utils.checkpoint`` takes)."""
    (e0, e1), (h0, h1) = step(block, (h0, h1), (e0, e1), (t0, t1), rotary)
    return e0, e1, h0, h1


def _conditioning_jvp(model, timestep, t_timestep, pooled, guidance, timestep2, t_timestep2, dtype) -> Pair:
    def conditioning(t: torch.Tensor, t2: torch.Tensor | None) -> torch.Tensor:
        return model.conditioning(t, pooled, guidance, t2, dtype=dtype)

    temb = conditioning(timestep, timestep2)
    with torch.no_grad():
        if timestep2 is None:
            _, ttemb = torch.func.jvp(lambda t: conditioning(t, None), (timestep.detach(),), (t_timestep,))
        else:
            _, ttemb = torch.func.jvp(conditioning, (timestep.detach(), timestep2.detach()),
                                      (t_timestep, t_timestep2 if t_timestep2 is not None
                                       else torch.zeros_like(timestep2)))
    return temb, ttemb


def flux_forward_jvp(
    model,
    hidden_states: torch.Tensor,
    t_hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    t_timestep: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None = None,
    timestep2: torch.Tensor | None = None,
    t_timestep2: torch.Tensor | None = None,
) -> Pair:
    """``(v, tv)``: the student's output and its directional derivative along (t_hidden_states, t_timestep[,
    t_timestep2]); text, pooled text, guidance and ids carry no tangent (as in sCM and MeanFlow).

    ``model`` is a :class:`t2i_distill.models.FluxStudent` (patched or not: this function calls the kernels
    directly). Equals ``torch.func.jvp`` of ``model.forward`` up to rounding; see the module docstring for autograd.
    """
    hidden = dual_linear(model.x_embedder, hidden_states, t_hidden_states)
    temb = _conditioning_jvp(model, timestep, t_timestep, pooled_projections, guidance, timestep2, t_timestep2,
                             hidden[0].dtype)
    encoder_primal = model.context_embedder(encoder_hidden_states)
    encoder = (encoder_primal, torch.zeros_like(encoder_primal))  # text enters without a tangent
    rotary = model.rotary_embedding(img_ids, txt_ids)
    # Gradient checkpointing (``model.enable_gradient_checkpointing()``, as FluxStudent.forward honours it): each
    # block's dual pass keeps only its inputs and is recomputed in the backward; the tangents come out detached-in-
    # effect (no gradient ever flows into them), so the backward differentiates the primal path only.
    checkpointed = torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False)
    stages = ((double_block_jvp, model.transformer_blocks), (single_block_jvp, model.single_transformer_blocks))
    for step, blocks in stages:
        for block in blocks:
            if checkpointed:
                e0, e1, h0, h1 = torch.utils.checkpoint.checkpoint(
                    _block_pairs, step, block, *hidden, *encoder, *temb, rotary, use_reentrant=False)
                encoder, hidden = (e0, e1), (h0, h1)
            else:
                encoder, hidden = step(block, hidden, encoder, temb, rotary)
    scale, shift = _adaln_chunks(model.norm_out, temb, 2, cast_to=hidden[0].dtype)
    out = dual_linear(model.proj_out, *_ln_modulate(model.norm_out.norm.eps, hidden, scale, shift))
    return out[0], out[1].detach()


def _map_jvp(fn: Callable[..., torch.Tensor], primals: tuple, tangents: tuple) -> Pair:
    """An elementwise map and its tangent: the primal keeps its graph, the tangent (``torch.func.jvp``) has none."""
    out = fn(*primals)
    with torch.no_grad():
        _, tout = torch.func.jvp(fn, tuple(p.detach() for p in primals), tangents)
    return out, tout


def trigflow_forward_jvp(
    model,
    hidden_states: torch.Tensor,
    t_hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    t_timestep: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None = None,
    return_logvar: bool = False,
) -> Pair | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sCM JVP of a :class:`~t2i_distill.models.TrigFlowStudent` along (t_hidden_states, t_timestep):
    ``(F, tF)`` (and the logvar when asked, which carries no tangent), as ``torch.func.jvp`` of ``model.forward``.

    The TrigFlow maps (time t → s, input scale c(s), output map) are elementwise and go through ``torch.func.jvp``;
    the flow model in between is :func:`flux_forward_jvp`. Casts follow ``TrigFlowStudent.forward`` exactly.
    """
    batch, prompt_dtype = hidden_states.shape[0], encoder_hidden_states.dtype
    t = timestep.reshape(-1).expand(batch).to(prompt_dtype)
    tt = t_timestep.reshape(-1).expand(batch).to(prompt_dtype)
    s, ts = _map_jvp(trigflow_to_flow_time, (t,), (tt,))
    s_b11, ts_b11 = s.view(-1, 1, 1), ts.view(-1, 1, 1)
    x_s, tx_s = _map_jvp(lambda x, s: x * flow_input_scale(s), (hidden_states, s_b11), (t_hidden_states, ts_b11))
    x_s, tx_s = x_s.to(prompt_dtype), tx_s.to(prompt_dtype)
    s_embed, ts_embed = (s, ts) if not model.config.get("time_embedding_fp32", False) else _map_jvp(
        trigflow_to_flow_time, (t.float(),), (tt.float(),))  # TrigFlowStudent.embedding_time, with its tangent
    v, tv = flux_forward_jvp(model, x_s, tx_s, encoder_hidden_states, pooled_projections, s_embed, ts_embed, img_ids,
                             txt_ids, guidance=guidance)
    velocity, t_velocity = _map_jvp(flow_to_trigflow_velocity, (x_s, v, s_b11), (tx_s, tv, ts_b11))
    if return_logvar:
        return velocity, t_velocity, model.logvar(t, pooled_projections, guidance)
    return velocity, t_velocity
