"""One decoder: the pixels training sees are the pixels curation checked, for the files real
folders hold (16-bit grey, RGBA, CMYK, palette, EXIF-rotated, animated); links out of the data
root are not followed; the same image under two labels is reported."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow.curation.ingest import grey_stats, pixel_sha256
from dinoflow.data import list_image_folder, load_splits
from dinoflow.data.decode import (
    decode_file,
    decode_image,
    decode_short_side,
    rgb_to_luma,
    short_side_size,
)
from dinoflow.errors import DataError

RNG = np.random.default_rng(0)


def _write_tricky(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    grey16 = (np.linspace(0, 65535, 32 * 24).reshape(24, 32)).astype(np.uint16)
    files["grey16"] = folder / "grey16.png"
    Image.fromarray(grey16).save(files["grey16"])  # opens as mode I;16 / I
    rgba = RNG.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 20, dtype=np.uint8)[None, :]
    files["rgba"] = folder / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(files["rgba"])
    files["cmyk"] = folder / "cmyk.jpg"
    Image.fromarray(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(files["cmyk"])
    palette = Image.fromarray(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("P")
    files["palette"] = folder / "palette.png"
    palette.save(files["palette"], transparency=0)
    exif_img = Image.fromarray(RNG.integers(0, 256, (10, 30, 3), dtype=np.uint8))
    exif = exif_img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    files["exif"] = folder / "exif.jpg"
    exif_img.save(files["exif"], exif=exif)
    frames = [Image.fromarray(np.full((12, 12), v, np.uint8)) for v in (30, 200, 90)]
    files["anim"] = folder / "anim.gif"
    frames[0].save(files["anim"], save_all=True, append_images=frames[1:])
    return files


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path) -> None:
    path = _write_tricky(tmp_path)["grey16"]
    grey = decode_image(path, channels=1)[0].numpy()
    assert grey.min() == 0 and grey.max() == 255  # the full range, not 99.6% white
    assert (grey == 255).mean() < 0.01
    # Pillow's own convert("L") clips 16-bit values: what a plain Pillow reader gives
    with Image.open(path) as im:
        clipped = np.asarray(im.convert("L"))
    assert (clipped == 255).mean() > 0.9


@pytest.mark.parametrize("name", ["grey16", "rgba", "cmyk", "palette", "exif", "anim"])
@pytest.mark.parametrize("channels", [1, 3])
def test_training_sees_the_pixels_curation_checked(tmp_path, name, channels) -> None:
    files = _write_tricky(tmp_path)
    checked = decode_file(files[name]).rgb  # what curation hashes and filters
    assert checked is not None and checked.dtype == np.uint8 and checked.shape[2] == 3
    split = load_splits("image_folder", str(tmp_path), val_size=0.0001, test_fraction=0.01,
                        channels=channels)
    where = {s: split[s].ids.index(files[name].name) for s in split if files[name].name in split[s].ids}
    (split_name, i), = where.items()
    seen = split[split_name].load(i)  # what the training loader decodes
    want = rgb_to_luma(checked)[None] if channels == 1 else checked.transpose(2, 0, 1)
    assert torch.equal(seen, torch.from_numpy(np.ascontiguousarray(want)))
    # and curation's grey statistics are computed on exactly that luma
    assert grey_stats(rgb_to_luma(checked)) == grey_stats(np.asarray(Image.fromarray(checked).convert("L")))
    assert pixel_sha256(checked) == pixel_sha256(decode_file(files[name].read_bytes()).rgb)


def test_what_each_tricky_file_decodes_to(tmp_path) -> None:
    files = _write_tricky(tmp_path)
    rgba = decode_file(files["rgba"]).rgb
    assert (rgba[:, 0] == 255).all()  # alpha 0 on the left column: composited on white
    assert decode_file(files["exif"]).rgb.shape[:2] == (30, 10)  # EXIF orientation applied
    anim = decode_file(files["anim"])
    assert anim.meta["n_frames"] == 3 and (anim.rgb == 30).all()  # the first frame
    assert decode_file(files["cmyk"]).meta["mode"] == "CMYK"


def test_an_unreadable_file_is_named(tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        decode_image(bad, 3)


def test_links_out_of_the_data_root_are_not_followed_by_default(tmp_path, caplog) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(outside / "stranger.png")
    (outside / "folder").mkdir()
    Image.fromarray(np.full((8, 8), 50, np.uint8)).save(outside / "folder" / "deep.png")
    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(root / "cats" / "real.png")
    (root / "cats" / "linked.png").symlink_to(outside / "stranger.png")
    (root / "cats" / "inside_link.png").symlink_to(root / "cats" / "real.png")
    (root / "dogs").symlink_to(outside / "folder", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="dinoflow.data.image_folder"):
        paths, labels, classes = list_image_folder(root)
    names = sorted(p.name for p in paths)
    assert names == ["inside_link.png", "real.png"] and classes == ["cats"]
    assert "2 link(s) out of the data root not followed" in caplog.text
    paths, _, classes = list_image_folder(root, follow_out_of_root=True)
    assert sorted(p.name for p in paths) == ["deep.png", "inside_link.png", "linked.png", "real.png"]
    assert classes == ["cats", "dogs"]
    from dinoflow.curation.ingest import list_skipped_files

    skipped = {Path(p).name: reason for p, reason, _ in list_skipped_files(root)}
    assert skipped == {"linked.png": "outside_root", "dogs": "outside_root"}


def test_the_same_image_under_two_labels_is_reported(tmp_path, run_curation) -> None:
    from dinoflow.curation import curation_config

    root = tmp_path / "data"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
    pics = RNG.integers(0, 256, (6, 24, 24), dtype=np.uint8)
    for i in range(3):
        Image.fromarray(pics[i]).save(root / "a" / f"{i}.png")
        Image.fromarray(pics[3 + i]).save(root / "b" / f"{i}.png")
    Image.fromarray(pics[0]).save(root / "b" / "copy_of_a0.png")  # the same pixels, label b
    splits = load_splits("image_folder", str(root), val_size=1, test_fraction=0.01)
    cfg = curation_config({"show_progress": False, "validation": {"enabled": False},
                           "sampling": {"enabled": False}, "report": {"dir": str(tmp_path / "rep")},
                           "dedup": {"embedding": False, "phash": False},
                           "decontam": {"enabled": False}, "quality": {"min_side": 8}})
    res = run_curation(splits, cfg.model_dump(), root=str(root))
    conflicts = res.report["label_conflicts"]
    assert len(conflicts) == 1 and {conflicts[0]["item_id"], conflicts[0]["duplicate_of"]} <= {
        "a/0.png", "b/copy_of_a0.png"}
    assert "under another label" in conflicts[0]["detail"]


# --------------------------------------------------------------------------- reduced decoding
def _full_then_resized(path: Path, side: int) -> np.ndarray:
    """The reference: the whole file decoded, then the same antialiased resize."""
    full = decode_file(path).rgb
    height, width = short_side_size(*full.shape[:2], side)
    return np.asarray(Image.fromarray(full).resize((width, height), Image.Resampling.BICUBIC))


def test_reduced_decoding_of_camera_photos_is_within_a_level(camera_photos) -> None:
    """decode_short_side against a full decode + the same resize, on real photos: mean
    absolute difference <= 1 uint8 level per photo, 99th percentile <= 6 (measured: at most
    0.9 and 5, 224 px on the 2-18 MP photos)."""
    for path in camera_photos:
        reduced = decode_short_side(path, 224)
        assert reduced.meta["draft_scale"] >= 2, path  # libjpeg really decoded it reduced
        want = _full_then_resized(path, 224)
        assert reduced.rgb.shape == want.shape and min(want.shape[:2]) == 224
        diff = np.abs(reduced.rgb.astype(np.int16) - want.astype(np.int16))
        assert diff.mean() <= 1.0 and np.percentile(diff, 99) <= 6, (path, diff.mean())


def test_min_side_takes_the_smallest_scale_that_keeps_it(camera_photos) -> None:
    path = camera_photos[0]
    full = decode_file(path)
    short = min(full.rgb.shape[:2])
    for min_side in (100, 300, short // 2, short):
        got = decode_file(path, min_side=min_side)
        scale = got.meta["draft_scale"]
        assert min(got.rgb.shape[:2]) == -(-short // scale) >= min_side
        assert scale == 8 or -(-short // (2 * scale)) < min_side  # the next scale would not do
        assert (got.meta["full_height"], got.meta["full_width"]) == full.rgb.shape[:2]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_with_reduced_decoding(
    tmp_path, camera_photos, orientation
) -> None:
    with Image.open(camera_photos[0]) as im:
        photo = im.convert("RGB").crop((0, 0, 1600, 1000))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.jpg"
    photo.save(path, quality=92, exif=exif)
    got = decode_file(path, min_side=200)
    turned = orientation in (6, 8)
    assert got.meta["draft_scale"] == 4  # 1000 // 200 = 5: libjpeg's 1/4, as stored
    assert got.rgb.shape[:2] == ((400, 250) if turned else (250, 400))
    assert (got.meta["full_height"], got.meta["full_width"]) == (
        (1600, 1000) if turned else (1000, 1600)
    )
    reduced, want = decode_short_side(path, 100).rgb, _full_then_resized(path, 100)
    assert reduced.shape == want.shape
    assert np.abs(reduced.astype(np.int16) - want.astype(np.int16)).mean() <= 1.0
    # the same photo unturned, turned by hand: a wrong orientation would be far off
    plain = tmp_path / "plain.jpg"
    photo.save(plain, quality=92)
    by_hand = {
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_270,
        8: Image.Transpose.ROTATE_90,
    }[orientation]
    expected = np.asarray(Image.fromarray(decode_file(plain, min_side=200).rgb).transpose(by_hand))
    assert np.array_equal(got.rgb, expected)


def test_reduced_decoding_keeps_the_guards(tmp_path, camera_photos) -> None:
    files = _write_tricky(tmp_path)
    for name, path in files.items():  # smaller than min_side: exactly the full decode
        assert np.array_equal(decode_file(path, min_side=64).rgb, decode_file(path).rgb), name
    bomb = decode_file(camera_photos[0], max_pixels=100_000, min_side=100)
    assert bomb.rgb is None and bomb.reason == "too_large"  # the header check comes first
    broken = tmp_path / "truncated.jpg"
    broken.write_bytes(camera_photos[0].read_bytes()[:20_000])
    assert decode_file(broken, min_side=100).reason == "unreadable"
    with pytest.raises(DataError, match="truncated.jpg"):
        decode_image(broken, 3, short_side=100)
