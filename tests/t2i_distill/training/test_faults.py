"""Nothing lost, nothing silently wrong: a training process killed (SIGKILL, by its own pid, at deterministic points of
a save) resumes to exactly an uninterrupted run's final export; corrupted or tampered checkpoints fall back to the
previous one (or are refused by name); bad data and bad settings are named before anything loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i_distill.training.args import parse_args
from t2i_distill.training.faults import POINTS
from t2i_distill.training.trainer import train
from tests.t2i_distill.training.test_trainer import REPO, flags, folder, images  # noqa: F401  (fixtures)

COMMON = ("--jvp", "reference", "--checkpointing_steps", "2", "--ema_decay", "0.9")


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"transformer_{step}.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(folder, images, out, *extra, fault=None):  # noqa: F811
    """``t2i-distill train scm`` in a fresh process, as a user runs it. Every run these tests compare is one: a
    process that ran other tests before may hold global state (thread pools, backends) that changes float results."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("T2I_FAULT", None)
    if fault:
        env["T2I_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "t2i_distill.cli", "train", "scm",
                           *flags(folder, images, out, "--max_train_steps", "4", *COMMON, *extra)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def straight(folder, images, tmp_path_factory):  # noqa: F811
    """The uninterrupted run: 4 steps, checkpoints (and exports) at 2 and 4."""
    out = tmp_path_factory.mktemp("straight") / "run"
    done = _cli(folder, images, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_any_point_of_a_save_resumes_to_the_uninterrupted_result(folder, images, straight, tmp_path,  # noqa: F811
                                                                           point):
    out = tmp_path / "run"
    killed = _cli(folder, images, out, fault=f"{point}:4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _cli(folder, images, out, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for step in (2, 4):  # every checkpointed step has its exports, equal to the uninterrupted run's
        assert _same(_weights(out, step), _weights(straight, step)), (point, step)
        assert _same(load_file(str(out / f"transformer_{step}_ema.safetensors")),
                     load_file(str(straight / f"transformer_{step}_ema.safetensors")))
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".*.tmp"))  # no stray temporaries


def test_a_checkpoint_whose_export_is_missing_gets_it_written_on_resume(folder, images, straight, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "transformer_4.safetensors").unlink()  # e.g. the disk filled up while exporting
    (out / ".tmp-transformer_4.safetensors").write_bytes(b"half an export")  # and a killed export's leftover
    done = _cli(folder, images, out, "--resume_from_checkpoint", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exports are missing" in done.stderr
    assert _same(_weights(out, 4), _weights(straight, 4))
    assert not (out / ".tmp-transformer_4.safetensors").exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated optimizer.pt": ("optimizer.pt", _truncate),
    "truncated extra.pt": ("extra.pt", _truncate),
    "truncated scheduler.pt": ("scheduler.pt", _truncate),
    "truncated model.safetensors": ("model.safetensors", _truncate),
    "truncated rng_state_0.pt": ("rng_state_0.pt", _truncate),
    "emptied manifest.json": ("manifest.json", lambda p: p.write_text("")),
    "emptied engine.json": ("engine.json", lambda p: p.write_text("")),
    "one flipped byte in model.safetensors": ("model.safetensors", _flip),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupted_newest_checkpoint_falls_back_and_an_explicit_one_is_refused(folder, images, straight,  # noqa: F811
                                                                                 tmp_path, case):
    name, corrupt = CORRUPTIONS[case]
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    corrupt(out / "checkpoint-4" / name)
    with pytest.raises(ValueError, match=rf"checkpoint-4.*{name.replace('.', '[.]')}"):
        train(parse_args("scm", flags(folder, images, tmp_path / "other", "--max_train_steps", "4",
                                      "--resume_from_checkpoint", str(out / "checkpoint-4"), *COMMON)))
    (out / "transformer_4.safetensors").unlink()
    done = _cli(folder, images, out, "--resume_from_checkpoint", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint-4 fails verification, falling back" in done.stderr and name in done.stderr
    assert _same(_weights(out, 4), _weights(straight, 4))  # steps 3-4 redone from checkpoint-2, bit-exact


def test_verify_checkpoint_command(straight, tmp_path, capsys):
    from t2i_distill.cli import main

    assert main(["verify-checkpoint", str(straight / "checkpoint-4")]) == 0
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    _flip(out / "checkpoint-4" / "model.safetensors")
    assert main(["verify-checkpoint", str(out)]) == 1
    text = capsys.readouterr().out
    assert "checkpoint-4: FAILED" in text and "content hash differs" in text
    assert f"would take: {out / 'checkpoint-2'}" in text


# -- bad settings and bad data, named ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--learning_rate", "-1"), ("--learning_rate", "nan"),
                                         ("--learning_rate", "inf"), ("--adam_epsilon", "0"), ("--seed", "-3")])
def test_numeric_training_flags_are_refused_at_parse_time_by_name(folder, images, tmp_path, capsys, flag,  # noqa: F811
                                                                   value):
    with pytest.raises(SystemExit):
        parse_args("scm", flags(folder, images, tmp_path / "x", flag, value))
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--num_inference_steps", "0"), ("--guidance_scale", "nan"),
                                         ("--resolution", "-64")])
