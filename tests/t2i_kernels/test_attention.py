"""Triton JVP flash attention: o, tangent and dq/dk/dv against float64 truth on ragged shapes and strided views;
the three forward-mode front ends; backward through a JVP's primal; the fp16-operand overflow fallback; bad input.
GPU-marked tests check bf16 parity at FLUX shapes and that new lengths do not recompile."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import t2i_kernels
from t2i_kernels import attention_tuning as tuning
from t2i_kernels import reference as ref
from t2i_kernels.attention import AttentionFunction, AttentionJVPFunction
from t2i_kernels.testing import assert_parity
from tests.conftest import HAS_CUDA
from tests.helpers import assert_bf16_attention_parity, f64, leaves

OP = "attention"
FP32 = torch.float32

# (B, H, Nq, Nk, D): single token, ragged lengths, Nq ≠ Nk both ways, every head dim, B·H > 1.
SHAPES = [
    (2, 2, 1, 1, 32),
    (1, 3, 17, 17, 64),
    (2, 2, 100, 37, 128),
    (1, 2, 37, 257, 32),
    (2, 1, 257, 100, 64),
]
# Many tiles both ways with ragged ends (16 query blocks, 9 key tiles at the interpreter's 64×64); larger shapes
# cost minutes of interpreter time per test and exercise nothing more.
SLOW_SHAPES = [(1, 1, 1000, 520, 128), (2, 1, 1000, 300, 64)]
# The forward loop variants (tuning.VARIANTS) on two small ragged shapes: Nk within one tile, and 5 tiles with a
# ragged last one (PIPELINE's look-ahead and flush trips, MERGE's pair loads past Nk).
VARIANT_SHAPES = [(2, 2, 100, 37, 128), (1, 2, 37, 257, 32)]
LOOP_VARIANTS = [name for name in tuning.VARIANTS if name != "plain"]
# The launchers' module: it holds _INTERPRETER_VARIANT (`t2i_kernels.attention` itself is the function).
_ATTENTION_MODULE = importlib.import_module("t2i_kernels.attention_launch")


def _use_variant(monkeypatch, name):
    """The interpreter runs one fixed config; this picks its loop variant (GPU launches autotune over them)."""
    monkeypatch.setattr(_ATTENTION_MODULE, "_INTERPRETER_VARIANT", name)


def _qkv(b, h, nq, nk, d, device, dtype=FP32, layout="bnhd", scale=1.0):
    """q, k, v and their tangents. "bnhd": (B, N, H, D) memory viewed as (B, H, N, D), FLUX's own layout;
    "sliced": every other element of a twice-as-wide head dim (last stride 1, odd row strides);
    "contiguous": plain (B, H, N, D)."""

    def one(n):
        def draw(*size):  # drawn on the CPU (same values on every device), then laid out on the device
            return (torch.randn(*size) * scale).to(device=device, dtype=dtype)

        if layout == "bnhd":
            return draw(b, n, h, d).transpose(1, 2)
        if layout == "sliced":
            return draw(b, h, n, 2 * d)[..., :d]
        return draw(b, h, n, d)

    q, k, v = one(nq), one(nk), one(nk)
    tq, tk, tv = one(nq), one(nk), one(nk)
    return q, k, v, tq, tk, tv


def _check_forward(shape, device, layout):
    b, h, nq, nk, d = shape
    q, k, v, tq, tk, tv = _qkv(b, h, nq, nk, d, device, layout=layout)
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v, tq, tk, tv))
    torch_o, torch_t = ref.attention_jvp(q, k, v, tq, tk, tv)
    truth_lse = torch.logsumexp(f64(q)[0] @ f64(k)[0].transpose(-1, -2) / math.sqrt(d), dim=-1)
    torch_lse = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)

    o, to, lse = t2i_kernels.attention_jvp(q, k, v, tq, tk, tv, return_lse=True)
    assert o.shape == to.shape == (b, h, nq, d) and lse.shape == (b, h, nq) and lse.dtype == FP32
    assert_parity(OP, "out", o, torch_o, truth_o)
    assert_parity(OP, "tangent", to, torch_t, truth_t)
    assert_parity(OP, "lse", lse, torch_lse, truth_lse)
    assert_parity(OP, "out", t2i_kernels.attention(q, k, v), torch_o, truth_o)

    # The Function's tangent kernel (reusing the LSE) through both forward-mode front ends.
    f_o, f_t = torch.func.jvp(t2i_kernels.attention, (q, k, v), (tq, tk, tv))
    assert_parity(OP, "out", f_o, torch_o, truth_o)
    assert_parity(OP, "tangent", f_t, torch_t, truth_t)
    with fwAD.dual_level():
        dual = t2i_kernels.attention(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))
        d_o, d_t = fwAD.unpack_dual(dual)
    assert torch.equal(d_o, f_o) and torch.equal(d_t, f_t)


def _check_backward(shape, device, layout):
    b, h, nq, nk, d = shape
    q, k, v, *_ = _qkv(b, h, nq, nk, d, device, layout=layout)
    grad = torch.randn(b, h, nq, d, device=device)

    def grads(fn, *inputs):
        ls = leaves(*inputs)
        fn(*ls).backward(grad.to(ls[0].dtype))
        return [t.grad for t in ls]

    truth = grads(ref.attention, *f64(q, k, v))
    same = grads(ref.attention, q, k, v)
    ours = grads(t2i_kernels.attention, q, k, v)
    for name, o, s, t in zip(("dq", "dk", "dv"), ours, same, truth):
        layout_of = torch.empty_like({"dq": q, "dk": k, "dv": v}[name])  # dense inputs keep their layout
        assert o.stride() == layout_of.stride(), "gradients take their input's (dense) layout"
        assert_parity(OP, name, o, s, t)
    # The fused explicit API's primal output backpropagates exactly the same gradients.
    ls = leaves(q, k, v)
    o, to = t2i_kernels.attention_jvp(*ls, None, None, None)
    assert not to.requires_grad
    o.backward(grad)
    for a, e in zip((t.grad for t in ls), ours):
        assert torch.equal(a, e)


@pytest.mark.parametrize("layout", ["bnhd", "sliced", "contiguous"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_tangent(shape, layout, device, poisoned_empty):
    _check_forward(shape, device, layout)


@pytest.mark.parametrize("variant", LOOP_VARIANTS)
@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=str)
def test_loop_variants_forward_and_tangent(shape, variant, device, poisoned_empty, monkeypatch):
    _use_variant(monkeypatch, variant)
    _check_forward(shape, device, "bnhd" if shape[-1] == 128 else "sliced")


def test_merge_variant_is_skipped_when_tangent_strides_differ(device, monkeypatch):
    """MERGE loads K and tK (V and tV) as one tile an element offset apart: a tangent in another layout must fall
    back to separate loads (and merged loads at those offsets would give a different answer)."""
    q, k, v, tq, _, _ = _qkv(1, 2, 40, 70, 64, device)
    tk, tv = torch.randn(1, 2, 70, 64, device=device), torch.randn(1, 2, 70, 64, device=device)  # contiguous
    assert not tuning.merge_applicable(k, v, tk, tv) and tuning.merge_applicable(k, v, tk.transpose(1, 2)
                                                                                   .contiguous().transpose(1, 2), None)
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v, tq, tk, tv))
    torch_o, torch_t = ref.attention_jvp(q, k, v, tq, tk, tv)
    _use_variant(monkeypatch, "pipeline+merge")
    o, to = t2i_kernels.attention_jvp(q, k, v, tq, tk, tv)
    assert_parity(OP, "out", o, torch_o, truth_o)
    assert_parity(OP, "tangent", to, torch_t, truth_t)
    assert tuning.variant_flags("pipeline+merge", False) == {"PIPELINE": True}


@pytest.mark.parametrize("layout", ["bnhd", "sliced"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward(shape, layout, device, poisoned_empty):
    _check_backward(shape, device, layout)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SLOW_SHAPES, ids=str)
def test_long_sequences(shape, device, poisoned_empty):
    _check_forward(shape, device, "bnhd")
    _check_backward(shape, device, "bnhd")


def test_head_dim_256(device):
    q, k, v, tq, tk, tv = _qkv(1, 2, 33, 40, 256, device)
    o, to = t2i_kernels.attention_jvp(q, k, v, tq, tk, tv)
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v, tq, tk, tv))
    torch_o, torch_t = ref.attention_jvp(q, k, v, tq, tk, tv)
    assert_parity(OP, "out", o, torch_o, truth_o)
    assert_parity(OP, "tangent", to, torch_t, truth_t)


def test_explicit_scale(device):
    q, k, v, tq, tk, tv = _qkv(1, 2, 20, 30, 64, device)
    o, to = t2i_kernels.attention_jvp(q, k, v, tq, tk, tv, scale=0.3)
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v, tq, tk, tv), scale=0.3)
    torch_o, torch_t = ref.attention_jvp(q, k, v, tq, tk, tv, scale=0.3)
    assert_parity(OP, "out", o, torch_o, truth_o)
    assert_parity(OP, "tangent", to, torch_t, truth_t)


@pytest.mark.parametrize("present", ["tq", "tk", "tv"])
def test_partial_tangents(present, device):
    q, k, v, tq, tk, tv = _qkv(2, 1, 23, 45, 32, device)
    given = {name: (t if name == present else None) for name, t in (("tq", tq), ("tk", tk), ("tv", tv))}
    _, to = t2i_kernels.attention_jvp(q, k, v, given["tq"], given["tk"], given["tv"])
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v, given["tq"], given["tk"], given["tv"]))
    _, torch_t = ref.attention_jvp(q, k, v, given["tq"], given["tk"], given["tv"])
    assert_parity(OP, "tangent", to, torch_t, truth_t)
    with fwAD.dual_level():  # forward AD where only one input carries a tangent
        args = [fwAD.make_dual(p, t) if t is not None else p for p, t in ((q, given["tq"]), (k, given["tk"]),
                                                                          (v, given["tv"]))]
        dual_t = fwAD.unpack_dual(t2i_kernels.attention(*args)).tangent
    assert_parity(OP, "tangent", dual_t, torch_t, truth_t)


def test_inside_func_jvp_between_plain_pytorch_layers(device):
    """Only attention is ours: the projections before it and the nonlinearity after are ordinary PyTorch."""
    b, h, n, d = 2, 2, 30, 32
    x, tx = torch.randn(b, n, h * d, device=device), torch.randn(b, n, h * d, device=device)
    w = torch.randn(3, h * d, h * d, device=device) / math.sqrt(h * d)

    def block(attn, x):
        q, k, v = (torch.tanh(x @ w[i].to(x.dtype)).unflatten(-1, (h, d)).transpose(1, 2) for i in range(3))
        return torch.sin(attn(q, k, v).transpose(1, 2).flatten(2))

    _, ours = torch.func.jvp(lambda x: block(t2i_kernels.attention, x), (x,), (tx,))
    _, same = torch.func.jvp(lambda x: block(ref.attention, x), (x,), (tx,))
    _, truth = torch.func.jvp(lambda x: block(ref.attention, x), (x.double(),), (tx.double(),))
    assert_parity(OP, "tangent", ours, same, truth)


def test_backward_through_the_primal_of_func_jvp(device):
    q, k, v, tq, tk, tv = _qkv(1, 2, 40, 50, 64, device)
    ours = leaves(q, k, v)
    with torch.enable_grad():
        o, _ = torch.func.jvp(t2i_kernels.attention, tuple(ours), (tq, tk, tv))
    (o * o).sum().backward()
    truth = leaves(*f64(q, k, v))
    (ref.attention(*truth) ** 2).sum().backward()
    same = leaves(q, k, v)
    (ref.attention(*same) ** 2).sum().backward()
    for name, a, s, t in zip(("dq", "dk", "dv"), ours, same, truth):
        assert_parity(OP, name, a.grad, s.grad, t.grad)


def test_very_large_logits_stay_finite(device):
    q, k, v, tq, tk, tv = _qkv(1, 2, 70, 90, 64, device)
    q = q * 300.0  # logits of order 1e3-1e4: exp overflows without the running max
    o, to, lse = t2i_kernels.attention_jvp(q, k, v, tq, tk, tv, return_lse=True)
    assert torch.isfinite(o).all() and torch.isfinite(to).all() and torch.isfinite(lse).all()
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v, tq, tk, tv))
    torch_o, torch_t = ref.attention_jvp(q, k, v, tq, tk, tv)
    assert_parity(OP, "out", o, torch_o, truth_o)
    assert_parity(OP, "tangent", to, torch_t, truth_t)
    ls = leaves(q, k, v)
    t2i_kernels.attention(*ls).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in ls)


def test_fp16_operand_overflow_falls_back_to_exact_operands(device):
    """bf16 inputs use fp16 P·V operands on GPUs. Emulated here in fp32 (operands rounded through fp16): a value
    beyond fp16's range must trigger the per-program recompute, giving the fp32 answer instead of inf/NaN."""
    q, k, v, tq, tk, tv = _qkv(1, 2, 70, 90, 64, device)
    scale = 1 / math.sqrt(64)
    o_plain, _ = AttentionFunction.apply(q, k, v, scale, False)
    o_round, _ = AttentionFunction.apply(q, k, v, scale, True)
    assert not torch.equal(o_round, o_plain), "the fp16 rounding emulation must actually change the operands"
    truth_o = ref.attention(*f64(q, k, v))
    assert (o_round.double() - truth_o).abs().max() < 1e-2  # fp16 operands: ~1e-3 relative, no overflow here

    v_big = v.clone()
    v_big[0, 0, 5, 3] = 1e6  # only head (0, 0) overflows; head (0, 1) keeps the fp16 path
    o, to, _ = AttentionJVPFunction.apply(q, k, v_big, tq, tk, tv, scale, True)
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v_big, tq, tk, tv))
    torch_o, torch_t = ref.attention_jvp(q, k, v_big, tq, tk, tv)
    assert torch.isfinite(o).all() and torch.isfinite(to).all()
    assert_parity(OP, "out", o[:, :1], torch_o[:, :1], truth_o[:, :1])
    assert_parity(OP, "tangent", to[:, :1], torch_t[:, :1], truth_t[:, :1])
    tangent_only = torch.func.jvp(lambda v: AttentionFunction.apply(q, k, v, scale, True)[0], (v_big,), (tv,))[1]
    assert torch.isfinite(tangent_only).all()


