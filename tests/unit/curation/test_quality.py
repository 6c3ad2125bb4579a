"""Quality filters (``curation.quality``): the reason each image is quarantined for."""

from __future__ import annotations

import importlib

import pandas as pd

from dinoflow.curation.config import QualityConfig
from dinoflow.curation.quality import quality_reasons

quality = importlib.import_module("dinoflow.curation.quality")  # the package names a function so


def test_quality_reason_precedence() -> None:
    meta = pd.DataFrame({
        "width": [8, 400, 100, 100, 100], "height": [8, 40, 100, 100, 100],
        "std": [50.0, 50.0, 1.0, 40.0, 40.0], "entropy": [5.0, 5.0, 5.0, 0.2, 5.0],
        "readable": [True] * 5, "reason": [""] * 5, "detail": [""] * 5,
    })  # fmt: skip
    reason, _ = quality_reasons(meta, QualityConfig())
    assert reason.tolist() == ["too_small", "extreme_aspect", "low_information", "low_information", ""]


def _mixed(n: int = 50) -> pd.DataFrame:
    """n rows cycling through: kept, too_small, extreme_aspect, low std, low entropy, unreadable
    at ingest, too_large (over max_pixels), on an index that is not 0..n-1."""
    kinds = [
        (100, 100, 40.0, 5.0, True),
        (10, 12, 40.0, 5.0, True),
        (30, 300, 40.0, 5.0, True),
        (100, 100, 1.0, 5.0, True),
        (100, 100, 40.0, 0.1, True),
        (-1, -1, 0.0, 0.0, False),
        (5000, 5000, 40.0, 5.0, True),
    ]
    rows = [kinds[i % len(kinds)] for i in range(n)]
    meta = pd.DataFrame(rows, columns=["width", "height", "std", "entropy", "readable"])
    meta["reason"] = ["unreadable" if not r[4] else "" for r in rows]
    meta["detail"] = ["decode error" if not r[4] else "" for r in rows]
    meta.index = meta.index * 2 + 100
    return meta


def test_quality_in_blocks_gives_the_one_block_reasons(monkeypatch) -> None:
    meta, cfg = _mixed(), QualityConfig(max_pixels=20_000_000)
    whole = quality_reasons(meta, cfg)
    monkeypatch.setattr(quality, "ROWS_PER_BLOCK", 7)
    blocks = quality_reasons(meta, cfg)
    assert whole[0].equals(blocks[0]) and whole[1].equals(blocks[1])
    assert blocks[0].index.equals(meta.index)
    assert blocks[0].value_counts().to_dict() == {
        "": 8, "too_small": 7, "extreme_aspect": 7, "low_information": 14,
        "unreadable": 7, "too_large": 7,
    }  # fmt: skip
    assert blocks[1].iloc[2] == "30x300: aspect 10.00 > 5.0"


def test_quality_progress_bar_counts_images(monkeypatch, capsys) -> None:
    import tqdm.auto

    steps = []

    class Recording(tqdm.auto.tqdm):
        def update(self, n: int = 1) -> None:
            steps.append(n)
            super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    monkeypatch.setattr(quality, "ROWS_PER_BLOCK", 20)
    quality.apply_quality(_mixed(), QualityConfig(), progress=True)
    err = capsys.readouterr().err
    assert "quality filters" in err and "50/50" in err and "img/s" in err
    assert steps == [20, 20, 10]  # block by block
