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
tangent; this function relies on that.

Gradient checkpointing (``model.enable_gradient_checkpointing()``, honoured with grad enabled): each transformer block's
dual pass runs without grad and keeps only the block's primal inputs (:class:`_CheckpointedBlock`); the backward
recomputes the block's **primal only** (the same helpers with every tangent ``None``: the plain kernels, one GEMM per
linear, no tangent work at all) and backpropagates through it. The blocks' AdaLN vectors (small linears of the time
embedding) stay outside the checkpoint, in the ordinary graph. Loss and tangent are the unchecked pass's bit for bit,
and so are the gradients where the recompute's primal is the forward's (tested on the CPU); the exceptions are
rounding: LoRA layers (whose forward graph comes from ``torch.func.jvp``, so some gradient sums run in another order)
and, on a GPU, a primal-only kernel the autotuner may tile otherwise than its fused ``*_jvp`` twin (attention).
Conditioning, embedders and the output layer are not checkpointed (they are small).

Limits: FLUX models in diffusers' layout (double + single blocks), head dims the attention kernel supports, no
attention masks, unfused QKV projections. LoRA (peft/diffusers ``add_adapter``) and other wrapped linears are
supported: see :func:`dual_linear`. The pass calls each block's submodules, not ``block.forward``; a block that FSDP2
shards on its own is called through ``Module.__call__`` with the dual step as its forward, so that FSDP2's hooks
all-gather, reshard and reduce-scatter it as in any forward (:func:`_through_module_call`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import t2i_kernels
from t2i_distill.models.trigflow import flow_input_scale, flow_to_trigflow_velocity, trigflow_to_flow_time
from t2i_kernels.attention import SUPPORTED_HEAD_DIMS

__all__ = ["dual_linear", "flux_forward_jvp", "trigflow_forward_jvp"]

Pair = tuple[torch.Tensor, torch.Tensor]
#: A pair whose tangent may be ``None``: the primal-only recompute of a checkpointed block (no tangent work at all).
MaybePair = tuple[torch.Tensor, torch.Tensor | None]

#: ``.separate_gemms`` is True while a checkpointed block runs its dual pass without grad (:class:`_CheckpointedBlock`):
#: plain linears then take the with-grad path's separate primal GEMM, whose value is what the unchecked pass and the
#: recompute compute. Thread-local (a ``threading.local``, which Dynamo traces; it does not trace ``ContextVar.get``).
_STATE = threading.local()


@contextlib.contextmanager
def _separate_gemms() -> Iterator[None]:
    previous = getattr(_STATE, "separate_gemms", False)
    _STATE.separate_gemms = True
    try:
        yield
    finally:
        _STATE.separate_gemms = previous


def dual_linear(linear: torch.nn.Module, x: torch.Tensor, tx: torch.Tensor | None) -> MaybePair:
    """``(linear(x), W·tx)`` for x, tx (..., in) → (..., out) in x's dtype; the tangent carries no graph.

    A plain ``nn.Linear``: without grad one GEMM on ``[x; tx]`` (the weight is read once); with grad the primal GEMM
    records its graph and the tangent GEMM runs without one (a shared GEMM would backpropagate through the tangent
    rows too). Anything else in a linear's place (a peft/diffusers LoRA layer ``base(x) + s·B(A(drop(x)))``, a
    quantised or other wrapped linear) is differentiated as it computes: ``torch.func.jvp`` of the module, primal
    and tangent in one call so both see the same dropout mask; its ``.weight`` alone would drop the adapter.

    ``tx=None`` gives the primal alone, ``(linear(x), None)``: a checkpointed block's recompute in the backward.
    """
    if tx is None:
        return linear(x), None
    if type(linear) is not torch.nn.Linear:
        y, ty = torch.func.jvp(linear, (x,), (tx.to(x.dtype),))
        return y, ty.detach()
    if torch.is_grad_enabled() or getattr(_STATE, "separate_gemms", False):
        # separate_gemms: a checkpointed block's no-grad forward. [x; tx] in one GEMM may round x's rows otherwise
        # than linear(x) (another kernel for another M; the bias added after), and the recompute runs linear(x).
        y = linear(x)
        with torch.no_grad():
            ty = F.linear(tx.to(x.dtype), linear.weight)
        return y, ty
    both = F.linear(torch.cat([x, tx.to(x.dtype)], dim=0), linear.weight)
    y, ty = both.split(x.shape[0], dim=0)
    return (y + linear.bias if linear.bias is not None else y), ty


# Every helper below takes (primal, tangent) pairs; a tangent of None (all of them None together: the primal-only
# recompute of a checkpointed block) runs the primal alone, through the plain kernel. A plain kernel computes its
# primal with the same code as its ``*_jvp`` twin (the same Triton kernel with the tangent switched off; attention:
# the same loop without the tangent accumulators), so the recompute reproduces the forward's primal (bit for bit
# under the interpreter; on a GPU where autotuning picks the same tiles).
def _silu_jvp(x: torch.Tensor, tx: torch.Tensor | None) -> MaybePair:
    """SiLU and its tangent ``σ(x)(1 + x(1 − σ(x)))·tx``; the tangent without graph."""
    y = F.silu(x)
    if tx is None:
        return y, None
    with torch.no_grad():
        sig = torch.sigmoid(x)
        ty = sig * (1 + x * (1 - sig)) * tx
    return y, ty


def _adaln_chunks(norm: torch.nn.Module, temb: MaybePair, chunks: int, cast_to: torch.dtype | None = None):
    """The AdaLN linear of ``norm`` on ``silu(temb)``, split into ``chunks`` (primal, tangent) pairs."""
    s, ts = _silu_jvp(*temb)
    if cast_to is not None:  # AdaLayerNormContinuous casts the SiLU output to x's dtype
        s, ts = s.to(cast_to), (None if ts is None else ts.to(cast_to))
    emb, temb_t = dual_linear(norm.linear, s, ts)
    return list(zip(emb.chunk(chunks, dim=1), [None] * chunks if temb_t is None else temb_t.chunk(chunks, dim=1)))


def _ln_modulate(norm_eps: float, x: MaybePair, scale: MaybePair, shift: MaybePair) -> MaybePair:
    if x[1] is None:
        return t2i_kernels.layer_norm_modulate(x[0], scale[0], shift[0], eps=norm_eps), None
    return t2i_kernels.layer_norm_modulate_jvp(x[0], x[1], scale[0], scale[1], shift[0], shift[1], eps=norm_eps)


def _residual(x: MaybePair, gate: MaybePair, y: MaybePair) -> MaybePair:
    if x[1] is None:
        return t2i_kernels.gated_residual(x[0], gate[0], y[0]), None
    return t2i_kernels.gated_residual_jvp(x[0], x[1], gate[0], gate[1], y[0], y[1])


def _gelu(x: MaybePair) -> MaybePair:
    if x[1] is None:
        return t2i_kernels.gelu_tanh(x[0]), None
    return t2i_kernels.gelu_tanh_jvp(*x)


def _qk_norm_rope(x: MaybePair, norm: torch.nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> MaybePair:
    if x[1] is None:
        return t2i_kernels.qk_norm_rope(x[0], norm.weight, cos, sin, eps=float(norm.eps)), None
    return t2i_kernels.qk_norm_rope_jvp(*x, norm.weight, cos, sin, eps=float(norm.eps))


def _slice(x: MaybePair, index) -> MaybePair:
    return x[0][index], (None if x[1] is None else x[1][index])


def _cat(pairs: list[MaybePair], dim: int) -> MaybePair:
    """The pairs concatenated along ``dim`` (a single pair as it is)."""
    if len(pairs) == 1:
        return pairs[0]
    tangents = [t for _, t in pairs]
    return (torch.cat([p for p, _ in pairs], dim=dim),
            None if tangents[0] is None else torch.cat(tangents, dim=dim))


def _feed_forward(ff: torch.nn.Module, x: MaybePair) -> MaybePair:
    """diffusers FeedForward: GELU(proj) → dropout (p = 0 in FLUX, an identity) → linear."""
    h = _gelu(dual_linear(ff.net[0].proj, *x))
    return dual_linear(ff.net[2], *h)


def _attention(attn: torch.nn.Module, streams: list[tuple[MaybePair, torch.nn.Module, torch.nn.Module, tuple]],
               rotary: tuple[torch.Tensor, torch.Tensor]) -> MaybePair:
    """Joint attention over the concatenated streams [(x, norm_q, norm_k, (to_q, to_k, to_v)) ...] (text first).

    Returns the attention output and its tangent as (B, L, H·D)."""
    if attn.head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flux_forward_jvp: head dim {attn.head_dim} is not supported by the attention kernel "
                         f"{SUPPORTED_HEAD_DIMS}")
    if getattr(attn, "fused_projections", False):
        raise ValueError("flux_forward_jvp: fused QKV projections are not supported; call unfuse_qkv_projections()")
    cos, sin = rotary
    qs, ks, vs, start = [], [], [], 0
    for x, norm_q, norm_k, (to_q, to_k, to_v) in streams:
        n = x[0].shape[1]
        c, s = cos[start:start + n], sin[start:start + n]
        qs.append(_qk_norm_rope(dual_linear(to_q, *x), norm_q, c, s))
        ks.append(_qk_norm_rope(dual_linear(to_k, *x), norm_k, c, s))
        vs.append(dual_linear(to_v, *x))
        start += n

    (q, tq), (k, tk), (v, tv) = _cat(qs, 2), _cat(ks, 2), _cat(vs, 1)

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, H·D) → (B, H, L, D)
        return t.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)

    if tq is None:
        return t2i_kernels.attention(q, k, heads(v)).transpose(1, 2).flatten(2), None
    o, to = t2i_kernels.attention_jvp(q, k, heads(v), tq, tk, heads(tv))
    return o.transpose(1, 2).flatten(2), to.transpose(1, 2).flatten(2)


