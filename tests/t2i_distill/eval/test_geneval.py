"""GenEval generation: layout, per-prompt seeds, sharding (1 vs 2 real processes give identical PNGs), resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2i_distill.eval.geneval import (
    distributed_rank,
    is_prompt_complete,
    prompt_seed,
    read_metadata,
    run_geneval,
    shard,
    write_prompt_folder,
)
from t2i_distill.eval.shapes import mini_geneval_metadata, write_metadata_jsonl

REPO = Path(__file__).resolve().parents[3]
SETTINGS = {"num_inference_steps": 1, "height": 64, "width": 64, "max_sequence_length": 16}


def test_prompt_seeds_are_deterministic_and_distinct():
    seeds = {prompt_seed(s, i) for s in (0, 1, 42, 43) for i in range(50)}
    assert len(seeds) == 200  # seed+index collisions (42, 1) vs (43, 0) do not happen
    assert prompt_seed(42, 7) == prompt_seed(42, 7) and 0 <= prompt_seed(42, 7) < 2**63
    with pytest.raises(ValueError, match="seed"):
        prompt_seed(-1, 0)


def test_shards_partition_the_prompts():
    parts = [shard(11, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    with pytest.raises(ValueError, match="rank"):
        shard(4, 2, 2)


def test_rank_from_the_launchers_environment():
    assert distributed_rank({}) == (0, 1)
    assert distributed_rank({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    with pytest.raises(ValueError, match="RANK"):
        distributed_rank({"RANK": "4", "WORLD_SIZE": "4"})


def test_read_metadata_checks_each_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "one red circle", "tag": "colors"}\n\n{"tag": "x"}\n')
    with pytest.raises(ValueError, match="line 3"):
        read_metadata(path)
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [r["prompt"] for r in read_metadata(path)] == ["a", "b"]
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.jsonl")


def test_a_folder_is_complete_only_with_metadata_and_every_image(tmp_path):
    from PIL import Image

    folder = tmp_path / "00000"
    write_prompt_folder(folder, {"prompt": "p"}, [Image.new("RGB", (8, 8))] * 2)
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]  # no temp files left
    assert json.loads((folder / "metadata.jsonl").read_text()) == {"prompt": "p"}
    assert is_prompt_complete(folder, 2) and not is_prompt_complete(folder, 3)
    (folder / "samples" / "0001.png").unlink()
    assert not is_prompt_complete(folder, 2)
    (folder / "samples" / "0001.png").write_bytes(b"")
    (folder / "metadata.jsonl").unlink()
    assert not is_prompt_complete(folder, 2)


@pytest.fixture(scope="module")
def scm_pipe(tiny_folder, students):
    from t2i_distill.pipelines import load_pipeline

    return load_pipeline("scm", tiny_folder, student_checkpoint=students["scm"])


def test_layout_and_resume(tmp_path, scm_pipe):
    metadata = mini_geneval_metadata(per_task=1)
    out = tmp_path / "geneval"
    first = run_geneval(scm_pipe, metadata, out, images_per_prompt=2, seed=42, rank=0, world_size=1, log=None,
                        **SETTINGS)
    assert first["generated"] == [0, 1, 2] and first["skipped"] == []
    for index, row in enumerate(metadata):
        folder = out / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == row
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    original = (out / "00001" / "samples" / "0001.png").read_bytes()
    (out / "00001" / "samples" / "0001.png").unlink()  # an interrupted prompt
    again = run_geneval(scm_pipe, metadata, out, images_per_prompt=2, seed=42, rank=0, world_size=1, log=None,
                        **SETTINGS)
    assert again["generated"] == [1] and again["skipped"] == [0, 2]
    assert (out / "00001" / "samples" / "0001.png").read_bytes() == original  # seeded per prompt: same image
    other_seed = run_geneval(scm_pipe, metadata, tmp_path / "seed7", images_per_prompt=2, seed=7, rank=0,
                             world_size=1, log=None, **SETTINGS)
    assert other_seed["generated"] == [0, 1, 2]
    assert (tmp_path / "seed7" / "00001" / "samples" / "0001.png").read_bytes() != original


def _launch(tiny_folder, student, metadata_path, out, rank, world):
    # One intra-op thread, as this test process (tests/conftest.py): float sums depend on the thread count, and the
    # claim under test is that images do not depend on the number of *processes*.
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "t2i_distill.eval.geneval", "--metadata", str(metadata_path), "--output_dir",
           str(out), "--pretrained_model_name_or_path", str(tiny_folder), "--method", "scm",
           "--student_checkpoint", str(student),
           "--num_inference_steps", "1", "--resolution", "64", "--max_sequence_length", "16", "--images_per_prompt",
           "2", "--device", "cpu"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_one_and_two_processes_write_identical_images(tmp_path, tiny_folder, students, scm_pipe):
    """Two launched ranks (RANK/WORLD_SIZE as torchrun sets them) reproduce the single-process run file for file."""
    metadata = mini_geneval_metadata(per_task=1)
    metadata_path = write_metadata_jsonl(tmp_path / "meta.jsonl", metadata)
    procs = [_launch(tiny_folder, students["scm"], metadata_path, tmp_path / "two", rank, 2) for rank in (0, 1)]
    run_geneval(scm_pipe, metadata, tmp_path / "one", images_per_prompt=2, seed=42, rank=0, world_size=1, log=None,
                **SETTINGS)
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    assert "[rank 0/2] generated 2 prompts" in logs[0] and "[rank 1/2] generated 1 prompts" in logs[1]
    def images(root):  # GenEval's layout (the settings record beside it differs: the CLI records its flags too)
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))

    one, two = images(tmp_path / "one"), images(tmp_path / "two")
    assert one == two and len(one) == 3 * 3  # 3 prompts × (metadata + 2 images)
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_a_folder_made_with_other_settings_is_refused_naming_them(scm_pipe, tmp_path):
    from t2i_distill.errors import ConfigurationError

    metadata = mini_geneval_metadata(per_task=1)[:2]
    common = {"images_per_prompt": 1, "seed": 42, "rank": 0, "world_size": 1, "log": None, "height": 64,
              "width": 64, "max_sequence_length": 16}
    run_geneval(scm_pipe, metadata, tmp_path / "out", num_inference_steps=1, **common)
    again = run_geneval(scm_pipe, metadata, tmp_path / "out", num_inference_steps=1, **common)
    assert again["skipped"] == [0, 1]
    with pytest.raises(ConfigurationError, match=r"num_inference_steps: folder 1, now 2"):
        run_geneval(scm_pipe, metadata, tmp_path / "out", num_inference_steps=2, **common)
