"""Loading students and teachers: diffusers folders and hub ids through the real ``from_pretrained``, the reference's
rescaled checkpoint (``{"module": sd}`` ``.pt``) and safetensors, key reports, and MeanFlow's copied embedder.

Every "pretrained" model is a tiny FLUX saved locally with ``save_pretrained`` into ``<root>/transformer``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from t2i_distill.errors import ConfigurationError
from t2i_distill.models import FluxStudent, LoadReport, TrigFlowStudent, load_state_dict_file, load_student
from t2i_distill.tiny import TINY_FLUX_CONFIG, build_tiny_flux

EMBEDDER = "time_text_embed.timestep_embedder."
EMBEDDER2 = "timestep_embedder2."
LOGVAR_KEYS = ["logvar_linear.bias", "logvar_linear.weight"]


class Payload:
    """An arbitrary Python object: what a pickle may carry and ``weights_only=True`` must refuse."""


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A diffusers-style folder holding a tiny stock FLUX transformer, and its weights."""
    root = tmp_path_factory.mktemp("tiny-flux")
    model = build_tiny_flux(seed=11)
    model.save_pretrained(root / "transformer")
    return root, {k: v.clone() for k, v in model.state_dict().items()}


def _rescaled(seed: int = 12) -> dict[str, torch.Tensor]:
    """A stand-in for the rescaled checkpoint: FLUX keys, values different from the folder's."""
    return dict(build_tiny_flux(seed=seed).state_dict())


def _assert_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


def _assert_no_meta(model: torch.nn.Module) -> None:
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    assert not meta, meta


# -- from_pretrained ---------------------------------------------------------------------------------------------
def test_a_stock_folder_loads_at_x1000_with_float32_time_embeddings(stock):
    root, weights = stock
    model, report = load_student(root, kind="flow")
    assert type(model) is FluxStudent and model.config.time_scale == 1000.0 and not model.config.dual_timestep
    assert model.config.time_embedding_fp32
    _assert_state(model, weights)
    assert report.missing == [] and report.unexpected == [] and report.initialised_from == {} and report.clean


def test_trigflow_from_a_flux_folder_initialises_the_logvar_head(stock):
    root, weights = stock
    model, report = load_student(root, kind="trigflow")  # documented init: clean
    assert type(model) is TrigFlowStudent
    _assert_no_meta(model)
    _assert_state(model, weights)
    assert report.missing == LOGVAR_KEYS and report.unexpected == []
    assert set(report.initialised_from) == {"logvar_linear"} and report.clean
    assert torch.count_nonzero(model.logvar_linear.bias) == 0
    assert torch.count_nonzero(model.logvar_linear.weight) == model.inner_dim


def test_meanflow_copies_the_first_embedder_without_sharing_storage(stock):
    root, weights = stock
    model, report = load_student(root, kind="meanflow")
    assert model.config.dual_timestep
    _assert_no_meta(model)
    _assert_state(model, weights)
    assert report.initialised_from == {"timestep_embedder2": "time_text_embed.timestep_embedder"}
    assert report.missing == sorted(EMBEDDER2 + k for k in ("linear_1.weight", "linear_1.bias", "linear_2.weight",
                                                             "linear_2.bias"))
    params = dict(model.named_parameters())
    for leaf in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
        first, second = params[EMBEDDER + leaf], params[EMBEDDER2 + leaf]
        assert torch.equal(first, second), leaf
        assert first.data_ptr() != second.data_ptr(), leaf
        assert second.requires_grad, leaf
    before = params[EMBEDDER + "linear_1.weight"].detach().clone()
    with torch.no_grad():
        params[EMBEDDER2 + "linear_1.weight"].add_(1.0)
    assert torch.equal(params[EMBEDDER + "linear_1.weight"], before)


