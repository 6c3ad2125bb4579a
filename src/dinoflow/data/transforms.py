"""The one normaliser: uint8 images -> the float tensors a backbone sees, in training (the
multi-crop augmentation's last step), evaluation, curation's model embedder and the registered
model. Channels are matched like the decoder does (grey repeated to RGB; RGB to luma exactly as
``dinoflow.data.decode.rgb_to_luma``), then resize (antialiased bilinear), scale, normalise.

Every consumer of a trained backbone (evaluation, the registered model and its embedder, the embed
pipeline, curation's model embedder) sees an image through ``resize_center_crop``, DINOv2's
evaluation transform: the shorter side resized to round(S / crop_ratio), then the centre S x S, so
a wide photo keeps its proportions instead of being squashed to a square.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

DEFAULT_CROP_RATIO = 0.875  # DINOv2's evaluation: shorter side to 256, centre crop 224


def _per_channel(values: Sequence[float], c: int, what: str) -> list[float]:
    v = list(values) * c if len(values) == 1 else list(values)
    if len(v) != c:
        raise ValueError(f"{what} has {len(values)} values but the images have {c} channels")
    return v


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float32: /255 then (x - mean) / std (one value or one per channel)."""
    c = x.shape[-3]
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, _per_channel(mean, c, "mean"), _per_channel(std, c, "std"))


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, channels, H, W): grey repeated to RGB, RGB to luma."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if x.shape[1] == 3 and channels == 1:
        if x.dtype == torch.uint8:  # Pillow's "L" in fixed point, as the decoder
            w = x.to(torch.int32)
            luma = (w[:, 0] * 19595 + w[:, 1] * 38470 + w[:, 2] * 7471 + 0x8000) >> 16
            return luma.to(torch.uint8).unsqueeze(1)
        return TF.rgb_to_grayscale(x, num_output_channels=1)
    raise ValueError(f"cannot map {x.shape[1]} image channels to {channels} backbone channels")


def resized_shorter_side(crop_size: int, crop_ratio: float = DEFAULT_CROP_RATIO) -> int:
    """The side ``resize_center_crop`` resizes the shorter side to: round(crop_size / crop_ratio)."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    return max(crop_size, round(crop_size / crop_ratio))


def resize_center_crop(
    images: torch.Tensor, crop_size: int, crop_ratio: float = DEFAULT_CROP_RATIO
) -> torch.Tensor:
    """uint8 (C, H, W) or (B, C, H, W) -> (..., crop_size, crop_size), the aspect ratio kept.

    The shorter side is resized (bilinear, antialiased; the longer side as torchvision's
    ``resize`` with one size scales it) to round(crop_size / crop_ratio), then the centre
    crop_size x crop_size is kept (torchvision's ``center_crop``, as DINOv2's ``CenterCrop``).
    Rule for images already at the crop's scale: when the shorter side equals crop_size the image
    is only centre-cropped, never upscaled first. So a square crop_size image comes back unchanged
    (28-px Fashion-MNIST at crop 28) and the transform is idempotent: its output, transformed
    again, is itself.
    """
    shorter = resized_shorter_side(crop_size, crop_ratio)
    if min(images.shape[-2:]) != crop_size:
        images = TF.resize(
            images, shorter, interpolation=InterpolationMode.BILINEAR, antialias=True
        )
    if tuple(images.shape[-2:]) != (crop_size, crop_size):
        images = TF.center_crop(images, [crop_size, crop_size])
    return images


def preprocess(
    images: torch.Tensor,
    image_size: int | tuple[int, int] | None,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int | None = None,
    crop_ratio: float = DEFAULT_CROP_RATIO,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32 (B, C', S, S): channels, crop, scale, normalise.

    ``image_size`` an int S: ``resize_center_crop(images, S, crop_ratio)``. A pair (H', W'): a
    plain resize to exactly that grid (dense maps, whose masks cover the whole image). None: the
    images' own size.
    """
    if channels is not None:
        images = match_channels(images, channels)
    if isinstance(image_size, int):
        images = resize_center_crop(images, image_size, crop_ratio)
    elif image_size is not None and list(images.shape[-2:]) != list(image_size):
        images = TF.resize(
            images, list(image_size), interpolation=InterpolationMode.BILINEAR, antialias=True
        )
    return normalize(images, mean, std)