@pytest.mark.parametrize("variant", ["plain", "pipeline+merge"])
def test_fp16_overflow_recomputes_only_the_flagged_rows(variant, device, monkeypatch):
    """The guarded pass flags rows, the fix-up launch redoes only those: a huge tQ row (|P⊙tS| beyond fp16) gets the
    exact-operand answer, every other row keeps the fp16-operand result bit for bit (tS of row i needs only tQ_i).
    Also run with a loop variant: its fix-up programs without a flagged row must skip the loop too."""
    _use_variant(monkeypatch, variant)
    q, k, v, tq, tk, tv = _qkv(1, 1, 70, 90, 64, device)
    scale = 1 / math.sqrt(64)
    o_ref, to_ref, _ = AttentionJVPFunction.apply(q, k, v, tq, tk, tv, scale, True)
    tq_big = tq.clone()
    tq_big[0, 0, 3] *= 1e6
    o, to, _ = AttentionJVPFunction.apply(q, k, v, tq_big, tk, tv, scale, True)
    others = [i for i in range(70) if i != 3]
    assert torch.equal(o[:, :, others], o_ref[:, :, others]) and torch.equal(to[:, :, others], to_ref[:, :, others])
    truth_o, truth_t = ref.attention_jvp(*f64(q, k, v, tq_big, tk, tv))
    torch_o, torch_t = ref.attention_jvp(q, k, v, tq_big, tk, tv)
    # Row 3 (O and tO) was recomputed with fp32 operands: fp32 parity, and O no longer carries fp16 rounding.
    assert_parity(OP, "tangent", to[:, :, 3:4], torch_t[:, :, 3:4], truth_t[:, :, 3:4])
    assert_parity(OP, "out", o[:, :, 3:4], torch_o[:, :, 3:4], truth_o[:, :, 3:4])
    assert not torch.equal(o[:, :, 3], o_ref[:, :, 3])


