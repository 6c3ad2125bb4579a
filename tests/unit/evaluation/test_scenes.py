"""Composite-scene benchmark: deterministic, masks match the pasted objects; user mask folders."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dinoflow.evaluation.report import EvalSettings
from dinoflow.evaluation.scenes import generate_scenes, load_mask_folder, make_scenes, resize_object
from dinoflow.evaluation.tasks.segmentation import segmentation_benchmark

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def source_images(n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Blobs with soft edges (values from 0 to 255), so thresholding matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:12, :12]
    images = []
    for _ in range(n):
        cy, cx, r = rng.uniform(4, 8), rng.uniform(4, 8), rng.uniform(2, 5)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        images.append(np.clip(255 * (r + 1 - d) / 2, 0, 255).astype(np.uint8))
    return np.stack(images), rng.integers(0, 5, n)


def test_deterministic_from_the_seed():
    images, labels = source_images()
    a = make_scenes(images, labels, 20, canvas=32, seed=3)
    b = make_scenes(images, labels, 20, canvas=32, seed=3)
    c = make_scenes(images, labels, 20, canvas=32, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert a[0].dtype == np.uint8 and a[1].dtype == np.int64 and a[0].shape == (20, 32, 32)


def test_masks_match_the_objects_painted_in_order():
    images, labels = source_images()
    threshold = 40
    scenes = generate_scenes(images, labels, 25, canvas=32, objects_per_scene=(2, 4), scale_range=(0.5, 1.5),
                             seed=1, threshold=threshold)  # fmt: skip
    for s in range(25):
        expected_mask = np.zeros((32, 32), np.int64)
        expected_img = np.zeros((32, 32), np.int64)
        objects = scenes.layout[s]
        assert 2 <= len(objects) <= 4
        for obj in objects:  # later objects occlude earlier ones where they are on
            pixels = resize_object(images[obj.source_index], obj.size).astype(np.int64)
            assert obj.mask_class == labels[obj.source_index] + 1
            on = pixels > threshold
            window = (slice(obj.top, obj.top + obj.size), slice(obj.left, obj.left + obj.size))
            expected_mask[window][on] = obj.mask_class
            expected_img[window][on] = pixels[on]
        assert np.array_equal(scenes.masks[s], expected_mask)
        labelled = expected_mask > 0
        assert np.array_equal(scenes.images[s][labelled], expected_img[labelled])
        assert (scenes.images[s][~labelled] <= threshold).all()  # background holds only faint edges


def test_hand_example_one_square():
    square = np.full((1, 4, 4), 200, np.uint8)
    images, masks = make_scenes(square, np.array([2]), 1, canvas=8, objects_per_scene=(1, 1),
                                scale_range=(1.0, 1.0), seed=0)  # fmt: skip
    assert (masks == 3).sum() == 16 and set(np.unique(masks)) == {0, 3}  # class 2 -> mask class 3
    rows, cols = np.nonzero(masks[0])
    assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
    assert (images[0][masks[0] == 3] == 200).all() and (images[0][masks[0] == 0] == 0).all()


def test_train_scenes_from_train_images_and_test_from_test():
    train_images, labels = np.full((10, 6, 6), 100, np.uint8), np.arange(10) % 3
    test_images = np.full((10, 6, 6), 200, np.uint8)
    splits = {
        "train": SimpleNamespace(images=train_images, labels=labels),
        "test": SimpleNamespace(images=test_images, labels=labels),
    }
    cfg = EvalSettings(seg_train_scenes=5, seg_test_scenes=4, seg_canvas=16)
    tr_x, tr_y, te_x, te_y, names = segmentation_benchmark(splits, cfg, ["a", "b", "c"])
    assert set(np.unique(tr_x)) == {0, 100} and set(np.unique(te_x)) == {0, 200}
    assert tr_x.shape == (5, 16, 16) and te_y.shape == (4, 16, 16)
    assert names == ["background", "a", "b", "c"]
    assert set(np.unique(np.concatenate([tr_y.ravel(), te_y.ravel()]))) <= {0, 1, 2, 3}


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_scenes_cover_several_classes():
    from dinoflow.data.fashion_mnist import read_idx

    images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:200]
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:200].astype(np.int64)
    _, masks = make_scenes(images, labels, 50, canvas=56, seed=0)
    present = np.unique(masks)
    assert present[0] == 0 and len(present) >= 8 and present.max() <= 10
    foreground = (masks > 0).mean()
    assert 0.1 < foreground < 0.7  # objects cover a real part of the canvas, not all of it


def test_load_mask_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    expected_masks = []
    for name in ("b", "a"):
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{name}.jpg"
        )
        mask = rng.integers(0, 3, (6, 6)).astype(np.uint8)
        mask[0, 0] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
        expected_masks.append(mask)
    images, masks = load_mask_folder(tmp_path)
    assert images.shape == (2, 6, 6, 3) and masks.dtype == np.int64
    assert np.array_equal(masks[0], expected_masks[1])  # sorted by name: a before b
    assert masks[0, 0, 0] == 255
    _, small = load_mask_folder(tmp_path, size=3)
    assert small.shape == (2, 3, 3) and set(np.unique(small)) <= {0, 1, 2, 255}
    (tmp_path / "masks" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        load_mask_folder(tmp_path)
