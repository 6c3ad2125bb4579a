"""Ingest helpers (``curation.ingest``): grey statistics, 16-bit images, the in-memory ingest,
thumbnails and RGBA on white."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dinoflow.curation.ingest import (
    array_to_rgb,
    box_thumbnails,
    describe,
    grey_stats,
    pil_to_rgb,
    to_uint8_grey,
)
from dinoflow.curation.ingest_run import IngestSettings, ingest_splits
from dinoflow.data import Split


def test_grey_stats_and_16_bit() -> None:
    std, ent = grey_stats(np.array([[0, 0], [255, 255]], np.uint8))
    assert std == 127.5 and ent == pytest.approx(1.0)
    assert grey_stats(np.full((4, 4), 9, np.uint8)) == (0.0, 0.0)
    assert to_uint8_grey(np.array([65535, 256, 255], np.uint16), "I;16").tolist() == [255, 1, 0]
    assert to_uint8_grey(np.array([0.0, 0.5, 1.0], np.float32), "F").tolist() == [0, 128, 255]


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
    settings = IngestSettings(16, 10**8, compute_phash=True, phash_min_side=0)
    frame, thumbs, _ = ingest_splits({"train": split}, settings, None, 1, arrays_per_chunk=7,
                                     progress=False)
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
