"""Shared by the pipeline and evaluation tests: the tiny FLUX pipeline folder (written once per test session, offline)
and untrained student checkpoints of it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from t2i_distill.tiny_pipeline import write_tiny_flux_pipeline

    return write_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipeline", seed=0)


@pytest.fixture(scope="session")
def students(tiny_folder, tmp_path_factory) -> dict:
    """``{"scm": path, "meanflow": path}``: untrained students of the tiny folder, saved without a time-scale record
    (so ×1, as the reference's checkpoints): a student sampler refuses to run without one."""
    from safetensors.torch import save_file

    from t2i_distill.models import load_student

    root = tmp_path_factory.mktemp("students")
    paths = {}
    for method, kind in (("scm", "trigflow"), ("meanflow", "meanflow")):
        model, _ = load_student(tiny_folder, kind=kind)
        paths[method] = root / f"{method}.safetensors"
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, paths[method])
    return paths
