"""load_pipeline: the right pipeline, student class and scheduler per method; checkpoints (.safetensors / .pt)."""

from __future__ import annotations

import pytest
import torch

from t2i_distill.models.flux import FluxStudent
from t2i_distill.pipelines import FluxMeanFlowPipeline, load_pipeline


def _perturbed_state(tiny_folder, kind):
    from t2i_distill.models.loading import load_student

    student, _ = load_student(tiny_folder, kind=kind)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in student.state_dict().items()}
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_meanflow_student_checkpoint_is_loaded(tmp_path, tiny_folder, suffix):
    state = _perturbed_state(tiny_folder, "meanflow")
    path = tmp_path / f"transformer_100{suffix}"
    if suffix == ".pt":
        torch.save({"module": state}, path)  # the reference's format
    else:
        from safetensors.torch import save_file

        save_file(state, path)
    pipe = load_pipeline("meanflow", tiny_folder, student_checkpoint=path)
    assert isinstance(pipe, FluxMeanFlowPipeline)
    loaded = pipe.transformer.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0)


def test_teacher_is_stock_flux_or_the_rescaled_x1_teacher(tmp_path, tiny_folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    stock = load_pipeline("teacher", tiny_folder)
    assert type(stock) is FluxPipeline and not isinstance(stock.transformer, FluxStudent)
    assert isinstance(stock.scheduler, FlowMatchEulerDiscreteScheduler)
    path = tmp_path / "rescaled.pt"
    torch.save({"module": _perturbed_state(tiny_folder, "flow")}, path)
    rescaled = load_pipeline("teacher", tiny_folder, student_checkpoint=path, torch_dtype=torch.bfloat16)
    assert type(rescaled) is FluxPipeline and isinstance(rescaled.transformer, FluxStudent)
    assert rescaled.transformer.config.time_scale == 1.0 and rescaled.transformer.dtype == torch.bfloat16


def test_bad_arguments(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match="method"):
        load_pipeline("ddim", tiny_folder)
    with pytest.raises(TypeError, match="torch_dtype"):
        load_pipeline("scm", tiny_folder, torch_dtype="bf16")
    with pytest.raises(FileNotFoundError):
        load_pipeline("scm", tiny_folder, student_checkpoint=tmp_path / "missing.pt")


def test_no_student_and_a_wrong_kind_are_refused_before_anything_loads(tiny_folder, students, monkeypatch):
    from t2i_distill.errors import ConfigurationError
    from t2i_distill.pipelines.loading import check_pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("t2i_distill.models.loading.load_student", no_loading)
    for method in ("scm", "meanflow"):
        with pytest.raises(ConfigurationError, match=rf"--method {method} needs a student.*untrained base model"):
            load_pipeline(method, tiny_folder)
    with pytest.raises(ConfigurationError, match=r"is a MeanFlow student .*--method scm needs an sCM student"):
        check_pipeline("scm", tiny_folder, students["meanflow"])
    with pytest.raises(ConfigurationError, match=r"is an sCM student .*--method teacher needs a flow model"):
        check_pipeline("teacher", tiny_folder, students["scm"])
    assert check_pipeline("teacher", tiny_folder) is None  # the stock folder's own ×1000 transformer