def _double_modulation(block, temb: MaybePair) -> list[MaybePair]:
    """A ``FluxTransformerBlock``'s 12 AdaLN vectors (shift, scale, gate of attention and MLP; image, then text)."""
    return _adaln_chunks(block.norm1, temb, 6) + _adaln_chunks(block.norm1_context, temb, 6)


def _double_body(block, hidden: MaybePair, encoder: MaybePair, modulation: list[MaybePair],
                 rotary) -> tuple[MaybePair, MaybePair]:
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
     c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = modulation
    norm_h = _ln_modulate(block.norm1.norm.eps, hidden, scale_msa, shift_msa)
    norm_c = _ln_modulate(block.norm1_context.norm.eps, encoder, c_scale_msa, c_shift_msa)
    attn = block.attn
    joint = _attention(attn, [
        (norm_c, attn.norm_added_q, attn.norm_added_k, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)),
        (norm_h, attn.norm_q, attn.norm_k, (attn.to_q, attn.to_k, attn.to_v)),
    ], rotary)
    text_len = encoder[0].shape[1]
    ctx_out = _slice(joint, (slice(None), slice(None, text_len)))
    img_out = _slice(joint, (slice(None), slice(text_len, None)))

    hidden = _residual(hidden, gate_msa, dual_linear(attn.to_out[0], *img_out))
    norm_h = _ln_modulate(block.norm2.eps, hidden, scale_mlp, shift_mlp)
    hidden = _residual(hidden, gate_mlp, _feed_forward(block.ff, norm_h))

    encoder = _residual(encoder, c_gate_msa, dual_linear(attn.to_add_out, *ctx_out))
    norm_c = _ln_modulate(block.norm2_context.eps, encoder, c_scale_mlp, c_shift_mlp)
    encoder = _residual(encoder, c_gate_mlp, _feed_forward(block.ff_context, norm_c))
    return encoder, hidden


