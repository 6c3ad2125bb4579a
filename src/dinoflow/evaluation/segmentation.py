"""Linear semantic segmentation on frozen patch tokens (docs/method.md section 6) and mIoU.

The head is BatchNorm + a 1x1 convolution on the (D, h, w) grid of last-block patch tokens; its
logits are upsampled bilinearly to the mask size and trained with per-pixel cross-entropy
(255 = ignore). Patch tokens are extracted once per image set and cached. Optimiser: AdamW with a
linear decay to 0 (the reference's mmseg "poly" schedule with power 1, without its warmup).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.evaluation.features import preprocess
from dinoflow.evaluation.scenes import IGNORE_INDEX
from dinoflow.precision import autocast


class LinearSegHead(nn.Module):
    """BatchNorm2d + 1x1 conv: patch-token maps (B, D, h, w) -> logits (B, n_classes, h, w)."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, n_classes, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(tokens))


def _as_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (S, H, W) or (S, H, W, C) -> (S, C, H, W)."""
    x = torch.as_tensor(np.asarray(images))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def grid_size(height: int, patch_size: int, image_size: int | None) -> int:
    """The input side fed to the backbone: ``image_size`` or the image's own side rounded down to
    a multiple of the patch size."""
    side = image_size if image_size is not None else height
    side = (side // patch_size) * patch_size
    if side < patch_size:
        raise ValueError(f"images of side {height} are smaller than one patch ({patch_size})")
    return side


@torch.inference_mode()
def extract_patch_maps(
    backbone: nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "patch tokens",
    precision: str = "fp32",
) -> torch.Tensor:
    """Frozen last-block patch tokens as maps: uint8 images (S, H, W[, C]) -> float32 (S, D, h, w).

    Uses ``backbone.forward_patches(x) -> (B, h*w, D)`` (row-major grid, final norm applied),
    in "fp32" or under "bf16" autocast (``precision``).
    """
    from tqdm.auto import tqdm

    x_all = _as_nchw(images)
    patch = backbone.patch_size
    patch = int(patch[0] if isinstance(patch, tuple) else patch)
    size = (
        grid_size(x_all.shape[-2], patch, image_size),
        grid_size(x_all.shape[-1], patch, image_size),
    )
    channels = int(getattr(backbone, "in_chans", x_all.shape[1]))
    h, w = size[0] // patch, size[1] // patch
    was_training = backbone.training
    backbone.eval().to(device)
    out = None
    try:
        for start in tqdm(
            range(0, len(x_all), batch_size),
            desc=desc,
            unit="batch",
            disable=not progress,
            leave=False,
        ):
            x = preprocess(x_all[start : start + batch_size], size, mean, std, channels)
            with autocast(precision, device):
                tokens = backbone.forward_patches(x.to(device)).float().cpu()  # (B, h*w, D)
            if out is None:
                out = torch.empty(len(x_all), tokens.shape[-1], h, w)
            out[start : start + len(x)] = tokens.view(len(x), h, w, -1).permute(0, 3, 1, 2)
    finally:
        backbone.train(was_training)
    return out


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, n_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(n_classes, n_classes) int64 counts, rows = target class, columns = predicted class.

    Pixels whose target is ``ignore_index`` (or outside 0..n_classes-1) are skipped.
    """
    pred, target = torch.as_tensor(pred).flatten().long(), torch.as_tensor(target).flatten().long()
    valid = (target != ignore_index) & (target >= 0) & (target < n_classes)
    idx = target[valid] * n_classes + pred[valid].clamp(0, n_classes - 1)
    return torch.bincount(idx, minlength=n_classes * n_classes).view(n_classes, n_classes)


def iou_from_confusion(
    confusion: torch.Tensor, ignore_absent: bool = True
) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU (C,)) from a confusion matrix.

    IoU_c = TP / (TP + FP + FN). A class with an empty union (in neither target nor prediction) has
    IoU NaN and is left out of the mean when ``ignore_absent``; otherwise it counts as 0.
    """
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    if ignore_absent:
        present = ~torch.isnan(iou)
        miou = float(iou[present].mean()) if bool(present.any()) else math.nan
    else:
        miou = float(torch.nan_to_num(iou, nan=0.0).mean())
    return miou, iou.numpy()


def mean_iou(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    n_classes: int,
    ignore_absent: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU (n_classes,)) of integer label maps of any equal shape."""
    return iou_from_confusion(
        confusion_matrix(pred, target, n_classes, ignore_index), ignore_absent
    )


