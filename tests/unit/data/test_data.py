"""Data sources: Fashion-MNIST lookups and checksum, image folders, the shared split."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoflow.data import (
    FashionMNISTNotFound,
    channel_stats,
    find_fashion_mnist,
    load_splits,
    read_idx,
)
from dinoflow.data.fashion_mnist import FILES, SYSTEM_DIR, parse_idx


def test_idx_parser_by_hand():
    payload = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
    arr = parse_idx(payload)
    assert arr.shape == (2, 1, 3) and arr.dtype == np.uint8
    assert arr.ravel().tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="holds 5"):
        parse_idx(payload[:-1], "x")


def test_fashion_mnist_splits(fmnist_splits):
    s = fmnist_splits
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (55000, 5000, 10000)
    assert not set(s["train"].ids) & set(s["val"].ids)  # val carved from train, disjoint
    assert s["test"].ids[0] == "test/000000"
    assert np.bincount(s["test"].labels).tolist() == [1000] * 10
    assert s["train"].load(0).shape == (1, 28, 28)
    again = load_splits(allow_download=False)
    assert again["val"].ids == s["val"].ids  # fixed seed: every pipeline sees the same split
    mean, std = channel_stats(s["train"])
    assert mean[0] == pytest.approx(0.286, abs=0.003) and std[0] == pytest.approx(0.353, abs=0.003)


def test_local_folder_first_then_checksum(tmp_path):
    local = tmp_path / "fm"
    local.mkdir()
    for stem, _ in FILES.values():  # uncompressed copies are fine
        with gzip.open(SYSTEM_DIR / f"{stem}.gz") as src, open(local / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert find_fashion_mnist(local_dir=local, allow_download=False) == local
    labels = local / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 1  # one corrupted label
    labels.write_bytes(bytes(data))
    # the corrupt local copy is rejected and the system copy is used instead
    assert find_fashion_mnist(local_dir=local, allow_download=False) == SYSTEM_DIR


def test_missing_everywhere_names_the_three_ways(tmp_path):
    with pytest.raises(FashionMNISTNotFound) as err:
        find_fashion_mnist(local_dir=tmp_path / "a", system_dir=tmp_path / "b",
                           base_url="http://127.0.0.1:9/")
    text = str(err.value)
    assert str(tmp_path / "a") in text and str(tmp_path / "b") in text
    assert "apt-get install dataset-fashion-mnist" in text and "download from http://127.0.0.1:9/" in text
    assert not list((tmp_path / "a").glob("*.part"))  # nothing half-downloaded is left


def _image(path: Path, color, size=(20, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_labels_from_subfolders(tmp_path):
    for i in range(10):
        _image(tmp_path / "cats" / f"c{i}.png", (200, 10, 10))
        _image(tmp_path / "dogs" / "deep" / f"d{i}.JPG", (10, 200, 10))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    _image(tmp_path / ".hidden" / "x.png", (0, 0, 0))
    splits = load_splits("image_folder", str(tmp_path), val_size=0.2, test_fraction=0.2, seed=1)
    everything = splits["train"].ids + splits["val"].ids + splits["test"].ids
    assert len(everything) == 20 and not any(".hidden" in i or i.endswith(".txt") for i in everything)
    assert splits["train"].class_names == ["cats", "dogs"]
    for split in splits.values():
        for item, label in zip(split.ids, split.labels, strict=True):
            assert label == (0 if item.startswith("cats/") else 1)
    img = splits["train"].load(0)
    assert img.shape == (3, 16, 20)


def test_image_folder_flat_is_unlabelled_and_grayscale_works(tmp_path):
    for i in range(12):
        _image(tmp_path / f"{i}.png", i * 10, mode="L")
    splits = load_splits("image_folder", str(tmp_path), val_size=0.2, test_fraction=0.2, channels=1)
    assert splits["train"].class_names == [] and (splits["train"].labels == -1).all()
    assert splits["train"].load(0).shape == (1, 16, 20)


def test_unreadable_image_names_the_file(tmp_path):
    _image(tmp_path / "a" / "ok.png", 5)
    for i in range(10):
        _image(tmp_path / "a" / f"ok{i}.png", 5)
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    splits = load_splits("image_folder", str(tmp_path), val_size=0.1, test_fraction=0.1)
    split = next(s for s in splits.values() if any(i.endswith("broken.png") for i in s.ids))
    index = next(k for k, i in enumerate(split.ids) if i.endswith("broken.png"))
    with pytest.raises(ValueError, match="broken.png"):
        split.load(index)


def test_read_idx_of_system_file():
    labels = read_idx(SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.max() == 9
