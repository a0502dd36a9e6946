"""A model's time scale is part of the model: which scale weights were trained at, refusals of a mismatch, the
float32 time embeddings of the stock-weights (×1000) path in all three JVP modes, and checkpoints in every format."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from t2i_distill import apply_kernels_to_flux
from t2i_distill.errors import ConfigurationError
from t2i_distill.losses import scm_loss
from t2i_distill.losses.meanflow import meanflow_loss
from t2i_distill.models import FluxStudent, TrigFlowStudent, check_load, load_student, read_checkpoint
from t2i_distill.models.checkpoint_files import metadata_for
from t2i_distill.models.time_scale import folder_time_scale
from t2i_distill.tiny import build_tiny_flux
from t2i_kernels.testing import assert_parity
from tests.t2i_distill.losses.helpers import (
    build,
    grads,
    make_batch,
    meanflow_draws,
    null_condition,
    scm_draws,
    to_float64,
)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    build_tiny_flux(seed=3).save_pretrained(root / "transformer")
    return root


# -- which scale ---------------------------------------------------------------------------------------------------
def test_a_stock_folder_is_x1000_and_a_folder_of_ours_records_its_scale(stock, tmp_path):
    assert folder_time_scale(stock)[0] == 1000.0
    model, _ = load_student(stock, kind="flow")
    assert model.config.time_scale == 1000.0 and model.config.time_embedding_fp32
    model.register_to_config(time_scale=1.0, time_embedding_fp32=False)
    model.save_pretrained(tmp_path / "x1" / "transformer")
    assert json.loads((tmp_path / "x1" / "transformer" / "config.json").read_text())["time_scale"] == 1.0
    again, _ = load_student(tmp_path / "x1", kind="trigflow")
    assert again.config.time_scale == 1.0 and not again.config.time_embedding_fp32


def test_a_checkpoint_without_a_record_is_x1_and_one_with_a_record_keeps_it(stock, tmp_path):
    weights = dict(build_tiny_flux(seed=4).state_dict())
    torch.save({"module": weights}, tmp_path / "reference.pt")
    save_file(weights, tmp_path / "ours.safetensors", metadata=metadata_for("flow", 1000.0))
    x1, _ = load_student(stock, kind="flow", rescaled_checkpoint=tmp_path / "reference.pt")
    x1000, _ = load_student(stock, kind="flow", rescaled_checkpoint=tmp_path / "ours.safetensors")
    assert x1.config.time_scale == 1.0 and x1000.config.time_scale == 1000.0


def test_a_mismatched_time_scale_is_refused_naming_the_flags(stock, tmp_path):
    with pytest.raises(ConfigurationError, match=r"--time_scale 1: the weights were trained at ×1000.*rescale"):
        check_load(stock, kind="trigflow", time_scale=1.0)
    torch.save({"module": dict(build_tiny_flux(seed=4).state_dict())}, tmp_path / "reference.pt")
    with pytest.raises(ConfigurationError, match=r"--time_scale 1000: the weights were trained at ×1 .*reference\.pt"):
        check_load(stock, kind="trigflow", checkpoint=tmp_path / "reference.pt", time_scale=1000.0)
    assert check_load(stock, kind="trigflow", checkpoint=tmp_path / "reference.pt", time_scale=1.0).time_scale == 1.0


def test_a_missing_folder_is_named_not_a_hub_error(tmp_path):
    with pytest.raises(ConfigurationError, match=r"--pretrained_model_name_or_path .*absent.*does not exist"):
        check_load(tmp_path / "absent")


# -- checkpoints in every format -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["folder", "sharded", "prefixed-pt", "compiled-safetensors", "pair-pt"])
def test_every_checkpoint_format_loads_the_same_weights(stock, tmp_path, fmt):
    source = TrigFlowStudent(**{k: v for k, v in build_tiny_flux(seed=6).config.items() if not k.startswith("_")})
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    if fmt == "folder":
        source.save_pretrained(tmp_path / "ckpt")
        path = tmp_path / "ckpt"
    elif fmt == "sharded":
        source.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
        assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
        path = next((tmp_path / "ckpt").glob("*.index.json"))
    elif fmt == "prefixed-pt":
        path = tmp_path / "ckpt.pt"
        torch.save({"module": {"module." + k: v for k, v in weights.items()}}, path)
    elif fmt == "compiled-safetensors":
        path = tmp_path / "ckpt.safetensors"
        save_file({"_orig_mod." + k: v.contiguous() for k, v in weights.items()}, path)
    else:
        path = tmp_path / "ckpt.pt"
        torch.save({"student." + k: v for k, v in weights.items()}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.kind == "trigflow" and checkpoint.state_dict.keys() == weights.keys()
    model, _ = load_student(stock, kind="trigflow", rescaled_checkpoint=path, accepted_kinds=("trigflow",))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def test_a_checkpoint_of_another_kind_or_with_foreign_keys_is_refused(stock, tmp_path):
    meanflow = FluxStudent(**{k: v for k, v in build_tiny_flux(seed=6).config.items() if not k.startswith("_")},
                           dual_timestep=True)
    save_file({k: v.contiguous() for k, v in meanflow.state_dict().items()}, tmp_path / "mf.safetensors")
    with pytest.raises(ConfigurationError, match=r"is a MeanFlow student .*--method scm needs an sCM student"):
        check_load(stock, kind="trigflow", checkpoint=tmp_path / "mf.safetensors", accepted_kinds=("trigflow",),
                   flags={"kind": "--method scm", "checkpoint": "--student_checkpoint"})
    other = {f"model.diffusion_model.{i}.weight": torch.zeros(2) for i in range(68)}
    torch.save({"module": other}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigurationError, match=r"0 of \d+ model keys match; \d+ missing .*68 unexpected"):
        check_load(stock, kind="flow", checkpoint=tmp_path / "foreign.pt")


# -- the stock-weights path: ×1000 with float32 time embeddings ------------------------------------------------
def _x1000(cls, seed, **overrides):
    return build(cls, seed, time_scale=1000.0, time_embedding_fp32=True, **overrides)


def _run_scm(student, teacher, batch, draws, mode):
    student.zero_grad(set_to_none=True)
    loss, logs = scm_loss(student, teacher, batch, step=2000, draws=draws, jvp_mode=mode)
    loss.backward()
    return loss.detach(), logs, grads(student)


@pytest.mark.parametrize("mode", ["dual", "func"])
def test_scm_at_x1000_with_float32_time_embeddings_agrees_across_jvp_modes(mode):
    student, teacher = _x1000(TrigFlowStudent, 0), _x1000(TrigFlowStudent, 1).requires_grad_(False)
    batch, draws = make_batch(2), scm_draws(2)
    s64, b64, d64, _ = to_float64(student, batch, draws)
    truth = _run_scm(s64, copy.deepcopy(teacher).double(), b64, d64, "reference")
    same = _run_scm(student, teacher, batch, draws, "reference")
    model = apply_kernels_to_flux(copy.deepcopy(student)) if mode == "func" else copy.deepcopy(student)
    ours = _run_scm(model, teacher, batch, draws, mode)
    assert_parity("flux_model", "out", ours[0], same[0], truth[0])
    for name in truth[2]:
        assert_parity("flux_model", "dparam", ours[2][name], same[2][name], truth[2][name])


@pytest.mark.parametrize("mode", ["dual", "func"])
def test_meanflow_at_x1000_agrees_across_jvp_modes(mode):
    student = _x1000(FluxStudent, 0, dual_timestep=True)
    teacher = _x1000(FluxStudent, 1).requires_grad_(False)
    batch, null = make_batch(2), null_condition()
    draws = meanflow_draws([0.6, 0.95], [0.2, 0.4], [False, False], [False, False])

    def run(model, teacher, batch, draws, null, jvp_mode):
        model.zero_grad(set_to_none=True)
        loss, _ = meanflow_loss(model, teacher, batch, null_condition=null, draws=draws, jvp_mode=jvp_mode)
        loss.backward()
        return loss.detach(), grads(model)

    s64, b64, d64, n64 = to_float64(student, batch, draws, null)
    truth = run(s64, copy.deepcopy(teacher).double(), b64, d64, n64, "reference")
    same = run(student, teacher, batch, draws, null, "reference")
    model = apply_kernels_to_flux(copy.deepcopy(student)) if mode == "func" else copy.deepcopy(student)
    ours = run(model, teacher, batch, draws, null, mode)
    assert_parity("flux_model", "out", ours[0], same[0], truth[0])
    for name in truth[1]:
        assert_parity("flux_model", "dparam", ours[1][name], same[1][name], truth[1][name])


def test_the_time_tangent_scales_by_1000_and_float32_embeddings_match_the_model_dtype_path_in_float32():
    x1 = build(FluxStudent, 0)
    x1000 = build(FluxStudent, 0, time_scale=1000.0, time_embedding_fp32=True)
    x1000_model_dtype = build(FluxStudent, 0, time_scale=1000.0)
    pooled = torch.randn(3, x1.config.pooled_projection_dim)
    guidance = torch.full((3,), 3.5)
    t = torch.tensor([0.1, 0.5, 0.9])
    # In float32 the two ×1000 paths compute the same thing (the float32 path only changes what bf16 rounds).
    torch.testing.assert_close(x1000.conditioning(t, pooled, guidance), x1000_model_dtype.conditioning(t, pooled,
                                                                                                          guidance))
    # d temb/dt at ×1000 is 1000 × the derivative of the ×1 model's embedding taken at 1000·t.
    _, tangent = torch.func.jvp(lambda s: x1000.conditioning(s, pooled, guidance), (t,), (torch.ones(3),))
    _, tangent_x1 = torch.func.jvp(lambda s: x1.conditioning(s, pooled, guidance * 1000), (t * 1000,),
                                   (torch.ones(3),))
    torch.testing.assert_close(tangent, 1000 * tangent_x1, rtol=1e-4, atol=1e-3)