def _upsampled_logits(
    head: LinearSegHead, maps: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    return F.interpolate(head(maps), size=size, mode="bilinear", align_corners=False)


def train_linear_segmentation(
    backbone: nn.Module,
    train_images: np.ndarray,
    train_masks: np.ndarray,
    test_images: np.ndarray,
    test_masks: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    n_classes: int,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    image_size: int | None = None,
    n_examples: int = 8,
    seed: int = 0,
    feature_batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Train the linear head on (train_images, train_masks), report mIoU on the test pair.
    The frozen patch tokens come from the backbone in ``precision`` (the head trains in fp32).

    images uint8 (S, H, W[, C]); masks int64 (S, H, W) with classes 0..n_classes-1, 255 = ignore.
    Returns {"seg_miou", "per_class_iou" (n_classes,) with NaN for absent classes,
    "pixel_accuracy", "examples": {"images", "masks", "predictions"} for the first n_examples
    test images, "head": the trained LinearSegHead}.
    """
    if epochs < 1:
        raise ValueError(f"segmentation: epochs must be >= 1, got {epochs}")
    train_maps, test_maps = (
        extract_patch_maps(
            backbone,
            images,
            mean,
            std,
            image_size,
            feature_batch_size,
            device,
            progress,
            f"seg {name} tokens",
            precision,
        )
        for name, images in (("train", train_images), ("test", test_images))
    )
    y_train = torch.as_tensor(np.asarray(train_masks), dtype=torch.long)
    y_test = torch.as_tensor(np.asarray(test_masks), dtype=torch.long)
    head = _fit_head(
        train_maps, y_train, n_classes, epochs, lr, batch_size, weight_decay, seed, device, progress
    )
    confusion, predictions = _predict(
        head, test_maps, y_test, n_classes, batch_size, n_examples, device
    )
    n_ex = min(n_examples, len(test_maps))
    return _segmentation_result(head, confusion, predictions, test_images, y_test, n_ex)


def _segmentation_result(
    head: LinearSegHead,
    confusion: torch.Tensor,
    predictions: np.ndarray,
    test_images: np.ndarray,
    y_test: torch.Tensor,
    n_ex: int,
) -> dict[str, Any]:
    """``train_linear_segmentation``'s result: the scores, the first n_ex examples, the head."""
    miou, per_class = iou_from_confusion(confusion)
    return {
        "seg_miou": miou,
        "per_class_iou": per_class,
        "pixel_accuracy": float(confusion.diag().sum()) / max(int(confusion.sum()), 1),
        "examples": {
            "images": np.asarray(test_images)[:n_ex],
            "masks": y_test[:n_ex].numpy(),
            "predictions": predictions[:n_ex],
        },
        "head": head,
    }


def _fit_head(
    train_maps: torch.Tensor,
    y_train: torch.Tensor,
    n_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    device: str | torch.device,
    progress: bool,
) -> LinearSegHead:
    """AdamW with a linear decay to 0 over ``epochs`` of shuffled batches (seeded)."""
    from tqdm.auto import tqdm

    size = (int(y_train.shape[-2]), int(y_train.shape[-1]))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded head init, the caller's RNG untouched
        torch.manual_seed(seed)
        head = LinearSegHead(train_maps.shape[1], n_classes).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(len(train_maps) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / total)
    )
    head.train()
    for _ in tqdm(
        range(epochs), desc="segmentation head", unit="epoch", disable=not progress, leave=False
    ):
        order = torch.randperm(len(train_maps), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if len(rows) < 2:  # BatchNorm needs more than one value per channel
                continue
            logits = _upsampled_logits(head, train_maps[rows].to(device), size)
            loss = F.cross_entropy(logits, y_train[rows].to(device), ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()


@torch.no_grad()
def _predict(
    head: LinearSegHead,
    test_maps: torch.Tensor,
    y_test: torch.Tensor,
    n_classes: int,
    batch_size: int,
    n_examples: int,
    device: str | torch.device,
) -> tuple[torch.Tensor, np.ndarray]:
    """(confusion matrix over the test set, predicted maps of the first n_examples images)."""
    test_size = (int(y_test.shape[-2]), int(y_test.shape[-1]))
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    examples = []
    for start in range(0, len(test_maps), batch_size):
        pred = _upsampled_logits(head, test_maps[start : start + batch_size].to(device), test_size)
        pred = pred.argmax(dim=1).cpu()
        confusion += confusion_matrix(pred, y_test[start : start + batch_size], n_classes)
        if sum(len(e) for e in examples) < n_examples:
            examples.append(pred)
    predictions = torch.cat(examples).numpy() if examples else np.zeros((0, *test_size), np.int64)
    return confusion, predictions