def test_numeric_sampling_flags_are_refused_never_defaulted(tmp_path, capsys, flag, value):
    from t2i_distill.cli import main

    with pytest.raises(SystemExit):
        main(["sample", "--pretrained_model_name_or_path", "x", "--prompt", "p", "--output_dir", str(tmp_path),
              flag, value])
    assert f"argument {flag}" in capsys.readouterr().err


def test_a_malformed_metadata_line_is_named_with_file_and_line(folder, images, tmp_path):  # noqa: F811
    from t2i_distill.errors import ConfigurationError

    bad = tmp_path / "images"
    shutil.copytree(images, bad)
    lines = (bad / "metadata.jsonl").read_text().splitlines()
    lines.insert(2, '{"file_name": "0.png", "text": ')  # not JSON
    (bad / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigurationError, match=r"metadata\.jsonl: 1 line\(s\) are not JSON objects: line 3"):
        train(parse_args("scm", flags(folder, bad, tmp_path / "x", "--max_train_steps", "1", "--jvp", "reference")))


def test_a_truncated_cache_shard_is_named_when_the_cache_is_opened(folder, images, tmp_path):  # noqa: F811
    from t2i_distill.data import DataConfig, TrainData, build_cache
    from t2i_distill.errors import ConfigurationError

    cache = tmp_path / "cache"
    build_cache(DataConfig(train_data_dir=str(images), resolution=32), cache, str(folder), max_sequence_length=8,
                rank=0, world_size=1, shard_size=4)
    shard = sorted(cache.glob("shard-*.safetensors"))[1]
    _truncate(shard)
    (cache / f".{shard.name}.{999999}.tmp").write_bytes(b"left by a killed cache run")
    pattern = rf"{shard.name}: \d+ bytes, its header implies \d+ \(truncated\).*re-encodes"
    with pytest.raises(ConfigurationError, match=pattern):
        TrainData(DataConfig(cached_dataset=str(cache), resolution=32), batch_size=2)
    # What the message says: rerun `cache` with the same flags; it re-encodes exactly the damaged shard.
    build_cache(DataConfig(train_data_dir=str(images), resolution=32), cache, str(folder), max_sequence_length=8,
                rank=0, world_size=1, shard_size=4)
    assert len(TrainData(DataConfig(cached_dataset=str(cache), resolution=32), batch_size=2).source) > 0
    assert not list(cache.glob(".*.tmp"))  # the dead writer's temporary was removed


def test_a_full_disk_is_named_with_its_free_space(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from t2i_distill.training import checkpoint

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 1261632 vs 1261524")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(100, 100, 0))
    with pytest.raises(OSError, match=r"the disk is full: writing '.*extra\.pt' failed with 0 bytes free"):
        checkpoint._torch_save({"a": 1}, tmp_path / "extra.pt")


def test_resuming_another_methods_checkpoint_is_refused_naming_both(folder, images, straight, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    manifest = json.loads((out / "checkpoint-4" / "manifest.json").read_text())
    assert manifest["method"] == "scm"
    with pytest.raises(ValueError, match=r"written by a method 'scm' run; this run's method is 'meanflow'"):
        train(parse_args("meanflow", flags(folder, images, out, "--max_train_steps", "4", "--resume_from_checkpoint",
                                           "latest", "--jvp", "reference")))