def test_torch_dtype_and_materialised_parameters(stock):
    root, _ = stock
    model, _ = load_student(root, kind="meanflow", torch_dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    params = dict(model.named_parameters())
    assert torch.equal(params[EMBEDDER2 + "linear_2.weight"], params[EMBEDDER + "linear_2.weight"])


# diffusers passes a deprecated argument to hf_hub_download; not ours to fix.
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning")
def test_hub_id_through_an_offline_local_cache(stock, tmp_path, monkeypatch):
    """A Hugging Face cache laid out as huggingface_hub writes it (``models--<org>--<name>/snapshots/<commit>`` and
    ``refs/main``; plain files instead of blob symlinks, which the resolver does not need), read offline by hub id.

    huggingface_hub reads ``HF_HUB_OFFLINE`` into ``constants.HF_HUB_OFFLINE`` at import, and checks that constant at
    request time, so the test sets both the variable and the constant.
    """
    root, weights = stock
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-flux"
    shutil.copytree(root / "transformer", repo / "snapshots" / commit / "transformer")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    checkpoint = _rescaled()
    torch.save({"module": checkpoint}, tmp_path / "rescaled.pt")
    model, report = load_student("tiny-org/tiny-flux", kind="meanflow", cache_dir=tmp_path / "hub",
                                 rescaled_checkpoint=tmp_path / "rescaled.pt")
    _assert_state(model, checkpoint)
    assert "tiny-org/tiny-flux" in report.pretrained
    assert set(report.initialised_from) == {"timestep_embedder2"}
    assert torch.equal(model.timestep_embedder2.linear_1.weight, checkpoint[EMBEDDER + "linear_1.weight"])

    # Not in the cache, and offline: no download attempted; named with the flag, not as a raw hub error.
    with pytest.raises(ConfigurationError, match="--pretrained_model_name_or_path 'tiny-org/other'"):
        load_student("tiny-org/other", cache_dir=tmp_path / "hub")


# -- rescaled checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["module.pt", "raw.pth", "raw.bin", "safetensors"])
def test_rescaled_checkpoint_round_trip(stock, tmp_path, fmt):
    root, _ = stock
    checkpoint = _rescaled()
    path = tmp_path / f"rescaled.{fmt.rsplit('.', 1)[-1]}"
    if fmt == "safetensors":
        save_file(checkpoint, path)
    else:
        torch.save({"module": checkpoint} if fmt.startswith("module") else checkpoint, path)
    loaded = load_state_dict_file(path)
    assert loaded.keys() == checkpoint.keys() and all(torch.equal(loaded[k], checkpoint[k]) for k in checkpoint)

    teacher, report = load_student(root, kind="flow", rescaled_checkpoint=path)
    _assert_state(teacher, checkpoint)
    assert report.missing == [] and report.unexpected == [] and report.checkpoint == repr(str(path))


def test_missing_and_unexpected_checkpoint_keys_are_refused_with_counts_and_examples(stock, tmp_path):
    root, weights = stock
    checkpoint = _rescaled()
    del checkpoint["proj_out.bias"]
    checkpoint["extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save({"module": checkpoint}, path)

    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. proj_out\.bias\); 1 unexpected \(e\.g\. extra_head"
                                         r"\.weight\).*nothing was loaded"):
        load_student(root, kind="flow", rescaled_checkpoint=path)


def test_reference_scm_checkpoint_loads_into_the_trigflow_student_exactly(stock, tmp_path):
    """The reference saves ``{"module": FluxTrigFlow.state_dict()}``: FLUX keys + ``logvar_linear.{weight,bias}``."""
    root, _ = stock
    reference = TrigFlowStudent(**TINY_FLUX_CONFIG)
    with torch.no_grad():
        reference.logvar_linear.bias.fill_(0.25)
    checkpoint = dict(reference.state_dict())
    path = tmp_path / "transformer_1000.pt"
    torch.save({"module": checkpoint}, path)

    student, report = load_student(root, kind="trigflow", rescaled_checkpoint=path)
    assert report.missing == [] and report.unexpected == [] and report.initialised_from == {}
    _assert_state(student, checkpoint)

    with pytest.raises(ValueError, match=r"is an sCM student .*needs a flow model"):  # not a teacher
        load_student(root, kind="flow", rescaled_checkpoint=path)


def test_meanflow_checkpoint_keeps_its_second_embedder(stock, tmp_path):
    root, _ = stock
    checkpoint = _rescaled()
    embedder2 = {EMBEDDER2 + k[len(EMBEDDER):]: torch.randn_like(v) for k, v in checkpoint.items()
                 if k.startswith(EMBEDDER)}
    path = tmp_path / "meanflow.safetensors"
    save_file(checkpoint | embedder2, path)
    model, report = load_student(root, kind="meanflow", rescaled_checkpoint=path)
    assert report.missing == [] and report.unexpected == [] and report.initialised_from == {}
    _assert_state(model, checkpoint | embedder2)


def test_trained_trigflow_folder_round_trips_through_save_pretrained(stock, tmp_path):
    root, _ = stock
    model, _ = load_student(root, kind="trigflow")
    with torch.no_grad():
        model.logvar_linear.bias.fill_(-1.5)
    model.save_pretrained(tmp_path / "transformer")
    again, report = load_student(tmp_path, kind="trigflow")
    assert report.missing == [] and report.unexpected == []
    _assert_state(again, model.state_dict())


def test_a_parameter_no_source_provides_is_an_error(stock, tmp_path):
    root, weights = stock
    folder = tmp_path / "transformer"
    shutil.copytree(root / "transformer", folder)
    save_file({k: v for k, v in weights.items() if k != "norm_out.linear.bias"},
              folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. norm_out\.linear\.bias\)"):
        load_student(tmp_path, kind="flow")

    checkpoint = _rescaled()  # the checkpoint fills the gap: nothing missing, the value is the checkpoint's
    save_file(checkpoint, tmp_path / "rescaled.safetensors")
    model, report = load_student(tmp_path, kind="flow", rescaled_checkpoint=tmp_path / "rescaled.safetensors")
    assert report.missing == [] and torch.equal(model.norm_out.linear.bias, checkpoint["norm_out.linear.bias"])


def test_shape_and_dtype_mismatches_are_one_error_listing_each(stock, tmp_path):
    root, _ = stock
    checkpoint = _rescaled()
    checkpoint["proj_out.weight"] = torch.zeros(3, 3)
    checkpoint["x_embedder.bias"] = torch.zeros(checkpoint["x_embedder.bias"].shape, dtype=torch.int64)
    torch.save({"module": checkpoint}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"1 with another shape \(proj_out\.weight: file \(3, 3\), model \(16, 64\)"):
        load_student(root, rescaled_checkpoint=tmp_path / "bad.pt")
    del checkpoint["proj_out.weight"]
    checkpoint["proj_out.weight"] = build_tiny_flux(seed=1).proj_out.weight.detach()
    torch.save({"module": checkpoint}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"x_embedder\.bias: checkpoint dtype torch\.int64"):
        load_student(root, rescaled_checkpoint=tmp_path / "bad.pt")


# -- load_state_dict_file errors ---------------------------------------------------------------------------------
def test_pickle_with_an_arbitrary_object_is_refused(stock, tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"module": {"a": torch.ones(1)}, "args": Payload()}, path)
    with pytest.raises(ValueError, match=r"not a plain weights file(.|\n)*refused it for safety(.|\n)*Payload"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match="not a plain weights file"):
        load_student(stock[0], rescaled_checkpoint=path)


