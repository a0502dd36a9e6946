"""LoRA students (``--lora_rank``) through the trainer on the tiny offline FLUX: every ``--jvp`` mode trains only the
adapter and the fully trained heads, a run resumes exactly, and the exports are the merged student (loaded strictly,
computing what the LoRA student computes) and the adapter alone (put back onto the base: the same model, bit for
bit). Plus :func:`apply_lora` on real, meta and fake parameters, and the flags' refusals, all at once."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from t2i_distill.training import trainer
from t2i_distill.training.args import parse_args
from t2i_distill.training.lora import (
    DEFAULT_LORA_TARGETS,
    META_LORA,
    apply_lora,
    load_lora_adapter,
    merged_state_dict,
)
from t2i_distill.training.trainer import train
from tests.t2i_distill.training.test_trainer import _equal, flags, folder, images  # noqa: F401  (fixtures)

KINDS = {"scm": "trigflow", "meanflow": "meanflow"}
HEADS = {"scm": ["logvar_linear"], "meanflow": ["timestep_embedder2"]}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(method, folder, images, out, *extra, monkeypatch=None):  # noqa: F811
    """``train`` with LoRA rank 2; returns (summary, the student's state after preparation, the trained student)."""
    seen = {}
    if monkeypatch is not None:
        real = trainer.prepare_student

        def spy(student, args):
            real(student, args)
            seen["start"] = _state(student)

        monkeypatch.setattr(trainer, "prepare_student", spy)

    def finish(engine):
        seen["model"] = copy.deepcopy(engine.unwrapped.student)

    summary = train(parse_args(method, flags(folder, images, out, "--lora_rank", "2", *extra)), on_finish=finish)
    return summary, seen.get("start"), seen["model"]


def _inputs(model, seed=0):
    from t2i_distill.tiny import TinyFluxShape, tiny_flux_inputs

    inputs = tiny_flux_inputs(model, TinyFluxShape(batch=2, text_tokens=8, latent_h=2, latent_w=2), seed=seed)
    if model.config.dual_timestep:  # MeanFlow's t - r
        inputs["timestep2"] = inputs["timestep"] * 0.5
    return inputs


def _velocity(model, inputs):
    with torch.no_grad():  # TrigFlowStudent returns its velocity; FluxStudent diffusers' tuple
        return model(**inputs) if hasattr(model, "logvar_linear") else model(**inputs, return_dict=False)[0]


# -- apply_lora ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_apply_lora_freezes_the_base_keeps_the_heads_and_starts_at_the_base(folder, method):  # noqa: F811
    from t2i_distill.models import load_student

    model, _ = load_student(folder, kind=KINDS[method])
    before = _velocity(model, _inputs(model))
    heads = apply_lora(model, 4, None, None)
    assert heads == HEADS[method]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith(tuple(heads)) for n in trained)
    assert any(n.startswith(heads[0]) for n in trained)
    adapted = {n.split(".lora_A.")[0] for n in trained if ".lora_A." in n}
    assert {n.rsplit(".", 1)[-1] for n in adapted} >= {"to_q", "proj_mlp", "proj_out"}
    assert "proj_out" in adapted  # peft's suffix rule: the final output projection too (documented)
    assert model.peft_config["default"].lora_alpha == 4  # alpha defaults to the rank: a scale of 1
    # peft's default initialisation (B = 0): the LoRA student starts as its base, bit for bit.
    assert torch.equal(_velocity(model, _inputs(model)), before)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, 4, None, None)


@pytest.mark.parametrize("where", ["meta", "fake", "fake, mode entered"])
def test_apply_lora_on_meta_and_fake_parameters_reads_no_data(where):
    """What a memory planner does: a model of shapes only, the adapter added with no data read or written (fake:
    also while the fake mode is active, where a planner builds and steps its model)."""
    from contextlib import nullcontext

    from torch._subclasses.fake_tensor import FakeTensorMode

    from t2i_distill.models import FluxStudent
    from t2i_distill.tiny import TINY_FLUX_CONFIG

    real = FluxStudent(**TINY_FLUX_CONFIG, dual_timestep=True)
    apply_lora(real, 3, 6.0, list(DEFAULT_LORA_TARGETS))
    mode = FakeTensorMode()
    with torch.device("meta") if where == "meta" else mode:
        abstract = FluxStudent(**TINY_FLUX_CONFIG, dual_timestep=True)
    # meta: in bf16, to see the adapter take the base layer's dtype (a fake model cannot be cast: torch swaps tensors).
    dtype = torch.bfloat16 if where == "meta" else torch.float32
    if where == "meta":
        abstract.to(dtype)
    with mode if where == "fake, mode entered" else nullcontext():
        assert apply_lora(abstract, 3, 6.0, list(DEFAULT_LORA_TARGETS)) == ["timestep_embedder2"]
        layer = abstract.single_transformer_blocks[0].proj_mlp
        if where != "meta":  # the adapted layer runs on fake inputs: shapes only
            with mode:
                assert layer(torch.empty(2, 5, layer.in_features)).shape == (2, 5, layer.out_features)
    shapes = {n: (tuple(p.shape), p.requires_grad) for n, p in abstract.named_parameters()}
    assert shapes == {n: (tuple(p.shape), p.requires_grad) for n, p in real.named_parameters()}
    lora = [p for n, p in abstract.named_parameters() if ".lora_" in n]
    assert lora and all(p.dtype == dtype for p in lora)  # like the base layer's
    if where == "meta":
        assert all(p.device.type == "meta" for p in lora)
    else:
        assert all(getattr(p, "fake_mode", None) is mode for p in lora)  # FakeTensors of the model's own mode


