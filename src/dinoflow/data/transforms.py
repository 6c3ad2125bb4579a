"""The one normaliser: uint8 images -> the float tensors a backbone sees, in training (the
multi-crop augmentation's last step), evaluation, curation's model embedder and the registered
model. Channels are matched like the decoder does (grey repeated to RGB; RGB to luma exactly as
``dinoflow.data.decode.rgb_to_luma``), then resize (antialiased bilinear), scale, normalise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


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


def preprocess(
    images: torch.Tensor,
    image_size: int | tuple[int, int] | None,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int | None = None,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32 (B, C', S, S): channels, resize, scale, normalise."""
    if channels is not None:
        images = match_channels(images, channels)
    if image_size is not None:
        size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        if list(images.shape[-2:]) != size:
            images = TF.resize(images, size, interpolation=InterpolationMode.BILINEAR,
                               antialias=True)
    return normalize(images, mean, std)
