"""Triton RMSNorm: forward, tangent (explicit, torch.func.jvp, forward_ad) and both gradients against float64 truth,
at ragged widths and row counts, strided layouts and mixed dtypes; plus bad-input errors and the fused-width limit."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import t2i_kernels
from t2i_kernels import reference as ref
from t2i_kernels._utils import MAX_FUSED_D_CHUNKED as MAX_FUSED_D
from t2i_kernels.testing import assert_parity
from tests.helpers import LAYOUTS, f64, leaves, make

OP = "rms_norm"
# x shapes (..., D): one element; ragged rows and width; FLUX's qk-norm (B, H, N, 128) with a ragged sequence (the
# multi-row tile, with a partial last tile); a ragged width past a power of two; FLUX's hidden width, odd row count
# (3 register chunks of 1024); 3 chunks of 128 in a multi-row tile with a partial last tile; 3 chunks of 256 whose
# last one is ragged (700 columns); the MLP width 12288 (3 chunks of 4096).
SHAPES = [(1, 1), (3, 17, 48), (2, 3, 13, 128), (5, 257), (3, 3072), (2, 5, 384), (3, 700), (2, 12288)]
DTYPES = [torch.float32, torch.float64]


def _inputs(shape, dtype, device, layout):
    x, tx = make(shape, dtype, device, layout), make(shape, dtype, device, layout)
    weight = make((shape[-1],), dtype, device, "sliced" if layout == "sliced" else "contiguous")
    return x, tx, weight


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_tangent(shape, dtype, layout, device, poisoned_empty):
    x, tx, weight = _inputs(shape, dtype, device, layout)
    truth_y, truth_t = ref.rms_norm_jvp(*f64(x, tx, weight))
    torch_y, torch_t = ref.rms_norm_jvp(x, tx, weight)

    assert_parity(OP, "out", t2i_kernels.rms_norm(x, weight), torch_y, truth_y)
    y, ty = t2i_kernels.rms_norm_jvp(x, tx, weight)
    assert y.is_contiguous() and ty.is_contiguous()
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)

    # The Function's jvp, reached through both forward-mode front ends, equals the explicit API bit for bit.
    f_y, f_t = torch.func.jvp(lambda x_: t2i_kernels.rms_norm(x_, weight), (x,), (tx,))
    assert torch.equal(f_y, y) and torch.equal(f_t, ty)
    with fwAD.dual_level():
        d_y, d_t = fwAD.unpack_dual(t2i_kernels.rms_norm(fwAD.make_dual(x, tx), weight))
    assert torch.equal(d_y, y) and torch.equal(d_t, ty)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(shape, dtype, layout, device, poisoned_empty):
    x, _, weight = _inputs(shape, dtype, device, layout)
    grad = make(shape, dtype, device, layout)

    def grads(fn, *inputs):
        leaves_ = leaves(*inputs)
        fn(*leaves_).backward(grad.to(leaves_[0].dtype))
        return [t.grad for t in leaves_]

    truth = grads(ref.rms_norm, *f64(x, weight))
    same = grads(ref.rms_norm, x, weight)
    ours = grads(t2i_kernels.rms_norm, x, weight)
    for name, o, s, t in zip(("dx", "dweight"), ours, same, truth):
        assert_parity(OP, name, o, s, t)
    # The explicit API's primal output backpropagates the same gradients; its tangent output is non-differentiable.
    x_, tx_, w_ = leaves(x, x, weight)
    y, ty = t2i_kernels.rms_norm_jvp(x_, tx_.detach(), w_)
    assert not ty.requires_grad, "tangent outputs are non-differentiable by contract"
    y.backward(grad)
    for o, t in zip((x_.grad, w_.grad), ours):
        assert torch.equal(o, t)


def test_head_transposed_view_is_read_in_place(device, poisoned_empty):
    """The qk-norm input as FLUX's processor hands it over: (B, N, H, D).transpose(1, 2), never copied."""
    x_bnhd, tx_bnhd = make((2, 11, 3, 128), torch.float64, device), make((2, 11, 3, 128), torch.float64, device)
    x, tx = x_bnhd.transpose(1, 2), tx_bnhd.transpose(1, 2)
    weight = make((128,), torch.float64, device)
    y, ty = t2i_kernels.rms_norm_jvp(x, tx, weight)
    truth_y, truth_t = ref.rms_norm_jvp(x, tx, weight)
    assert_parity(OP, "out", y, truth_y, truth_y)
    assert_parity(OP, "tangent", ty, truth_t, truth_t)


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.float16)],
    ids=["fp32-x-fp64-w", "fp64-x-fp32-w", "fp32-x-fp16-w"],
)
def test_mixed_dtypes_follow_the_reference(x_dtype, w_dtype, device):
    """Output dtype and the rounding to a half-precision weight's dtype are the reference's (FLUX's dtype order)."""
    x, tx, weight = make((4, 9, 40), x_dtype, device), make((4, 9, 40), x_dtype, device), make((40,), w_dtype, device)
    y, ty = t2i_kernels.rms_norm_jvp(x, tx, weight)
    torch_y, torch_t = ref.rms_norm_jvp(x, tx, weight)
    assert y.dtype == ty.dtype == torch_y.dtype == torch_t.dtype
    truth_y, truth_t = ref.rms_norm_jvp(*f64(x, tx, weight))
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)
    x_, w_ = leaves(x, weight)
    t2i_kernels.rms_norm(x_, w_).sum().backward()
    assert x_.grad.dtype == x_dtype and w_.grad.dtype == w_dtype