def test_apply_lora_names_every_bad_argument():
    from t2i_distill.models import FluxStudent
    from t2i_distill.tiny import TINY_FLUX_CONFIG

    model = FluxStudent(**TINY_FLUX_CONFIG)
    with pytest.raises(ValueError) as error:
        apply_lora(model, 0, -1.0, ["to_q"], dropout=1.5)
    for needle in ("--lora_rank): expected an integer >= 1, got 0", "--lora_alpha): expected a finite number > 0",
                   "--lora_dropout): expected a number in [0, 1), got 1.5"):
        assert needle in str(error.value)
    with pytest.raises(ValueError, match="'to_qq' matches no module .* e.g. .*to_q"):
        apply_lora(model, 2, None, ["to_qq"])


# -- the trainer: every JVP mode ----------------------------------------------------------------------------------
MODES = [("scm", "dual", ()), ("scm", "func", ()), ("scm", "reference", ("--gradient_checkpointing",)),
         ("scm", "fd", ()), ("meanflow", "dual", ("--lora_dropout", "0.1")),
         ("meanflow", "func", ("--lora_dropout", "0.1")), ("meanflow", "reference", ()),
         ("meanflow", "fd", ("--lora_alpha", "4"))]


@pytest.mark.parametrize("method, jvp, extra", MODES, ids=[f"{m}-{j}" for m, j, _ in MODES])
def test_every_jvp_mode_trains_only_the_adapter_and_the_heads(folder, images, tmp_path, monkeypatch,  # noqa: F811
                                                             method, jvp, extra):
    out = tmp_path / "run"
    summary, start, model = _run(method, folder, images, out, "--max_train_steps", "2", "--jvp", jvp,
                                 "--checkpointing_steps", "2", *extra, monkeypatch=monkeypatch)
    assert summary["global_step"] == 2 and summary["counters"]["nonfinite_skipped"] == 0  # finite losses
    end = _state(model)
    assert start.keys() == end.keys()
    changed = {k for k in end if not torch.equal(start[k], end[k])}
    allowed = {k for k in end if ".lora_" in k or k.startswith(tuple(HEADS[method]))}
    assert changed <= allowed, sorted(changed - allowed)[:5]
    assert any(".lora_B." in k for k in changed) and any(k.startswith(HEADS[method][0]) for k in changed)
    assert all(torch.isfinite(v).all() for v in end.values())
    # The usual export is the merged student; the adapter beside it.
    assert _equal(load_file(str(out / "transformer_2.safetensors")),
                  merged_state_dict(end, {"r": 2, "lora_alpha": 4.0 if "--lora_alpha" in extra else 2.0}))
    assert (out / "adapter_2.safetensors").is_file()