def double_block_jvp(block, hidden: MaybePair, encoder: MaybePair, temb: MaybePair,
                     rotary) -> tuple[MaybePair, MaybePair]:
    """One ``FluxTransformerBlock`` on (image, text) streams with tangents; returns (encoder, hidden) pairs."""
    return _double_body(block, hidden, encoder, _double_modulation(block, temb), rotary)


def _single_modulation(block, temb: MaybePair) -> list[MaybePair]:
    """A ``FluxSingleTransformerBlock``'s 3 AdaLN vectors (shift, scale, gate)."""
    return _adaln_chunks(block.norm, temb, 3)


def _single_body(block, hidden: MaybePair, encoder: MaybePair, modulation: list[MaybePair],
                 rotary) -> tuple[MaybePair, MaybePair]:
    shift, scale, gate = modulation
    text_len = encoder[0].shape[1]
    x = _cat([encoder, hidden], dim=1)
    norm_x = _ln_modulate(block.norm.norm.eps, x, scale, shift)
    mlp = _gelu(dual_linear(block.proj_mlp, *norm_x))
    attn = block.attn
    attn_out = _attention(attn, [(norm_x, attn.norm_q, attn.norm_k, (attn.to_q, attn.to_k, attn.to_v))], rotary)
    projected = dual_linear(block.proj_out, *_cat([attn_out, mlp], dim=2))
    out = _residual(x, gate, projected)
    return _slice(out, (slice(None), slice(None, text_len))), _slice(out, (slice(None), slice(text_len, None)))


def single_block_jvp(block, hidden: MaybePair, encoder: MaybePair, temb: MaybePair,
                     rotary) -> tuple[MaybePair, MaybePair]:
    """One ``FluxSingleTransformerBlock`` on the joint [text; image] stream with tangents."""
    return _single_body(block, hidden, encoder, _single_modulation(block, temb), rotary)