def test_backward_through_the_primal_of_func_jvp(device):
    x, tx, weight = _inputs((3, 7, 40), torch.float64, device, "contiguous")
    leaves_ = leaves(x, weight)
    y, _ = torch.func.jvp(t2i_kernels.rms_norm, tuple(leaves_), (tx, torch.zeros_like(weight)))
    (y * y).sum().backward()
    ref_leaves = leaves(x, weight)
    (ref.rms_norm(*ref_leaves) ** 2).sum().backward()
    for a, b in zip(leaves_, ref_leaves):
        assert_parity(OP, "dx" if a.dim() > 1 else "dweight", a.grad, b.grad, b.grad)


def test_weight_tangent(device):
    """A tangent on the weight (not used by the student, but forward AD must not drop it): ty += round_w(x·ρ)·tw."""
    x, tx, weight = _inputs((3, 5, 24), torch.float64, device, "transposed")
    tweight = make((24,), torch.float64, device)
    _, ours = torch.func.jvp(t2i_kernels.rms_norm, (x, weight), (tx, tweight))
    _, truth = torch.func.jvp(ref.rms_norm, (x, weight), (tx, tweight))
    assert_parity(OP, "tangent", ours, truth, truth)
    with fwAD.dual_level():  # the weight alone carries a tangent: the kernel runs without tx
        only_w = fwAD.unpack_dual(t2i_kernels.rms_norm(x, fwAD.make_dual(weight, tweight))).tangent
    _, truth_w = torch.func.jvp(lambda w: ref.rms_norm(x, w), (weight,), (tweight,))
    assert_parity(OP, "tangent", only_w, truth_w, truth_w)


def test_gradcheck_forward_and_backward_ad(device):
    x, tx, weight = _inputs((3, 5), torch.float64, device, "transposed")
    assert torch.autograd.gradcheck(t2i_kernels.rms_norm, tuple(leaves(x, weight)), check_forward_ad=True)
    assert torch.autograd.gradcheck(
        lambda *a: t2i_kernels.rms_norm_jvp(*a)[0], tuple(leaves(x, tx, weight)), check_forward_ad=True
    )


