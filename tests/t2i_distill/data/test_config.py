"""DataConfig validation: every bad option names itself, the expected and the received value."""

from __future__ import annotations

import pytest

from t2i_distill.data.config import DataConfig
from t2i_distill.data.sources import resolve_source


def test_config_validation_names_the_argument():
    with pytest.raises(ValueError, match="no data source"):
        DataConfig()
    with pytest.raises(ValueError, match="`resolution`: expected a positive multiple of 16.*got 500"):
        DataConfig(dataset_name="x/y", resolution=500)
    with pytest.raises(ValueError, match="`max_train_samples`"):
        DataConfig(dataset_name="x/y", max_train_samples=0)
    with pytest.raises(TypeError, match="`dataset_name`: expected a str"):
        DataConfig(dataset_name=3)
    with pytest.raises(ValueError, match="`train_data_dir`: expected an existing folder"):
        resolve_source(DataConfig(train_data_dir="/no/such/dir"))
    with pytest.raises(ValueError, match="`dataloader_num_workers`: expected an int >= 0, got -1"):
        DataConfig(dataset_name="x/y", dataloader_num_workers=-1)
    with pytest.raises(ValueError, match="`image_column`: expected a non-empty str"):
        DataConfig(dataset_name="x/y", image_column="")
    assert DataConfig(cached_dataset="c").to_dict()["cached_dataset"] == "c"
