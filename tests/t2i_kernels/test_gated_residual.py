"""Triton gated residual: forward, tangent (explicit, torch.func.jvp, forward_ad) and every gradient against
float64 truth, at ragged shapes and strided layouts; plus bad-input errors."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import t2i_kernels
from t2i_kernels import reference as ref
from t2i_kernels.testing import assert_parity
from tests.helpers import LAYOUTS, f64, leaves, make

OP = "gated_residual"
# (B, N, D): a single element, ragged everything, FLUX's width with a ragged sequence.
SHAPES = [(1, 1, 1), (2, 17, 48), (3, 100, 257), (2, 33, 3072)]
DTYPES = [torch.float32, torch.float64]


def _inputs(shape, dtype, device, layout):
    b, n, d = shape
    x, y = make(shape, dtype, device, layout), make(shape, dtype, device, layout)
    gate = make((b, d), dtype, device, "sliced" if layout == "sliced" else "contiguous")
    tx, ty = make(shape, dtype, device, layout), make(shape, dtype, device, layout)
    tgate = make((b, d), dtype, device)
    return x, tx, gate, tgate, y, ty


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_tangent(shape, dtype, layout, device, poisoned_empty):
    x, tx, gate, tgate, y, ty = _inputs(shape, dtype, device, layout)
    truth_out, truth_t = ref.gated_residual_jvp(*f64(x, tx, gate, tgate, y, ty))
    torch_out, torch_t = ref.gated_residual_jvp(x, tx, gate, tgate, y, ty)

    assert_parity(OP, "out", t2i_kernels.gated_residual(x, gate, y), torch_out, truth_out)
    out, tout = t2i_kernels.gated_residual_jvp(x, tx, gate, tgate, y, ty)
    assert out.is_contiguous() and tout.is_contiguous()
    assert_parity(OP, "out", out, torch_out, truth_out)
    assert_parity(OP, "tangent", tout, torch_t, truth_t)

    # The Function's jvp, reached through both forward-mode front ends, equals the explicit API bit for bit.
    f_out, f_t = torch.func.jvp(t2i_kernels.gated_residual, (x, gate, y), (tx, tgate, ty))
    assert torch.equal(f_out, out) and torch.equal(f_t, tout)
    with fwAD.dual_level():
        dual = t2i_kernels.gated_residual(fwAD.make_dual(x, tx), fwAD.make_dual(gate, tgate), fwAD.make_dual(y, ty))
        d_out, d_t = fwAD.unpack_dual(dual)
    assert torch.equal(d_out, out) and torch.equal(d_t, tout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(shape, dtype, layout, device, poisoned_empty):
    x, _, gate, _, y, _ = _inputs(shape, dtype, device, layout)
    grad = make(shape, dtype, device, layout)

    def grads(fn, *inputs):
        leaves_ = leaves(*inputs)
        fn(*leaves_).backward(grad.to(leaves_[0].dtype))
        return [t.grad for t in leaves_]

    truth = grads(ref.gated_residual, *f64(x, gate, y))
    same = grads(ref.gated_residual, x, gate, y)
    ours = grads(t2i_kernels.gated_residual, x, gate, y)
    for name, o, s, t in zip(("dx", "dgate", "dy"), ours, same, truth):
        assert_parity(OP, name, o, s, t)
    # The explicit API's primal output backpropagates the same gradients to x, gate, y.
    x_, tx_, g_, tg_, y_, ty_ = leaves(x, x, gate, gate, y, y)
    out, tout = t2i_kernels.gated_residual_jvp(x_, tx_.detach(), g_, tg_.detach(), y_, ty_.detach())
    assert not tout.requires_grad, "tangent outputs are non-differentiable by contract"
    out.backward(grad)
    for o, t in zip((x_.grad, g_.grad, y_.grad), ours):
        assert torch.equal(o, t)


def test_backward_through_the_primal_of_func_jvp(device):
    x, tx, gate, tgate, y, ty = _inputs((2, 9, 40), torch.float64, device, "contiguous")
    leaves_ = leaves(x, gate, y)
    out, _ = torch.func.jvp(t2i_kernels.gated_residual, tuple(leaves_), (tx, tgate, ty))
    (out * out).sum().backward()
    ref_leaves = leaves(x, gate, y)
    (ref.gated_residual(*ref_leaves) ** 2).sum().backward()
    for a, b in zip(leaves_, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


def test_inside_func_jvp_between_plain_pytorch_ops(device):
    """A model where only one layer is ours: tangents flow through PyTorch ops on both sides of the kernel."""
    x, tx, gate, tgate, y, ty = _inputs((2, 11, 24), torch.float64, device, "transposed")

    def model(impl, x, gate, y):
        return torch.tanh(impl(torch.sin(x), gate * 2, y @ torch.eye(24, dtype=y.dtype, device=y.device)))

    _, ours = torch.func.jvp(lambda *a: model(t2i_kernels.gated_residual, *a), (x, gate, y), (tx, tgate, ty))
    _, truth = torch.func.jvp(lambda *a: model(ref.gated_residual, *a), (x, gate, y), (tx, tgate, ty))
    torch.testing.assert_close(ours, truth, atol=1e-12, rtol=0)


@pytest.mark.parametrize("present", ["tx", "tgate", "ty", "none"])
def test_partial_tangents(present, device):
    x, tx, gate, tgate, y, ty = _inputs((2, 5, 19), torch.float64, device, "contiguous")
    given = {"tx": tx, "tgate": tgate, "ty": ty}
    given = {k: (v if k == present else None) for k, v in given.items()}
    _, tout = t2i_kernels.gated_residual_jvp(x, given["tx"], gate, given["tgate"], y, given["ty"])
    _, truth = ref.gated_residual_jvp(x, given["tx"], gate, given["tgate"], y, given["ty"])
    torch.testing.assert_close(tout, truth, atol=1e-12, rtol=0)
    with fwAD.dual_level():  # forward AD with only one input carrying a tangent
        pairs = ((x, given["tx"]), (gate, given["tgate"]), (y, given["ty"]))
        args = [fwAD.make_dual(p, t) if t is not None else p for p, t in pairs]
        dual_t = fwAD.unpack_dual(t2i_kernels.gated_residual(*args)).tangent
    if present == "none":
        assert dual_t is None
    else:
        torch.testing.assert_close(dual_t, truth, atol=1e-12, rtol=0)


@pytest.mark.parametrize("wanted", ["x", "gate", "y"])
def test_backward_computes_only_requested_gradients(wanted, device):
    x, _, gate, _, y, _ = _inputs((2, 7, 33), torch.float64, device, "contiguous")
    tensors = {"x": x.clone(), "gate": gate.clone(), "y": y.clone()}
    tensors[wanted].requires_grad_()
    t2i_kernels.gated_residual(tensors["x"], tensors["gate"], tensors["y"]).sum().backward()
    expected = {"x": torch.ones_like(x), "gate": y.sum(1), "y": gate[:, None].expand_as(y)}[wanted]
    torch.testing.assert_close(tensors[wanted].grad, expected, atol=1e-12, rtol=0)


def test_gradcheck_forward_and_backward_ad(device):
    x, tx, gate, tgate, y, ty = _inputs((2, 3, 5), torch.float64, device, "transposed")
    assert torch.autograd.gradcheck(t2i_kernels.gated_residual, tuple(leaves(x, gate, y)), check_forward_ad=True)
    assert torch.autograd.gradcheck(
        lambda *a: t2i_kernels.gated_residual_jvp(*a)[0], tuple(leaves(x, tx, gate, tgate, y, ty)),
        check_forward_ad=True,
    )


def test_empty_sequence(device):
    x, y = torch.empty(2, 0, 8, device=device), torch.empty(2, 0, 8, device=device)
    gate = torch.randn(2, 8, device=device, requires_grad=True)
    out = t2i_kernels.gated_residual(x, gate, y)
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert torch.equal(gate.grad, torch.zeros_like(gate))


def test_expanded_gate_with_zero_stride(device):
    x, y = make((3, 6, 10), torch.float64, device), make((3, 6, 10), torch.float64, device)
    gate = make((1, 10), torch.float64, device).expand(3, 10)
    assert gate.stride(0) == 0
    torch.testing.assert_close(t2i_kernels.gated_residual(x, gate, y), ref.gated_residual(x, gate, y),
                               atol=1e-12, rtol=0)


# ---- bad input --------------------------------------------------------------------------------------------------
def _good(device):
    return (make((2, 5, 8), torch.float32, device), make((2, 8), torch.float32, device),
            make((2, 5, 8), torch.float32, device))


@pytest.mark.parametrize(
    "mutate, error, fragments",
    [
        (lambda x, g, y: (x[0], g, y), ValueError, ["`x`", "3-d", "(5, 8)"]),
        (lambda x, g, y: (x, g[:, :7], y), ValueError, ["`gate`", "(2, 8)", "(2, 7)"]),
        (lambda x, g, y: (x, g[0], y), ValueError, ["`gate`", "2-d", "(8,)"]),
        (lambda x, g, y: (x, g, y[:, :4]), ValueError, ["`y`", "(2, 5, 8)", "(2, 4, 8)"]),
        (lambda x, g, y: (x, g.double(), y), ValueError, ["`gate` float64", "`x` float32", "dtype"]),
        (lambda x, g, y: (x.int(), g, y), TypeError, ["`x`", "floating dtype", "int32"]),
        (lambda x, g, y: (x, g, [1.0]), TypeError, ["`y`", "torch.Tensor", "list"]),
        (lambda x, g, y: (x, g.to("meta"), y), ValueError, ["device", "`gate` meta", "`x` cpu"]),
    ],
    ids=["x-rank", "gate-shape", "gate-rank", "y-shape", "mixed-dtype", "int-dtype", "not-a-tensor", "mixed-device"],
)
def test_bad_input_is_named(mutate, error, fragments):
    x, g, y = mutate(*_good(torch.device("cpu")))
    with pytest.raises(error) as info:
        t2i_kernels.gated_residual(x, g, y)
    message = str(info.value)
    assert message.startswith("gated_residual:")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_bad_tangents_are_named_and_all_problems_listed():
    x, g, y = _good(torch.device("cpu"))
    with pytest.raises(ValueError) as info:
        t2i_kernels.gated_residual_jvp(x, x[:, :3], g, g[:, :2], y, y.double())
    message = str(info.value)
    assert "problems" in message
    for fragment in ["`tx`", "(2, 3, 8)", "`tgate`", "(2, 2)", "`ty` float64"]:
        assert fragment in message, f"{fragment!r} missing from: {message}"
