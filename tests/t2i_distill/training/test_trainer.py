"""The trainer end to end on the tiny offline FLUX folder: sCM and MeanFlow through every JVP mode and data path,
exact resume, NaN/inf steps, refusals before training, and real 2-process runs for every backend (gloo, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i_distill.training.args import parse_args
from t2i_distill.training.trainer import NonFiniteLossError, train

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("trainer_worker.py")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from t2i_distill.tiny_pipeline import write_tiny_flux_pipeline

    return write_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Eight captioned 40×32 images (a shorter side to resize, a long side to crop) and one corrupt file."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("images")
    lines = []
    for i, colour in enumerate(["red", "blue", "green", "red", "blue", "green", "red", "blue"]):
        image = Image.new("RGB", (40, 32), "white")
        ImageDraw.Draw(image).ellipse((4 + i, 4, 24 + i, 24), fill=colour)
        image.save(root / f"{i}.png")
        lines.append({"file_name": f"{i}.png", "text": f"one {colour} circle"})
    (root / "broken.png").write_bytes(b"not a png")
    lines.append({"file_name": "broken.png", "text": "a broken file"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def flags(folder: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(folder), "--train_data_dir", str(images), "--resolution", "32",
            "--train_batch_size", "2", "--max_sequence_length", "8", "--cpu", "--output_dir", str(out),
            "--report_to", "none", "--seed", "0", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", *extra]


def student_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"transformer_{step}.safetensors"))


@pytest.mark.parametrize("method, jvp", [("scm", "dual"), ("meanflow", "dual"), ("scm", "func"),
                                         ("meanflow", "reference"), ("meanflow", "fd")])
def test_a_short_run_trains_and_exports(folder, images, tmp_path, method, jvp):
    out = tmp_path / "run"
    summary = train(parse_args(method, flags(folder, images, out, "--max_train_steps", "2", "--jvp", jvp,
                                             "--checkpointing_steps", "2")))
    assert summary["global_step"] == 2 and summary["counters"]["nonfinite_skipped"] == 0
    assert (out / "checkpoint-2").is_dir() and not list(out.glob(".tmp*"))
    trained = student_weights(out, 2)
    from t2i_distill.models import load_student

    start, _ = load_student(folder, kind="trigflow" if method == "scm" else "meanflow")
    changed = [k for k, v in start.state_dict().items() if k in trained and not torch.equal(v, trained[k])]
    assert changed, "no student weight changed in two optimizer steps"
    assert all(torch.isfinite(v).all() for v in trained.values())


def test_resume_is_exact(folder, images, tmp_path):
    """4 steps straight == 2 steps, stop, resume from the checkpoint, 2 more: same weights, optimizer, data order."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--jvp", "reference", "--checkpointing_steps", "2", "--ema_decay", "0.9")
    train(parse_args("scm", flags(folder, images, straight, "--max_train_steps", "4", *common)))
    train(parse_args("scm", flags(folder, images, split, "--max_train_steps", "2", *common)))
    train(parse_args("scm", flags(folder, images, split, "--max_train_steps", "4", "--resume_from_checkpoint",
                                  "latest", *common)))
    a, b = student_weights(straight, 4), student_weights(split, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("optimizer.pt", "extra.pt"):
        sa = torch.load(straight / "checkpoint-4" / name, weights_only=True)
        sb = torch.load(split / "checkpoint-4" / name, weights_only=True)
        assert _equal(sa, sb), name  # optimizer moments, EMA, sampler position and counters
    assert not torch.equal(a["x_embedder.weight"], student_weights(split, 2)["x_embedder.weight"])
    # The EMA is exported beside the raw weights (--ema_decay turns --export_ema on), exactly on resume too.
    ema_a, ema_b = (load_file(str(out / "transformer_4_ema.safetensors")) for out in (straight, split))
    assert ema_a.keys() == a.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in a)
    assert not torch.equal(ema_a["x_embedder.weight"], a["x_embedder.weight"])
    from t2i_distill.models import load_student

    model, _ = load_student(folder, kind="trigflow", rescaled_checkpoint=straight / "transformer_4_ema.safetensors",
                            accepted_kinds=("trigflow",))
    assert torch.equal(model.x_embedder.weight, ema_a["x_embedder.weight"])


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(folder, images, tmp_path, monkeypatch):
    from t2i_distill import losses

    real, calls = losses.scm_loss, {"n": 0}

    def flaky(*args, **kwargs):
        loss, logs = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:  # one isolated bad step, then bad forever
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(losses, "scm_loss", flaky)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is .*checkpoint-2"):
        train(parse_args("scm", flags(folder, images, out, "--max_train_steps", "50", "--jvp", "reference",
                                      "--checkpointing_steps", "1", "--max_nonfinite_steps", "3")))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert torch.load(out / "checkpoint-2" / "extra.pt", weights_only=True)["trainer"]["counters"] == {
        "nonfinite_skipped": 1}