@pytest.mark.parametrize("wanted", ["x", "weight"])
def test_backward_computes_only_requested_gradients(wanted, device):
    x, _, weight = _inputs((4, 33), torch.float64, device, "contiguous")
    ours, theirs = {"x": x.clone(), "weight": weight.clone()}, {"x": x.clone(), "weight": weight.clone()}
    ours[wanted].requires_grad_()
    theirs[wanted].requires_grad_()
    t2i_kernels.rms_norm(ours["x"], ours["weight"]).sum().backward()
    ref.rms_norm(theirs["x"], theirs["weight"]).sum().backward()
    other = "weight" if wanted == "x" else "x"
    assert ours[other].grad is None
    assert_parity(OP, "d" + wanted, ours[wanted].grad, theirs[wanted].grad, theirs[wanted].grad)


def _two_programs_per_group(n_tiles: int, groups: int, device: torch.device) -> tuple[int, int]:
    """A split of every group's tiles over two programs, the second one shorter: exercises the per-program loop and
    its ragged end whatever the device's own heuristic picks."""
    tiles_per_program = max(1, -(-n_tiles // 2))
    return -(-n_tiles // tiles_per_program), tiles_per_program


# 280 rows of 48: 5 tiles of 64 → 3 + 2; 35 rows of 3 chunks of 128: 5 tiles of 8 rows → 3 + 2 (loop-carried chunks).
@pytest.mark.parametrize("shape", [(7, 40, 48), (7, 5, 384)], ids=str)
def test_weight_gradient_with_several_tiles_per_program(shape, monkeypatch, device):
    monkeypatch.setattr(importlib.import_module("t2i_kernels.rms_norm"), "reduction_split", _two_programs_per_group)
    x, _, weight = _inputs(shape, torch.float64, device, "contiguous")
    grad = make(shape, torch.float64, device)
    ours, truth = leaves(x, weight), leaves(x, weight)
    t2i_kernels.rms_norm(*ours).backward(grad)
    ref.rms_norm(*truth).backward(grad)
    for name, o, t in zip(("dx", "dweight"), ours, truth):
        assert_parity(OP, name, o.grad, t.grad, t.grad)


def test_weight_gradient_is_deterministic(device):
    x, _, weight = _inputs((5, 41, 64), torch.float32, device, "contiguous")
    grad = make((5, 41, 64), torch.float32, device)
    runs = []
    for _ in range(2):
        w_ = weight.clone().requires_grad_()
        t2i_kernels.rms_norm(x, w_).backward(grad)
        runs.append(w_.grad)
    assert torch.equal(runs[0], runs[1])


def test_empty_rows(device):
    x = torch.empty(0, 3, 8, device=device)
    weight = torch.randn(8, device=device, requires_grad=True)
    y = t2i_kernels.rms_norm(x, weight)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_width_above_the_fused_limit_raises_runtime_error(device):
    x, weight = torch.zeros(1, MAX_FUSED_D + 2, device=device), torch.ones(MAX_FUSED_D + 2, device=device)
    with pytest.raises(RuntimeError, match=f"fused limit of {MAX_FUSED_D}"):
        t2i_kernels.rms_norm(x, weight)


def test_unmergeable_strides_raise_instead_of_copying(device):
    base = make((2, 3, 4, 5, 8), torch.float32, device)
    x = base.permute(3, 1, 0, 2, 4)  # five leading dims in an order no three strides describe
    with pytest.raises(ValueError) as info:
        t2i_kernels.rms_norm(x, torch.ones(8, device=device))
    message = str(info.value)
    for fragment in ["`x`", "`.contiguous()`", str(tuple(x.stride()))]:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_custom_ops_pass_opcheck(device):
    """Schema, fake (meta) implementation and AOT dispatch of every launcher: what torch.compile and torch.func rely
    on. The mixed dtypes check that the fakes report the reference's output dtype."""
    module = importlib.import_module("t2i_kernels.rms_norm")
    x, tx = make((2, 3, 8), torch.float32, device), make((2, 3, 8), torch.float32, device)
    weight = make((8,), torch.float64, device)
    for op, args in [
        (module._rms_norm_fwd, (x, weight, 1e-6)),
        (module._rms_norm_tangent, (x, weight, tx, weight, 1e-6)),
        (module._rms_norm_fwd_jvp, (x, tx, weight, 1e-6)),
        (module._rms_norm_bwd, (tx.double(), x, weight, 1e-6, True, True)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- bad input --------------------------------------------------------------------------------------------------
def _good(device):
    return make((2, 5, 8), torch.float32, device), make((8,), torch.float32, device)


@pytest.mark.parametrize(
    "mutate, error, fragments",
    [
        (lambda x, w, e: (x, w[:7], e), ValueError, ["`weight`", "(8,)", "(7,)"]),
        (lambda x, w, e: (x, w[None], e), ValueError, ["`weight`", "1-d", "(1, 8)"]),
        (lambda x, w, e: (x.int(), w, e), TypeError, ["`x`", "floating dtype", "int32"]),
        (lambda x, w, e: (x, w.long(), e), TypeError, ["`weight`", "floating dtype", "int64"]),
        (lambda x, w, e: (x, [1.0] * 8, e), TypeError, ["`weight`", "torch.Tensor", "list"]),
        (lambda x, w, e: (x, w.to("meta"), e), ValueError, ["device", "`weight` meta", "`x` cpu"]),
        (lambda x, w, e: (x[0, 0, 0], w, e), ValueError, ["`x`", "rank ≥ 1", "0-d"]),
        (lambda x, w, e: (x, w, -1.0), ValueError, ["`eps`", "≥ 0", "-1.0"]),
        (lambda x, w, e: (x, w, "1e-6"), TypeError, ["`eps`", "float", "str"]),
    ],
    ids=["weight-length", "weight-rank", "int-x", "int-weight", "not-a-tensor", "mixed-device", "0-d-x", "neg-eps",
         "str-eps"],
)
def test_bad_input_is_named(mutate, error, fragments):
    x, w, eps = mutate(*_good(torch.device("cpu")), 1e-6)
    with pytest.raises(error) as info:
        t2i_kernels.rms_norm(x, w, eps)
    message = str(info.value)
    assert message.startswith("rms_norm:")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_bad_tangent_is_named_and_all_problems_listed():
    x, w = _good(torch.device("cpu"))
    with pytest.raises(ValueError) as info:
        t2i_kernels.rms_norm_jvp(x, x.double()[:, :3], w[:4])
    message = str(info.value)
    assert message.startswith("rms_norm_jvp:") and "problems" in message
    for fragment in ["`tx`", "(2, 3, 8)", "`weight`", "(4,)", "`tx` float64"]:
        assert fragment in message, f"{fragment!r} missing from: {message}"


# ---- GPU: half precision at FLUX shapes ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 24, 4352, 128), (2, 4608, 3072)], ids=str)
def test_half_precision_parity_on_gpu(shape, dtype, device):
    x, tx, weight = _inputs(shape, dtype, device, "contiguous")
    truth_y, truth_t = ref.rms_norm_jvp(*f64(x, tx, weight))
    torch_y, torch_t = ref.rms_norm_jvp(x, tx, weight)
    y, ty = t2i_kernels.rms_norm_jvp(x, tx, weight)
    assert y.dtype == torch_y.dtype
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)
    grad = make(shape, dtype, device)
    ours, same, truth = leaves(x, weight), leaves(x, weight), leaves(*f64(x, weight))
    t2i_kernels.rms_norm(*ours).backward(grad)
    ref.rms_norm(*same).backward(grad)
    ref.rms_norm(*truth).backward(grad.double())
    for name, o, s, t in zip(("dx", "dweight"), ours, same, truth):
        assert_parity(OP, name, o.grad, s.grad, t.grad)