def test_tangent_kernel_reads_the_saved_output(device):
    """tO = Σ P·(tS·V + tV) − μ·O with O taken from the primal pass: given O = 0 the kernel must return exactly the
    first term, (P⊙tS)·V + P·tV; given the true O, the full tangent."""
    from t2i_kernels.attention import _attention_tangent

    q, k, v, tq, tk, tv = _qkv(1, 2, 33, 47, 32, device)
    scale = 1 / math.sqrt(32)
    o, lse = AttentionFunction.apply(q, k, v, scale, False)
    Q, K, V, TQ, TK, TV = f64(q, k, v, tq, tk, tv)
    p = torch.softmax(Q @ K.transpose(-1, -2) * scale, -1)
    ts = (TQ @ K.transpose(-1, -2) + Q @ TK.transpose(-1, -2)) * scale
    first = (p * ts) @ V + p @ TV
    mu = (p * ts).sum(-1, keepdim=True)
    got0 = _attention_tangent(q, k, v, torch.zeros_like(o), tq, tk, tv, lse, scale)
    got = _attention_tangent(q, k, v, o, tq, tk, tv, lse, scale)
    assert (got0.double() - first).abs().max() < 1e-4 * first.abs().max()
    assert (got.double() - (first - mu * o.double())).abs().max() < 1e-4 * first.abs().max()


