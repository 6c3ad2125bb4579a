"""The image cache (``data.cache``): built once, redone only where files changed, read by
``Split.load`` instead of the originals; and ``train.num_workers: auto``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow.config import ConfigError, DataConfig, PretrainConfig, validate
from dinoflow.data import Split, load_data
from dinoflow.data.cache import build_for_data, build_image_cache, cache_folder, read_index
from dinoflow.data.decode import decode_file, decode_image, decode_short_side
from dinoflow.errors import DataError

SIDE = 256


def _photo_folder(root: Path, photos: list[Path]) -> dict[str, Path]:
    """Four camera photos, a small JPEG (under SIDE), a grey PNG and a file that is no image."""
    files = {}
    for k, photo in enumerate(photos[:4]):
        files[f"photo{k}"] = root / "photos" / f"{k}.jpg"
        files[f"photo{k}"].parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, files[f"photo{k}"])
    with Image.open(photos[0]) as im:
        im.draft("RGB", (400, 400))
        small, grey = im.convert("RGB").resize((200, 125)), im.convert("L").resize((640, 400))
    files["small"], files["grey"] = root / "small.jpg", root / "grey.png"
    small.save(files["small"], quality=90)
    grey.save(files["grey"])
    files["broken"] = root / "broken.jpg"
    files["broken"].write_bytes(photos[0].read_bytes()[:5000])
    return files


def _data(root: Path, tmp_path: Path, short_side: int | None = SIDE) -> DataConfig:
    return DataConfig(source="image_folder", path=str(root), val_size=1, test_fraction=0.2,
                      cache={"short_side": short_side, "dir": str(tmp_path / "cache")})  # fmt: skip


def _stored(folder: Path) -> dict[str, int]:
    """{stored file: mtime_ns} of a cache folder (index and lock left out)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.glob("??/*") if p.is_file()}  # fmt: skip


def test_a_rebuild_redoes_only_the_changed_file(tmp_path, camera_photos) -> None:
    root = tmp_path / "images"
    files = _photo_folder(root, camera_photos)
    data = _data(root, tmp_path)
    folder = cache_folder(data.cache)
    first = build_for_data(data, progress=False)
    assert (first.images, first.encoded, first.unreadable) == (7, 6, 1)  # broken.jpg: recorded
    before = _stored(folder)
    assert len(before) == 6
    again = build_for_data(data, progress=False)
    assert (again.unchanged, again.encoded, again.reused) == (7, 0, 0)
    # one photo replaced by other pixels: only that one is read and stored again
    with Image.open(camera_photos[1]) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(files["photo1"], quality=90)
    third = build_image_cache(sorted(p for p in root.rglob("*") if p.is_file()), root, SIDE,
                              folder, workers=2, progress=False)  # fmt: skip
    assert (third.unchanged, third.encoded, third.reused, third.unreadable) == (6, 1, 0, 0)
    after = _stored(folder)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing else rewritten
    assert len(after) == 7  # the old content stays stored (another file may still have it)
    # touched without a change: hashed again, found stored, not encoded
    os.utime(files["photo2"], ns=(1, 1))
    touched = build_for_data(data, progress=False)
    assert (touched.unchanged, touched.reused, touched.encoded) == (6, 1, 0)
    assert _stored(folder) == after


def test_what_the_cache_stores(tmp_path, camera_photos) -> None:
    root = tmp_path / "images"
    files = _photo_folder(root, camera_photos)
    data = _data(root, tmp_path)
    build_for_data(data, progress=False)
    folder = cache_folder(data.cache)
    index = read_index(folder, root)
    for name in ("photo0", "photo3"):  # JPEG q95 4:4:4 of decode_short_side's pixels
        stored = folder / index[files[name].relative_to(root).as_posix()][3]
        want = decode_short_side(files[name], SIDE).rgb
        got = decode_file(stored).rgb
        assert stored.suffix == ".jpg" and got.shape == want.shape and min(got.shape[:2]) == SIDE
        assert np.abs(got.astype(np.int16) - want.astype(np.int16)).mean() < 2.0
    small = folder / index["small.jpg"][3]  # under SIDE: the original bytes, never upscaled
    assert small.read_bytes() == files["small"].read_bytes()
    grey = folder / index["grey.png"][3]  # lossless, one channel, exactly the decoded pixels
    with Image.open(grey) as im:
        assert (im.format, im.mode, min(im.size)) == ("PNG", "L", SIDE)
    assert np.array_equal(decode_file(grey).rgb, decode_short_side(files["grey"], SIDE).rgb)
    assert index["broken.jpg"][3] == "" and index["broken.jpg"][4].startswith("unreadable: ")


