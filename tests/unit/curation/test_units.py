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
from dinoflow.curation.ingest import (
    _to_uint8_grey,
    array_to_rgb,
    box_thumbnails,
    describe,
    grey_stats,
    ingest_split,
    pil_to_rgb,
)
from dinoflow.curation.quality import quality_reasons
from dinoflow.data import Split


def test_grey_stats_and_16_bit() -> None:
    std, ent = grey_stats(np.array([[0, 0], [255, 255]], np.uint8))
    assert std == 127.5 and ent == pytest.approx(1.0)
    assert grey_stats(np.full((4, 4), 9, np.uint8)) == (0.0, 0.0)
    assert _to_uint8_grey(np.array([65535, 256, 255], np.uint16), "I;16").tolist() == [255, 1, 0]
    assert _to_uint8_grey(np.array([0.0, 0.5, 1.0], np.float32), "F").tolist() == [0, 128, 255]


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (32, 32, 3), (17, 17, 4), (30, 20)])
def test_in_memory_ingest_is_the_per_image_description(shape) -> None:
    """The batched in-memory ingest gives each image's own ``describe``: hashes, statistics and
    Pillow's BOX thumbnail exactly (chunks of 7 over 20 images: uneven last chunk too)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, *shape)).astype(np.uint8)
    images[0] = 0  # constant image: std 0, entropy 0
    images[1] = images[2]  # an exact duplicate
    split = Split(ids=[f"i{j}" for j in range(20)], labels=np.arange(20) % 3, class_names=list("abc"),
                  channels=1, images=images)
    frame, thumbs = ingest_split(split, "train", 16, 10**8, compute_phash=True, progress=False,
                                 phash_min_side=0, chunk=7)
    for j, image in enumerate(images):
        info, thumb = describe(array_to_rgb(image), 16, compute_phash=True)
        row = frame.iloc[j]
        assert (row["sha256"], row["phash"]) == (info["sha256"], info["phash"])
        assert row["std"] == pytest.approx(info["std"], rel=1e-12, abs=1e-12)
        assert row["entropy"] == pytest.approx(info["entropy"], rel=1e-12, abs=1e-12)
        np.testing.assert_array_equal(thumbs[j], thumb)
    assert frame["readable"].all() and frame.loc[0, "entropy"] == 0.0
    assert frame.loc[1, "sha256"] == frame.loc[2, "sha256"] != frame.loc[3, "sha256"]
    assert frame["width"].eq(shape[1]).all() and frame["height"].eq(shape[0]).all()
    assert frame["label"].tolist() == (np.arange(20) % 3).tolist()


@pytest.mark.parametrize("side", [28, 64, 12, 9])
def test_box_thumbnails_are_pillows(side) -> None:
    rgb = np.random.default_rng(side).integers(0, 256, (5, side, side, 3)).astype(np.uint8)
    want = [np.asarray(Image.fromarray(x).resize((16, 16), Image.Resampling.BOX)) for x in rgb]
    np.testing.assert_array_equal(box_thumbnails(rgb, 16), np.stack(want))
    with pytest.raises(ValueError, match="square"):
        box_thumbnails(rgb[:, :, :-1], 16)


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
