"""Every kernel refuses double differentiation (backward of a tangent, double backward, forward-over-reverse) with a
DoubleDifferentiationError naming the op, instead of PyTorch's generic errors; single differentiation is unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import t2i_kernels
from t2i_kernels import DoubleDifferentiationError

B, H, N, D = 1, 2, 8, 32


def _rope_tables():
    angles = torch.randn(N, D // 2)
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def _cases():
    """name -> (function of the differentiated inputs, their shapes); the other arguments are fixed (seed 0, drawn
    in the order _reference_of redraws them)."""
    torch.manual_seed(0)
    cos, sin = _rope_tables()
    weight = torch.rand(D) + 0.5
    gate = torch.randn(B, D)
    return {
        "attention": (t2i_kernels.attention, [(B, H, N, D)] * 3),
        "gated_residual": (lambda x, y: t2i_kernels.gated_residual(x, gate, y), [(B, N, D)] * 2),
        "gelu_tanh": (t2i_kernels.gelu_tanh, [(B, N, D)]),
        "layer_norm_modulate": (lambda x: t2i_kernels.layer_norm_modulate(x, gate, gate), [(B, N, D)]),
        "rms_norm": (lambda x: t2i_kernels.rms_norm(x, weight), [(B, N, D)]),
        "rope": (lambda x: t2i_kernels.rope(x, cos, sin), [(B, H, N, D)]),
        "qk_norm_rope": (lambda x: t2i_kernels.qk_norm_rope(x, weight, cos, sin), [(B, N, H * D)]),
    }


CASES = sorted(_cases())


def _inputs(shapes, requires_grad=False):
    return [torch.randn(s, requires_grad=requires_grad) for s in shapes]


@pytest.mark.parametrize("name", CASES)
def test_backward_of_a_tangent_is_refused_by_name(name):
    fn, shapes = _cases()[name]
    primals, tangents = _inputs(shapes, requires_grad=True), _inputs(shapes)
    _, tangent = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    if name == "rope":  # linear: its tangent rope(tx) does not depend on the primal, there is nothing to refuse
        assert not tangent.requires_grad
        return
    with pytest.raises(DoubleDifferentiationError, match=rf"t2i_kernels::{name}_\w+: backward through this op.*"
                                                         "sCM and MeanFlow"):
        tangent.sum().backward()
    with fwAD.dual_level():  # the same through forward_ad dual tensors
        out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        with pytest.raises(DoubleDifferentiationError, match=rf"t2i_kernels::{name}_"):
            fwAD.unpack_dual(out).tangent.sum().backward()


@pytest.mark.parametrize("name", CASES)
def test_double_backward_is_refused_by_name(name):
    fn, shapes = _cases()[name]
    primals = _inputs(shapes, requires_grad=True)
    # the last input: its gradient comes out of the backward kernel (gated_residual passes x's gradient through as is)
    (grad,) = torch.autograd.grad(fn(*primals).square().sum(), primals[-1], create_graph=True)
    with pytest.raises(DoubleDifferentiationError, match=rf"t2i_kernels::{name}_\w+: backward through this op"):
        grad.sum().backward()


@pytest.mark.parametrize("name", CASES)
def test_forward_over_reverse_is_refused_by_name(name):
    fn, shapes = _cases()[name]
    primals, tangents = _inputs(shapes), _inputs(shapes)

    def grad_of_first(*xs):
        return torch.func.grad(lambda x0: fn(x0, *xs[1:]).square().sum())(xs[0])

    with pytest.raises(DoubleDifferentiationError, match=r"Function\.backward: forward-mode AD over a backward"):
        torch.func.jvp(grad_of_first, tuple(primals), tuple(tangents))
    leaf = primals[0].clone().requires_grad_()
    out = fn(leaf, *primals[1:])
    with fwAD.dual_level(), pytest.raises(DoubleDifferentiationError, match="forward-over-reverse"):
        torch.autograd.grad(out, leaf, fwAD.make_dual(torch.ones_like(out), torch.randn_like(out)))


@pytest.mark.parametrize("name", CASES)
def test_single_differentiation_still_works_and_matches_the_reference(name):
    fn, shapes = _cases()[name]
    primals, tangents = _inputs(shapes, requires_grad=True), _inputs(shapes)
    out, tangent = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    out.square().sum().backward()  # the primal of a JVP trains
    grads = [p.grad for p in primals]
    expected_fn = _reference_of(name)
    ref_primals = [p.detach().double().requires_grad_() for p in primals]
    ref_out, ref_tangent = torch.func.jvp(expected_fn, tuple(ref_primals), tuple(t.double() for t in tangents))
    ref_out.square().sum().backward()
    torch.testing.assert_close(tangent, ref_tangent.float(), atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, ref_primals):
        torch.testing.assert_close(g, r.grad.float(), atol=1e-4, rtol=1e-4)


def _reference_of(name):
    """The same function as in _cases() on t2i_kernels.reference, in float64 (fixed arguments re-seeded identically)."""
    from t2i_kernels import reference
    from t2i_kernels.qk_norm_rope import qk_norm_rope_ref

    torch.manual_seed(0)
    cos, sin = (t.double() for t in _rope_tables())
    weight, gate = (torch.rand(D) + 0.5).double(), torch.randn(B, D).double()
    return {
        "attention": reference.attention,
        "gated_residual": lambda x, y: reference.gated_residual(x, gate, y),
        "gelu_tanh": reference.gelu_tanh,
        "layer_norm_modulate": lambda x: reference.layer_norm_modulate(x, gate, gate),
        "rms_norm": lambda x: reference.rms_norm(x, weight),
        "rope": lambda x: reference.rope(x, cos, sin),
        "qk_norm_rope": lambda x: qk_norm_rope_ref(x, weight, cos, sin),
    }[name]
