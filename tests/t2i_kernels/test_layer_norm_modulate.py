"""Triton LayerNorm + AdaLN modulation: forward, tangent (explicit, torch.func.jvp, forward_ad) and every gradient
against float64 truth, for per-sample (B, D) and shared (D,) modulation, ragged shapes and strided layouts; plus
bad-input errors."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import t2i_kernels
from t2i_kernels import reference as ref
from t2i_kernels._utils import MAX_FUSED_D
from t2i_kernels.testing import assert_parity
from tests.helpers import LAYOUTS, f64, leaves, make

OP = "layer_norm_modulate"
# (B, N, D): a single element (x̂ = 0); ragged everything; a width past a power of two; FLUX's width, ragged rows
# (3 register chunks of 1024); 3 chunks of 128 in a multi-row tile with a partial last tile; 3 chunks of 256 whose
# last one is ragged (700 columns); 3 chunks of 2048 (6144; 12288 is above this op's fused limit).
SHAPES = [(1, 1, 1), (2, 17, 48), (3, 5, 257), (2, 3, 3072), (2, 5, 384), (1, 3, 700), (1, 2, 6144)]
DTYPES = [torch.float32, torch.float64]
#: Modulation forms: (scale, shift) per sample (B, D) as AdaLN-Zero, shared (D,), or one of each.
FORMS = {"per-sample": (True, True), "shared": (False, False), "mixed": (True, False)}


def _inputs(shape, dtype, device, layout, form="per-sample"):
    b, _, d = shape
    x, tx = make(shape, dtype, device, layout), make(shape, dtype, device, layout)
    mod_layout = "sliced" if layout == "sliced" else "contiguous"
    per_sample_scale, per_sample_shift = FORMS[form]
    scale_shape, shift_shape = ((b, d) if per_sample_scale else (d,)), ((b, d) if per_sample_shift else (d,))
    scale, tscale = make(scale_shape, dtype, device, mod_layout), make(scale_shape, dtype, device)
    shift, tshift = make(shift_shape, dtype, device, mod_layout), make(shift_shape, dtype, device)
    return x, tx, scale, tscale, shift, tshift


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_tangent(shape, dtype, layout, form, device, poisoned_empty):
    x, tx, scale, tscale, shift, tshift = _inputs(shape, dtype, device, layout, form)
    truth_y, truth_t = ref.layer_norm_modulate_jvp(*f64(x, tx, scale, tscale, shift, tshift))
    torch_y, torch_t = ref.layer_norm_modulate_jvp(x, tx, scale, tscale, shift, tshift)

    assert_parity(OP, "out", t2i_kernels.layer_norm_modulate(x, scale, shift), torch_y, truth_y)
    y, ty = t2i_kernels.layer_norm_modulate_jvp(x, tx, scale, tscale, shift, tshift)
    assert y.is_contiguous() and ty.is_contiguous()
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)

    # The Function's jvp, reached through both forward-mode front ends, equals the explicit API bit for bit.
    f_y, f_t = torch.func.jvp(t2i_kernels.layer_norm_modulate, (x, scale, shift), (tx, tscale, tshift))
    assert torch.equal(f_y, y) and torch.equal(f_t, ty)
    with fwAD.dual_level():
        dual = t2i_kernels.layer_norm_modulate(
            fwAD.make_dual(x, tx), fwAD.make_dual(scale, tscale), fwAD.make_dual(shift, tshift)
        )
        d_y, d_t = fwAD.unpack_dual(dual)
    assert torch.equal(d_y, y) and torch.equal(d_t, ty)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(shape, dtype, layout, form, device, poisoned_empty):
    x, _, scale, _, shift, _ = _inputs(shape, dtype, device, layout, form)
    grad = make(shape, dtype, device, layout)

    def grads(fn, *inputs):
        leaves_ = leaves(*inputs)
        fn(*leaves_).backward(grad.to(leaves_[0].dtype))
        return [t.grad for t in leaves_]

    truth = grads(ref.layer_norm_modulate, *f64(x, scale, shift))
    same = grads(ref.layer_norm_modulate, x, scale, shift)
    ours = grads(t2i_kernels.layer_norm_modulate, x, scale, shift)
    for name, o, s, t in zip(("dx", "dscale", "dshift"), ours, same, truth):
        assert_parity(OP, name, o, s, t)
    # The explicit API's primal output backpropagates the same gradients; its tangent output is non-differentiable.
    x_, tx_, sc_, sh_ = leaves(x, x, scale, shift)
    y, ty = t2i_kernels.layer_norm_modulate_jvp(x_, tx_.detach(), sc_, None, sh_, None)
    assert not ty.requires_grad, "tangent outputs are non-differentiable by contract"
    y.backward(grad)
    for o, t in zip((x_.grad, sc_.grad, sh_.grad), ours):
        assert torch.equal(o, t)


@pytest.mark.parametrize("present", ["tx", "tscale", "tshift"])
def test_partial_tangents(present, device):
    x, tx, scale, tscale, shift, tshift = _inputs((2, 5, 19), torch.float64, device, "contiguous")
    given = {"tx": tx, "tscale": tscale, "tshift": tshift}
    given = {k: (v if k == present else None) for k, v in given.items()}
    truth_tx = given["tx"] if given["tx"] is not None else torch.zeros_like(x)
    _, truth = ref.layer_norm_modulate_jvp(x, truth_tx, scale, given["tscale"], shift, given["tshift"])
    if present == "tx":  # the explicit API needs tx; tscale/tshift may be None
        _, tout = t2i_kernels.layer_norm_modulate_jvp(x, tx, scale, None, shift, None)
        assert_parity(OP, "tangent", tout, truth, truth)
    with fwAD.dual_level():  # forward AD with only one input carrying a tangent: the others are skipped, not zeros
        pairs = ((x, given["tx"]), (scale, given["tscale"]), (shift, given["tshift"]))
        args = [fwAD.make_dual(p, t) if t is not None else p for p, t in pairs]
        dual_t = fwAD.unpack_dual(t2i_kernels.layer_norm_modulate(*args)).tangent
    assert_parity(OP, "tangent", dual_t, truth, truth)


def test_backward_through_the_primal_of_func_jvp(device):
    x, tx, scale, tscale, shift, tshift = _inputs((2, 9, 40), torch.float64, device, "contiguous")
    leaves_ = leaves(x, scale, shift)
    y, _ = torch.func.jvp(t2i_kernels.layer_norm_modulate, tuple(leaves_), (tx, tscale, tshift))
    (y * y).sum().backward()
    ref_leaves = leaves(x, scale, shift)
    (ref.layer_norm_modulate(*ref_leaves) ** 2).sum().backward()
    for name, a, b in zip(("dx", "dscale", "dshift"), leaves_, ref_leaves):
        assert_parity(OP, name, a.grad, b.grad, b.grad)


def test_inside_func_jvp_between_plain_pytorch_ops(device):
    """An AdaLN block where only the norm is ours: tangents reach scale/shift through a linear layer on temb."""
    x, tx, _, _, _, _ = _inputs((2, 11, 24), torch.float64, device, "contiguous")
    temb, ttemb = make((2, 16), torch.float64, device), make((2, 16), torch.float64, device)
    weight = make((48, 16), torch.float64, device)

    def block(norm, x, temb):
        shift, scale = (torch.nn.functional.silu(temb) @ weight.T).chunk(2, dim=1)
        return torch.tanh(norm(x, scale, shift))

    _, ours = torch.func.jvp(lambda *a: block(t2i_kernels.layer_norm_modulate, *a), (x, temb), (tx, ttemb))
    _, truth = torch.func.jvp(lambda *a: block(ref.layer_norm_modulate, *a), (x, temb), (tx, ttemb))
    assert_parity(OP, "tangent", ours, truth, truth)


def test_gradcheck_forward_and_backward_ad(device):
    x, tx, scale, tscale, shift, tshift = _inputs((2, 2, 3), torch.float64, device, "transposed")
    assert torch.autograd.gradcheck(
        t2i_kernels.layer_norm_modulate, tuple(leaves(x, scale, shift)), check_forward_ad=True
    )
    assert torch.autograd.gradcheck(
        lambda *a: t2i_kernels.layer_norm_modulate_jvp(*a)[0],
        tuple(leaves(x, tx, scale, tscale, shift, tshift)),
        check_forward_ad=True,
    )


def test_mixed_dtypes_promote_as_the_reference(device):
    """fp32 hidden states with fp64 modulation: output (and tangent) in the promoted dtype, gradients per input."""
    x, tx = make((2, 7, 24), torch.float32, device), make((2, 7, 24), torch.float32, device)
    scale, shift = make((2, 24), torch.float64, device), make((24,), torch.float32, device)
    y, ty = t2i_kernels.layer_norm_modulate_jvp(x, tx, scale, None, shift, None)
    torch_y, torch_t = ref.layer_norm_modulate_jvp(x, tx, scale, None, shift, None)
    assert y.dtype == ty.dtype == torch_y.dtype == torch.float64
    truth_y, truth_t = ref.layer_norm_modulate_jvp(*f64(x, tx, scale), None, shift.double(), None)
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)
    x_, sc_, sh_ = leaves(x, scale, shift)
    t2i_kernels.layer_norm_modulate(x_, sc_, sh_).sum().backward()
    assert (x_.grad.dtype, sc_.grad.dtype, sh_.grad.dtype) == (torch.float32, torch.float64, torch.float32)


@pytest.mark.parametrize("wanted", ["x", "scale", "shift"])
def test_backward_computes_only_requested_gradients(wanted, device):
    x, _, scale, _, shift, _ = _inputs((2, 7, 33), torch.float64, device, "contiguous")
    ours = {"x": x.clone(), "scale": scale.clone(), "shift": shift.clone()}
    theirs = {k: v.clone() for k, v in ours.items()}
    ours[wanted].requires_grad_()
    theirs[wanted].requires_grad_()
    t2i_kernels.layer_norm_modulate(ours["x"], ours["scale"], ours["shift"]).sum().backward()
    ref.layer_norm_modulate(theirs["x"], theirs["scale"], theirs["shift"]).sum().backward()
    assert all(t.grad is None for k, t in ours.items() if k != wanted)
    assert_parity(OP, "d" + wanted, ours[wanted].grad, theirs[wanted].grad, theirs[wanted].grad)


def _two_programs_per_group(n_tiles: int, groups: int, device: torch.device) -> tuple[int, int]:
    """A split of every group's tiles over two programs, the second one shorter: exercises the per-program loop and
    its ragged end whatever the device's own heuristic picks."""
    tiles_per_program = max(1, -(-n_tiles // 2))
    return -(-n_tiles // tiles_per_program), tiles_per_program


# 300 rows of 48 per sample: 5 tiles of 64 → 3 + 2; 35 rows of 3 chunks of 128: 5 tiles of 8 → 3 + 2 (loop-carried
# chunks).
@pytest.mark.parametrize("shape", [(2, 300, 48), (2, 35, 384)], ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_modulation_gradients_with_several_tiles_per_program(form, shape, monkeypatch, device):
    monkeypatch.setattr(importlib.import_module("t2i_kernels.layer_norm_modulate"), "reduction_split",
                        _two_programs_per_group)
    x, _, scale, _, shift, _ = _inputs(shape, torch.float64, device, "contiguous", form)
    grad = make(shape, torch.float64, device)
    ours, truth = leaves(x, scale, shift), leaves(x, scale, shift)
    t2i_kernels.layer_norm_modulate(*ours).backward(grad)
    ref.layer_norm_modulate(*truth).backward(grad)
    for name, o, t in zip(("dx", "dscale", "dshift"), ours, truth):
        assert_parity(OP, name, o.grad, t.grad, t.grad)


def test_modulation_gradients_are_deterministic(device):
    x, _, scale, _, shift, _ = _inputs((2, 67, 48), torch.float32, device, "contiguous")
    grad = make((2, 67, 48), torch.float32, device)
    runs = []
    for _ in range(2):
        sc_, sh_ = leaves(scale, shift)
        t2i_kernels.layer_norm_modulate(x, sc_, sh_).backward(grad)
        runs.append((sc_.grad, sh_.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_expanded_modulation_with_zero_stride(device):
    x = make((3, 6, 10), torch.float64, device)
    scale, shift = make((1, 10), torch.float64, device).expand(3, 10), make((10,), torch.float64, device)
    assert scale.stride(0) == 0
    y = t2i_kernels.layer_norm_modulate(x, scale, shift)
    truth = ref.layer_norm_modulate(x, scale, shift)
    assert_parity(OP, "out", y, truth, truth)


def test_empty_sequence(device):
    x = torch.empty(2, 0, 8, device=device)
    scale = torch.randn(2, 8, device=device, requires_grad=True)
    shift = torch.randn(8, device=device, requires_grad=True)
    y = t2i_kernels.layer_norm_modulate(x, scale, shift)
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert torch.equal(scale.grad, torch.zeros_like(scale)) and torch.equal(shift.grad, torch.zeros_like(shift))


def test_width_above_the_fused_limit_raises_runtime_error(device):
    d = MAX_FUSED_D + 2
    x, scale = torch.zeros(1, 1, d, device=device), torch.zeros(d, device=device)
    with pytest.raises(RuntimeError, match=f"fused limit of {MAX_FUSED_D}"):
        t2i_kernels.layer_norm_modulate(x, scale, scale)


def test_custom_ops_pass_opcheck(device):
    """Schema, fake (meta) implementation and AOT dispatch of every launcher: what torch.compile and torch.func rely
    on. The mixed dtypes check that the fakes report the promoted output dtype."""
    module = importlib.import_module("t2i_kernels.layer_norm_modulate")
    x, tx = make((2, 3, 8), torch.float32, device), make((2, 3, 8), torch.float32, device)
    scale, shift = make((2, 8), torch.float64, device), make((8,), torch.float32, device)
    for op, args in [
        (module._layer_norm_modulate_fwd, (x, scale, shift, 1e-6)),
        (module._layer_norm_modulate_tangent, (x, scale, shift, tx, None, shift, 1e-6)),
        (module._layer_norm_modulate_fwd_jvp, (x, tx, scale, scale, shift, None, 1e-6)),
        (module._layer_norm_modulate_bwd, (tx.double(), x, scale, shift, 1e-6, True, True, False)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- bad input --------------------------------------------------------------------------------------------------
def _good(device):
    x, scale, shift = (make(shape, torch.float32, device) for shape in ((2, 5, 8), (2, 8), (8,)))
    return x, scale, shift


@pytest.mark.parametrize(
    "mutate, error, fragments",
    [
        (lambda x, sc, sh: (x[0], sc, sh), ValueError, ["`x`", "3-d", "(5, 8)"]),
        (lambda x, sc, sh: (x, sc[:, :7], sh), ValueError, ["`scale`", "(2, 8) = (B, D)", "(8,) = (D,)", "(2, 7)"]),
        (lambda x, sc, sh: (x, sc, sh[:3]), ValueError, ["`shift`", "(2, 8) = (B, D)", "(3,)"]),
        (lambda x, sc, sh: (x, sc[None], sh), ValueError, ["`scale`", "(B, D)", "(1, 2, 8)"]),
        (lambda x, sc, sh: (x, sc[:1], sh), ValueError, ["`scale`", "(2, 8)", "(1, 8)"]),
        (lambda x, sc, sh: (x.int(), sc, sh), TypeError, ["`x`", "floating dtype", "int32"]),
        (lambda x, sc, sh: (x, sc.long(), sh), TypeError, ["`scale`", "floating dtype", "int64"]),
        (lambda x, sc, sh: (x, sc, 0.5), TypeError, ["`shift`", "torch.Tensor", "float"]),
        (lambda x, sc, sh: (x, sc.to("meta"), sh), ValueError, ["device", "`scale` meta", "`x` cpu"]),
    ],
    ids=["x-rank", "scale-width", "shift-length", "scale-rank", "scale-batch", "int-x", "int-scale", "not-a-tensor",
         "mixed-device"],
)
def test_bad_input_is_named(mutate, error, fragments):
    x, sc, sh = mutate(*_good(torch.device("cpu")))
    with pytest.raises(error) as info:
        t2i_kernels.layer_norm_modulate(x, sc, sh)
    message = str(info.value)
    assert message.startswith("layer_norm_modulate:")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_bad_tangents_are_named_and_all_problems_listed():
    x, sc, sh = _good(torch.device("cpu"))
    with pytest.raises(ValueError) as info:
        t2i_kernels.layer_norm_modulate_jvp(x, x[:, :3], sc, sc[:, :2], sh, sh.double())
    message = str(info.value)
    assert message.startswith("layer_norm_modulate_jvp:") and "problems" in message
    for fragment in ["`tx`", "(2, 3, 8)", "`tscale`", "(2, 2)", "`tshift` float64"]:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    with pytest.raises(TypeError, match="`tx`: expected a torch.Tensor"):
        t2i_kernels.layer_norm_modulate_jvp(x, None, sc, None, sh, None)


# ---- GPU: half precision at FLUX shapes ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4352, 3072), (2, 1280, 3072)], ids=str)
def test_half_precision_parity_on_gpu(shape, dtype, device):
    x, tx, scale, tscale, shift, tshift = _inputs(shape, dtype, device, "contiguous")
    truth_y, truth_t = ref.layer_norm_modulate_jvp(*f64(x, tx, scale, tscale, shift, tshift))
    torch_y, torch_t = ref.layer_norm_modulate_jvp(x, tx, scale, tscale, shift, tshift)
    y, ty = t2i_kernels.layer_norm_modulate_jvp(x, tx, scale, tscale, shift, tshift)
    assert y.dtype == torch_y.dtype
    assert_parity(OP, "out", y, torch_y, truth_y)
    assert_parity(OP, "tangent", ty, torch_t, truth_t)
    grad = make(shape, dtype, device)
    ours, same, truth = leaves(x, scale, shift), leaves(x, scale, shift), leaves(*f64(x, scale, shift))
    t2i_kernels.layer_norm_modulate(*ours).backward(grad)
    ref.layer_norm_modulate(*same).backward(grad)
    ref.layer_norm_modulate(*truth).backward(grad.double())
    for name, o, s, t in zip(("dx", "dscale", "dshift"), ours, same, truth):
        assert_parity(OP, name, o.grad, s.grad, t.grad)
