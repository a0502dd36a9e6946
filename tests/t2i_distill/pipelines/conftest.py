"""The tiny FLUX pipeline folder the pipeline tests load (written once per test session, offline)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from t2i_distill.tiny_pipeline import write_tiny_flux_pipeline

    return write_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipeline", seed=0)
