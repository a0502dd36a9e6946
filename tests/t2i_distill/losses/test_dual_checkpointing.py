"""The fused dual pass is checkpointable: with ``enable_gradient_checkpointing()`` each block keeps only its primal
inputs and the backward recomputes the block's primal alone (no tangent work). Loss, tangent and every gradient equal
the unchecked dual pass bit for bit (CPU, Triton interpreter, fp32; LoRA gradients to rounding), also under DDP and
FSDP2; fewer bytes are saved for the backward."""

from __future__ import annotations

import contextlib
import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist

import t2i_kernels
from t2i_distill.losses import meanflow_loss, scm_loss
from t2i_distill.models import dual_forward
from t2i_distill.models.dual_forward import flux_forward_jvp
from tests.t2i_distill.flux_helpers import build as build_flux
from tests.t2i_distill.flux_helpers import split_inputs
from tests.t2i_distill.losses.helpers import (
    grads,
    make_batch,
    meanflow_draws,
    meanflow_models,
    null_condition,
    scm_draws,
    scm_models,
)

JVP_KERNELS = ("layer_norm_modulate_jvp", "gated_residual_jvp", "gelu_tanh_jvp", "qk_norm_rope_jvp", "attention_jvp")
PRIMAL_KERNELS = ("layer_norm_modulate", "gated_residual", "gelu_tanh", "qk_norm_rope", "attention")


def _saved_tensors_bytes(fn, model: torch.nn.Module) -> tuple[object, int]:
    """Run ``fn`` and count the bytes of activations autograd saves for the backward (what checkpointing is there to
    cut); saved parameters (a linear's weight) are references to memory held anyway, and are not counted."""
    total = 0
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        nonlocal total
        if tensor.untyped_storage().data_ptr() not in parameters:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, total


