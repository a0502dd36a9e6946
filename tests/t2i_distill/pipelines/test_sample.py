"""``t2i-distill sample``: prompts from flags and files, PNGs per prompt and image, the grid, seeds per prompt."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from t2i_distill.pipelines import sample


def test_prompts_from_flags_and_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("one red circle\n\n  two blue squares  \n")
    assert sample.read_prompts(["x"], str(path)) == ["x", "one red circle", "two blue squares"]
    with pytest.raises(ValueError, match="no prompts"):
        sample.read_prompts(None, None)
    with pytest.raises(FileNotFoundError, match="prompts_file"):
        sample.read_prompts(None, str(tmp_path / "missing.txt"))


def test_sample_command_writes_pngs_and_a_grid(tmp_path, tiny_folder, students, capsys):
    parser = argparse.ArgumentParser()
    sample.add_subparser(parser.add_subparsers(dest="command"))
    out = tmp_path / "samples"
    args = parser.parse_args([
        "sample", "--pretrained_model_name_or_path", str(tiny_folder), "--method", "meanflow",
        "--student_checkpoint", str(students["meanflow"]), "--prompt",
        "one red circle", "--prompt", "two blue squares", "--num_images_per_prompt", "2", "--num_inference_steps",
        "1", "--resolution", "64", "--max_sequence_length", "16", "--output_dir", str(out), "--seed", "5"])
    assert args.func(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000_00.png", "000_01.png", "001_00.png", "001_01.png",
                                                     "grid.png"]
    assert "meanflow: 4 images of 2 prompts" in capsys.readouterr().out
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64
    # Prompt 1 is seeded by (seed, 1) whatever comes before it: sampling it alone gives the same image.
    import torch

    from t2i_distill.eval.geneval import prompt_seed
    from t2i_distill.pipelines import load_pipeline

    pipe = load_pipeline("meanflow", tiny_folder, student_checkpoint=students["meanflow"])
    alone = pipe("two blue squares", num_inference_steps=1, height=64, width=64, max_sequence_length=16,
                 num_images_per_prompt=2, generator=torch.Generator().manual_seed(prompt_seed(5, 1))).images
    np.testing.assert_array_equal(np.asarray(alone[1]), np.asarray(Image.open(out / "001_01.png")))
