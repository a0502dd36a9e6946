"""load_pipeline: the right pipeline, student class and scheduler per method; checkpoints (.safetensors / .pt); the
refusals (no student, a checkpoint of another kind), made before anything loads."""

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


def _forbid_loading(monkeypatch):
    """Make every way of loading weights fail the test: models, pipelines, and checkpoint tensors (headers only)."""
    from diffusers import DiffusionPipeline, ModelMixin

    import t2i_distill.models.checkpoint_files as files
    import t2i_distill.models.loading as models_loading

    def no_loading(*args, **kwargs):
        raise AssertionError("something was loaded before the refusal")

    monkeypatch.setattr(models_loading, "load_student", no_loading)
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(no_loading))
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(no_loading))
    read = files.read_checkpoint

    def headers_only(path, *, tensors=True):
        assert not tensors, f"the tensors of {path} were read before the refusal"
        return read(path, tensors=False)

    monkeypatch.setattr(files, "read_checkpoint", headers_only)
    monkeypatch.setattr(models_loading, "read_checkpoint", headers_only)


def test_a_wrong_kind_checkpoint_is_refused_naming_both_kinds(tiny_folder, students):
    from t2i_distill.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"is a MeanFlow student .*--method scm needs an sCM student") as info:
        load_pipeline("scm", tiny_folder, student_checkpoint=students["meanflow"])
    assert isinstance(info.value, ValueError) and str(students["meanflow"]) in str(info.value)
    with pytest.raises(ConfigurationError, match=r"is an sCM student .*--method meanflow needs a MeanFlow student"):
        load_pipeline("meanflow", tiny_folder, student_checkpoint=students["scm"])
    with pytest.raises(ConfigurationError, match=r"is an sCM student .*--method teacher needs a flow model"):
        load_pipeline("teacher", tiny_folder, student_checkpoint=students["scm"])


def test_check_pipeline_refuses_before_anything_loads(tiny_folder, students, monkeypatch):
    from t2i_distill.errors import ConfigurationError
    from t2i_distill.pipelines.loading import check_pipeline

    _forbid_loading(monkeypatch)
    for method in ("scm", "meanflow"):
        for refuse in (check_pipeline, load_pipeline):  # load_pipeline refuses through check_pipeline, first
            with pytest.raises(ValueError, match=rf"--method {method} needs a student.*untrained base model"):
                refuse(method, tiny_folder)
    with pytest.raises(ConfigurationError, match=r"is a MeanFlow student .*--method scm needs an sCM student"):
        check_pipeline("scm", tiny_folder, students["meanflow"])
    with pytest.raises(ConfigurationError, match=r"is a MeanFlow student .*--method scm needs an sCM student"):
        load_pipeline("scm", tiny_folder, student_checkpoint=students["meanflow"])
    # What it accepts, it accepts from headers alone too.
    assert check_pipeline("teacher", tiny_folder) is None  # the stock folder's own ×1000 transformer
    assert check_pipeline("scm", tiny_folder, students["scm"]).time_scale == 1.0  # saved without metadata: ×1
    assert check_pipeline("meanflow", tiny_folder, students["meanflow"]).time_scale == 1.0