@pytest.mark.parametrize(
    "name, content, error, pattern",
    [
        ("absent.pt", None, FileNotFoundError, r"absent\.pt"),
        ("weights.ckpt", {"a": torch.ones(1)}, ValueError, r"unsupported file 'weights\.ckpt'"),
        ("nested.pt", {"state_dict": {"a": torch.ones(1)}}, ValueError, r"'state_dict': dict.*no tensors at all"),
        ("mixed.pt", {"module": {"a": torch.ones(1), "step": 3}}, ValueError, r"entry 'module'.*'step': int"),
        ("list.pt", [torch.ones(1)], ValueError, r"expected a state dict.*found list"),
        ("empty.pt", {"module": {}}, ValueError, r"empty"),
        ("garbage.pt", b"not a checkpoint", ValueError, r"not a plain weights file.*could not unpickle it"),
        ("truncated.pt", b"\x80", ValueError, r"could not"),
        ("garbage.safetensors", b"not a checkpoint", ValueError, r"not a valid safetensors file"),
    ],
)
def test_load_state_dict_file_errors_name_path_expected_and_found(tmp_path, name, content, error, pattern):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=pattern) as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)


def test_unknown_kind_and_report_text():
    with pytest.raises(ValueError, match=r"`kind`.*'dual'"):
        load_student("unused", kind="dual")
    report = LoadReport(missing=["a.weight"], unexpected=["b.bias"], initialised_from={"a": "zeros"},
                        pretrained="FluxStudent (flow) from 'x'", checkpoint="'c.pt'")
    text = str(report)
    assert "missing from checkpoint 'c.pt' (1): a.weight" in text
    assert "unexpected, ignored (1): b.bias" in text and "a <- zeros" in text
    assert report.unexplained_missing == [] and not report.clean
