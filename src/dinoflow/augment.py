"""DINOv2 multi-crop views (DINOV2.md section 1) on uint8 tensors with torchvision.transforms.v2.

Per image: 2 global crops and ``n_local`` local crops. Every crop: random resized crop (bicubic,
antialias), horizontal flip, colour jitter (random order of brightness/contrast/saturation/hue,
as torchvision's ColorJitter) with probability ``jitter_p``, grayscale with ``grayscale_p``;
then Gaussian blur with probability ``blur_p`` = (global 1, global 2, each local), solarize on
global crop 2 only; finally float in [0, 1] and Normalize(mean, std).

The random draws for one crop are made first (``sample_crop_params``) and applied afterwards
(``apply_crop``) so the decisions are inspectable and tests can count them. Draws come from a
``torch.Generator`` when given, else from torch's global RNG (so DataLoader worker seeding works).

All ops run on the (small) uint8 crop tensor with no PIL round trip; like the reference (which
works on PIL images) intermediate results stay uint8 until the final normalisation.
1-channel images: saturation and hue are no-ops (PIL's behaviour), grayscale keeps 1 channel.
3-channel images: grayscale gives 3 equal channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import InterpolationMode

from dinoflow.data.transforms import normalize

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropParams",
    "EvalTransform",
    "MultiCropAugmentation",
    "collate_multicrop",
    "effective_blur_kernel",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range
_CROP_ATTEMPTS = 10  # torchvision's number of tries before the centre-crop fallback
# Layout of the uniforms drawn per crop (one torch.rand call per crop).
_U_POS = 2 * _CROP_ATTEMPTS  # 2 per crop attempt (area, log-ratio), then 2 for the position
_U_FLIP = _U_POS + 2
_U_JITTER = _U_FLIP + 1  # apply?, then 4 factors, then 4 keys whose argsort is the op order
_U_GRAY = _U_JITTER + 9
_U_BLUR = _U_GRAY + 1  # apply?, then sigma
_U_SOLAR = _U_BLUR + 2
_N_DRAWS = _U_SOLAR + 1


def effective_blur_kernel(kernel: int, crop_size: int) -> int:
    """Blur kernel actually used on a crop of side crop_size.

    The kernel must be odd and fit in the crop; crops smaller than the kernel (e.g. 8 px local
    crops with kernel 9) use the largest odd size <= crop_size. Larger crops use ``kernel``.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"blur kernel must be odd and >= 1, got {kernel}")
    if crop_size >= kernel:
        return kernel
    return crop_size if crop_size % 2 == 1 else crop_size - 1


