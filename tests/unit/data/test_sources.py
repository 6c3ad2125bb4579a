"""Image sources looked up by name (``dinoflow.data.sources``): the registry, the refusal of an
unknown name, and each source's splits recomputed independently of ``load_splits``."""

from __future__ import annotations

import numpy as np
import pytest

from dinoflow.config import SOURCE_NEEDS_PATH, DataConfig, validate
from dinoflow.data import SOURCES, get_source, list_image_folder, load_splits, read_idx
from dinoflow.data.fashion_mnist import FILES, SYSTEM_DIR
from dinoflow.errors import ConfigError, DataError
from dinoflow.evaluation.metric_spec import data_is_labelled

PROTOCOL = ("name", "reads_files", "needs_path", "splits", "val_size", "files", "is_labelled")


def _carved(n: int, count: int, seed: int) -> tuple[list[int], list[int]]:
    """(rest, carved) of range(n): ``count`` items drawn by a seeded permutation, both sorted."""
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[count:].tolist()), sorted(order[:count].tolist())


def test_the_registry_holds_every_source_under_the_names_the_config_accepts():
    assert list(SOURCES) == ["fashion_mnist", "image_folder", "shards"]
    assert {name: s.needs_path for name, s in SOURCES.items()} == SOURCE_NEEDS_PATH
    for name, source in SOURCES.items():
        assert source.name == name and get_source(name) is source
        assert all(hasattr(source, member) for member in PROTOCOL), name
    assert not get_source("fashion_mnist").reads_files  # held in memory: no image cache
    assert get_source("image_folder").reads_files


def test_an_unknown_source_is_refused_naming_data_source_and_the_known_names():
    with pytest.raises(DataError, match=r"data\.source: unknown source 'webdataset'") as err:
        get_source("webdataset")
    assert "fashion_mnist, image_folder, shards" in str(err.value)
    with pytest.raises(DataError, match=r"data\.source"):
        load_splits("webdataset")
    with pytest.raises(ConfigError) as err:
        validate(DataConfig, {"source": "webdataset"}, "data")
    assert str(err.value).splitlines()[1:] == [
        "  data.source: not a registered image source (fashion_mnist, image_folder, shards) "
        "(got 'webdataset')"
    ]
    with pytest.raises(ConfigError, match="data.path is required with data.source=image_folder"):
        validate(DataConfig, {"source": "image_folder"}, "data")


def test_fashion_mnist_gives_the_official_train_and_test_then_val_carved_with_the_seed():
    full_train, test = get_source("fashion_mnist").splits(DataConfig(allow_download=False))
    assert full_train.ids == [f"train/{i:06d}" for i in range(60000)]
    assert test.ids == [f"test/{i:06d}" for i in range(10000)]
    labels = read_idx(SYSTEM_DIR / f"{FILES['test_labels'][0]}.gz")
    assert np.array_equal(test.labels, labels.astype(np.int64)) and test.channels == 1
    splits = load_splits(allow_download=False, val_size=5000, seed=0)
    rest, val = _carved(60000, 5000, 0)  # a count is carved as it is (no cap)
    assert splits["val"].ids == [f"train/{i:06d}" for i in val]
    assert splits["train"].ids == [f"train/{i:06d}" for i in rest]
    assert splits["test"].ids == test.ids
    assert np.array_equal(splits["val"].labels, full_train.labels[val])
    assert get_source("fashion_mnist").files(DataConfig()) == []


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, real_photo):
    """24 crops of a real photo: 10 under cat/, 10 under dog/, 4 directly under the root."""
    root = tmp_path_factory.mktemp("photos")
    photo = real_photo(96, 64)
    for i in range(24):
        folder = root / ("cat", "dog", "")[min(i // 10, 2)]
        folder.mkdir(exist_ok=True)
        photo.rotate(15 * i).save(folder / f"{i:02d}.{'jpg' if i % 2 else 'png'}")
    return root


def test_an_image_folder_gives_its_listing_split_with_the_seeds(photo_folder):
    paths, label_names, class_names = list_image_folder(photo_folder)
    ids = [p.relative_to(photo_folder).as_posix() for p in paths]
    labels = [class_names.index(n) if n else -1 for n in label_names]
    assert len(ids) == 24 and class_names == ["cat", "dog"]
    seed = 7
    rest, test = _carved(24, 3, seed + 1)  # test_fraction 0.125 of 24, seed + 1
    train, val = _carved(len(rest), 2, seed)  # val_size 5000 capped at a tenth: 21 // 10 = 2
    splits = load_splits(
        "image_folder", str(photo_folder), val_size=5000, test_fraction=0.125, seed=seed
    )
    assert splits["test"].ids == [ids[i] for i in test]
    assert splits["val"].ids == [ids[rest[i]] for i in val]
    assert splits["train"].ids == [ids[rest[i]] for i in train]
    assert splits["train"].labels.tolist() == [labels[rest[i]] for i in train]
    assert splits["train"].paths == [paths[rest[i]] for i in train]
    assert splits["train"].load(0).shape == (3, 64, 96)
    data = DataConfig(source="image_folder", path=str(photo_folder))
    assert get_source("image_folder").files(data) == paths


def test_the_source_says_whether_its_images_are_labelled(photo_folder, tmp_path, real_photo):
    assert data_is_labelled(DataConfig())  # Fashion-MNIST: 10 classes
    # images directly under the root have no label
    assert not data_is_labelled(DataConfig(source="image_folder", path=str(photo_folder)))
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        real_photo(32, 32).save(tmp_path / name / "a.png")
    assert data_is_labelled(DataConfig(source="image_folder", path=str(tmp_path)))
