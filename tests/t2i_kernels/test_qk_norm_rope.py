"""Triton fused qk-RMSNorm + RoPE + head transpose: forward, tangent (explicit, torch.func.jvp, forward_ad) and both
gradients against the float64 composition ``rope(rms_norm(x as heads).transpose(1, 2))``, for (B, N, H·D) and
(B, N, H, D) inputs, ragged shapes and strided layouts; plus bad-input errors."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import t2i_kernels
from t2i_kernels.qk_norm_rope import qk_norm_rope_jvp_ref, qk_norm_rope_ref
from t2i_kernels.testing import assert_parity
from tests.helpers import LAYOUTS, f64, leaves, make, rope_tables

OP = "qk_norm_rope"
# (B, N, H, D): one pair per head; ragged sequence, heads and width; FLUX's head dim, ragged sequence (multi-row tile);
# FLUX's head dim over two forward tiles of 32 tokens and three backward tiles of 16, the last one ragged.
SHAPES = [(1, 3, 2, 2), (2, 17, 3, 48), (1, 9, 2, 128), (1, 37, 2, 128)]
DTYPES = [torch.float32, torch.float64]
#: The projection output as the processor has it, (B, N, H·D), or already split into heads, (B, N, H, D).
FORMS = ["flat", "heads"]


def _inputs(shape, dtype, device, layout, form="flat"):
    b, n, h, d = shape
    x_shape = (b, n, h * d) if form == "flat" else shape
    x, tx = make(x_shape, dtype, device, layout), make(x_shape, dtype, device, layout)
    weight = make((d,), dtype, device, "sliced" if layout == "sliced" else "contiguous")
    cos, sin = rope_tables(n, d, dtype, device)
    return x, tx, weight, cos, sin


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_tangent(shape, dtype, layout, form, device, poisoned_empty):
    x, tx, weight, cos, sin = _inputs(shape, dtype, device, layout, form)
    truth_y, truth_t = qk_norm_rope_jvp_ref(*f64(x, tx, weight, cos, sin))
    torch_y, torch_t = qk_norm_rope_jvp_ref(x, tx, weight, cos, sin)

    assert_parity(OP, "out", t2i_kernels.qk_norm_rope(x, weight, cos, sin), torch_y, truth_y)
    y, ty = t2i_kernels.qk_norm_rope_jvp(x, tx, weight, cos, sin)
    b, n, h, d = shape
    assert y.shape == ty.shape == (b, h, n, d) and y.is_contiguous() and ty.is_contiguous()
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)

    # The Function's jvp, reached through both forward-mode front ends, equals the explicit API bit for bit.
    f_y, f_t = torch.func.jvp(lambda x_: t2i_kernels.qk_norm_rope(x_, weight, cos, sin), (x,), (tx,))
    assert torch.equal(f_y, y) and torch.equal(f_t, ty)
    with fwAD.dual_level():
        d_y, d_t = fwAD.unpack_dual(t2i_kernels.qk_norm_rope(fwAD.make_dual(x, tx), weight, cos, sin))
    assert torch.equal(d_y, y) and torch.equal(d_t, ty)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(shape, dtype, layout, form, device, poisoned_empty):
    x, _, weight, cos, sin = _inputs(shape, dtype, device, layout, form)
    b, n, h, d = shape
    grad = make((b, h, n, d), dtype, device, layout)

    def grads(fn, x, weight, cos, sin):
        leaves_ = leaves(x, weight)
        fn(*leaves_, cos, sin).backward(grad.to(leaves_[0].dtype))
        return [t.grad for t in leaves_]

    truth = grads(qk_norm_rope_ref, *f64(x, weight, cos, sin))
    same = grads(qk_norm_rope_ref, x, weight, cos, sin)
    ours = grads(t2i_kernels.qk_norm_rope, x, weight, cos, sin)
    assert ours[0].shape == x.shape
    for name, o, s, t in zip(("dx", "dweight"), ours, same, truth):
        assert_parity(OP, name, o, s, t)
    # The explicit API's primal output backpropagates the same gradients; its tangent output is non-differentiable.
    x_, w_ = leaves(x, weight)
    y, ty = t2i_kernels.qk_norm_rope_jvp(x_, x.clone(), w_, cos, sin)
    assert not ty.requires_grad, "tangent outputs are non-differentiable by contract"
    y.backward(grad)
    for o, t in zip((x_.grad, w_.grad), ours):
        assert torch.equal(o, t)


def test_stream_slice_of_a_joint_projection(device, poisoned_empty):
    """The image tokens of a joint [txt; img] projection: a sequence slice (row stride ≠ row length), read in place."""
    joint = make((2, 5 + 11, 2 * 64), torch.float64, device)
    x, tx = joint[:, 5:], make((2, 11, 2 * 64), torch.float64, device)
    weight = make((64,), torch.float64, device)
    cos, sin = rope_tables(11, 64, torch.float64, device)
    y, ty = t2i_kernels.qk_norm_rope_jvp(x, tx, weight, cos, sin)
    truth_y, truth_t = qk_norm_rope_jvp_ref(x, tx, weight, cos, sin)
    assert_parity(OP, "out", y, truth_y, truth_y)
    assert_parity(OP, "tangent", ty, truth_t, truth_t)


def test_mixed_dtypes_follow_the_reference(device):
    """fp32 x with an fp16 weight: normalised value rounded to fp16 before × weight, output fp16, as the reference."""
    x, tx, _, cos, sin = _inputs((2, 7, 3, 16), torch.float32, device, "contiguous")
    weight = make((16,), torch.float16, device)
    y, ty = t2i_kernels.qk_norm_rope_jvp(x, tx, weight, cos, sin)
    torch_y, torch_t = qk_norm_rope_jvp_ref(x, tx, weight, cos, sin)
    assert y.dtype == ty.dtype == torch_y.dtype == torch.float16
    truth_y, truth_t = qk_norm_rope_jvp_ref(*f64(x, tx, weight, cos, sin))
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)


def test_weight_tangent(device):
    """Forward AD must not drop a tangent on the weight (the student never gives it one; gradcheck does)."""
    x, tx, weight, cos, sin = _inputs((2, 5, 3, 8), torch.float64, device, "transposed")
    tweight = make((8,), torch.float64, device)
    _, ours = torch.func.jvp(lambda a, w: t2i_kernels.qk_norm_rope(a, w, cos, sin), (x, weight), (tx, tweight))
    _, truth = torch.func.jvp(lambda a, w: qk_norm_rope_ref(a, w, cos, sin), (x, weight), (tx, tweight))
    assert_parity(OP, "tangent", ours, truth, truth)


def test_backward_through_the_primal_of_func_jvp(device):
    x, tx, weight, cos, sin = _inputs((2, 9, 3, 16), torch.float64, device, "contiguous")
    leaves_ = leaves(x, weight)
    y, _ = torch.func.jvp(lambda a, w: t2i_kernels.qk_norm_rope(a, w, cos, sin), tuple(leaves_),
                          (tx, torch.zeros_like(weight)))
    (y * y).sum().backward()
    ref_leaves = leaves(x, weight)
    (qk_norm_rope_ref(*ref_leaves, cos, sin) ** 2).sum().backward()
    for name, a, b in zip(("dx", "dweight"), leaves_, ref_leaves):
        assert_parity(OP, name, a.grad, b.grad, b.grad)


def test_gradcheck_forward_and_backward_ad(device):
    x, tx, weight, cos, sin = _inputs((1, 2, 2, 4), torch.float64, device, "transposed")
    assert torch.autograd.gradcheck(
        lambda a, w: t2i_kernels.qk_norm_rope(a, w, cos, sin), tuple(leaves(x, weight)), check_forward_ad=True
    )
    assert torch.autograd.gradcheck(
        lambda a, t, w: t2i_kernels.qk_norm_rope_jvp(a, t, w, cos, sin)[0], tuple(leaves(x, tx, weight)),
        check_forward_ad=True,
    )


def _two_programs_per_group(n_tiles: int, groups: int, device: torch.device) -> tuple[int, int]:
    """A split of every group's tiles over two programs, the second one shorter: exercises the per-program loop and
    its ragged end whatever the device's own heuristic picks."""
    tiles_per_program = max(1, -(-n_tiles // 2))
    return -(-n_tiles // tiles_per_program), tiles_per_program


# (B, N, H, D): 2·1·3 = 6 tiles → 3 + 3; FLUX's head dim in the backward's 16-token tiles, 2·3·3 = 18 tiles → 9 + 9,
# each program's 2-D dw partial carried over tiles from several heads and token blocks, the last block ragged.
@pytest.mark.parametrize("shape", [(2, 40, 3, 16), (2, 37, 3, 128)], ids=str)
def test_weight_gradient_with_several_tiles_per_program(shape, monkeypatch, device):
    monkeypatch.setattr(importlib.import_module("t2i_kernels.qk_norm_rope"), "reduction_split", _two_programs_per_group)
    b, n, h, d = shape
    x, _, weight, cos, sin = _inputs(shape, torch.float64, device, "contiguous")
    grad = make((b, h, n, d), torch.float64, device)
    ours, truth = leaves(x, weight), leaves(x, weight)
    t2i_kernels.qk_norm_rope(*ours, cos, sin).backward(grad)
    qk_norm_rope_ref(*truth, cos, sin).backward(grad)
    for name, o, t in zip(("dx", "dweight"), ours, truth):
        assert_parity(OP, name, o.grad, t.grad, t.grad)


def test_weight_gradient_is_deterministic(device):
    x, _, weight, cos, sin = _inputs((2, 37, 3, 32), torch.float32, device, "contiguous")
    grad = make((2, 3, 37, 32), torch.float32, device)
    runs = []
    for _ in range(2):
        (w_,) = leaves(weight)
        t2i_kernels.qk_norm_rope(x, w_, cos, sin).backward(grad)
        runs.append(w_.grad)
    assert torch.equal(runs[0], runs[1])


def test_tangent_on_the_tables_is_refused_not_dropped(device):
    x, _, weight, cos, sin = _inputs((1, 3, 1, 4), torch.float64, device, "contiguous")
    with pytest.raises(ValueError, match="no tangent on `cos`"):
        torch.func.jvp(lambda c: t2i_kernels.qk_norm_rope(x, weight, c, sin), (cos,), (torch.ones_like(cos),))


@pytest.mark.parametrize("form", FORMS)
def test_custom_ops_pass_opcheck(form, device):
    """Schema, fake (meta) implementation and AOT dispatch of every launcher: what torch.compile and torch.func rely
    on. An fp16 weight checks that the fakes report the RMSNorm output dtype and the (B, H, N, D) shape."""
    module = importlib.import_module("t2i_kernels.qk_norm_rope")
    x, tx, _, cos, sin = _inputs((2, 3, 2, 8), torch.float32, device, "contiguous", form)
    weight = make((8,), torch.float16, device)
    grad = make((2, 2, 3, 8), torch.float16, device)
    for op, args in [
        (module._qk_norm_rope_fwd, (x, weight, cos, sin, 1e-6)),
        (module._qk_norm_rope_tangent, (x, weight, cos, sin, tx, weight, 1e-6)),
        (module._qk_norm_rope_fwd_jvp, (x, tx, weight, cos, sin, 1e-6)),
        (module._qk_norm_rope_bwd, (grad, x, weight, cos, sin, 1e-6, True, True)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- bad input --------------------------------------------------------------------------------------------------
def _good(device):
    x, _, weight, cos, sin = _inputs((2, 5, 3, 8), torch.float32, device, "contiguous")
    return x, weight, cos, sin


@pytest.mark.parametrize(
    "mutate, error, fragments",
    [
        (lambda x, w, c, s: (x[0], w, c, s), ValueError, ["`x`", "3-d or 4-d", "(5, 24)"]),
        (lambda x, w, c, s: (x, w[:5], c[:, :5], s[:, :5]), ValueError, ["`weight`", "even length", "(5,)"]),
        (lambda x, w, c, s: (x[..., :20], w, c, s), ValueError, ["`x`", "divisible by D = len(weight) = 8",
                                                                  "(2, 5, 20)"]),
        (lambda x, w, c, s: (x.unflatten(-1, (4, 6)), w, c, s), ValueError, ["`x`", "D = len(weight) = 8",
                                                                            "(2, 5, 4, 6)"]),
        (lambda x, w, c, s: (x, w, c[:4], s), ValueError, ["`cos`", "(5, 8) = (N, D) of x", "(4, 8)"]),
        (lambda x, w, c, s: (x, w, c, s.requires_grad_()), ValueError, ["`sin`", "requires_grad=True"]),
        (lambda x, w, c, s: (x.int(), w, c, s), TypeError, ["`x`", "floating dtype", "int32"]),
        (lambda x, w, c, s: (x, w.to("meta"), c, s), ValueError, ["device", "`weight` meta", "`x` cpu"]),
    ],
    ids=["x-rank", "odd-d", "heads-not-divisible", "head-dim", "cos-shape", "sin-requires-grad", "int-x",
         "mixed-device"],
)
def test_bad_input_is_named(mutate, error, fragments):
    x, w, c, s = mutate(*_good(torch.device("cpu")))
    with pytest.raises(error) as info:
        t2i_kernels.qk_norm_rope(x, w, c, s)
    message = str(info.value)
    assert message.startswith("qk_norm_rope:")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_bad_tangent_is_named():
    x, w, c, s = _good(torch.device("cpu"))
    with pytest.raises(ValueError) as info:
        t2i_kernels.qk_norm_rope_jvp(x, x[:, :2], w, c, s)
    assert "`tx`" in str(info.value) and "(2, 2, 24)" in str(info.value)


# ---- GPU: half precision at FLUX shapes ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_parity_on_gpu(dtype, device):
    shape = (1, 4352, 24, 128)
    x, tx, weight, _, _ = _inputs(shape, dtype, device, "contiguous")
    cos, sin = rope_tables(4352, 128, torch.float32, device)  # FLUX's tables are fp32 whatever the model dtype
    truth_y, truth_t = qk_norm_rope_jvp_ref(*f64(x, tx, weight, cos, sin))
    torch_y, torch_t = qk_norm_rope_jvp_ref(x, tx, weight, cos, sin)
    y, ty = t2i_kernels.qk_norm_rope_jvp(x, tx, weight, cos, sin)
    assert y.dtype == torch_y.dtype
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)
    grad = make((1, 24, 4352, 128), dtype, device)
    ours, same, truth = leaves(x, weight), leaves(x, weight), leaves(*f64(x, weight))
    t2i_kernels.qk_norm_rope(*ours, cos, sin).backward(grad)
    qk_norm_rope_ref(*same, cos, sin).backward(grad)
    qk_norm_rope_ref(*truth, *f64(cos, sin)).backward(grad.double())
    for name, o, s, t in zip(("dx", "dweight"), ours, same, truth):
        assert_parity(OP, name, o.grad, s.grad, t.grad)
