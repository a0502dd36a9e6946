"""The reference's launch scripts port unchanged: their flag lists (copied here as data from reference-spec §1.4)
run on the tiny model. What a port must add is only what the reference hard-coded in Python (its dataset, a
model folder) and what a CPU needs (a DeepSpeed JSON with bf16 off, a step limit, fewer workers)."""

from __future__ import annotations

import json

import pytest

from t2i_distill.training.args import parse_args
from t2i_distill.training.trainer import train
from tests.t2i_distill.training.test_trainer import REPO, folder, images  # noqa: F401  (fixtures)

#: script/train_sCM.sh lines 10-24, with its positional defaults (LR 1e-5, RESOLUTION 512 → 32 here, BATCH_SIZE 8).
TRAIN_SCM = ["--dataloader_num_workers=4", "--gradient_accumulation_steps=1",
             "--ds_file=parallel_config/deepspeed_bf16_batch$BATCH_SIZE.json", "--max_train_steps=10_000_000",
             "--max_grad_norm=0.1", "--gradient_checkpointing", "--checkpointing_steps=1000", "--allow_tf32",
             "--report_to=tensorboard", "--logit_mean=0.2", "--logit_std=1.6", "--learning_rate=1e-5",
             "--resolution=32", "--train_batch_size=$BATCH_SIZE", "--output_dir=$OUT_DIR",
             "--rescaled_checkpoint_path=$RESCALED_PATH"]
#: script/train_meanflow.sh: the same common flags, plus its five CFG flags (lines 29-33).
TRAIN_MEANFLOW = [f for f in TRAIN_SCM if not f.startswith(("--logit_mean", "--logit_std"))] + [
    "--use_cfg_meanflow=True", "--cfg_omega=1", "--cfg_kappa=0.5", "--cfg_min_t=0.0", "--cfg_max_t=1.0"]
#: script/geneval_sCM.sh / geneval_meanflow.sh (NFE 4, CFG 3.5; RESOLUTION 512 → 32 here).
GENEVAL = ["--resolution", "32", "--num_inference_steps", "4", "--guidance_scale", "3.5", "--max_sequence_length",
           "256", "--seed", "42", "--ds_file", "parallel_config/deepspeed_bf16_batch1.json", "--output_dir",
           "$CKPT_PATH/GenEval/", "--resume_path", "$CKPT_PATH/ckpts/transformer_1.pt", "--local_rank", "0"]


def _substitute(flags: list[str], **values: str) -> list[str]:
    out = []
    for flag in flags:
        for name, value in values.items():
            flag = flag.replace(f"${name}", value)
        out.append(flag)
    return out


@pytest.fixture(scope="module")
def rescaled(folder, images, tmp_path_factory):  # noqa: F811
    """The reference's --rescaled_checkpoint_path: a ×1 .pt made by `t2i-distill rescale` on the tiny folder."""
    out = tmp_path_factory.mktemp("rescale")
    train(parse_args("rescale", ["--pretrained_model_name_or_path", str(folder), "--train_data_dir", str(images),
                                 "--resolution", "32", "--max_sequence_length", "8", "--train_batch_size", "2",
                                 "--cpu", "--jvp", "reference", "--max_train_steps", "1", "--report_to", "none",
                                 "--output_dir", str(out)]))
    return out / "rescaled_transformer.pt"


@pytest.mark.parametrize("method, script", [("scm", TRAIN_SCM), ("meanflow", TRAIN_MEANFLOW)])
def test_the_reference_training_scripts_flags_run_unchanged(folder, images, rescaled, tmp_path, method,  # noqa: F811
                                                            script):
    import os
    import subprocess
    import sys

    from tests.t2i_distill.training.test_trainer import _free_port

    # The CPU's copy of parallel_config/deepspeed_bf16_batch8.json: bf16 off (the one change a CPU needs).
    json_dir = tmp_path / "parallel_config"
    json_dir.mkdir()
    config = json.loads((REPO / "parallel_config" / "deepspeed_bf16_batch8.json").read_text())
    config["bf16"]["enabled"] = False
    (json_dir / "deepspeed_bf16_batch8.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    flags = _substitute(script, BATCH_SIZE="8", OUT_DIR=str(out), RESCALED_PATH=str(rescaled))
    flags = [f.replace("--ds_file=parallel_config/", f"--ds_file={json_dir}/") for f in flags]
    added = ["--pretrained_model_name_or_path", str(folder), "--train_data_dir", str(images),  # hard-coded there
             "--max_sequence_length", "8", "--cpu", "--max_train_steps", "1", "--dataloader_num_workers", "0",
             "--local_rank", "0", "--export_layout", "reference"]
    # One process, in the environment scripts/train.sh's torchrun gives it (DeepSpeed reads the launcher's variables).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    done = subprocess.run([sys.executable, "-m", "t2i_distill.cli", "train", method, *flags, *added],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    record = json.loads((out / "args.json").read_text())
    assert record["flags"]["max_grad_norm"] == 0.1 and record["resolved"]["jvp"] == "reference"  # B5 fixed; CPU
    assert record["flags"]["train_batch_size"] == 8 and record["resolved"]["backend"] == "deepspeed"
    assert "--local_rank is accepted" in done.stderr and "finished at step 1" in done.stdout
    assert (out / "ckpts" / "transformer_1.pt").is_file()  # where the reference's GenEval scripts read


def test_the_reference_geneval_scripts_flags_run_unchanged(folder, images, rescaled, tmp_path,  # noqa: F811
                                                            monkeypatch):
    from t2i_distill.eval.geneval import main
    from t2i_distill.eval.shapes import mini_geneval_metadata, write_metadata_jsonl

    ckpt = tmp_path / "run"
    train(parse_args("scm", ["--pretrained_model_name_or_path", str(folder), "--train_data_dir", str(images),
                             "--resolution", "32", "--max_sequence_length", "8", "--train_batch_size", "2", "--cpu",
                             "--max_train_steps", "1", "--report_to", "none", "--output_dir", str(ckpt),
                             "--rescaled_checkpoint_path", str(rescaled), "--export_layout", "reference"]))
    monkeypatch.chdir(tmp_path)  # the reference reads evaluation/evaluation_metadata.jsonl from the working dir
    (tmp_path / "evaluation").mkdir()
    write_metadata_jsonl(tmp_path / "evaluation" / "evaluation_metadata.jsonl", mini_geneval_metadata(per_task=1)[:2])
    flags = _substitute(GENEVAL, CKPT_PATH=str(ckpt))
    assert main(["--pretrained_model_name_or_path", str(folder), "--method", "scm", "--images_per_prompt", "1",
                 *flags]) == 0
    assert len(list((ckpt / "GenEval").rglob("*.png"))) == 2
