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


def _mixed_meta() -> pd.DataFrame:
    """10 rows: the first 4 unreadable (readable fraction 0.6, though 0 in the first blocks),
    a 10x10 image, a 40x400 one, a 5-channel one."""
    meta = _meta([f"i{k}" for k in range(10)], [0, 1, -1, 0, 1, 0, 1, 0, 1, 0])
    meta.loc[:3, ["readable", "width", "height"]] = [False, -1, -1]
    meta.loc[5, ["width", "height"]] = [10, 10]
    meta.loc[6, ["width", "height"]] = [40, 400]
    meta.loc[8, "channels"] = 5
    return meta


@pytest.mark.parametrize("rows_per_batch", [2, 3])
def test_validation_in_blocks_gives_the_one_block_summary(tmp_path, rows_per_batch) -> None:
    from dinoflow.curation.validate import validate_metadata

    def checks(rows: int) -> list[dict]:
        cfg = ValidationConfig(docs_dir=str(tmp_path / "docs"), rows_per_batch=rows)
        out = validate_metadata(_mixed_meta(), 2, cfg, QualityConfig())
        assert out["n_blocks"] == -(-10 // rows)
        return out["checks"]

    whole, blocks = checks(10), checks(rows_per_batch)
    assert blocks == whole
    by_column = {c["kwargs"].get("column"): c for c in blocks if c["severity"] == "warning"}
    assert by_column["readable"]["unexpected_count"] == 4
    assert by_column["readable"]["examples"] == ["0", "0", "0", "0"]
    assert by_column["min_side"]["examples"] == ["10.0"]
    assert by_column["aspect"]["examples"] == ["10.0"]
    assert by_column["channels"]["unexpected_count"] == 1
    mean = next(c for c in blocks if c["expectation"] == "expect_column_mean_to_be_between")
    assert mean["success"] and mean["observed_value"] == "0.6"  # the first blocks' mean is 0


@pytest.mark.parametrize(
    ("edit", "min_readable", "match"),
    [
        ("duplicate", 0.5, "unique"),  # rows 1 and 8: in different blocks
        (None, 0.7, "mean"),  # 0.6 readable overall
    ],
)
def test_validation_in_blocks_fails_as_one_block(tmp_path, edit, min_readable, match) -> None:
    from dinoflow.curation.validate import validate_metadata

    meta = _mixed_meta()
    if edit == "duplicate":
        meta.loc[8, "item_id"] = "i1"
    messages = []
    for rows in (10, 3):
        cfg = ValidationConfig(
            docs_dir=str(tmp_path / "docs"), rows_per_batch=rows, min_readable_fraction=min_readable
        )
        with pytest.raises(CurationValidationError, match=match) as err:
            validate_metadata(meta, 2, cfg, QualityConfig())
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[1].count("\n  - ") == 1


def test_validation_progress_bar_counts_images(tmp_path, capsys, monkeypatch) -> None:
    import tqdm.auto

    from dinoflow.curation.validate import validate_metadata

    steps = []

    class Recording(tqdm.auto.tqdm):
        def update(self, n: int = 1) -> None:
            steps.append(n)
            super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    cfg = ValidationConfig(docs_dir=str(tmp_path / "docs"), rows_per_batch=3)
    validate_metadata(_mixed_meta(), 2, cfg, QualityConfig(), progress=True)
    err = capsys.readouterr().err
    assert "validate (Great Expectations)" in err and "10/10" in err and "img/s" in err
    assert steps == [3, 3, 3, 1]  # block by block