def test_unwritable_output_dir_fails_before_any_model_is_loaded(folder, images, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="file"):
        train(parse_args("scm", flags(folder, images, blocker / "out", "--max_train_steps", "1")))


def test_micro_batch_must_match_the_deepspeed_json(folder, images, tmp_path, capsys):
    json_path = REPO / "parallel_config" / "deepspeed_bf16_batch8.json"
    with pytest.raises(SystemExit):  # at parse time, with the other problems, before anything loads
        parse_args("scm", flags(folder, images, tmp_path / "ds", "--max_train_steps", "1",
                                "--deepspeed_config", str(json_path)))
    assert "--train_batch_size 2 disagrees with the DeepSpeed JSON's train_micro_batch_size_per_gpu 8" in \
        capsys.readouterr().err


def test_gradient_checkpointing_is_honoured_and_never_switched_on_behind_the_users_back(folder, images, tmp_path,
                                                                                        monkeypatch):
    from t2i_distill.training import trainer

    seen = []
    real = trainer.prepare_student

    def spy(student, args):
        real(student, args)
        seen.append(student.gradient_checkpointing)

    monkeypatch.setattr(trainer, "prepare_student", spy)
    train(parse_args("meanflow", flags(folder, images, tmp_path / "off", "--max_train_steps", "1", "--jvp",
                                       "reference")))
    train(parse_args("meanflow", flags(folder, images, tmp_path / "on", "--max_train_steps", "1", "--jvp", "func",
                                       "--gradient_checkpointing")))
    # The fused dual pass is checkpointable too (each block recomputed in the backward).
    train(parse_args("scm", flags(folder, images, tmp_path / "dual", "--max_train_steps", "1", "--jvp", "dual",
                                  "--gradient_checkpointing")))
    assert seen == [False, True, True]


# -- multi-process ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# FSDP2 also under the two kernel JVP modes, each block (the kernel-patched ones too) a unit of its own: `func` runs
# torch.func.jvp over the sharded student, `dual` calls each sharded block through Module.__call__ (FSDP2's hooks).
@pytest.mark.parametrize(("backend", "jvp"), [("ddp", "reference"), ("fsdp2", "reference"), ("deepspeed", "reference"),
                                              ("fsdp2", "func"), ("fsdp2", "dual")])
