"""The shared sample/geneval flags: defaults per sampler, sampler-only options, device choice."""

from __future__ import annotations

import argparse

import pytest
import torch

from t2i_distill.pipelines.options import add_model_arguments, call_options, resolve_device


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(["--pretrained_model_name_or_path", "folder", *argv])


def test_defaults_per_sampler_and_sampler_only_options():
    assert call_options(_parse("--method", "teacher")) == {
        "num_inference_steps": 28, "guidance_scale": 3.5, "height": 512, "width": 512, "max_sequence_length": 256}
    scm = call_options(_parse("--method", "scm", "--intermediate_timestep", "1.1"))
    assert scm["num_inference_steps"] == 2 and scm["intermediate_timestep"] == 1.1
    meanflow = call_options(_parse("--method", "meanflow", "--quantize_timesteps", "--resolution", "1024"))
    assert meanflow["num_inference_steps"] == 4 and meanflow["quantize_timesteps"] is True
    assert meanflow["height"] == meanflow["width"] == 1024 and "intermediate_timestep" not in meanflow
    assert call_options(_parse("--num_inference_steps", "1"))["num_inference_steps"] == 1


def test_reference_flag_name_for_the_checkpoint():
    assert _parse("--resume_path", "ckpts/transformer_1000.pt").student_checkpoint == "ckpts/transformer_1000.pt"
    with pytest.raises(SystemExit):
        _parse("--method", "ddim")


def test_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    expected = torch.device("cuda", 1 % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == expected
