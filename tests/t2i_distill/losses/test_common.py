"""Shared loss helpers: unwrapping training wrappers, the phase timer, and the batch checks."""

from __future__ import annotations

import pytest
import torch

from t2i_distill.losses import PhaseTimer
from t2i_distill.losses.common import prepare_batch, unwrap
from tests.t2i_distill.losses.helpers import make_batch, scm_models


class _Wrapper(torch.nn.Module):  # what DDP / DeepSpeed engines look like from the loss: the model in `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_unwrap_reaches_the_model_through_nested_wrappers():
    model = torch.nn.Linear(2, 2)
    assert unwrap(_Wrapper(_Wrapper(model))) is model and unwrap(model) is model


def test_phase_timer_records_each_phase_and_no_peak_on_the_cpu():
    timer = PhaseTimer("cpu")
    for _ in range(2):
        with timer("a"):
            torch.ones(10).sum()
        with timer("b"):
            pass
    assert list(timer.times_ms) == ["a", "b"] and all(len(v) == 2 for v in timer.times_ms.values())
    assert all(t >= 0 for v in timer.times_ms.values() for t in v)
    assert timer.peak_gib == {"a": [None, None], "b": [None, None]}
    with pytest.raises(RuntimeError, match="boom"), timer("c"):
        raise RuntimeError("boom")
    assert len(timer.times_ms["c"]) == 1  # a failing phase is still recorded


def test_prepare_batch_casts_to_the_student_and_builds_flux_ids():
    student, _ = scm_models()
    data = prepare_batch(make_batch(2), student.double())
    assert data.latents.dtype == torch.float64 and data.prompt_embeds.dtype == torch.float64
    assert data.img_ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
    assert data.txt_ids.shape == (3, 3) and not data.txt_ids.any()
    with pytest.raises(ValueError, match="joint_attention_dim"):
        prepare_batch({**make_batch(2), "prompt_embeds": torch.zeros(2, 3, 5)}, student)
    with pytest.raises(ValueError, match="even"):
        prepare_batch({**make_batch(2), "latents": torch.zeros(2, 4, 3, 4)}, student)
    with pytest.raises(TypeError, match="dict"):
        prepare_batch([1, 2], student)
