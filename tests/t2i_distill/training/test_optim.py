"""Optimizer and scheduler factories: the reference's AdamW settings, diffusers schedules, bad input."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from t2i_distill.training import lr_scheduler_factory, optimizer_factory


def test_adamw_defaults_are_the_references():
    optimizer = optimizer_factory("adamw", lr=1e-6)(list(nn.Linear(2, 2).parameters()))
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-6, (0.9, 0.999), 1e-8, 1e-4)


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is not None, reason="prodigyopt is installed")
def test_prodigy_without_the_package_names_it():
    with pytest.raises(ImportError, match="pip install prodigyopt"):
        optimizer_factory("prodigy", lr=1.0)


def test_linear_warmup_schedule_counts_optimizer_updates():
    optimizer = optimizer_factory("adamw", lr=1.0)(list(nn.Linear(2, 2).parameters()))
    scheduler = lr_scheduler_factory("linear", warmup_steps=2, total_steps=6)(optimizer)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("call, match", [
    (lambda: optimizer_factory("sgd"), "optimizer: expected one of"),
    (lambda: optimizer_factory("adamw", lr=0), "lr: expected a float > 0"),
    (lambda: lr_scheduler_factory("steps"), "lr_scheduler: expected one of"),
    (lambda: lr_scheduler_factory("cosine", warmup_steps=1), "total_steps"),
    (lambda: lr_scheduler_factory("constant", warmup_steps=-1), "warmup_steps"),
])
def test_bad_names_and_values(call, match):
    with pytest.raises(ValueError, match=match):
        call()
