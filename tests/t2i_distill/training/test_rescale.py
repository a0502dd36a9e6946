"""``t2i-distill rescale`` end to end on the tiny offline FLUX folder: it runs, checkpoints, resumes exactly, closes
its gap, writes a ×1 folder that ``train scm`` and ``sample`` take without a checkpoint flag; the frequency-map
initialisation is exact for the shared frequencies and starts closer than a plain copy; refusals name the flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i_distill.errors import ConfigurationError
from t2i_distill.models import FluxStudent, load_student
from t2i_distill.training.args import parse_args
from t2i_distill.training.rescale import frequency_map_init, frequency_shift
from t2i_distill.training.trainer import main, train
from tests.t2i_distill.training.test_trainer import flags, folder, images  # noqa: F401  (fixtures)


def _gaps(out: Path) -> list[dict]:
    return json.loads((out / "rescale_gap.json").read_text())


def _rescale(folder, images, out, *extra):  # noqa: F811
    return train(parse_args("rescale", flags(folder, images, out, "--jvp", "reference", "--learning_rate", "1e-4",
                                             *extra)))


def test_rescale_checkpoints_resumes_exactly_and_closes_its_gap(folder, images, tmp_path):  # noqa: F811
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--checkpointing_steps", "4", "--validation_steps", "4")
    _rescale(folder, images, straight, "--max_train_steps", "8", *common)
    _rescale(folder, images, split, "--max_train_steps", "4", *common)
    _rescale(folder, images, split, "--max_train_steps", "8", "--resume_from_checkpoint", "latest", *common)
    a, b = load_file(str(straight / "transformer_8.safetensors")), load_file(str(split / "transformer_8.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    gaps = _gaps(straight)
    assert [g["when"] for g in gaps] == ["start", "validation", "end"] and len(gaps[0]["buckets"]) == 4
    assert gaps[-1]["overall"] < gaps[0]["overall"], gaps  # training closes the gap (a test that can fail)
    assert [g["step"] for g in _gaps(split)] == [0, 4, 4, 8]  # start of each run, and the first run's end

    # The outputs: a ×1 pipeline folder and the reference's {"module": state_dict} .pt, both the final student.
    config = json.loads((straight / "rescaled" / "transformer" / "config.json").read_text())
    assert config["time_scale"] == 1.0 and config["_class_name"] == "FluxStudent"
    reference = torch.load(straight / "rescaled_transformer.pt", weights_only=True)
    assert reference["module"].keys() == a.keys() and all(torch.equal(reference["module"][k], a[k]) for k in a)
    model, _ = load_student(straight / "rescaled", kind="flow")
    assert model.config.time_scale == 1.0
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())


def test_the_rescaled_folder_trains_scm_and_samples_without_a_checkpoint_flag(folder, images, tmp_path):  # noqa: F811
    from t2i_distill.cli import main as cli

    out = tmp_path / "rescale"
    _rescale(folder, images, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    scm = tmp_path / "scm"
    summary = train(parse_args("scm", flags(out / "rescaled", images, scm, "--max_train_steps", "2", "--jvp",
                                            "reference", "--checkpointing_steps", "2")))
    assert summary["global_step"] == 2
    student = scm / "transformer_2.safetensors"
    assert cli(["sample", "--method", "scm", "--pretrained_model_name_or_path", str(out / "rescaled"),
                "--student_checkpoint", str(student), "--prompt", "a red circle", "--resolution", "32",
                "--max_sequence_length", "8", "--output_dir", str(tmp_path / "images")]) == 0
    assert (tmp_path / "images" / "grid.png").is_file()
    # The teacher sampler runs the ×1 folder at ×1 (not diffusers' ×1000 stock class).
    from t2i_distill.pipelines import load_pipeline

    pipe = load_pipeline("teacher", out / "rescaled")
    assert type(pipe.transformer) is FluxStudent and pipe.transformer.config.time_scale == 1.0


def test_frequency_map_is_exact_for_the_shared_frequencies_and_starts_closer_than_a_copy(folder, images,  # noqa: F811
                                                                                        tmp_path):
    assert frequency_shift(1000.0, 1.0) == 96
    teacher, _ = load_student(folder, kind="flow")
    student, _ = load_student(folder, kind="flow")
    student.register_to_config(time_scale=1.0, time_embedding_fp32=False)
    frequency_map_init(student)
    embed_t, embed_s = teacher.time_text_embed, student.time_text_embed
    t = torch.linspace(0.0, 1.0, 11)
    proj_t, proj_s = embed_t.time_proj(t * 1000), embed_s.time_proj(t)
    shared = torch.cat([torch.arange(96, 128), torch.arange(224, 256)])
    torch.testing.assert_close(proj_s[:, list(range(32)) + list(range(128, 160))], proj_t[:, shared],
                               rtol=0, atol=2e-3)  # the same sinusoid features (float32 phase rounding at 1000·t)
    w_t, w_s = embed_t.timestep_embedder.linear_1.weight, embed_s.timestep_embedder.linear_1.weight
    torch.testing.assert_close(w_s[:, :32], w_t[:, 96:128], rtol=0, atol=0)
    assert torch.count_nonzero(w_s[:, 32:128]) == 0

    starts = {}
    for init in ("frequency_map", "copy"):
        out = tmp_path / init
        _rescale(folder, images, out, "--max_train_steps", "1", "--embedder_init", init)
        starts[init] = _gaps(out)[0]["overall"]
    assert starts["frequency_map"] < starts["copy"], starts


def test_refusals_name_the_flags(folder, images, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "rescale"
    _rescale(folder, images, out, "--max_train_steps", "1")
    with pytest.raises(ConfigurationError, match=r"rescale distils the stock ×1000 .*already ×1"):
        _rescale(out / "rescaled", images, tmp_path / "again", "--max_train_steps", "1")
    for extra, pattern in ((("--rescaled_checkpoint_path", "x.pt"), "takes no rescaled checkpoint"),
                           (("--time_scale", "1"), "rescale's teacher runs at")):
        with pytest.raises(SystemExit):
            parse_args("rescale", flags(folder, images, tmp_path / "x", *extra))
        assert pattern in capsys.readouterr().err
    # The stock folder at ×1 without a checkpoint: refused by the CLI before anything loads, exit status 2.
    with pytest.raises(SystemExit) as exited:
        main(["scm", *flags(folder, images, tmp_path / "scm", "--time_scale", "1")])
    assert exited.value.code == 2
    assert "--time_scale 1: the weights were trained at ×1000" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_rescale_on_two_processes(folder, images, tmp_path, backend):  # noqa: F811
    """torchrun, 2 gloo processes: the gap is measured on every rank (FSDP2 gathers shards in its forward), the
    ranks agree, and the main rank writes the ×1 outputs."""
    import os
    import subprocess
    import sys

    from tests.t2i_distill.training.test_trainer import REPO, WORKER, _free_port

    out = tmp_path / backend
    extra = ["--max_train_steps", "2", "--jvp", "reference", "--checkpointing_steps", "2", "--backend", backend,
             "--train_batch_size", "1", "--rescale_gap_batches", "1"]
    if backend == "deepspeed":
        ds = json.loads((REPO / "parallel_config" / "deepspeed_bf16_batch1.json").read_text())
        ds["bf16"]["enabled"] = False  # CPU: fp32
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        extra += ["--deepspeed_config", str(tmp_path / "ds.json")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(WORKER), "rescale", *flags(folder, images, out, *extra)], capture_output=True, text=True, env=env,
        timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    states = [torch.load(out / f"rank{r}_state.pt", weights_only=True) for r in (0, 1)]
    assert states[0] and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert [g["when"] for g in _gaps(out)] == ["start", "end"]
    assert (out / "rescaled" / "transformer" / "config.json").is_file() and (out / "rescaled_transformer.pt").is_file()


def test_a_cache_of_the_stock_folder_serves_rescale_and_the_rescaled_folder(folder, images, tmp_path):  # noqa: F811
    """The cache depends on the text encoders and VAE only, which the ×1 folder links from the stock one."""
    from t2i_distill.data import DataConfig, build_cache

    cache = tmp_path / "cache"
    build_cache(DataConfig(train_data_dir=str(images), resolution=32), cache, str(folder), max_sequence_length=8,
                rank=0, world_size=1)

    def cached(base):
        i = base.index("--train_data_dir")
        return [*base[:i], "--cached_dataset", str(cache), *base[i + 2:]]

    out = tmp_path / "rescale"
    train(parse_args("rescale", cached(flags(folder, images, out, "--jvp", "reference", "--max_train_steps", "2",
                                             "--checkpointing_steps", "2", "--learning_rate", "1e-4"))))
    assert [g["when"] for g in _gaps(out)] == ["start", "end"]
    summary = train(parse_args("meanflow", cached(flags(out / "rescaled", images, tmp_path / "mf", "--jvp",
                                                        "reference", "--max_train_steps", "1"))))
    assert summary["global_step"] == 1
    other = tmp_path / "other"  # a different stock folder: its cache is refused, as before
    from t2i_distill.tiny_pipeline import write_tiny_flux_pipeline

    write_tiny_flux_pipeline(other, seed=1)
    with pytest.raises(ValueError, match="does not match"):
        train(parse_args("rescale", cached(flags(other, images, tmp_path / "x", "--max_train_steps", "1"))))
