"""The curation config (``curation.config``): every bad key is named."""

from __future__ import annotations

import pytest

from dinoflow.config import ConfigError
from dinoflow.curation import curation_config


def test_config_names_the_bad_key() -> None:
    with pytest.raises(ConfigError, match=r"curation\.dedup\.cosine_treshold: unknown key"):
        curation_config({"dedup": {"cosine_treshold": 0.9}})
    with pytest.raises(ConfigError, match="one entry per level"):
        curation_config({"sampling": {"n_clusters": [10, 2], "resampling_steps": [0]}})
    with pytest.raises(ConfigError, match="timm_weights"):
        curation_config({"embedding": {"kind": "timm", "timm_name": "resnet18"}})
