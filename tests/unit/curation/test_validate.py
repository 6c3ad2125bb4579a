"""Great Expectations validation (``curation.validate``): a must-hold check stops with a message."""

from __future__ import annotations

import pandas as pd
import pytest

from dinoflow.curation import CurationValidationError
from dinoflow.curation.config import QualityConfig, ValidationConfig


def _meta(ids: list[str], labels: list[int]) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({
        "split": ["train"] * n, "item_id": ids, "label": labels, "readable": [True] * n,
        "width": [32] * n, "height": [32] * n, "channels": [3] * n,
    })  # fmt: skip


def test_validation_must_hold_stops_with_message(tmp_path) -> None:
    from dinoflow.curation.validate import validate_metadata

    cfg = ValidationConfig(docs_dir=str(tmp_path / "docs"))
    ok = validate_metadata(_meta(["a", "b"], [0, 1]), 2, cfg, QualityConfig())
    assert ok["success_critical"] and (tmp_path / "docs" / "index.html").is_file()
    with pytest.raises(CurationValidationError, match="unique") as err:
        validate_metadata(_meta(["a", "a", "c"], [0, 1, 7]), 2, cfg, QualityConfig())
    assert "expect_column_values_to_be_in_set on label" in str(err.value)
