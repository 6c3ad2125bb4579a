"""Frozen-backbone features, extracted once per split and shared by every evaluator.

One forward pass per image gives everything the kNN and linear protocols (docs/method.md section 6)
need: the CLS token of the last block, the CLS tokens of the last n blocks, and the average-pooled
patch tokens of the last block, all after the final norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from dinoflow.data.transforms import (
    DEFAULT_CROP_RATIO,
    match_channels,
    preprocess,
    resize_center_crop,
)
from dinoflow.precision import autocast

__all__ = [
    "FeatureSet",
    "ImageSource",
    "extract_features",
    "load_batch",
    "match_channels",
    "preprocess",
    "raw_pixel_features",
]


class ImageSource(Protocol):
    """What feature extraction needs from a split: ``len``, ``load(i)`` (uint8 (C,H,W)), labels."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def load(self, i: int) -> torch.Tensor: ...


@dataclass
class FeatureSet:
    """Cached features of one split (float32, CPU).

    cls_last:   (N, D)   CLS token of the last block after the final norm (the kNN feature).
    cls_last4:  (N, n*D) CLS tokens of the last n blocks (n = n_last_blocks, 4 by default),
                oldest first, each after the final norm; None for raw-pixel features.
    patch_mean: (N, D)   mean of the last block's patch tokens; None for raw-pixel features.
    labels:     (N,) int64, -1 where unlabelled.
    """

    cls_last: torch.Tensor
    labels: torch.Tensor
    cls_last4: torch.Tensor | None = None
    patch_mean: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.cls_last.shape[0])

    def subset(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> FeatureSet:
        """The rows ``indices`` (for example the labelled ones)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return FeatureSet(
            cls_last=self.cls_last[idx],
            labels=self.labels[idx],
            cls_last4=None if self.cls_last4 is None else self.cls_last4[idx],
            patch_mean=None if self.patch_mean is None else self.patch_mean[idx],
        )


def _backbone_channels(backbone: nn.Module, default: int) -> int:
    return int(getattr(backbone, "in_chans", default))


def load_batch(
    split: ImageSource,
    start: int,
    stop: int,
    image_size: int | None,
    crop_ratio: float = DEFAULT_CROP_RATIO,
) -> torch.Tensor:
    """Items start..stop-1 as uint8 (B, C, H, W); items of different sizes are each brought to
    the ``image_size`` centre crop (``resize_center_crop``, which ``preprocess`` then leaves as
    it is) so they can be stacked. In-memory arrays are sliced directly."""
    images = getattr(split, "images", None)
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.array(images[start:stop]))  # a copy: sources may be read-only
        return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    items = [split.load(i) for i in range(start, stop)]
    if len({tuple(t.shape) for t in items}) > 1:
        if image_size is None:
            raise ValueError(
                f"items {start}..{stop - 1} differ in size: set an image size to evaluate them"
            )
        items = [resize_center_crop(t, image_size, crop_ratio) for t in items]
    return torch.stack(items)


def _labels_of(split: ImageSource) -> torch.Tensor:
    labels = getattr(split, "labels", None)
    if labels is None:
        return torch.full((len(split),), -1, dtype=torch.long)
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    split: ImageSource,
    image_size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    n_last_blocks: int = 4,
    device: str | torch.device = "cpu",
    desc: str = "features",
    progress: bool = True,
    precision: str = "fp32",
    crop_ratio: float = DEFAULT_CROP_RATIO,
) -> FeatureSet:
    """Run the frozen backbone once over ``split`` and keep what every evaluator needs.

    The backbone must provide ``get_intermediate_layers(x, n)`` -> n tuples of
    (patch tokens (B, N, D), CLS (B, D)), last block last. Output tensors are preallocated on the
    CPU so peak memory is the features themselves plus one batch. ``precision``: the backbone's
    forward in "fp32" or under "bf16" autocast (as DINOv2's evaluations run their feature
    models); the features are kept in float32 either way. Each image is the ``image_size`` centre
    crop of its resized self (``dinoflow.data.transforms.resize_center_crop``, ``crop_ratio``).
    """
    n = len(split)
    if n == 0:
        raise ValueError(f"{desc}: empty split")
    n_last_blocks = min(n_last_blocks, int(getattr(backbone, "depth", n_last_blocks)))
    was_training = backbone.training
    backbone.eval().to(device)
    channels = _backbone_channels(backbone, default=split.load(0).shape[0])
    cls_last = cls_lastn = patch_mean = None
    try:
        with _progress(n, desc, progress) as bar:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                images = load_batch(split, start, stop, image_size, crop_ratio)
                x = preprocess(images, image_size, mean, std, channels, crop_ratio)
                with autocast(precision, device):
                    outs = backbone.get_intermediate_layers(x.to(device), n_last_blocks)
                last_patches, last_cls = outs[-1]
                cls_cat = torch.cat([cls for _, cls in outs], dim=-1)
                if cls_last is None:  # shapes are known after the first batch
                    d = last_cls.shape[-1]
                    cls_last = torch.empty(n, d)
                    cls_lastn = torch.empty(n, cls_cat.shape[-1])
                    patch_mean = torch.empty(n, last_patches.shape[-1])
                cls_last[start:stop] = last_cls.float().cpu()
                cls_lastn[start:stop] = cls_cat.float().cpu()
                patch_mean[start:stop] = last_patches.float().mean(dim=1).cpu()
                bar.update(stop - start)
    finally:
        backbone.train(was_training)
    return FeatureSet(
        cls_last=cls_last, labels=_labels_of(split), cls_last4=cls_lastn, patch_mean=patch_mean
    )


def raw_pixel_features(
    split: ImageSource,
    size: int | None = None,
    batch_size: int = 4096,
    channels: int | None = None,
    crop_ratio: float = DEFAULT_CROP_RATIO,
) -> FeatureSet:
    """The raw-pixel baseline: each image's ``size`` centre crop (``resize_center_crop``, as the
    backbones see it) flattened, scaled to [0, 1].

    Returns a FeatureSet with only ``cls_last`` (N, C*S*S) set.
    """
    n = len(split)
    chunks = []
    for start in range(0, n, batch_size):
        x = load_batch(split, start, min(start + batch_size, n), size, crop_ratio)
        if channels is not None:
            x = match_channels(x, channels)
        if size is not None:
            x = resize_center_crop(x, size, crop_ratio)
        chunks.append(TF.to_dtype(x, torch.float32, scale=True).flatten(1))
    return FeatureSet(cls_last=torch.cat(chunks), labels=_labels_of(split))