def _assert_same_grads(actual: dict, expected: dict, rel: float = 0.0) -> None:
    """Every gradient equal: bit for bit, or (``rel``) within ``rel`` of the tensor's largest entry (rounding)."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        tol = rel * grad.abs().max().item()
        torch.testing.assert_close(actual[name], grad, rtol=0, atol=tol,
                                   msg=lambda message, name=name: f"{name}: {message}")


def _compare(loss_of, student):
    """Loss, gradients and the bytes saved from forward to backward, unchecked vs checkpointed."""
    results = []
    for checkpointed in (False, True):
        model = copy.deepcopy(student)
        if checkpointed:
            model.enable_gradient_checkpointing()
        loss, saved = _saved_tensors_bytes(lambda: loss_of(model), model)  # the forward only: the backward's recompute
        loss.backward()  # saves again, transiently, one block at a time
        results.append((loss.detach(), grads(model), saved))
    (loss_a, grads_a, saved_plain), (loss_b, grads_b, saved_checked) = results
    assert torch.equal(loss_b, loss_a)
    _assert_same_grads(grads_b, grads_a)
    assert saved_checked < saved_plain / 2, (saved_checked, saved_plain)


def test_checkpointed_dual_scm_equals_the_unchecked_dual_pass():
    student, teacher = scm_models()
    _compare(lambda model: scm_loss(model, teacher, make_batch(2), step=2000, draws=scm_draws(2),
                                    jvp_mode="dual")[0], student)


def test_checkpointed_dual_meanflow_equals_the_unchecked_dual_pass():
    student, teacher = meanflow_models()
    draws = meanflow_draws([0.6, 0.95], [0.2, 0.4], [False, False], [False, False])
    _compare(lambda model: meanflow_loss(model, teacher, make_batch(2), null_condition=null_condition(), draws=draws,
                                         jvp_mode="dual")[0], student)


def _dual_pass(model, seed: int = 0):
    """(out, tangent, gradients of a weighted sum of out) of one dual pass with grad."""
    x, t, rest = split_inputs(model)
    gen = torch.Generator().manual_seed(seed)
    tx, weights = torch.randn(x.shape, generator=gen), torch.randn(x.shape[:2] + (model.config.in_channels,),
                                                                   generator=gen)
    model.zero_grad(set_to_none=True)
    out, tangent = flux_forward_jvp(model, x, tx, timestep=t, t_timestep=torch.ones_like(t), **rest)
    assert out.requires_grad and not tangent.requires_grad
    (out * weights).sum().backward()
    return out.detach(), tangent, grads(model)


def test_checkpointed_dual_pass_returns_the_same_primal_and_a_detached_tangent():
    model = build_flux(num_layers=2, num_single_layers=2).train()
    out_a, tangent_a, grads_a = _dual_pass(copy.deepcopy(model))
    model.enable_gradient_checkpointing()
    out_b, tangent_b, grads_b = _dual_pass(model)
    assert torch.equal(out_b, out_a) and torch.equal(tangent_b, tangent_a)
    _assert_same_grads(grads_b, grads_a)


def _counting(monkeypatch, names, counts: Counter, module=t2i_kernels):
    for name in names:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def test_the_backward_recomputes_each_block_s_primal_and_no_tangent(monkeypatch):
    model = build_flux(num_layers=2, num_single_layers=1).train()
    model.enable_gradient_checkpointing()
    x, t, rest = split_inputs(model)
    counts: Counter = Counter()
    _counting(monkeypatch, JVP_KERNELS + PRIMAL_KERNELS, counts)
    _counting(monkeypatch, ["jvp"], counts, module=torch.func)
    original_linear = dual_forward.dual_linear

    def dual_linear(linear, x, tx):
        counts["linear tangent" if tx is not None else "linear primal"] += 1
        return original_linear(linear, x, tx)

    monkeypatch.setattr(dual_forward, "dual_linear", dual_linear)
    out, _ = flux_forward_jvp(model, x, torch.randn_like(x), timestep=t, t_timestep=torch.ones_like(t), **rest)
    forward = Counter(counts)
    assert forward["attention_jvp"] == 3 and forward["attention"] == 0  # the forward is the fused dual pass
    counts.clear()
    out.sum().backward()
    assert all(counts[name] == 0 for name in JVP_KERNELS), counts  # no tangent work in the backward
    assert counts["jvp"] == 0 and counts["linear tangent"] == 0, counts
    # ... and exactly the blocks' primal work: one primal kernel call for each fused call of the forward's blocks
    # (the embedders, the conditioning and the output layer are not recomputed: their graph was kept)
    blocks = Counter({name: forward[name + "_jvp"] for name in PRIMAL_KERNELS})
    blocks["layer_norm_modulate"] -= 1  # the output layer's norm
    assert Counter({name: counts[name] for name in PRIMAL_KERNELS}) == blocks, counts
    assert model.x_embedder.weight.grad is not None and model.transformer_blocks[0].attn.to_q.weight.grad is not None


def test_checkpointed_lora_with_dropout_recomputes_the_forward_s_masks(monkeypatch):
    """LoRA layers go through ``torch.func.jvp`` in the forward and ``linear(x)`` in the recompute: the same dropout
    mask only if the recompute restores the forward's RNG state (the last run shows that the test catches it).

    Gradients agree to rounding, not bit for bit: ``torch.func.jvp`` with grad records the LoRA primal through other
    (alias) nodes, so the gradient of an input shared by q, k and v sums its three terms in another order."""
    from tests.t2i_distill.test_lora import lora_student

    student = lora_student(dropout=0.3).train()

    def run(model, checkpointed):
        if checkpointed:
            model.enable_gradient_checkpointing()
        torch.manual_seed(123)
        return _dual_pass(model)

    out_a, tangent_a, grads_a = run(copy.deepcopy(student), False)
    out_b, tangent_b, grads_b = run(copy.deepcopy(student), True)
    assert torch.equal(out_b, out_a) and torch.equal(tangent_b, tangent_a)
    assert {n for n in grads_b if "lora_" in n} == {n for n, _ in student.named_parameters() if "lora_" in n}
    _assert_same_grads(grads_b, grads_a, rel=1e-6)

    monkeypatch.setattr(dual_forward, "_restored_rng", lambda state: contextlib.nullcontext())
    _, _, grads_c = run(copy.deepcopy(student), True)
    assert any(not torch.allclose(grads_c[n], grads_a[n], rtol=1e-3) for n in grads_a if "lora_" in n)


def test_a_parameter_replaced_before_the_backward_is_an_error():
    """The recompute differentiates the block's current parameters; one swapped since the forward would silently get
    no gradient (and the old one none either), so the backward refuses."""
    model = build_flux().train()
    model.enable_gradient_checkpointing()
    x, t, rest = split_inputs(model)
    out, _ = flux_forward_jvp(model, x, torch.randn_like(x), timestep=t, t_timestep=torch.ones_like(t), **rest)
    to_q = model.transformer_blocks[0].attn.to_q
    to_q.weight = torch.nn.Parameter(to_q.weight.detach().clone())
    with pytest.raises(RuntimeError, match="parameters were replaced"):
        out.sum().backward()


@pytest.fixture
def process_group():
    """A one-process gloo group (in-process store: no port)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _DualLoss(torch.nn.Module):
    """What the trainer wraps: a module whose forward is a loss computed by the dual pass of its student."""

    def __init__(self, student: torch.nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, x, tx, t, weights, rest):
        out, tangent = flux_forward_jvp(self.student, x, tx, timestep=t, t_timestep=torch.ones_like(t), **rest)
        return ((out - 0.5 * tangent) * weights).sum()


