"""The fused dual pass is checkpointable: with ``enable_gradient_checkpointing()`` each block keeps only its inputs
and is recomputed in the backward; loss and every gradient equal the unchecked dual pass (and the reference)."""

from __future__ import annotations

import copy

import torch

from t2i_distill.losses import meanflow_loss, scm_loss
from tests.t2i_distill.losses.helpers import (
    grads,
    make_batch,
    meanflow_draws,
    meanflow_models,
    null_condition,
    scm_draws,
    scm_models,
)


def _saved_tensors_bytes(fn) -> tuple[object, int]:
    """Run ``fn`` and count the bytes autograd saves for the backward (what checkpointing is there to cut)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, total


def _compare(run, student):
    plain, checked = copy.deepcopy(student), copy.deepcopy(student)
    checked.enable_gradient_checkpointing()
    (loss_a, grads_a), saved_plain = _saved_tensors_bytes(lambda: run(plain))
    (loss_b, grads_b), saved_checked = _saved_tensors_bytes(lambda: run(checked))
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-9, msg=name)
    assert saved_checked < saved_plain, (saved_checked, saved_plain)


def test_checkpointed_dual_scm_equals_the_unchecked_dual_pass():
    student, teacher = scm_models()

    def run(model):
        model.zero_grad(set_to_none=True)
        loss, _ = scm_loss(model, teacher, make_batch(2), step=2000, draws=scm_draws(2), jvp_mode="dual")
        loss.backward()
        return loss.detach(), grads(model)

    _compare(run, student)


def test_checkpointed_dual_meanflow_equals_the_unchecked_dual_pass():
    student, teacher = meanflow_models()
    draws = meanflow_draws([0.6, 0.95], [0.2, 0.4], [False, False], [False, False])

    def run(model):
        model.zero_grad(set_to_none=True)
        loss, _ = meanflow_loss(model, teacher, make_batch(2), null_condition=null_condition(), draws=draws,
                                jvp_mode="dual")
        loss.backward()
        return loss.detach(), grads(model)

    _compare(run, student)