def test_two_processes_train_and_agree(folder, images, tmp_path, backend, jvp):
    """torchrun, 2 gloo processes, 4 optimizer steps: finite losses and the same weights on both ranks."""
    out = tmp_path / f"{backend}-{jvp}"
    extra = ["--max_train_steps", "4", "--jvp", jvp, "--checkpointing_steps", "4", "--backend", backend,
             "--train_batch_size", "1", "--ema_decay", "0.9"]
    if backend == "deepspeed":
        config = tmp_path / "ds.json"
        ds = json.loads((REPO / "parallel_config" / "deepspeed_bf16_batch1.json").read_text())
        ds["bf16"]["enabled"] = False  # CPU: fp32
        config.write_text(json.dumps(ds))
        extra += ["--deepspeed_config", str(config)]
    args = flags(folder, images, out, *extra)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(WORKER), "scm", *args], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    states = [torch.load(out / f"rank{r}_state.pt", weights_only=True) for r in (0, 1)]
    assert states[0].keys() == states[1].keys() and states[0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    summary = json.loads((out / "rank0_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["counters"]["nonfinite_skipped"] == 0
    assert (out / "checkpoint-4").is_dir() and (out / "transformer_4.safetensors").is_file()
    ema = load_file(str(out / "transformer_4_ema.safetensors"))  # gathered from every rank's EMA shards
    assert ema.keys() == load_file(str(out / "transformer_4.safetensors")).keys()


def test_validation_grids_are_written_and_logged(folder, images, tmp_path):
    out = tmp_path / "val"
    train(parse_args("scm", flags(folder, images, out, "--max_train_steps", "2", "--jvp", "reference",
                                  "--validation_prompts", "one red circle", "two blue squares",
                                  "--validation_steps", "2", "--validation_inference_steps", "1", "2",
                                  "--report_to", "tensorboard", "--ema_decay", "0.5")))
    from PIL import Image

    for steps in (1, 2):
        grid = Image.open(out / "validation" / f"step0000002_nfe{steps}.png")
        assert grid.width > 2 * 32 and grid.height > 32  # two prompts side by side, a label row
    events = list((out / "logs").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs"))  # the folder: the run record's hparams are a second events file
    acc.Reload()
    assert {"validation/nfe1", "validation/nfe2"} <= set(acc.Tags()["images"])
    assert {"loss_sCM", "grad_norm", "lr", "samples_per_s", "step_time_s"} <= set(acc.Tags()["scalars"])


def test_a_cache_of_another_resolution_is_refused_before_any_model_is_loaded(folder, images, tmp_path, monkeypatch):
    from t2i_distill.data import DataConfig, build_cache

    cache = tmp_path / "cache"
    build_cache(DataConfig(train_data_dir=str(images), resolution=32), cache, str(folder), max_sequence_length=8,
                rank=0, world_size=1)
    from t2i_distill.training import trainer

    monkeypatch.setattr(trainer, "load_models", lambda *a, **k: pytest.fail("models loaded before the cache check"))
    base = [a for a in flags(folder, images, tmp_path / "out", "--max_train_steps", "1") if a not in ()]
    i = base.index("--train_data_dir")
    base[i:i + 2] = ["--cached_dataset", str(cache)]
    with pytest.raises(ValueError, match="resolution"):
        train(parse_args("meanflow", [*base, "--resolution", "64"]))


def test_launch_script_semantics(tmp_path):
    script = REPO / "scripts" / "train.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
    done = subprocess.run(["bash", str(script), "scm"], capture_output=True, text=True,
                          env={**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1"})
    assert done.returncode == 2 and "MASTER_ADDR" in done.stderr  # several nodes need node 0's address


def test_a_run_folder_tells_what_produced_it_and_is_not_retrained_by_accident(folder, images, tmp_path, capsys):
    """args.json + runs.jsonl (flags, versions, commit), TensorBoard hparams; a folder with checkpoints is refused
    without --resume_from_checkpoint or --overwrite_output_dir, and --overwrite_output_dir removes the old run."""
    out = tmp_path / "run"
    base = [a for a in flags(folder, images, out, "--max_train_steps", "1", "--jvp", "reference",
                             "--checkpointing_steps", "1") if a not in ("--report_to", "none")]
    train(parse_args("scm", [*base, "--report_to", "tensorboard"]))
    record = json.loads((out / "args.json").read_text())
    assert record["flags"]["learning_rate"] == 1e-3 and record["resolved"]["jvp"] == "reference"
    import importlib.metadata

    assert record["versions"]["torch"] == importlib.metadata.version("torch")
    assert "commit" in record["git"] and len((out / "runs.jsonl").read_text().splitlines()) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"), size_guidance={"tensors": 0}).Reload()
    assert "run/record/text_summary" in events.Tags()["tensors"]
    with pytest.raises(SystemExit):
        parse_args("scm", base)
    assert "holds an earlier run (checkpoint-1, transformer_1.safetensors)" in capsys.readouterr().err
    train(parse_args("scm", [*base, "--overwrite_output_dir", "--max_train_steps", "2", "--checkpointing_steps", "2"]))
    assert not (out / "checkpoint-1").exists() and (out / "checkpoint-2").is_dir()
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2


def _fake_bin(tmp_path: Path) -> dict:
    """A fake python (prints the launcher's argv and env) and fake SLURM tools, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fakepy").write_text('#!/usr/bin/env bash\necho "ARGS $*"\necho "ENV NODE_RANK=$NODE_RANK '
                                    'NNODES=$NNODES MASTER_ADDR=$MASTER_ADDR"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'node0\\nnode1\\n'\n")
    # srun: run the command once per node, as SLURM would, with that task's SLURM_NODEID.
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'for id in 0 1; do SLURM_NODEID=$id "$@"; done\n')
    for name in ("fakepy", "scontrol", "srun"):
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "T2I_PYTHON": str(bin_dir / "fakepy")}


def test_rendezvous_timeout_flag_and_the_slurm_example(tmp_path):
    env = {**_fake_bin(tmp_path), "NPROC_PER_NODE": "2"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "train.sh"), "scm", "--rdzv_timeout", "36000", "--seed",
                           "3"], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "--rdzv-conf=timeout=36000" in done.stdout and "train scm --seed 3" in done.stdout
    assert "rdzv_timeout" not in done.stdout.split("t2i_distill.cli", 1)[1]  # consumed, not passed to the trainer
    bad = subprocess.run(["bash", str(REPO / "scripts" / "train.sh"), "scm", "--rdzv_timeout", "soon"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 2 and "whole seconds" in bad.stderr
    slurm = subprocess.run(["bash", str(REPO / "scripts" / "train.slurm"), "meanflow", "--config", "run.yaml"],
                           capture_output=True, text=True, cwd=REPO,
                           env={**env, "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2"})
    assert slurm.returncode == 0, slurm.stderr
    assert slurm.stdout.count("train meanflow --config run.yaml") == 2
    for rank in (0, 1):
        assert f"ENV NODE_RANK={rank} NNODES=2 MASTER_ADDR=node0" in slurm.stdout
    assert "--nnodes=2 --node_rank=1" in slurm.stdout


def test_a_failing_rank_is_printed_once_unwrapped_by_the_launcher(tmp_path, monkeypatch):
    from t2i_distill.training.trainer import _record_failure

    errors = tmp_path / "errors"
    errors.mkdir()
    monkeypatch.setenv("T2I_ERROR_DIR", str(errors))
    monkeypatch.setenv("RANK", "1")
    try:
        raise ValueError("the real message")
    except ValueError as error:
        _record_failure(error)
    text = (errors / "rank00001.txt").read_text()
    assert text.startswith("rank 1: ValueError: the real message") and "Traceback" in text
    # The launcher: torchrun fails (a fake one writing that file), train.sh prints the first error once, at the end.
    env = _fake_bin(tmp_path)
    fake = Path(env["T2I_PYTHON"])
    fake.write_text('#!/usr/bin/env bash\necho "rank 1: ValueError: the real message" > "$T2I_ERROR_DIR/rank00001.txt"'
                    '\necho "ChildFailedError banner" >&2\nexit 1\n')
    done = subprocess.run(["bash", str(REPO / "scripts" / "train.sh"), "scm"], capture_output=True, text=True,
                          env={**env, "NPROC_PER_NODE": "2"}, cwd=REPO)
    assert done.returncode == 1
    assert done.stderr.count("rank 1: ValueError: the real message") == 1
    assert done.stderr.index("ChildFailedError banner") < done.stderr.index("the first error:")


def test_meanflow_bar_shows_the_number_that_moves_and_each_model_is_reported_once(folder, images, tmp_path, capsys,
                                                                                   caplog):
    import logging

    with caplog.at_level(logging.INFO):
        train(parse_args("meanflow", flags(folder, images, tmp_path / "mf", "--max_train_steps", "2", "--jvp",
                                           "reference")))
    bar = capsys.readouterr().err
    assert "loss_mean_ref=" in bar and "loss=" not in bar.replace("loss_mean_ref=", "")
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert len(reports) == 2, reports  # the student's and the teacher's, once each