def _wrapped_loss_grads(wrap, student):
    x, t, rest = split_inputs(student)
    gen = torch.Generator().manual_seed(3)
    tx, weights = torch.randn(x.shape, generator=gen), torch.randn(x.shape[:2] + (student.config.in_channels,),
                                                                   generator=gen)
    module = _DualLoss(student)
    wrapped = wrap(module)
    loss = wrapped(x, tx, t, weights, rest)
    loss.backward()
    return loss.detach(), {n.removeprefix("student."): p.grad.detach().clone() for n, p in module.named_parameters()
                           if p.grad is not None}


def _engine_fsdp2(module: torch.nn.Module) -> torch.nn.Module:
    """The engine's own FSDP2 sharding: every block its own unit (the patched blocks too), then the root."""
    from t2i_distill.training.engine import EngineConfig, _shard_fsdp2

    _shard_fsdp2(module, EngineConfig(backend="fsdp2", mixed_precision="no"))
    return module


@pytest.mark.parametrize("checkpointed", [True, False], ids=["checkpointed", "unchecked"])
@pytest.mark.parametrize("backend", ["ddp", "ddp-find-unused", "fsdp2"])
def test_the_dual_pass_under_a_distributed_wrapper(process_group, backend, checkpointed):
    """The block parameters' gradients reach the wrapper's hooks: DDP's reducer (and its search for unused parameters
    from the loss) and FSDP2's post-backward reduce-scatter. Under FSDP2 every block is a unit of its own, and the
    dual pass calls it through ``Module.__call__`` so that its all-gather and reduce-scatter run: loss and gradients
    equal the unwrapped, unchecked pass, and each block is resharded after its forward and after its backward."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    wraps = {"ddp": lambda m: DistributedDataParallel(m),
             "ddp-find-unused": lambda m: DistributedDataParallel(m, find_unused_parameters=True),
             "fsdp2": _engine_fsdp2}
    student = build_flux().train()
    loss_a, grads_a = _wrapped_loss_grads(lambda m: m, copy.deepcopy(student))
    if checkpointed:
        student.enable_gradient_checkpointing()
    loss_b, grads_b = _wrapped_loss_grads(wraps[backend], student)
    if backend == "fsdp2":  # gradients of DTensor shards: a one-rank shard is the whole tensor
        blocks = [*student.transformer_blocks, *student.single_transformer_blocks]
        assert all(isinstance(block, FSDPModule) for block in blocks)
        assert all(isinstance(p, dist.tensor.DTensor) for block in blocks for p in block.parameters())  # resharded
        assert "forward" not in blocks[0].__dict__  # the dual step was its forward for one call only
        grads_b = {n: g.full_tensor() for n, g in grads_b.items()}
    assert torch.equal(loss_b, loss_a)
    # FSDP2's per-block hook nodes change the order in which autograd sums the time embedding's per-block gradient
    # terms: equal to rounding there (measured: 1 ulp), bit for bit under DDP.
    _assert_same_grads(grads_b, grads_a, rel=1e-6 if backend == "fsdp2" else 0.0)
