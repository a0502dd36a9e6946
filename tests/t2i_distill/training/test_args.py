"""The trainer's flags: the reference's names, --config files, and errors that name the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2i_distill.training.args import build_parser, parse_args, str2bool

REPO = Path(__file__).resolve().parents[3]
BASE = ["--pretrained_model_name_or_path", "some/folder", "--train_data_dir", "images"]


def test_reference_flag_names_parse_with_the_reference_defaults(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the reference's setting: GPUs, bf16 JSON
    args = parse_args("scm", BASE + ["--ds_file", "parallel_config/deepspeed_bf16_batch8.json", "--logit_mean", "0.2",
                                     "--logit_std", "1.6", "--gradient_checkpointing", "--allow_tf32",
                                     "--max_grad_norm", "0.1", "--checkpointing_steps", "1000"])
    assert args.deepspeed_config == "parallel_config/deepspeed_bf16_batch8.json"  # --ds_file is an alias
    assert (args.logit_mean, args.logit_std, args.max_grad_norm) == (0.2, 1.6, 0.1)
    assert args.sigma_data == 0.5 and args.tangent_warmup_steps == 4000 and args.scm_cfg_scale == [4.0, 4.5, 5.0]
    # --jvp auto on CUDA: dual, checkpointed like the other modes.
    assert args.gradient_checkpointing and args.jvp == "dual" and args.method == "scm"
    assert args.train_batch_size == 8 and args.mixed_precision == "bf16"  # taken from the JSON (flags not given)


def test_meanflow_defaults_are_appendix_a():
    args = parse_args("meanflow", BASE)
    assert (args.time_mu, args.time_sigma, args.ratio_r_not_equal_t, args.cfg_prob) == (-0.4, 1.0, 0.75, 0.1)
    assert (args.cfg_omega, args.cfg_kappa, args.adaptive_p, args.use_cfg_meanflow) == (1.0, 0.0, 1.0, False)
    assert (args.cfg_velocity_at, args.meanflow_tangent, args.gradient_checkpointing) == ("t", "teacher", False)
    assert parse_args("meanflow", BASE + ["--use_cfg_meanflow"]).use_cfg_meanflow is True
    assert parse_args("meanflow", BASE + ["--use_cfg_meanflow", "false"]).use_cfg_meanflow is False


@pytest.mark.parametrize("text, value", [("False", False), ("0", False), ("no", False), ("True", True), ("1", True)])
def test_prodigy_booleans_parse_false_as_false(text, value):  # the reference's type=bool made every value True
    assert parse_args("scm", BASE + ["--prodigy_decouple", text]).prodigy_decouple is value
    assert str2bool(text) is value


def test_seed_zero_is_a_seed():
    assert parse_args("scm", BASE + ["--seed", "0"]).seed == 0


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"pretrained_model_name_or_path": "from/file", "cached_dataset": "cache",
                                  "learning_rate": 3e-6, "scm_cfg_scale": [4, 5], "train_batch_size": 2}))
    args = parse_args("scm", ["--config", str(config), "--learning_rate", "1e-5"])
    assert args.pretrained_model_name_or_path == "from/file" and args.cached_dataset == "cache"
    assert args.learning_rate == 1e-5 and args.scm_cfg_scale == [4.0, 5.0] and args.train_batch_size == 2


def test_yaml_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("pretrained_model_name_or_path: m\ntrain_data_dir: d\ncfg_scale: [3.5]\nuse_cfg_meanflow: true\n")
    args = parse_args("meanflow", ["--config", str(config)])
    assert args.cfg_scale == [3.5] and args.use_cfg_meanflow is True


def test_unknown_key_in_config_file_names_it(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "learning_rat": 1}))
    with pytest.raises(SystemExit):
        parse_args("scm", ["--config", str(config)])
    assert "learning_rat" in capsys.readouterr().err


def test_flag_of_the_other_method_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args("meanflow", BASE + ["--logit_std", "1.6"])
    assert "--logit_std" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--cached_dataset", "c"], "exactly one of"),
    (["--backend", "ddp", "--deepspeed_config", "x.json"], "--deepspeed_config"),
    (["--max_grad_norm", "-1"], "--max_grad_norm"),
    (["--ema_decay", "1.5"], "--ema_decay"),
    (["--resolution", "100"], "--resolution"),
    (["--resume_from_checkpoint", "/no/such/folder"], "--resume_from_checkpoint"),
])
def test_contradictory_flags_name_the_flag(extra, needle, capsys):
    with pytest.raises(SystemExit):
        parse_args("scm", BASE + extra)
    assert needle in capsys.readouterr().err


def test_missing_model_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args("scm", ["--train_data_dir", "d"])
    assert "--pretrained_model_name_or_path" in capsys.readouterr().err


def test_meanflow_cfg_window_and_dropout_checks(capsys):
    with pytest.raises(SystemExit):
        parse_args("meanflow", BASE + ["--cfg_min_t", "0.8", "--cfg_max_t", "0.3"])
    with pytest.raises(SystemExit):
        parse_args("meanflow", BASE + ["--use_cfg_meanflow", "--cfg_prob", "0"])
    err = capsys.readouterr().err
    assert "--cfg_min_t" in err and "--cfg_prob" in err


def test_help_lists_every_group():
    text = build_parser("scm").format_help()
    for flag in ("--jvp", "--backend", "--ema_decay", "--validation_prompts", "--checkpoints_total_limit"):
        assert flag in text


# -- preflight: every refusal at once, before anything loads (issue: a port took four runs, one refusal each) --------
DS8 = "parallel_config/deepspeed_bf16_batch8.json"


def test_every_problem_is_reported_at_once_with_its_flag(capsys, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(SystemExit):
        parse_args("scm", ["--pretrained_model_name_or_path", str(tmp_path / "absent"), "--train_data_dir", "d",
                           "--ds_file", DS8, "--train_batch_size", "4", "--resolution", "30"], check_files=True)
    err = capsys.readouterr().err
    assert "problems:" in err
    for needle in ("--resolution must be a multiple of 16", "--train_batch_size 4 disagrees with the DeepSpeed JSON's "
                   "train_micro_batch_size_per_gpu 8", 'pip install "t2i-distill[deepspeed]"',
                   "the folder does not exist"):
        assert needle in err, needle


def test_deepspeed_json_settings_are_taken_when_the_flags_are_not_given(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    args = parse_args("scm", [*BASE, "--deepspeed_config", DS8])
    assert (args.train_batch_size, args.gradient_accumulation_steps, args.mixed_precision) == (8, 1, "bf16")
    assert args.max_grad_norm == 1.0 and any("from the DeepSpeed JSON" in note for note in args.preflight_notes)


def test_a_bf16_json_on_a_cpu_is_refused_naming_the_file(capsys):
    with pytest.raises(SystemExit):
        parse_args("scm", [*BASE, "--deepspeed_config", DS8, "--cpu"])
    assert "enables bf16, which this run cannot use without a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("cuda, extra, mode", [(False, [], "reference"), (True, [], "dual"),
                                               (True, ["--gradient_checkpointing"], "dual"),
                                               (False, ["--jvp", "dual"], "dual")])
def test_jvp_auto_picks_by_device_and_says_why(monkeypatch, cuda, extra, mode):
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    args = parse_args("scm", [*BASE, *extra])
    assert args.jvp == mode and len(args.preflight_notes) == 1
    if not cuda:
        assert "interpreter" in args.preflight_notes[0]


@pytest.mark.parametrize("method", ["scm", "meanflow", "rescale"])
def test_help_gives_every_flag_a_text_and_a_default_and_cites_only_files_in_the_repository(method, capsys):
    parser = build_parser(method)
    assert [a.dest for a in parser._actions if a.option_strings and not a.help] == []
    text = parser.format_help()
    assert "(default: 0.0001)" in text and "reference-spec" not in text and "docs/reference-bugs.md" in text
    assert (REPO / "docs" / "reference-bugs.md").is_file()


def test_only_rank_zero_prints_a_refusal(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exited:
        parse_args("scm", [*BASE, "--resolution", "30"])
    assert exited.value.code == 2 and capsys.readouterr().err == ""


def test_every_alias_works_as_a_config_key(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the reference's bf16 JSON is for GPUs
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"pretrained_model_name_or_path": "m", "train_data_dir": "d",
                                  "ds_file": "parallel_config/deepspeed_bf16_batch1.json", "local-rank": 0,
                                  "validation_prompt": ["a cat"]}))
    args = parse_args("scm", ["--config", str(config)])
    assert args.deepspeed_config.endswith("batch1.json") and args.validation_prompts == ["a cat"]
    assert args.local_rank == 0 and args.train_batch_size == 1  # the JSON's micro-batch, taken