def test_empty_query(device):
    q = torch.empty(1, 2, 0, 32, device=device)
    k, v = torch.randn(1, 2, 5, 32, device=device), torch.randn(1, 2, 5, 32, device=device)
    o, to = t2i_kernels.attention_jvp(q, k, v, q, k, v)
    assert o.shape == to.shape == (1, 2, 0, 32)


# ---- bad input --------------------------------------------------------------------------------------------------
def _good():
    return [torch.randn(2, 3, 8, 32) for _ in range(3)]


@pytest.mark.parametrize(
    "mutate, error, fragments",
    [
        (lambda q, k, v: (q.double(), k, v), ValueError, ["`q`", "float64", "float16, bfloat16, float32"]),
        (lambda q, k, v: (q, k.half(), v), ValueError, ["`k` float16", "`q` float32"]),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, ["device", "`v` meta"]),
        (lambda q, k, v: (q[0], k, v), ValueError, ["`q`", "4-d", "(3, 8, 32)"]),
        (lambda q, k, v: (q, k, v.int()), TypeError, ["`v`", "floating dtype", "int32"]),
        (lambda q, k, v: (q, k[..., :16], v[..., :16]), ValueError, ["`k`", "head dim 32", "(2, 3, 8, 16)"]),
        (lambda q, k, v: (q[..., :24], k[..., :24], v[..., :24]), ValueError, ["head dim", "(32, 64, 128, 256)", "24"]),
        (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, ["`v`", "(2, 3, 8, 32)", "(2, 3, 5, 32)"]),
        (lambda q, k, v: (q, k[:, :2], v[:, :2]), ValueError, ["`k`", "batch and heads (2, 3)"]),
        (lambda q, k, v: (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v), ValueError,
         ["`q`", "stride 1", ".contiguous()"]),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, ["`k`", "at least one key"]),
        (lambda q, k, v: ("q", k, v), TypeError, ["`q`", "torch.Tensor", "str"]),
    ],
    ids=["fp64", "mixed-dtype", "mixed-device", "rank", "int", "qk-head-dim", "unsupported-head-dim", "v-shape",
         "heads", "last-stride", "no-keys", "not-a-tensor"],
)
def test_bad_input_is_named(mutate, error, fragments):
    q, k, v = mutate(*_good())
    with pytest.raises(error) as info:
        t2i_kernels.attention(q, k, v)
    message = str(info.value)
    assert message.startswith("attention:")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_bad_tangents_are_all_listed():
    q, k, v = _good()
    with pytest.raises(ValueError) as info:
        t2i_kernels.attention_jvp(q, k, v, q[:, :, :4], k.half(), v, scale=0.5)
    message = str(info.value)
    for fragment in ["problems", "`tq`", "(2, 3, 4, 32)", "`tk` float16"]:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    with pytest.raises(ValueError, match="`scale`: expected a finite float"):
        t2i_kernels.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="`scale`: expected a float"):
        t2i_kernels.attention(q, k, v, scale="0.5")


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU half precision runs")
def test_half_precision_rejected_by_the_interpreter_with_a_reason():
    q, k, v = (t.bfloat16() for t in _good())
    with pytest.raises(ValueError, match="interpreter"):
        t2i_kernels.attention(q, k, v)


