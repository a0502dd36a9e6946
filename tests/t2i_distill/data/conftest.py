"""Generated data sets (imagefolder, parquet, tar) shared by the data tests, and a tiny FLUX pipeline folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.t2i_distill.data.datagen import make_items, write_imagefolder, write_parquet, write_tar


@pytest.fixture(scope="session")
def items():
    return make_items()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, items) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_imagefolder(root / "imagefolder", items)
    write_parquet(root / "parquet", items)
    write_tar(root / "tar", items)
    return root


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> str:
    """A private ``datasets`` cache folder, so the tests neither read nor fill the user's."""
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    from t2i_distill.tiny_pipeline import write_tiny_flux_pipeline

    return write_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_flux_dir):
    """The tiny folder's text encoders and VAE, loaded through the real ``from_pretrained`` paths (fp32, CPU)."""
    import torch

    from t2i_distill.data.cache import _load_models

    return _load_models(str(tiny_flux_dir), torch.float32, "cpu", None, None)