@dataclass(frozen=True)
class CropParams:
    """The random decisions for one crop.

    box: (top, left, height, width) in the source image. jitter: None (not applied) or
    (order of the 4 ops as indices 0=brightness 1=contrast 2=saturation 3=hue, factors).
    blur_sigma: None (no blur) or sigma.
    """

    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[tuple[int, ...], tuple[float, float, float, float]] | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def _resized_crop_box(
    height: int, width: int, scale: tuple[float, float], u: list[float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, with the uniforms given.

    u: 2 per attempt (area, log aspect ratio) for _CROP_ATTEMPTS attempts, then 2 (top, left).
    """
    area = height * width
    log_r = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for a in range(_CROP_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * a])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[2 * a + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u[_U_POS] * (height - h + 1))
            j = int(u[_U_POS + 1] * (width - w + 1))
            return min(i, height - h), min(j, width - w), h, w
    # fallback: whole image clipped to the ratio range, centred (as torchvision)
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        h, w = height, int(round(height * _RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MultiCropAugmentation:
    """DINOv2 views. img uint8 (C, H, W), C in {1, 3} -> {"global_crops": [T(C,G,G)] * 2,
    "local_crops": [T(C,L,L)] * n_local}, float32, normalised.

    blur_p: blur probability for (global crop 1, global crop 2, each local crop).
    reference_blur_bug: reproduce the reference code, which passes 1 - p to RandomApply and so
        blurs with probabilities (0.0, 0.9, 0.5) instead of (1.0, 0.1, 0.5).
    mean/std: one value per channel, or a single value broadcast to all channels.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_kernel: int = 9,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize_threshold: int = 128,
        solarize_p: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        reference_blur_bug: bool = False,
    ) -> None:
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        for name, sc in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < sc[0] <= sc[1] <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {sc}")
        probs = {"flip_p": flip_p, "jitter_p": jitter_p, "grayscale_p": grayscale_p}
        probs |= {"solarize_p": solarize_p, **{f"blur_p[{i}]": p for i, p in enumerate(blur_p)}}
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if len(blur_p) != 3:
            raise ValueError(f"blur_p must be (global1, global2, local), got {blur_p}")
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {mean} vs {std}")
        if not 0.0 <= jitter[3] <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {jitter[3]}")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.flip_p, self.jitter, self.jitter_p = flip_p, tuple(jitter), jitter_p
        self.grayscale_p = grayscale_p
        self.blur_sigma = tuple(blur_sigma)
        self.blur_kernel = blur_kernel
        effective_blur_kernel(blur_kernel, global_size)  # validates the kernel
        # the reference's GaussianBlur(p) is RandomApply(p=1 - p)
        self.blur_p = tuple(1.0 - p for p in blur_p) if reference_blur_bug else tuple(blur_p)
        self.solarize_threshold, self.solarize_p = solarize_threshold, solarize_p
        self.mean, self.std = tuple(mean), tuple(std)
        self.reference_blur_bug = reference_blur_bug

    # ------------------------------------------------------------------ sampling
    def sample_crop_params(
        self,
        height: int,
        width: int,
        kind: str,
        generator: torch.Generator | None = None,
    ) -> CropParams:
        """Draw the random decisions for one crop. kind: "global1", "global2" or "local"."""
        if kind not in ("global1", "global2", "local"):
            raise ValueError(f"kind must be global1, global2 or local, got {kind!r}")
        u = torch.rand(_N_DRAWS, generator=generator, dtype=torch.float64).tolist()
        scale = self.local_scale if kind == "local" else self.global_scale
        box = _resized_crop_box(height, width, scale, u)
        flip = u[_U_FLIP] < self.flip_p
        jitter = None
        if u[_U_JITTER] < self.jitter_p:
            b, c, s, h = self.jitter
            f = u[_U_JITTER + 1 : _U_JITTER + 5]
            factors = (
                1 - b + 2 * b * f[0],
                1 - c + 2 * c * f[1],
                1 - s + 2 * s * f[2],
                -h + 2 * h * f[3],
            )
            keys = u[_U_JITTER + 5 : _U_JITTER + 9]
            order = tuple(sorted(range(4), key=keys.__getitem__))  # uniform random permutation
            jitter = (order, factors)
        grayscale = u[_U_GRAY] < self.grayscale_p
        blur_p = {"global1": self.blur_p[0], "global2": self.blur_p[1], "local": self.blur_p[2]}
        blur_sigma = None
        if u[_U_BLUR] < blur_p[kind]:
            lo, hi = self.blur_sigma
            blur_sigma = lo + (hi - lo) * u[_U_BLUR + 1]
        solarize = kind == "global2" and u[_U_SOLAR] < self.solarize_p
        return CropParams(box, flip, jitter, grayscale, blur_sigma, solarize)

    # ------------------------------------------------------------------ applying
    def apply_crop(self, img: torch.Tensor, p: CropParams, size: int) -> torch.Tensor:
        """uint8 (C, H, W) -> uint8 (C, size, size): all per-crop ops except normalisation."""
        top, left, h, w = p.box
        x = TF.resized_crop(
            img,
            top,
            left,
            h,
            w,
            [size, size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        if p.flip:
            x = TF.horizontal_flip(x)
        if p.jitter is not None:
            order, (fb, fc, fs, fh) = p.jitter
            for op in order:
                if op == 0:
                    x = TF.adjust_brightness(x, fb)
                elif op == 1:
                    x = TF.adjust_contrast(x, fc)
                elif op == 2:
                    x = TF.adjust_saturation(x, fs)  # no-op on 1 channel
                else:
                    x = TF.adjust_hue(x, fh)  # no-op on 1 channel
        if p.grayscale and x.shape[-3] == 3:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if p.blur_sigma is not None:
            k = effective_blur_kernel(self.blur_kernel, size)
            x = TF.gaussian_blur(x, kernel_size=[k, k], sigma=[p.blur_sigma, p.blur_sigma])
        if p.solarize:
            x = TF.solarize(x, threshold=self.solarize_threshold)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> float32 (..., C, H, W): /255 then (x - mean) / std."""
        return normalize(x, self.mean, self.std)

    def __call__(
        self, img: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """img uint8 (C, H, W) -> {"global_crops": [2 x (C,G,G)], "local_crops": [n x (C,L,L)]}."""
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] not in (1, 3):
            raise ValueError(
                f"expected a uint8 tensor (C, H, W) with C in (1, 3), got {img.dtype} "
                f"{tuple(img.shape)}"
            )
        _, height, width = img.shape
        kinds = ("global1", "global2")
        glob = [
            self.apply_crop(
                img, self.sample_crop_params(height, width, k, generator), self.global_size
            )
            for k in kinds
        ]
        loc = [
            self.apply_crop(
                img, self.sample_crop_params(height, width, "local", generator), self.local_size
            )
            for _ in range(self.n_local)
        ]
        # normalise each size group in one call (fewer small-op overheads)
        out_g = list(self.normalize(torch.stack(glob)).unbind(0))
        out_l = list(self.normalize(torch.stack(loc)).unbind(0)) if loc else []
        return {"global_crops": out_g, "local_crops": out_l}


class EvalTransform:
    """Feature-extraction transform: resize the shorter side to resize_size (default: size),
    centre-crop size x size, float [0, 1], normalise. uint8 (C, H, W) or (B, C, H, W) -> float32.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_size: int | None = None,
    ) -> None:
        self.size = size
        self.resize_size = resize_size or size
        if self.resize_size < size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than the crop {size}")
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = img
        if min(x.shape[-2:]) != self.resize_size:
            x = TF.resize(
                x, [self.resize_size], interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = TF.center_crop(x, [self.size, self.size])
        return normalize(x, self.mean, self.std)


def collate_multicrop(samples: list[dict]) -> dict:
    """Batch MultiCropAugmentation outputs.

    -> {"global_crops": (2B, C, G, G) ordered [view 0 of every image, then view 1],
        "local_crops": (N*B, C, L, L) ordered by view then image (empty (0, C, G, G) if N = 0),
        "n_local": N, "batch_size": B}
    """
    if not samples:
        raise ValueError("collate_multicrop got an empty batch")
    b = len(samples)
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    for s in samples:
        if len(s["global_crops"]) != n_global or len(s["local_crops"]) != n_local:
            raise ValueError("samples in a batch have different numbers of crops")
    glob = torch.stack([s["global_crops"][v] for v in range(n_global) for s in samples])
    if n_local:
        loc = torch.stack([s["local_crops"][v] for v in range(n_local) for s in samples])
    else:
        loc = glob.new_empty((0, *glob.shape[1:]))
    return {"global_crops": glob, "local_crops": loc, "n_local": n_local, "batch_size": b}