class _CheckpointedBlock(torch.autograd.Function):
    """The body of one block's dual pass, checkpointed so that the backward recomputes its **primal only**.

    ``apply(body, block, n, h, th, e, te, cos, sin, *modulation, *params)`` → ``(e, te, h, th)`` as ``body`` (one of
    the ``_*_body``) computes them from the block's ``n`` AdaLN pairs, ``modulation`` = their n primals then their n
    tangents (computed outside, by the ordinary graph: (B, D) vectors, so the time embedding's gradient sums its
    per-block terms exactly as the unchecked pass does). The forward runs the dual pass without grad, with the
    with-grad path's separate primal GEMMs (:func:`_separate_gemms`), and saves the primal inputs only (the tangents
    are neither saved nor differentiable). The backward reruns ``body`` with every tangent ``None`` under grad, on the
    saved inputs, with the forward's RNG and autocast state (a LoRA dropout mask comes out the same), and returns the
    gradients of the primal inputs and of ``params`` (the block's parameters).

    Why not ``torch.utils.checkpoint`` (non-reentrant) with a primal-only recompute: its recompute must save the
    forward's saved tensors one for one, and a forward with grad also saves for the tangent work: ``torch.func.jvp``
    of a peft LoRA linear (:func:`dual_linear`) saves 12 tensors where ``linear(x)`` saves 5, so the recompute fails
    the count check, unless it redoes the tangent, the work this class exists to skip. It would also keep each
    block's tangent inputs alive as checkpoint inputs. Why the parameters are inputs: their gradients then come out
    of this node and the outer backward accumulates them, where DDP's and FSDP2's gradient hooks (and DDP's search
    for unused parameters from the loss) see them, not a nested ``backward()`` as in reentrant checkpointing.
    """

    @staticmethod
    def forward(ctx, body, block, n, h, th, e, te, cos, sin, *rest):
        modulation = list(zip(rest[:n], rest[n:2 * n]))
        ctx.body, ctx.block, ctx.n, ctx.params = body, block, n, rest[2 * n:]
        ctx.rng = _rng_state(h)
        ctx.autocast = _autocast_state(h.device.type)
        ctx.save_for_backward(h, e, cos, sin, *rest[:n])
        with _separate_gemms():
            (e, te), (h, th) = body(block, (h, th), (e, te), modulation, (cos, sin))
        ctx.mark_non_differentiable(te, th)
        return e, te, h, th

    @staticmethod
    def backward(ctx, grad_e, _grad_te, grad_h, _grad_th):
        n, needs = ctx.n, ctx.needs_input_grad
        primal_needs = (needs[3], needs[5], needs[7], needs[8], *needs[9:9 + n])  # h, e, cos, sin, modulation
        param_needs = needs[9 + 2 * n:]
        current = list(ctx.block.parameters())
        if len(current) != len(ctx.params) or any(p is not q for p, q in zip(current, ctx.params)):
            raise RuntimeError("flux_forward_jvp: a checkpointed block's parameters were replaced between its "
                               "forward and backward; its recompute would differentiate other tensors")
        inputs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, primal_needs)]
        h, e, cos, sin, *modulation = inputs
        with torch.enable_grad(), _restored_rng(ctx.rng), _autocast(ctx.autocast):
            (e_out, _), (h_out, _) = ctx.body(ctx.block, (h, None), (e, None), [(m, None) for m in modulation],
                                              (cos, sin))
        outputs, grads = [], []
        for out, grad in ((e_out, grad_e), (h_out, grad_h)):
            if grad is not None and out.requires_grad:
                outputs.append(out)
                grads.append(grad)
        wanted = [x for x in inputs if x.requires_grad] + [p for p, need in zip(ctx.params, param_needs) if need]
        found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True) if outputs and wanted else
                     [None] * len(wanted))
        h_grad, e_grad, cos_grad, sin_grad, *modulation_grads = [next(found) if x.requires_grad else None
                                                                  for x in inputs]
        param_grads = [next(found) if need else None for need in param_needs]
        return (None, None, None, h_grad, None, e_grad, None, cos_grad, sin_grad, *modulation_grads,
                *([None] * n), *param_grads)


def _checkpointed_block(body, block, hidden: Pair, encoder: Pair, modulation: list[Pair],
                        rotary) -> tuple[Pair, Pair]:
    primals, tangents = zip(*modulation)
    e, te, h, th = _CheckpointedBlock.apply(body, block, len(modulation), *hidden, *encoder, *rotary, *primals,
                                            *tangents, *block.parameters())
    return (e, te), (h, th)