# -- exports ------------------------------------------------------------------------------------------------------
def test_exports_are_the_merged_student_and_the_adapter_and_come_back_on_resume(folder, images, tmp_path):  # noqa: F811
    from t2i_distill.models import load_student

    out = tmp_path / "run"
    common = ("--jvp", "reference", "--checkpointing_steps", "2", "--ema_decay", "0.5", "--lora_alpha", "3")
    _, _, lora_model = _run("scm", folder, images, out, "--max_train_steps", "2", *common)
    lora_model.eval()
    inputs = _inputs(lora_model, seed=1)
    expected = _velocity(lora_model, inputs)

    # The merged export: a plain TrigFlow student, loaded strictly, computing what the LoRA student computes.
    merged, report = load_student(folder, kind="trigflow", rescaled_checkpoint=out / "transformer_2.safetensors",
                                  accepted_kinds=("trigflow",))
    assert report.clean and not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    torch.testing.assert_close(_velocity(merged, inputs), expected, atol=1e-5, rtol=1e-5)

    # The adapter alone, put back onto the base: the trained LoRA student, bit for bit.
    with safe_open(str(out / "adapter_2.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    settings = json.loads(metadata[META_LORA])
    assert (settings["r"], settings["lora_alpha"], settings["fully_trained"]) == (2, 3.0, ["logvar_linear"])
    assert metadata["t2i_distill.kind"] == "trigflow" and "logvar_linear.weight" in keys
    assert all(".lora_" in k or k.startswith("logvar_linear.") for k in keys)
    assert not any(".default." in k for k in keys)  # peft's saved keys: no adapter name
    with pytest.raises(ValueError, match="it is a LoRA adapter .* give the merged transformer_<step>.safetensors"):
        load_student(folder, kind="trigflow", rescaled_checkpoint=out / "adapter_2.safetensors")
    base, _ = load_student(folder, kind="trigflow")
    assert load_lora_adapter(base, out / "adapter_2.safetensors") == ["logvar_linear"]
    assert _equal(_state(base.eval()), _state(lora_model))
    assert torch.equal(_velocity(base, inputs), expected)

    # The EMA: both exports, the merged one the merge of the EMA adapter.
    ema_base, _ = load_student(folder, kind="trigflow")
    load_lora_adapter(ema_base, out / "adapter_2_ema.safetensors")
    ema = load_file(str(out / "transformer_2_ema.safetensors"))
    assert _equal(ema, merged_state_dict(_state(ema_base), settings))
    assert not torch.equal(ema["logvar_linear.weight"], merged.logvar_linear.weight)

    # A checkpoint whose exports are missing gets them written again on resume, equal to the first ones.
    first = {name: load_file(str(out / name)) for name in ("adapter_2.safetensors", "adapter_2_ema.safetensors")}
    for name in first:
        (out / name).unlink()
    train(parse_args("scm", flags(folder, images, out, "--lora_rank", "2", "--max_train_steps", "2",
                                  "--resume_from_checkpoint", "latest", *common)))
    assert all(_equal(load_file(str(out / name)), first[name]) for name in first)


# -- exact resume -------------------------------------------------------------------------------------------------
def test_resume_is_exact_and_other_lora_flags_are_refused_by_name(folder, images, tmp_path):  # noqa: F811
    """4 steps straight == 2 steps, resume, 2 more (with adapter dropout: the RNG comes back too)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--jvp", "reference", "--checkpointing_steps", "2", "--ema_decay", "0.9", "--lora_dropout", "0.1")
    _run("meanflow", folder, images, straight, "--max_train_steps", "4", *common)
    _run("meanflow", folder, images, split, "--max_train_steps", "2", *common)
    _run("meanflow", folder, images, split, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common)
    for name in ("transformer_4.safetensors", "adapter_4.safetensors", "adapter_4_ema.safetensors",
                 "transformer_4_ema.safetensors"):
        assert _equal(load_file(str(straight / name)), load_file(str(split / name))), name
    for name in ("optimizer.pt", "extra.pt"):
        assert _equal(*(torch.load(out / "checkpoint-4" / name, weights_only=True) for out in (straight, split))), name
    assert not _equal(load_file(str(split / "adapter_2.safetensors")), load_file(str(split / "adapter_4.safetensors")))
    with pytest.raises(ValueError, match="was written by a lora 'rank 2, .*' run; this run's lora is 'rank 3"):
        train(parse_args("meanflow", flags(folder, images, split, "--lora_rank", "3", "--max_train_steps", "6",
                                           "--resume_from_checkpoint", "latest", *common)))


# -- flags --------------------------------------------------------------------------------------------------------
def test_lora_flags_are_refused_before_anything_loads_all_at_once(folder, images, tmp_path, capsys,  # noqa: F811
                                                                 monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(SystemExit):
        parse_args("meanflow", flags(folder, images, tmp_path / "a", "--lora_rank", "4", "--jvp", "fd",
                                     "--lora_dropout", "0.1", "--lora_target_modules", "to_q", "nope", "attn",
                                     "timestep_embedder2.linear_1"), check_files=True)
    err = capsys.readouterr().err
    for needle in ("problems:", 'pip install "t2i-distill[lora]"',
                   "--lora_dropout 0.1 with --jvp fd", "'nope' matches no module of the student",
                   "'attn' matches transformer_blocks.0.attn", "'timestep_embedder2.linear_1' matches "
                   "timestep_embedder2.linear_1, a head that is trained in full"):
        assert needle in err, needle
    assert "'to_q'" not in err
    with pytest.raises(SystemExit):
        parse_args("scm", flags(folder, images, tmp_path / "b", "--lora_alpha", "8", "--lora_dropout", "0.1"))
    assert "--lora_alpha, --lora_dropout configure(s) a LoRA adapter, but --lora_rank is 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args("rescale", flags(folder, images, tmp_path / "c", "--lora_rank", "4"))
    assert "unrecognized arguments: --lora_rank" in capsys.readouterr().err
