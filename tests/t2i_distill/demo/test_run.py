"""The end-to-end demo (`t2i-distill demo`) at a very small size: every phase runs and the report is consistent."""

from __future__ import annotations

import json

import pytest

from t2i_distill.demo.run import run_demo

SMALL = {"num_images": 24, "train_batch_size": 4, "scm_steps": 2, "meanflow_steps": 2, "teacher_steps": 2,
         "student_steps": (1, 2), "images_per_prompt": 1, "prompts_per_task": 1}


def test_small_demo_writes_report_grid_and_scores(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, settings=SMALL, log=lambda *a: None)
    assert (out / "grid.png").is_file() and (out / "report.md").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"], default=str))
    samplers = [(r["sampler"], r["steps"]) for r in report["results"]]
    assert samplers == [("teacher", 2), ("scm", 1), ("scm", 2), ("meanflow", 1), ("meanflow", 2)]
    for r in report["results"]:
        assert set(r["tasks"]) == {"colors", "counting", "single_object"} and 0.0 <= r["overall"] <= 1.0
        assert r["images"] == 3  # one prompt per task, one image each
    assert (out / "train-scm" / "transformer_2.safetensors").is_file()
    assert (out / "train-meanflow" / "transformer_2.safetensors").is_file()
    # The fused dual path and the reference agree on one sCM loss and its gradient (kernels in the interpreter).
    spot = report["dual_spot_check"]
    assert spot["loss_rel_diff"] < 1e-4 and spot["grad_rel_diff"] < 1e-3, spot
    assert "| teacher | 2 |" in (out / "report.md").read_text()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="nothing was deleted"):
        run_demo(tmp_path, settings=SMALL, log=lambda *a: None)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_the_committed_demo_folder_is_one_the_demo_may_replace():
    """A fresh clone holds demo/report.md, report.json and grid.png; without the marker tracked beside them,
    `bash scripts/demo.sh` would refuse its own folder."""
    import subprocess
    from pathlib import Path

    from t2i_distill.demo.run import _MARKER

    repo = Path(__file__).resolve().parents[3]
    tracked = subprocess.run(["git", "ls-files", "demo"], capture_output=True, text=True, cwd=repo).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert f"demo/{_MARKER}" in tracked, tracked
