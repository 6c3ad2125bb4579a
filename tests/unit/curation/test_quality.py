"""Quality filters (``curation.quality``): the reason each image is quarantined for."""

from __future__ import annotations

import pandas as pd

from dinoflow.curation.config import QualityConfig
from dinoflow.curation.quality import quality_reasons


def test_quality_reason_precedence() -> None:
    meta = pd.DataFrame({
        "width": [8, 400, 100, 100, 100], "height": [8, 40, 100, 100, 100],
        "std": [50.0, 50.0, 1.0, 40.0, 40.0], "entropy": [5.0, 5.0, 5.0, 0.2, 5.0],
        "readable": [True] * 5, "reason": [""] * 5, "detail": [""] * 5,
    })  # fmt: skip
    reason, _ = quality_reasons(meta, QualityConfig())
    assert reason.tolist() == ["too_small", "extreme_aspect", "low_information", "low_information", ""]
