"""The pure-PyTorch references: hand-written tangents equal torch.func.jvp (float64), and the primal ops reproduce
what the reference system's modules compute (diffusers FLUX modules, bit for bit in bf16)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from t2i_kernels import reference as ref
from t2i_kernels.testing import REFERENCE_JVP_ATOL
from tests.helpers import make

F64 = torch.float64
CPU = torch.device("cpu")


def _rope_tables(n: int, d: int, dtype=torch.float32):
    """FLUX-style cos/sin (N, D): each frequency repeated for the two members of its pair."""
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None, :]
    return (angles.cos().repeat_interleave(2, dim=-1).to(dtype), angles.sin().repeat_interleave(2, dim=-1).to(dtype))


def _jvp_cases():
    """(name, primal fn, analytic jvp fn, primals, tangents); constants are closed over, as in the student."""
    b, h, n, nk, d, dm = 2, 3, 7, 5, 8, 12
    q, k, v = make((b, h, n, d), F64, CPU), make((b, h, nk, d), F64, CPU), make((b, h, nk, d), F64, CPU)
    tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
    x = make((b, n, dm), F64, CPU, scale=3.0) + 0.5
    tx = torch.randn_like(x)
    w = make((dm,), F64, CPU)
    scale, shift = make((b, dm), F64, CPU), make((b, dm), F64, CPU)
    tscale, tshift = torch.randn_like(scale), torch.randn_like(shift)
    gate, tgate, y, ty = make((b, dm), F64, CPU), make((b, dm), F64, CPU), make((b, n, dm), F64, CPU), None
    ty = torch.randn_like(y)
    xr = make((b, h, n, d), F64, CPU)
    cos, sin = _rope_tables(n, d, F64)
    return [
        ("attention", lambda q, k, v: ref.attention(q, k, v, 0.37),
         lambda q, k, v, tq, tk, tv: ref.attention_jvp(q, k, v, tq, tk, tv, 0.37), (q, k, v), (tq, tk, tv)),
        ("rms_norm", lambda x: ref.rms_norm(x, w), lambda x, tx: ref.rms_norm_jvp(x, tx, w), (x,), (tx,)),
        ("layer_norm_modulate", lambda x, s, sh: ref.layer_norm_modulate(x, s, sh),
         lambda x, s, sh, tx, ts, tsh: ref.layer_norm_modulate_jvp(x, tx, s, ts, sh, tsh),
         (x, scale, shift), (tx, tscale, tshift)),
        ("layer_norm_modulate_shared", lambda x, s, sh: ref.layer_norm_modulate(x, s, sh),
         lambda x, s, sh, tx, ts, tsh: ref.layer_norm_modulate_jvp(x, tx, s, ts, sh, tsh),
         (x, scale[0], shift[0]), (tx, tscale[0], tshift[0])),
        ("rope", lambda x: ref.rope(x, cos, sin), lambda x, tx: ref.rope_jvp(x, tx, cos, sin),
         (xr,), (torch.randn_like(xr),)),
        ("gelu_tanh", ref.gelu_tanh, ref.gelu_tanh_jvp, (x,), (tx,)),
        ("gated_residual", ref.gated_residual,
         lambda x, g, y, tx, tg, ty: ref.gated_residual_jvp(x, tx, g, tg, y, ty), (x, gate, y), (tx, tgate, ty)),
    ]


@pytest.mark.parametrize("case", _jvp_cases(), ids=lambda c: c[0])
def test_analytic_tangent_equals_func_jvp_float64(case):
    _, primal_fn, jvp_fn, primals, tangents = case
    out, tout = torch.func.jvp(primal_fn, primals, tangents)
    mine_out, mine_tout = jvp_fn(*primals, *tangents)
    assert mine_out.dtype == mine_tout.dtype == F64
    torch.testing.assert_close(mine_out, out, atol=REFERENCE_JVP_ATOL, rtol=0)
    torch.testing.assert_close(mine_tout, tout, atol=REFERENCE_JVP_ATOL, rtol=0)


def test_missing_tangents_count_as_zero():
    x, gate, y = make((2, 5, 6), F64, CPU), make((2, 6), F64, CPU), make((2, 5, 6), F64, CPU)
    ty = torch.randn_like(y)
    _, tout = ref.gated_residual_jvp(x, None, gate, None, y, ty)
    torch.testing.assert_close(tout, gate[:, None] * ty, atol=0, rtol=0)
    s, sh = make((2, 6), F64, CPU), make((2, 6), F64, CPU)
    tx = torch.randn_like(x)
    _, t_all = ref.layer_norm_modulate_jvp(x, tx, s, torch.zeros_like(s), sh, torch.zeros_like(sh))
    _, t_none = ref.layer_norm_modulate_jvp(x, tx, s, None, sh, None)
    torch.testing.assert_close(t_none, t_all, atol=0, rtol=0)


# ---- the primal references reproduce the reference system's modules -------------------------------------------
def test_attention_matches_math_sdpa_and_the_vanilla_processor():
    q, k, v = (make((2, 3, 9, 16), torch.float32, CPU) for _ in range(3))
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    torch.testing.assert_close(ref.attention(q, k, v), expected, atol=1e-5, rtol=1e-5)
    # The reference processor's exact op order, bf16: scale applied after the matmul, +0 bias, softmax, matmul.
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    w = qb @ kb.transpose(-2, -1) * (1 / math.sqrt(16))
    w += torch.zeros(9, 9, dtype=torch.bfloat16)
    expected_bf16 = torch.dropout(torch.softmax(w, dim=-1), 0.0, train=True) @ vb
    assert torch.equal(ref.attention(qb, kb, vb), expected_bf16)


def test_rms_norm_matches_diffusers_rmsnorm_bitwise():
    from diffusers.models.normalization import RMSNorm

    for dtype in (torch.bfloat16, torch.float32):
        module = RMSNorm(128, eps=1e-6).to(dtype)
        with torch.no_grad():
            module.weight.copy_(torch.randn(128))
        x = make((2, 3, 11, 128), dtype, CPU, scale=4.0)
        assert torch.equal(ref.rms_norm(x, module.weight.detach()), module(x).detach())


def test_layer_norm_modulate_matches_diffusers_adaln_zero_bitwise():
    from diffusers.models.normalization import AdaLayerNormZero

    dim = 48
    module = AdaLayerNormZero(dim).to(torch.bfloat16)
    x = make((2, 13, dim), torch.bfloat16, CPU, scale=2.0)
    emb = make((2, dim), torch.bfloat16, CPU)
    with torch.no_grad():
        out, *_ = module(x, emb=emb)
        shift, scale, *_ = module.linear(module.silu(emb)).chunk(6, dim=1)
    assert torch.equal(ref.layer_norm_modulate(x, scale, shift), out)


def test_rope_matches_diffusers_apply_rotary_emb_bitwise():
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = _rope_tables(10, 32)
    x = make((2, 3, 10, 32), torch.bfloat16, CPU, scale=3.0)
    assert torch.equal(ref.rope(x, cos, sin), apply_rotary_emb(x, (cos, sin), sequence_dim=2))


def test_gelu_and_gated_residual_match_the_flux_expressions_bitwise():
    x = make((2, 7, 40), torch.bfloat16, CPU, scale=3.0)
    assert torch.equal(ref.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    gate, y = make((2, 40), torch.bfloat16, CPU), make((2, 7, 40), torch.bfloat16, CPU)
    attn_output = gate.unsqueeze(1) * y  # FluxTransformerBlock: gate first, then the residual add
    assert torch.equal(ref.gated_residual(x, gate, y), x + attn_output)


@pytest.mark.parametrize("name", ["attention", "rms_norm", "layer_norm_modulate", "gelu_tanh", "gated_residual"])
def test_upcast_keeps_dtype_and_is_closer_to_truth(name):
    b, n, d = 2, 33, 64
    if name == "attention":
        args = [make((b, 2, n, d), torch.bfloat16, CPU, scale=2.0) for _ in range(3)]
    elif name == "rms_norm":
        args = [make((b, n, d), torch.bfloat16, CPU, scale=3.0), make((d,), torch.bfloat16, CPU)]
    elif name == "layer_norm_modulate":
        args = [make((b, n, d), torch.bfloat16, CPU, scale=3.0), make((b, d), torch.bfloat16, CPU),
                make((b, d), torch.bfloat16, CPU)]
    elif name == "gelu_tanh":
        args = [make((b, n, d), torch.bfloat16, CPU, scale=3.0)]
    else:
        args = [make((b, n, d), torch.bfloat16, CPU), make((b, d), torch.bfloat16, CPU),
                make((b, n, d), torch.bfloat16, CPU)]
    fn = getattr(ref, name)
    truth = fn(*[a.double() for a in args])
    plain, upcast = fn(*args), fn(*args, upcast=True)
    assert upcast.dtype == plain.dtype == torch.bfloat16
    err_plain = (plain.double() - truth).abs().mean()
    err_upcast = (upcast.double() - truth).abs().mean()
    assert err_upcast <= err_plain