def test_split_load_reads_the_cached_pixels(tmp_path, camera_photos) -> None:
    root = tmp_path / "images"
    _photo_folder(root, camera_photos)
    data = _data(root, tmp_path)
    build_for_data(data, progress=False)
    with Image.open(camera_photos[0]) as im:  # a file added after the build
        im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(root / "added_later.jpg", quality=90)
    plain, cached = load_data(_data(root, tmp_path, None)), load_data(data)
    for name in ("train", "val", "test"):  # the cache does not change what is in the splits
        assert plain[name].ids == cached[name].ids
    everything = {s.ids[i]: (s, i) for s in cached.values() for i in range(len(s))}
    for item, (split, i) in everything.items():
        stored = split.cached[i]
        if item in ("broken.jpg", "added_later.jpg"):  # no entry: the original, at SIDE
            assert stored is None
            continue
        got = split.load(i)
        assert torch.equal(got, decode_image(stored, 3))  # the cached file's pixels
        assert min(got.shape[1:]) == (125 if item == "small.jpg" else SIDE)
    split, i = everything["added_later.jpg"]
    assert torch.equal(split.load(i), decode_image(root / "added_later.jpg", 3, short_side=SIDE))
    split, i = everything["broken.jpg"]
    with pytest.raises(DataError, match="broken.jpg"):  # as without the cache
        split.load(i)


def test_the_node_builds_nothing_when_the_cache_is_off(tmp_path) -> None:
    from dinoflow.pipelines.curation.nodes import build_image_cache as node

    off = {"cache": {"dir": str(tmp_path / "cache")}}
    assert node(off) == {"short_side": None}
    assert (tmp_path / "cache").is_dir() and not any((tmp_path / "cache").iterdir())
    in_memory = {"cache": {"short_side": 64, "dir": str(tmp_path / "cache")}}
    assert node(in_memory) == {"short_side": None}  # Fashion-MNIST: arrays, no files to cache
    with pytest.raises(ConfigError, match=r"data\.cache\.short_side"):
        validate(DataConfig, {"cache": {"short_side": 8}}, "data")
    with pytest.raises(ConfigError, match=r"data\.cache\.size: unknown key"):
        validate(DataConfig, {"cache": {"size": 256}}, "data")


# --------------------------------------------------------------------------- num_workers: auto
@pytest.mark.parametrize(
    ("cores", "local", "device", "memory", "compile_", "want"),
    [
        (16, 1, "cuda", False, False, 15),  # CUDA: the process's cores, one for itself
        (16, 4, "cuda", True, False, 3),  # 4 GPUs: 4 cores each
        (16, 1, "cpu", True, False, 0),  # in-memory images: augmentation in the process
        (16, 1, "cpu", False, True, 0),  # compiled on a CPU: no forked workers
        (16, 1, "cpu", False, False, 5),  # files on a CPU: a third of the cores
        (2, 1, "cpu", False, False, 2),  # at least 2 (measured on 2 cores)
        (2, 2, "cpu", False, False, 0),  # one core per process: none
    ],
)
def test_num_workers_auto(monkeypatch, cores, local, device, memory, compile_, want) -> None:
    from dinoflow.training import resolve_num_workers

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    cfg = PretrainConfig.model_validate({"train": {"num_workers": "auto", "compile": compile_}})
    images = np.zeros((4, 8, 8), np.uint8) if memory else None
    paths = None if memory else [Path(f"{i}.jpg") for i in range(4)]
    split = Split(ids=list("abcd"), labels=np.full(4, -1), class_names=[], channels=3,
                  images=images, paths=paths)  # fmt: skip
    assert resolve_num_workers(cfg, split, torch.device(device)).train.num_workers == want
    fixed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 5})})
    assert resolve_num_workers(fixed, split, torch.device(device)).train.num_workers == 5
