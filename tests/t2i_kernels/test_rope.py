"""Triton RoPE (FLUX's interleaved pairs): forward, tangent (explicit, torch.func.jvp, forward_ad) and the gradient
against float64 truth, on FLUX-style and arbitrary tables, ragged shapes and strided layouts; plus the constant-table
contract and bad-input errors."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import t2i_kernels
from t2i_kernels import reference as ref
from t2i_kernels.testing import assert_parity
from tests.helpers import LAYOUTS, f64, leaves, make, rope_tables

OP = "rope"
# (B, H, N, D): one pair per token; ragged heads/sequence/width; FLUX's head dim with a ragged sequence.
SHAPES = [(1, 1, 3, 2), (2, 3, 17, 48), (1, 2, 9, 128)]
DTYPES = [torch.float32, torch.float64]


def _inputs(shape, dtype, device, layout, tables="flux"):
    x, tx = make(shape, dtype, device, layout), make(shape, dtype, device, layout)
    n, d = shape[2], shape[3]
    if tables == "flux":
        cos, sin = rope_tables(n, d, dtype, device)
    else:  # arbitrary tables: both members of a pair see different values, which pins down the exact transpose
        cos, sin = make((n, d), dtype, device, layout), make((n, d), dtype, device, layout)
    return x, tx, cos, sin


@pytest.mark.parametrize("tables", ["flux", "arbitrary"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_tangent(shape, dtype, layout, tables, device, poisoned_empty):
    x, tx, cos, sin = _inputs(shape, dtype, device, layout, tables)
    truth_y, truth_t = ref.rope_jvp(*f64(x, tx, cos, sin))
    torch_y, torch_t = ref.rope_jvp(x, tx, cos, sin)

    assert_parity(OP, "out", t2i_kernels.rope(x, cos, sin), torch_y, truth_y)
    y, ty = t2i_kernels.rope_jvp(x, tx, cos, sin)
    assert y.is_contiguous() and ty.is_contiguous()
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)

    # The Function's jvp, reached through both forward-mode front ends, equals the explicit API bit for bit.
    f_y, f_t = torch.func.jvp(lambda x_: t2i_kernels.rope(x_, cos, sin), (x,), (tx,))
    assert torch.equal(f_y, y) and torch.equal(f_t, ty)
    with fwAD.dual_level():
        d_y, d_t = fwAD.unpack_dual(t2i_kernels.rope(fwAD.make_dual(x, tx), cos, sin))
    assert torch.equal(d_y, y) and torch.equal(d_t, ty)


@pytest.mark.parametrize("tables", ["flux", "arbitrary"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(shape, dtype, layout, tables, device, poisoned_empty):
    x, _, cos, sin = _inputs(shape, dtype, device, layout, tables)
    grad = make(shape, dtype, device, layout)
    truth, same, ours = leaves(*f64(x)), leaves(x), leaves(x)
    ref.rope(truth[0], *f64(cos, sin)).backward(grad.double())
    ref.rope(same[0], cos, sin).backward(grad)
    t2i_kernels.rope(ours[0], cos, sin).backward(grad)
    assert_parity(OP, "dx", ours[0].grad, same[0].grad, truth[0].grad)
    # The explicit API's primal output backpropagates the same gradient; its tangent output is non-differentiable.
    (x_,) = leaves(x)
    y, ty = t2i_kernels.rope_jvp(x_, x.clone(), cos, sin)
    assert not ty.requires_grad, "tangent outputs are non-differentiable by contract"
    y.backward(grad)
    assert torch.equal(x_.grad, ours[0].grad)


def test_head_transposed_view_is_read_in_place(device, poisoned_empty):
    """Q as a (B, N, H, D) projection viewed (B, H, N, D): read through its strides, output row-major (B, H, N, D)."""
    x, tx = make((2, 13, 3, 64), torch.float64, device).transpose(1, 2), make((2, 3, 13, 64), torch.float64, device)
    cos, sin = rope_tables(13, 64, torch.float64, device)
    y, ty = t2i_kernels.rope_jvp(x, tx, cos, sin)
    truth_y, truth_t = ref.rope_jvp(x, tx, cos, sin)
    assert y.is_contiguous()
    assert_parity(OP, "out", y, truth_y, truth_y)
    assert_parity(OP, "tangent", ty, truth_t, truth_t)


def test_backward_is_rope_with_sin_negated_on_flux_tables(device):
    """With per-pair-repeated tables the transpose of the rotation is the rotation by the opposite angle."""
    x, _, cos, sin = _inputs((2, 3, 11, 32), torch.float64, device, "contiguous")
    grad = make((2, 3, 11, 32), torch.float64, device)
    (x_,) = leaves(x)
    t2i_kernels.rope(x_, cos, sin).backward(grad)
    expected = ref.rope(grad, cos, -sin)
    assert_parity(OP, "dx", x_.grad, expected, expected)


def test_backward_through_the_primal_of_func_jvp(device):
    x, tx, cos, sin = _inputs((2, 3, 9, 16), torch.float64, device, "contiguous")
    (x_,) = leaves(x)
    y, _ = torch.func.jvp(lambda a: t2i_kernels.rope(a, cos, sin), (x_,), (tx,))
    (y * y).sum().backward()
    (x_ref,) = leaves(x)
    (ref.rope(x_ref, cos, sin) ** 2).sum().backward()
    assert_parity(OP, "dx", x_.grad, x_ref.grad, x_ref.grad)


def test_gradcheck_forward_and_backward_ad(device):
    x, tx, cos, sin = _inputs((1, 2, 3, 4), torch.float64, device, "transposed", "arbitrary")
    assert torch.autograd.gradcheck(lambda a: t2i_kernels.rope(a, cos, sin), tuple(leaves(x)), check_forward_ad=True)
    assert torch.autograd.gradcheck(
        lambda a, t: t2i_kernels.rope_jvp(a, t, cos, sin)[0], tuple(leaves(x, tx)), check_forward_ad=True
    )


def test_tables_of_another_dtype(device):
    """fp32 x with fp64 tables: fp64 math, output in x's dtype (the reference's ``.to(x.dtype)``)."""
    x, tx, _, _ = _inputs((1, 2, 5, 8), torch.float32, device, "contiguous")
    cos, sin = rope_tables(5, 8, torch.float64, device)
    y, ty = t2i_kernels.rope_jvp(x, tx, cos, sin)
    torch_y, torch_t = ref.rope_jvp(x, tx, cos, sin)
    assert y.dtype == ty.dtype == torch_y.dtype == torch.float32
    truth_y, truth_t = ref.rope_jvp(*f64(x, tx), cos, sin)
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)


def test_tables_that_require_grad_are_refused(device):
    x, _, cos, sin = _inputs((1, 1, 3, 4), torch.float32, device, "contiguous")
    with pytest.raises(ValueError) as info:
        t2i_kernels.rope(x, cos.requires_grad_(), sin)
    message = str(info.value)
    for fragment in ["`cos`", "requires_grad=False", "got requires_grad=True"]:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_tangent_on_the_tables_is_refused_not_dropped(device):
    x, tx, cos, sin = _inputs((1, 1, 3, 4), torch.float64, device, "contiguous")
    with pytest.raises(ValueError, match="no tangent on `sin`"):
        torch.func.jvp(lambda s: t2i_kernels.rope(x, cos, s), (sin,), (torch.ones_like(sin),))


def test_empty_sequence(device):
    x = torch.empty(2, 3, 0, 8, device=device, requires_grad=True)
    cos, sin = torch.empty(0, 8, device=device), torch.empty(0, 8, device=device)
    y = t2i_kernels.rope(x, cos, sin)
    assert y.shape == (2, 3, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_custom_ops_pass_opcheck(device):
    """Schema, fake (meta) implementation and AOT dispatch of every launcher: what torch.compile and torch.func rely
    on."""
    module = importlib.import_module("t2i_kernels.rope")
    x, tx, cos, sin = _inputs((2, 2, 3, 8), torch.float32, device, "transposed")
    for op, args in [
        (module._rope_fwd, (x, cos, sin)),
        (module._rope_fwd_jvp, (x, tx, cos, sin)),
        (module._rope_bwd, (tx, cos, sin)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- bad input --------------------------------------------------------------------------------------------------
def _good(device):
    return make((2, 3, 5, 8), torch.float32, device), *rope_tables(5, 8, torch.float32, device)


@pytest.mark.parametrize(
    "mutate, error, fragments",
    [
        (lambda x, c, s: (x[0], c, s), ValueError, ["`x`", "4-d", "(B, H, N, D)", "(3, 5, 8)"]),
        (lambda x, c, s: (x[..., :7], c[:, :7], s[:, :7]), ValueError, ["`x`", "even last dim", "(2, 3, 5, 7)"]),
        (lambda x, c, s: (x, c[:4], s), ValueError, ["`cos`", "(5, 8) = (N, D) of x", "(4, 8)"]),
        (lambda x, c, s: (x, c, s[None]), ValueError, ["`sin`", "2-d", "(1, 5, 8)"]),
        (lambda x, c, s: (x.int(), c, s), TypeError, ["`x`", "floating dtype", "int32"]),
        (lambda x, c, s: (x, c.long(), s), TypeError, ["`cos`", "floating dtype", "int64"]),
        (lambda x, c, s: (x, c.to("meta"), s), ValueError, ["device", "`cos` meta", "`x` cpu"]),
    ],
    ids=["x-rank", "odd-d", "cos-shape", "sin-rank", "int-x", "int-cos", "mixed-device"],
)
def test_bad_input_is_named(mutate, error, fragments):
    x, c, s = mutate(*_good(torch.device("cpu")))
    with pytest.raises(error) as info:
        t2i_kernels.rope(x, c, s)
    message = str(info.value)
    assert message.startswith("rope:")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_bad_tangent_is_named():
    x, c, s = _good(torch.device("cpu"))
    with pytest.raises(ValueError) as info:
        t2i_kernels.rope_jvp(x, x.double(), c, s)
    assert "`tx` float64" in str(info.value) and str(info.value).startswith("rope_jvp:")


# ---- GPU: half precision at FLUX shapes ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_parity_on_gpu(dtype, device):
    shape = (1, 24, 4352, 128)
    x, tx = make(shape, dtype, device), make(shape, dtype, device)
    cos, sin = rope_tables(4352, 128, torch.float32, device)  # FLUX's tables are fp32 whatever the model dtype
    truth_y, truth_t = ref.rope_jvp(*f64(x, tx, cos, sin))
    torch_y, torch_t = ref.rope_jvp(x, tx, cos, sin)
    y, ty = t2i_kernels.rope_jvp(x, tx, cos, sin)
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)
    grad = make(shape, dtype, device)
    ours, same, truth = leaves(x), leaves(x), leaves(*f64(x))
    t2i_kernels.rope(ours[0], cos, sin).backward(grad)
    ref.rope(same[0], cos, sin).backward(grad)
    ref.rope(truth[0], *f64(cos, sin)).backward(grad.double())
    assert_parity(OP, "dx", ours[0].grad, same[0].grad, truth[0].grad)
