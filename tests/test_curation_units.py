"""Unit checks of ingest helpers, quality filters, dedup graph, config and GX validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinoflow.config import ConfigError
from dinoflow.curation import CurationValidationError, curation_config
from dinoflow.curation.config import QualityConfig, ValidationConfig
from dinoflow.curation.dedup import (
    connected_components,
    exact_duplicates,
    hamming_edges,
    phash_bytes,
    representatives,
    similarity_edges,
)
from dinoflow.curation.ingest import _to_uint8_grey, grey_stats, pil_to_rgb
from dinoflow.curation.quality import quality_reasons


def test_grey_stats_and_16_bit() -> None:
    std, ent = grey_stats(np.array([[0, 0], [255, 255]], np.uint8))
    assert std == 127.5 and ent == pytest.approx(1.0)
    assert grey_stats(np.full((4, 4), 9, np.uint8)) == (0.0, 0.0)
    assert _to_uint8_grey(np.array([65535, 256, 255], np.uint16), "I;16").tolist() == [255, 1, 0]
    assert _to_uint8_grey(np.array([0.0, 0.5, 1.0], np.float32), "F").tolist() == [0, 128, 255]


def test_rgba_composited_on_white() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [10, 20, 30, 255]  # opaque; the others fully transparent black
    rgb = pil_to_rgb(Image.fromarray(rgba, "RGBA"))
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[1, 1].tolist() == [255, 255, 255]


def test_quality_reason_precedence() -> None:
    meta = pd.DataFrame({
        "width": [8, 400, 100, 100, 100], "height": [8, 40, 100, 100, 100],
        "std": [50.0, 50.0, 1.0, 40.0, 40.0], "entropy": [5.0, 5.0, 5.0, 0.2, 5.0],
        "readable": [True] * 5, "reason": [""] * 5, "detail": [""] * 5,
    })  # fmt: skip
    reason, _ = quality_reasons(meta, QualityConfig())
    assert reason.tolist() == ["too_small", "extreme_aspect", "low_information", "low_information", ""]


def test_similarity_edges_match_direct_cosines() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    x[3] = x[0] + 0.01  # near duplicate of 0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = curation_config({}).dedup
    i, j, s = similarity_edges(x, 0.99, 3, cfg)
    cos = x @ x.T
    expected = {(a, b) for a in range(6) for b in range(a + 1, 6) if cos[a, b] >= 0.99}
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected == {(0, 3)}
    assert s[0] == pytest.approx(cos[0, 3], abs=1e-6)
    i, j, _ = similarity_edges(x[:3], 0.99, 1, cfg, base=x[3:])  # cross mode
    assert (i.tolist(), j.tolist()) == ([0], [0])


def test_ivf_search_finds_the_same_duplicates() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    x[1000:1010] = x[:10] + 0.001  # ten near copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat = similarity_edges(x, 0.99, 4, curation_config({}).dedup)
    ivf_cfg = curation_config({"dedup": {"index": "ivf", "ivf_nlist": 16, "ivf_nprobe": 16}}).dedup
    ivf = similarity_edges(x, 0.99, 4, ivf_cfg)  # nprobe = nlist: exhaustive, so identical
    assert flat[0].tolist() == ivf[0].tolist() == list(range(10))
    assert flat[1].tolist() == ivf[1].tolist() == list(range(1000, 1010))


def test_hamming_edges_and_phash_bytes() -> None:
    import imagehash

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8))
    h = imagehash.phash(img)
    assert np.unpackbits(phash_bytes([str(h)])[0]).astype(bool).tolist() == h.hash.flatten().tolist()
    codes = phash_bytes(["0000000000000000", "0000000000000003", "ffffffffffffffff"])
    i, j, d = hamming_edges(codes, 2, 2)  # distances: (0,1)=2, (0,2)=64, (1,2)=62
    assert (i.tolist(), j.tolist(), d.tolist()) == ([0], [1], [2])


def test_components_and_representatives() -> None:
    labels = connected_components(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert labels[0] == labels[1] == labels[2] and labels[4] == labels[5] and labels[3] not in labels[[0, 4]]
    keep = representatives(labels, np.array([0, -5, 0, 0, 3, 3]))
    assert keep.tolist() == [False, True, False, True, True, False]
    keep, twin = exact_duplicates(pd.Series(["x", "y", "x", "x"]), np.array([0, 0, -1, 0]))
    assert keep.tolist() == [False, True, True, False] and twin.tolist() == [2, 1, 2, 2]


def test_config_names_the_bad_key() -> None:
    with pytest.raises(ConfigError, match=r"curation\.dedup\.cosine_treshold: unknown key"):
        curation_config({"dedup": {"cosine_treshold": 0.9}})
    with pytest.raises(ConfigError, match="one entry per level"):
        curation_config({"sampling": {"n_clusters": [10, 2], "resampling_steps": [0]}})
    with pytest.raises(ConfigError, match="timm_weights"):
        curation_config({"embedding": {"kind": "timm", "timm_name": "resnet18"}})


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
