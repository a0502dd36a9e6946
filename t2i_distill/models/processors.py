"""A diffusers attention processor for FLUX that runs our Triton kernels: fused qk-RMSNorm + RoPE, JVP attention.

Installed with ``model.set_attn_processor(FluxKernelAttnProcessor(...))`` (diffusers' public seam), usually through
:func:`t2i_distill.apply_kernels_to_flux`. Same call signature and outputs as diffusers' ``FluxAttnProcessor``.

Per call, with the text stream (B, Lt, H·D) and image stream (B, Li, H·D) projections (double blocks) or the joint
stream (single blocks)::

    q, k  = qk_norm_rope(proj, norm.weight, cos, sin)     (B, H, N, D), one pass each instead of ≥ 4
    v     = proj.unflatten(-1, (H, D)).transpose(1, 2)    a view, no copy
    out   = attention(q, k, v)                            (B, H, L, D) in (B, L, H, D) memory → flatten(2) is free

Under forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) every step has a Triton tangent rule. In an
ordinary training pass (no forward-mode AD on a GPU) ``training_attention="auto"`` uses PyTorch's SDPA
(flash/cuDNN), the fastest exact attention with a backward; ``"kernel"`` forces ours.

Anything the kernels cannot serve falls back, for that call, to diffusers' own ``FluxAttnProcessor`` with one warning
naming the reason: an attention mask, no rotary embedding, qk-norms without a weight, a head dim the attention kernel
does not support, IP-adapter inputs, context parallelism. The fallback is exact and stays forward-differentiable: under
forward-mode AD it runs diffusers' math attention backend (SDPA's fused kernels have no forward-AD rule), otherwise the
attention backend the model is set to.

Attention backends (``model.set_attention_backend(name)``, diffusers' ``attention_backend`` context) select the
attention of every call our kernel does not run: SDPA passes (``training_attention="sdpa"``, or ``"auto"`` on CUDA,
without forward-mode AD), ``attention=False`` and the fallbacks. Passes under forward-mode AD always run our kernel
(or math attention), because no backend has a forward-AD rule.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.autograd.forward_ad as fwAD
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

import t2i_kernels
from t2i_kernels.attention import SUPPORTED_HEAD_DIMS

logger = logging.getLogger(__name__)

__all__ = ["FluxKernelAttnProcessor", "forward_mode_active"]

TRAINING_ATTENTION_CHOICES = ("auto", "kernel", "sdpa")
#: qk-norm modules the fused kernel reproduces (diffusers 0.42 FLUX uses torch's; older code used diffusers').
_RMS_NORMS = (torch.nn.RMSNorm, DiffusersRMSNorm)


def forward_mode_active(*tensors: torch.Tensor) -> bool:
    """Whether any tensor carries a forward-mode tangent (functorch-wrapped, e.g. inside ``torch.func.jvp``, or a
    dual tensor of ``torch.autograd.forward_ad``). Then attention must be ours: SDPA has no forward-AD rule.

    While ``torch.compile`` traces, this cannot be asked (Dynamo does not trace functorch's introspection), so the
    answer is a conservative True: our kernel and math attention are exact with and without forward-mode AD."""
    from torch._C._functorch import is_functorch_wrapped_tensor

    if torch.compiler.is_compiling():
        return True
    for t in tensors:
        if is_functorch_wrapped_tensor(t) or fwAD.unpack_dual(t).tangent is not None:
            return True
    return False


class FluxKernelAttnProcessor(torch.nn.Module):
    """FLUX attention through Triton: ``qk_norm`` fuses RMSNorm + RoPE + head transpose; ``attention`` uses the JVP
    flash attention. An ``nn.Module`` without parameters so ``print(model)`` shows it and ``state_dict`` is unchanged.
    """

    # diffusers' set_attention_backend / enable_parallelism set these on every processor that declares them.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, attention: bool = True, qk_norm: bool = True, training_attention: str = "auto") -> None:
        super().__init__()
        if training_attention not in TRAINING_ATTENTION_CHOICES:
            raise ValueError(
                f"`training_attention`: expected one of {TRAINING_ATTENTION_CHOICES}, got {training_attention!r}"
            )
        self.attention = attention
        self.qk_norm = qk_norm
        self.training_attention = training_attention
        self._fallback = FluxAttnProcessor()
        self._warned: set[str] = set()

    def extra_repr(self) -> str:
        return (f"attention={'triton' if self.attention else 'sdpa'}, "
                f"qk_norm_rope={'triton' if self.qk_norm else 'eager'}, training_attention={self.training_attention}")

    # -- fallbacks ------------------------------------------------------------------------------------------------
    def unsupported_reason(self, attn, attention_mask, image_rotary_emb, kwargs) -> str | None:
        """Why this call cannot run on the kernels (None when it can)."""
        if attention_mask is not None:
            return "an attention mask was given (the kernels implement unmasked attention only)"
        if kwargs:
            return f"extra processor inputs {sorted(kwargs)} (e.g. IP-adapter) are not supported"
        if self._parallel_config is not None:
            return "context parallelism is enabled (the kernels attend within one device's sequence only)"
        if self.attention and attn.head_dim not in SUPPORTED_HEAD_DIMS:
            return f"head dim {attn.head_dim} is not supported by the attention kernel {SUPPORTED_HEAD_DIMS}"
        if self.qk_norm:
            if image_rotary_emb is None:
                return "no rotary embedding was given (the fused qk-norm kernel applies RoPE)"
            norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k]
                                                   if attn.added_kv_proj_dim is not None else [])
            if not all(isinstance(n, _RMS_NORMS) for n in norms):
                return f"a qk-norm is not an RMSNorm ({sorted({type(n).__name__ for n in norms})})"
            if any(getattr(n, "weight", None) is None for n in norms):
                return "a qk-norm has no weight (elementwise_affine=False)"
            if any(getattr(n, "eps", None) is None for n in norms):
                return "a qk-norm has eps=None (a dtype-dependent default the kernel does not reproduce)"
        return None

    def _warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"FluxKernelAttnProcessor: falling back to diffusers' FluxAttnProcessor because {reason} "
                          "(math attention under forward-mode AD, the model's attention backend otherwise)",
                          stacklevel=3)

    # -- the processor --------------------------------------------------------------------------------------------
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        reason = self.unsupported_reason(attn, attention_mask, image_rotary_emb, kwargs)
        if reason is not None:
            self._warn_once(reason)
            tangents = forward_mode_active(*(t for t in (hidden_states, encoder_hidden_states) if t is not None))
            self._fallback._attention_backend = AttentionBackendName._NATIVE_MATH if tangents else (
                self._attention_backend)
            self._fallback._parallel_config = self._parallel_config
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                  **kwargs)

        heads_dim = (-1, attn.head_dim)
        if getattr(attn, "fused_projections", False):
            q_B_N_HD, k_B_N_HD, v_B_N_HD = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q_B_N_HD, k_B_N_HD, v_B_N_HD = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        streams = [(q_B_N_HD, k_B_N_HD, v_B_N_HD, attn.norm_q, attn.norm_k)]
        text_len = 0
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            text_len = encoder_hidden_states.shape[1]
            streams.insert(0, (eq, ek, ev, attn.norm_added_q, attn.norm_added_k))  # FLUX order: text first

        if self.qk_norm:
            q_B_H_L_D, k_B_H_L_D = self._qk_norm_rope(streams, image_rotary_emb, text_len)
        else:
            q_B_H_L_D, k_B_H_L_D = self._qk_norm_rope_eager(streams, image_rotary_emb, heads_dim)
        v_B_L_HD = torch.cat([s[2] for s in streams], dim=1) if len(streams) > 1 else streams[0][2]
        v_B_H_L_D = v_B_L_HD.unflatten(-1, heads_dim).transpose(1, 2)

        out_B_H_L_D = self._attention(q_B_H_L_D, k_B_H_L_D, v_B_H_L_D)
        out_B_L_HD = out_B_H_L_D.transpose(1, 2).flatten(2).to(q_B_H_L_D.dtype)

        if text_len:
            context_B_Lt_HD, image_B_Li_HD = out_B_L_HD.split_with_sizes(
                [text_len, out_B_L_HD.shape[1] - text_len], dim=1
            )
            image_B_Li_HD = attn.to_out[1](attn.to_out[0](image_B_Li_HD.contiguous()))
            return image_B_Li_HD, attn.to_add_out(context_B_Lt_HD.contiguous())
        return out_B_L_HD

    def _qk_norm_rope(self, streams, image_rotary_emb, text_len):
        cos, sin = image_rotary_emb
        qs, ks, start = [], [], 0
        for q, k, _, norm_q, norm_k in streams:
            n = q.shape[1]
            c, s = cos[start:start + n], sin[start:start + n]
            qs.append(t2i_kernels.qk_norm_rope(q, norm_q.weight, c, s, eps=_eps(norm_q)))
            ks.append(t2i_kernels.qk_norm_rope(k, norm_k.weight, c, s, eps=_eps(norm_k)))
            start += n
        # The text/image concatenation is one copy of Q and K (the kernel writes one stream per call).
        if len(qs) == 1:
            return qs[0], ks[0]
        return torch.cat(qs, dim=2), torch.cat(ks, dim=2)

    @staticmethod
    def _qk_norm_rope_eager(streams, image_rotary_emb, heads_dim):
        """diffusers' own sequence: unflatten, qk-norm modules, concatenate, RoPE, then the (B, H, L, D) view."""
        qs = [norm_q(q.unflatten(-1, heads_dim)) for q, _, _, norm_q, _ in streams]
        ks = [norm_k(k.unflatten(-1, heads_dim)) for _, k, _, _, norm_k in streams]
        q, k = torch.cat(qs, dim=1), torch.cat(ks, dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2)

    def _attention(self, q, k, v):
        """(B, H, L, D) attention: our kernel, or diffusers' dispatch (the model's backend; math under forward AD)."""
        tangents = forward_mode_active(q, k, v)
        if not self.attention:
            return self._dispatch(q, k, v, AttentionBackendName._NATIVE_MATH if tangents else self._attention_backend)
        wants_sdpa = self.training_attention == "sdpa" or (
            self.training_attention == "auto" and q.device.type == "cuda"
        )
        if wants_sdpa and not tangents:  # SDPA has no forward-AD rule
            return self._dispatch(q, k, v, self._attention_backend)
        return t2i_kernels.attention(q, k, v)

    def _dispatch(self, q, k, v, backend):
        # diffusers' dispatch takes (B, L, H, D); the transposes are views.
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=backend,
                                    parallel_config=self._parallel_config)
        return out.transpose(1, 2)


def _eps(norm: torch.nn.Module) -> float:
    return float(norm.eps)  # never None here: unsupported_reason falls back first