def _is_fsdp_unit(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def _through_module_call(block: torch.nn.Module, run: Callable, hidden: Pair, encoder: Pair,
                         temb: Pair) -> tuple[Pair, Pair]:
    """``run(block, hidden, encoder, temb)``, as the block's own ``forward`` when FSDP2 shards the block.

    Why: FSDP2 acts in ``Module.__call__``'s hooks: the pre-forward hook all-gathers the block's parameters (and casts
    its floating inputs to the compute dtype) and registers the post-backward reduce-scatter on the inputs; the
    post-forward hook reshards and registers the pre-backward all-gather on the outputs. The dual pass calls the
    block's submodules, so a block sharded on its own (the engine's per-block ``fully_shard``) would otherwise keep
    its parameters sharded here. For this one call the dual step is the block's ``forward`` (an instance attribute
    shadows the class's). The rotary embedding stays in ``run``'s closure, uncast, as in the unsharded pass. Other
    blocks are called directly: hooks that expect the block's own signature never see a dual call."""
    if not _is_fsdp_unit(block):
        return run(block, hidden, encoder, temb)
    missing = object()
    previous = block.__dict__.get("forward", missing)
    block.forward = lambda hidden, encoder, temb: run(block, hidden, encoder, temb)
    try:
        return block(hidden, encoder, temb)
    finally:
        if previous is missing:
            del block.forward
        else:
            block.forward = previous


def _rng_state(like: torch.Tensor) -> tuple:
    """The CPU RNG state and that of the accelerator ``like`` is on (what the recompute restores)."""
    devices, states = torch.utils.checkpoint.get_device_states(like)
    return torch.get_rng_state(), devices, states, like.device.type


@contextlib.contextmanager
def _restored_rng(state: tuple) -> Iterator[None]:
    cpu, devices, states, device_type = state
    fork_type = device_type if device_type != "cpu" else "cuda"  # fork_rng's default; no devices are forked then
    with torch.random.fork_rng(devices=devices, device_type=fork_type):
        torch.set_rng_state(cpu)
        if devices:
            torch.utils.checkpoint.set_device_states(devices, states, device_type=device_type)
        yield


def _autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype, bool]]:
    return [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), torch.is_autocast_cache_enabled())
            for kind in dict.fromkeys((device_type, "cpu"))]


@contextlib.contextmanager
def _autocast(state: list[tuple[str, bool, torch.dtype, bool]]) -> Iterator[None]:
    """The forward's autocast state (the backward runs outside the caller's ``torch.autocast``)."""
    with contextlib.ExitStack() as stack:
        for kind, enabled, dtype, cache in state:
            stack.enter_context(torch.autocast(kind, enabled=enabled, dtype=dtype, cache_enabled=cache))
        yield


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
    directly). Equals ``torch.func.jvp`` of ``model.forward`` up to rounding; see the module docstring for autograd
    and gradient checkpointing.
    """
    hidden = dual_linear(model.x_embedder, hidden_states, t_hidden_states)
    temb = _conditioning_jvp(model, timestep, t_timestep, pooled_projections, guidance, timestep2, t_timestep2,
                             hidden[0].dtype)
    encoder_primal = model.context_embedder(encoder_hidden_states)
    encoder = (encoder_primal, torch.zeros_like(encoder_primal))  # text enters without a tangent
    rotary = model.rotary_embedding(img_ids, txt_ids)
    # Gradient checkpointing (``model.enable_gradient_checkpointing()``, as FluxStudent.forward honours it): each
    # block's dual pass keeps only its primal inputs, and the backward recomputes the block's primal alone (the
    # tangents are detached, so nothing differentiates them): see _CheckpointedBlock.
    checkpointed = torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False)
    stages = ((double_block_jvp, _double_modulation, _double_body, model.transformer_blocks),
              (single_block_jvp, _single_modulation, _single_body, model.single_transformer_blocks))
    for step, modulation, body, blocks in stages:
        if checkpointed:
            def run(block, hidden, encoder, temb, body=body, modulation=modulation):
                return _checkpointed_block(body, block, hidden, encoder, modulation(block, temb), rotary)
        else:
            def run(block, hidden, encoder, temb, step=step):
                return step(block, hidden, encoder, temb, rotary)
        for block in blocks:
            encoder, hidden = _through_module_call(block, run, hidden, encoder, temb)
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
