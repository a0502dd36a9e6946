"""Triton GELU-tanh: forward, tangent (explicit, torch.func.jvp, forward_ad) and the gradient against float64 truth,
at ragged shapes (0-d to 4-d), strided layouts and the saturated tails; plus bad-input errors."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import t2i_kernels
from t2i_kernels import reference as ref
from t2i_kernels.testing import assert_parity
from tests.helpers import LAYOUTS, f64, leaves, make

OP = "gelu_tanh"
# A scalar; one ragged row; ragged rows and width; the FF hidden width past a tile, a ragged row count.
SHAPES = [(), (37,), (3, 17, 48), (2, 3, 1100)]
DTYPES = [torch.float32, torch.float64]
#: Inputs spread over ±3σ·SPREAD so both saturated tails (y → 0 and y → x) are exercised, not only the bend.
SPREAD = 3.0


def _inputs(shape, dtype, device, layout):
    layout = layout if len(shape) >= 2 else "contiguous"  # the strided layouts need two dims
    return make(shape, dtype, device, layout, scale=SPREAD), make(shape, dtype, device, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_tangent(shape, dtype, layout, device, poisoned_empty):
    x, tx = _inputs(shape, dtype, device, layout)
    truth_y, truth_t = ref.gelu_tanh_jvp(*f64(x, tx))
    torch_y, torch_t = ref.gelu_tanh_jvp(x, tx)

    assert_parity(OP, "out", t2i_kernels.gelu_tanh(x), torch_y, truth_y)
    y, ty = t2i_kernels.gelu_tanh_jvp(x, tx)
    assert y.shape == x.shape and y.is_contiguous() and ty.is_contiguous()
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)

    # The Function's jvp, reached through both forward-mode front ends, equals the explicit API bit for bit.
    f_y, f_t = torch.func.jvp(t2i_kernels.gelu_tanh, (x,), (tx,))
    assert torch.equal(f_y, y) and torch.equal(f_t, ty)
    with fwAD.dual_level():
        d_y, d_t = fwAD.unpack_dual(t2i_kernels.gelu_tanh(fwAD.make_dual(x, tx)))
    assert torch.equal(d_y, y) and torch.equal(d_t, ty)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(shape, dtype, layout, device, poisoned_empty):
    x, grad = _inputs(shape, dtype, device, layout)
    truth, same, ours = leaves(*f64(x)), leaves(x), leaves(x)
    ref.gelu_tanh(truth[0]).backward(grad.double())
    ref.gelu_tanh(same[0]).backward(grad)
    t2i_kernels.gelu_tanh(ours[0]).backward(grad)
    assert_parity(OP, "dx", ours[0].grad, same[0].grad, truth[0].grad)
    # The explicit API's primal output backpropagates the same gradient; its tangent output is non-differentiable.
    (x_,) = leaves(x)
    y, ty = t2i_kernels.gelu_tanh_jvp(x_, grad)
    assert not ty.requires_grad, "tangent outputs are non-differentiable by contract"
    y.backward(grad)
    assert torch.equal(x_.grad, ours[0].grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_inputs_stay_finite_and_exact(dtype, device):
    """Far tails: y = x (x ≫ 0) or a signed zero/underflow (x ≪ 0), y' = 1 or 0, with no inf·0 NaN on the way."""
    x = torch.tensor([-1e4, -60.0, -12.0, -6.0, 0.0, 6.0, 12.0, 60.0, 1e4], dtype=dtype, device=device)
    tx = torch.ones_like(x)
    y, ty = t2i_kernels.gelu_tanh_jvp(x, tx)
    truth_y, truth_t = ref.gelu_tanh_jvp(*f64(x, tx))
    torch_y, torch_t = ref.gelu_tanh_jvp(x, tx)
    assert torch.isfinite(y).all() and torch.isfinite(ty).all()
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)


def test_head_of_a_wide_tensor_is_read_in_place(device, poisoned_empty):
    """A (B, N, H, D).transpose(1, 2) view: leading dims that do not merge, read through their strides."""
    x = make((2, 7, 3, 16), torch.float64, device).transpose(1, 2)
    tx = make((2, 3, 7, 16), torch.float64, device)
    y, ty = t2i_kernels.gelu_tanh_jvp(x, tx)
    truth_y, truth_t = ref.gelu_tanh_jvp(x, tx)
    assert_parity(OP, "out", y, truth_y, truth_y)
    assert_parity(OP, "tangent", ty, truth_t, truth_t)


