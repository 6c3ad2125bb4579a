"""Linear segmentation: mIoU against hand-computed values, patch-map layout, the head learns."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dinoflow.evaluation.scenes import make_scenes
from dinoflow.evaluation.segmentation import (
    LinearSegHead,
    confusion_matrix,
    extract_patch_maps,
    grid_size,
    mean_iou,
    train_linear_segmentation,
)

PRED = torch.tensor([[0, 1, 1], [1, 2, 0]])
TARGET = torch.tensor([[0, 0, 1], [1, 2, 2]])


def test_mean_iou_hand_example():
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    miou, per_class = mean_iou(PRED, TARGET, 3)
    np.testing.assert_allclose(per_class, [1 / 3, 2 / 3, 1 / 2])
    assert miou == pytest.approx(0.5)


def test_mean_iou_absent_class_and_ignore_index():
    miou, per_class = mean_iou(PRED, TARGET, 4)  # class 3 in neither map
    assert math.isnan(per_class[3]) and miou == pytest.approx(0.5)
    miou_all, _ = mean_iou(PRED, TARGET, 4, ignore_absent=False)
    assert miou_all == pytest.approx(1.5 / 4)
    ignored = TARGET.clone()
    ignored[0, 1] = 255  # drops class 0's FN and class 1's FP: 1/2, 2/2, 1/2
    miou, per_class = mean_iou(PRED, ignored, 3)
    np.testing.assert_allclose(per_class, [1 / 2, 1, 1 / 2])
    assert miou == pytest.approx(2 / 3)


def test_confusion_rows_are_targets():
    conf = confusion_matrix(PRED, TARGET, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_patch_maps_keep_the_row_major_grid(tiny_backbone):
    torch.manual_seed(0)
    backbone = tiny_backbone()
    images = np.random.default_rng(0).integers(0, 255, (3, 12, 8), dtype=np.uint8)
    maps = extract_patch_maps(backbone, images, (0.5,), (0.25,), progress=False, batch_size=2)
    assert maps.shape == (3, 16, 3, 2)
    x = (torch.from_numpy(images).float().unsqueeze(1) / 255 - 0.5) / 0.25
    with torch.no_grad():
        tokens = backbone.forward_patches(x)  # (3, 6, 16)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(maps[:, :, i, j], tokens[:, i * 2 + j], rtol=1e-5, atol=1e-5)
    assert grid_size(30, 4, None) == 28 and grid_size(30, 4, 16) == 16


def test_head_shapes():
    head = LinearSegHead(16, 5)
    assert head(torch.randn(2, 16, 3, 4)).shape == (2, 5, 3, 4)
    assert isinstance(head.bn, nn.BatchNorm2d) and head.conv.kernel_size == (1, 1)


def test_linear_head_learns_scenes(tiny_backbone):
    """Objects of 3 classes differ in intensity; a random patchifier keeps that linearly readable."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    images = np.zeros((60, 8, 8), np.uint8)
    images[:, 1:7, 1:7] = (np.array([90, 170, 250])[labels])[:, None, None]
    images = np.clip(images + rng.integers(0, 5, images.shape), 0, 255).astype(np.uint8)
    tr_x, tr_y = make_scenes(images, labels, 120, canvas=24, scale_range=(1.0, 1.5), seed=0)
    te_x, te_y = make_scenes(images, labels, 30, canvas=24, scale_range=(1.0, 1.5), seed=1)
    backbone = tiny_backbone(patch=2)
    out = train_linear_segmentation(backbone, tr_x, tr_y, te_x, te_y, (0.2,), (0.3,), n_classes=4,
                                    epochs=15, lr=1e-2, batch_size=16, n_examples=3, progress=False)  # fmt: skip
    background_only, _ = mean_iou(torch.zeros_like(torch.from_numpy(te_y)), te_y, 4)
    assert out["seg_miou"] > 0.6 > background_only + 0.3
    assert out["per_class_iou"].shape == (4,)
    assert out["examples"]["predictions"].shape == (3, 24, 24)
    assert np.array_equal(out["examples"]["masks"], te_y[:3])
    assert np.array_equal(out["examples"]["images"], te_x[:3])
    assert backbone.training  # extraction ran in eval mode and restored the caller's mode