# ---- GPU: bf16 parity at FLUX shapes, no recompiles ------------------------------------------------------------
FLUX_SHAPES = [(2, 24, 1280, 128), (2, 24, 1536, 128), (1, 24, 4352, 128), (1, 24, 4608, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", FLUX_SHAPES, ids=str)
def test_bf16_parity_at_flux_shapes(shape):
    b, h, n, d = shape
    q, k, v, tq, tk, tv = _qkv(b, h, n, n, d, torch.device("cuda"), dtype=torch.bfloat16)
    o, to = t2i_kernels.attention_jvp(q, k, v, tq, tk, tv)
    ref_o, ref_t = ref.attention_jvp(q, k, v, tq, tk, tv, upcast=True)  # fp32 math on the bf16 values, bf16 out
    assert_bf16_attention_parity(o, to, q, k, v, tq, tk, tv)
    assert torch.isfinite(ref_o).all() and torch.isfinite(ref_t).all()
    ls = leaves(q, k, v)
    t2i_kernels.attention(*ls).backward(torch.ones_like(o))
    truth = leaves(*(t.float() for t in (q, k, v)))
    ref.attention(*truth).backward(torch.ones_like(o).float())
    same = leaves(q, k, v)
    ref.attention(*same).backward(torch.ones_like(o))
    for name, a, s, t in zip(("dq", "dk", "dv"), ls, same, truth):
        assert_parity(OP, name, a.grad, s.grad, t.grad.double())


@pytest.mark.gpu
def test_new_lengths_and_batch_sizes_do_not_recompile():
    from t2i_kernels.attention import _attn_fwd_kernel

    def run(b, n):
        q, k, v, tq, tk, tv = _qkv(b, 4, n, n, 64, torch.device("cuda"), dtype=torch.bfloat16)
        t2i_kernels.attention_jvp(q, k, v, tq, tk, tv)

    def compiled_variants():  # device_caches[device][0] is the kernel cache (triton 3.6 - 3.9)
        return sum(len(entry[0]) for entry in _attn_fwd_kernel.device_caches.values())

    run(1, 1000)
    compiled = compiled_variants()
    for b, n in ((2, 1001), (3, 1003), (1, 777)):  # same power-of-two bucket (1024), new B and N
        run(b, n)
    assert compiled_variants() == compiled


def test_guarded_pass_reads_v_and_tv_converted_once_with_their_strides():
    """bf16 inputs: the guarded pass gets fp16 copies of V and tV made once by the launcher (same strides, so a
    (B, N, H, D) view stays one), the fp32 emulation gets values rounded through fp16, unguarded dtypes the inputs."""
    from t2i_kernels.attention import _pv_operands

    v = torch.randn(2, 40, 3, 64).transpose(1, 2)  # FLUX's (B, N, H, D) memory viewed as (B, H, N, D)
    v16, none = _pv_operands(v.to(torch.bfloat16), None, guard=True, round_f16=False)
    assert none is None and v16.dtype == torch.float16 and v16.stride() == v.stride()
    assert torch.equal(v16, v.to(torch.bfloat16).to(torch.float16))
    v_big = v.clone()
    v_big[0, 0, 0, 0] = 1e6  # beyond fp16: inf, which the guard flags; the fix-up pass reads the original
    rounded, t_rounded = _pv_operands(v_big, v, guard=True, round_f16=True)
    assert rounded.dtype == torch.float32 and torch.isinf(rounded[0, 0, 0, 0])
    assert torch.equal(t_rounded, v.to(torch.float16).float()) and not torch.equal(t_rounded, v)
    same_v, same_tv = _pv_operands(v, v_big, guard=False, round_f16=False)
    assert same_v is v and same_tv is v_big


def test_under_autocast_attention_inputs_take_the_autocast_dtype():
    """bf16 autocast over fp32 masters: FLUX's RMSNorm (fp32 weight) gives fp32 q/k while v is bf16; SDPA casts all
    three to bf16 under autocast, and so do the kernels' entry points (they take one dtype per call)."""
    from t2i_kernels.attention import _autocast_inputs

    q, v = torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = _autocast_inputs(q, q, v, None)
    assert {t.dtype for t in cast[:3]} == {torch.bfloat16} and cast[3] is None  # an absent tangent stays absent
    assert _autocast_inputs(q, q, v) == (q, q, v)  # outside autocast: untouched (the checks name a mismatch)