def test_backward_through_the_primal_of_func_jvp(device):
    x, tx = _inputs((2, 9, 40), torch.float64, device, "contiguous")
    (x_,) = leaves(x)
    y, _ = torch.func.jvp(t2i_kernels.gelu_tanh, (x_,), (tx,))
    (y * y).sum().backward()
    (x_ref,) = leaves(x)
    (ref.gelu_tanh(x_ref) ** 2).sum().backward()
    assert_parity(OP, "dx", x_.grad, x_ref.grad, x_ref.grad)


def test_inside_func_jvp_between_plain_pytorch_ops(device):
    """A feed-forward where only the activation is ours: Linear → GELU → Linear, tangents through all three."""
    x, tx = _inputs((2, 11, 8), torch.float64, device, "contiguous")
    w1, w2 = make((32, 8), torch.float64, device), make((8, 32), torch.float64, device)

    def ff(act, x):
        return act(x @ w1.T) @ w2.T

    _, ours = torch.func.jvp(lambda a: ff(t2i_kernels.gelu_tanh, a), (x,), (tx,))
    _, truth = torch.func.jvp(lambda a: ff(ref.gelu_tanh, a), (x,), (tx,))
    assert_parity(OP, "tangent", ours, truth, truth)


def test_gradcheck_forward_and_backward_ad(device):
    x, tx = _inputs((3, 4), torch.float64, device, "transposed")
    assert torch.autograd.gradcheck(t2i_kernels.gelu_tanh, tuple(leaves(x)), check_forward_ad=True)
    assert torch.autograd.gradcheck(lambda *a: t2i_kernels.gelu_tanh_jvp(*a)[0], tuple(leaves(x, tx)),
                                    check_forward_ad=True)


def test_empty(device):
    x = torch.empty(3, 0, 5, device=device, requires_grad=True)
    y = t2i_kernels.gelu_tanh(x)
    assert y.shape == (3, 0, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_unmergeable_strides_raise_instead_of_copying(device):
    x = make((2, 3, 4, 5, 6), torch.float32, device).permute(3, 1, 0, 2, 4)
    with pytest.raises(ValueError) as info:
        t2i_kernels.gelu_tanh(x)
    message = str(info.value)
    for fragment in ["`x`", "`.contiguous()`", str(tuple(x.stride()))]:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_custom_ops_pass_opcheck(device):
    """Schema, fake (meta) implementation and AOT dispatch of every launcher: what torch.compile and torch.func rely
    on."""
    module = importlib.import_module("t2i_kernels.gelu_tanh")
    x, tx = _inputs((2, 3, 8), torch.float32, device, "transposed")
    for op, args in [
        (module._gelu_tanh_fwd, (x,)),
        (module._gelu_tanh_tangent, (x, tx)),
        (module._gelu_tanh_fwd_jvp, (x, tx)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "x, error, fragments",
    [
        (torch.arange(4), TypeError, ["`x`", "floating dtype", "int64"]),
        ([1.0, 2.0], TypeError, ["`x`", "torch.Tensor", "list"]),
        (torch.zeros(3, dtype=torch.complex64), TypeError, ["`x`", "floating dtype", "complex64"]),
    ],
    ids=["int-x", "not-a-tensor", "complex-x"],
)
def test_bad_input_is_named(x, error, fragments):
    with pytest.raises(error) as info:
        t2i_kernels.gelu_tanh(x)
    message = str(info.value)
    assert message.startswith("gelu_tanh:")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_bad_tangents_are_named_and_all_problems_listed():
    x = make((2, 5), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError) as info:
        t2i_kernels.gelu_tanh_jvp(x, x.double()[:, :3])
    message = str(info.value)
    assert message.startswith("gelu_tanh_jvp:") and "problems" in message
    for fragment in ["`tx`", "(2, 5)", "(2, 3)", "`tx` float64"]:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    with pytest.raises(ValueError, match="`tx` meta"):
        t2i_kernels.gelu_tanh_jvp(x, x.to("meta"))


# ---- GPU: half precision at FLUX shapes ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_parity_on_gpu(dtype, device):
    shape = (1, 4352, 12288)
    x, tx = make(shape, dtype, device, scale=SPREAD), make(shape, dtype, device)
    truth_y, truth_t = ref.gelu_tanh_jvp(*f64(x, tx))
    torch_y, torch_t = ref.gelu_tanh_jvp(x, tx)
    y, ty = t2i_kernels.gelu_tanh_jvp(x, tx)
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)
    ours, same = leaves(x), leaves(x)
    t2i_kernels.gelu_tanh(ours[0]).backward(tx)
    ref.gelu_tanh(same[0]).backward(tx)
    assert_parity(OP, "dx", ours[0].grad, same[0].grad, truth_t)
