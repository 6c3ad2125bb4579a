"""The evaluation transform (``dinoflow.data.transforms.resize_center_crop``): the shorter side
resized, the centre square kept, on real photos and drawn shapes; and evaluation's consumers
(features, raw pixels, label-free clean images, the settings) going through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dinoflow.data import Split
from dinoflow.data.transforms import normalize, preprocess, resize_center_crop
from dinoflow.errors import ConfigError
from dinoflow.evaluation.features import extract_features, load_batch, raw_pixel_features
from dinoflow.models.vit import DinoVisionTransformer

MEAN, STD = (0.3,), (0.35,)


def _tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W)."""
    x = torch.from_numpy(np.array(image))
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)


def _square_resize_preprocess(x: torch.Tensor, size: int) -> torch.Tensor:
    """A plain square resize to size x size, then the normaliser (no centre crop)."""
    if list(x.shape[-2:]) != [size, size]:
        x = TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return normalize(x, MEAN, STD)


def _disc_aspect(x: torch.Tensor) -> float:
    """Width / height of the bounding box of the bright pixels of a (1, H, W) image."""
    rows, cols = np.nonzero(x[0].numpy() > 127)
    return (cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1)


def test_square_crop_size_images_are_bit_identical_to_a_plain_square_resize(real_photo) -> None:
    grey = _tensor(real_photo(640, 480).convert("L").resize((28, 28), Image.BILINEAR))
    noise = torch.randint(
        0, 256, (4, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    for x in (grey[None], noise):
        assert torch.equal(resize_center_crop(x, 28), x)
        assert torch.equal(preprocess(x, 28, MEAN, STD), _square_resize_preprocess(x, 28))
        assert torch.equal(preprocess(x, 28, MEAN, STD, crop_ratio=0.5), _square_resize_preprocess(x, 28))
    assert float(grey.float().std()) > 10  # a real picture, not a flat one


@pytest.mark.parametrize("width, height", [(300, 200), (200, 300)])
def test_a_drawn_circle_stays_a_circle(width: int, height: int) -> None:
    canvas = Image.new("L", (width, height))
    cx, cy, r = width // 2, height // 2, 60
    ImageDraw.Draw(canvas).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    x = _tensor(canvas)
    assert _disc_aspect(x) == 1.0
    crop = resize_center_crop(x, 112)  # shorter side 200 -> 128, centre 112 x 112
    assert crop.shape == (1, 112, 112)
    assert 0.97 < _disc_aspect(crop) < 1.03
    rows, cols = np.nonzero(crop[0].numpy() > 127)
    assert abs(rows.mean() - 55.5) < 1 and abs(cols.mean() - 55.5) < 1  # still in the middle
    diameter = rows.max() - rows.min() + 1
    assert abs(diameter - 2 * r * 128 / 200) <= 2  # scaled by 128 / 200, the shorter side's
    squashed = TF.resize(x, [112, 112], antialias=True)  # the old square resize
    assert abs(_disc_aspect(squashed) - height / width) < 0.05


def test_the_photo_crop_is_the_shorter_side_resize_then_the_centre(real_photo) -> None:
    x = _tensor(real_photo(640, 480))
    crop = resize_center_crop(x, 224)  # 224 / 0.875 = 256: (480, 640) -> (256, 341)
    resized = TF.resize(x, 256, interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert resized.shape == (3, 256, 341)
    assert torch.equal(crop, resized[:, 16:240, 58:282])  # round(32 / 2), round(117 / 2)
    assert torch.equal(resize_center_crop(crop, 224), crop)  # idempotent
    # the shorter side already the crop's: only cropped, never upscaled first
    assert torch.equal(resize_center_crop(x, 480), x[:, :, 80:560])
    assert torch.equal(
        resize_center_crop(x, 224, crop_ratio=1.0), TF.resize(x, 224, antialias=True)[:, :, 37:261]
    )
    with pytest.raises(ValueError, match="crop_ratio"):
        resize_center_crop(x, 224, crop_ratio=1.5)


@pytest.fixture
def _photo_split(real_photo):
    """The factory ``_photo_split(root) -> Split``: three real photo crops as PNG files."""

    def _photo_split(root: Path) -> Split:
        """Three real photo crops of different shapes, as PNG files in a folder split."""
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (w, h) in enumerate(((64, 48), (40, 72), (36, 36))):
            paths.append(root / f"{i}.png")
            real_photo(4 * w, 4 * h).resize((w, h), Image.BILINEAR).save(paths[-1])
        return Split(
            ids=[p.name for p in paths],
            labels=np.array([0, 1, 0]),
            class_names=["a", "b"],
            channels=3,
            paths=paths,
        )

    return _photo_split


def test_features_and_raw_pixels_see_the_centre_crop(tmp_path: Path, _photo_split) -> None:
    split = _photo_split(tmp_path / "photos")
    crops = torch.stack([resize_center_crop(split.load(i), 32) for i in range(3)])
    assert torch.equal(load_batch(split, 0, 3, 32), crops)
    pixels = raw_pixel_features(split, 32).cls_last
    torch.testing.assert_close(pixels, crops.flatten(1).float() / 255)
    torch.manual_seed(0)
    vit = DinoVisionTransformer(
        img_size=32, patch_size=8, in_chans=3, embed_dim=16, depth=1, num_heads=2
    ).eval()
    feats = extract_features(
        vit, split, 32, MEAN, STD, batch_size=2, n_last_blocks=1, progress=False
    )
    with torch.no_grad():
        expected = vit.forward_features(normalize(crops, MEAN, STD))["x_norm_clstoken"]
    assert (feats.cls_last - expected).abs().max() < 1e-5
    squashed = torch.stack([TF.resize(split.load(i), [32, 32], antialias=True) for i in range(3)])
    assert (crops[:2].float() - squashed[:2].float()).abs().mean() > 5  # the crop is not a squash


def test_label_free_clean_images_are_the_centre_crop(tmp_path: Path, _photo_split) -> None:
    from dinoflow.evaluation.labelfree import ViewSettings, _batch_inputs

    split = _photo_split(tmp_path / "photos")
    images = [split.load(i) for i in range(3)]
    augmentation = ViewSettings().augmentation(32, MEAN * 3, STD * 3)
    inputs = _batch_inputs(images, np.arange(3), 3, augmentation, seed=0, crop_ratio=0.8)
    expected = torch.stack(
        [normalize(resize_center_crop(t, 32, 0.8), MEAN * 3, STD * 3) for t in images]
    )
    assert torch.equal(inputs["clean"], expected)


def test_evaluation_crop_ratio_is_validated_naming_the_key(tmp_path: Path) -> None:
    from dinoflow.jobs.evaluate import evaluation_settings

    cfg = evaluation_settings({"crop_ratio": 0.5}, str(tmp_path), (0.5,), (0.5,), 28)
    assert (cfg.crop_ratio, cfg.image_size) == (0.5, 28)
    assert evaluation_settings({}, str(tmp_path), (0.5,), (0.5,), 28).crop_ratio == 0.875
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=r"evaluation\.crop_ratio"):
            evaluation_settings({"crop_ratio": bad}, str(tmp_path), (0.5,), (0.5,), 28)
