"""Reduced JPEG decoding at ingest (``curation.ingest.decode_min_side``), on crops of a real photo:
the table keeps the full size, the thumbnails and pHash stay within the measured tolerance of a
full decode's, exact and near duplicates are found as with a full decode, a PNG decodes in full.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from dinoflow.curation import curate
from dinoflow.curation.config import curation_config
from dinoflow.curation.ingest import describe_split
from dinoflow.data import Split

MIN_SIDE = 256
# Measured on this set (2000x1500 and 1000x750 at 1/4 and 1/2 scale): thumbnails differ by at
# most 5 grey levels, pHash by at most 2 bits, grey std by < 0.5 %; on the camera photos
# (experiments/results/reduced_decode.md, up to 1/8 scale): 6 levels, 2 bits, std up to 15 %.
THUMB_TOLERANCE = 8
PHASH_BITS = 4


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, real_photo) -> list:
    """A 2000x1500 JPEG, its byte copy, a quality-80 re-encode, a half-size copy, four
    1000x750 crops (JPEG) and one 1000x750 crop as PNG."""
    folder = tmp_path_factory.mktemp("reduced")
    big = real_photo(2000, 1500)
    big.save(folder / "big.jpg", quality=92)
    shutil.copyfile(folder / "big.jpg", folder / "big_copy.jpg")
    big.save(folder / "big_q80.jpg", quality=80)
    big.resize((1000, 750)).save(folder / "big_half.jpg", quality=92)
    for k, (x, y) in enumerate([(0, 0), (1000, 0), (0, 750), (1000, 750)]):
        big.crop((x, y, x + 1000, y + 750)).save(folder / f"crop_{k}.jpg", quality=92)
    big.crop((500, 375, 1500, 1125)).save(folder / "crop.png")
    return sorted(folder.iterdir())


def _split(paths: list) -> Split:
    return Split(ids=[p.name for p in paths], labels=np.full(len(paths), -1), class_names=[],
                 channels=3, paths=list(paths), name="train")  # fmt: skip


def _ingest(paths: list, min_side: int | None):
    return describe_split(_split(paths), "train", 16, 10**8, True, 64, 0, min_side)


def _hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def test_full_size_in_table_thumbnails_and_phash_within_tolerance(photo_files) -> None:
    full, full_thumbs = _ingest(photo_files, None)
    reduced, thumbs = _ingest(photo_files, MIN_SIDE)
    assert reduced["readable"].all()
    assert reduced[["width", "height"]].equals(full[["width", "height"]])  # the file's size
    assert set(zip(reduced["width"], reduced["height"], strict=True)) == {(2000, 1500), (1000, 750)}
    diff = np.abs(thumbs.astype(int) - full_thumbs.astype(int))
    assert diff.max() <= THUMB_TOLERANCE
    hamming = [_hamming(a, b) for a, b in zip(reduced["phash"], full["phash"], strict=True)]
    assert max(hamming) <= PHASH_BITS
    assert ((reduced["std"] - full["std"]).abs() / full["std"]).max() < 0.02
    png = reduced["item_id"] == "crop.png"  # not a JPEG: decoded in full, every value the same
    assert reduced[png].equals(full[png]) and np.array_equal(thumbs[png], full_thumbs[png])
    jpeg = ~png.to_numpy()
    assert (reduced["sha256"][jpeg] != full["sha256"][jpeg]).all()  # a hash of other pixels


def _curate(paths: list, min_side: int | None) -> dict:
    cfg = curation_config({"workers": 1, "show_progress": False,
                           "ingest": {"decode_min_side": min_side}})  # fmt: skip
    splits = {"train": _split(paths)}
    meta, thumbs = curate.ingest(splits, cfg)
    meta = curate.quality(meta, cfg)
    meta = curate.deduplicate(meta, curate.embed(meta, thumbs, splits, cfg)[0], cfg)
    return dict(zip(meta["item_id"], zip(meta["reason"], meta["dup_of"], strict=True), strict=True))


def test_duplicates_found_as_with_a_full_decode(photo_files) -> None:
    full, reduced = _curate(photo_files, None), _curate(photo_files, MIN_SIDE)
    assert reduced == full
    assert reduced["big_copy.jpg"] == ("exact_duplicate", "big.jpg")  # byte copy: same pixels
    assert reduced["big_q80.jpg"] == ("near_duplicate", "big.jpg")
    assert reduced["big_half.jpg"] == ("near_duplicate", "big.jpg")
    assert all(reduced[f"crop_{k}.jpg"] == ("", "") for k in range(4))


def test_default_and_null() -> None:
    assert curation_config({}).ingest.decode_min_side == MIN_SIDE
    assert curation_config({"ingest": {"decode_min_side": None}}).ingest.decode_min_side is None
