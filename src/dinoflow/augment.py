"""DINOv2 multi-crop views (docs/method.md section 1) on uint8 tensors with torchvision.transforms.v2.

Per image: 2 global crops and ``n_local`` local crops. Every crop: random resized crop (bicubic,
antialias), horizontal flip, colour jitter (random order of brightness/contrast/saturation/hue,
as torchvision's ColorJitter) with probability ``jitter_p``, grayscale with ``grayscale_p``;
then Gaussian blur with probability ``blur_p`` = (global 1, global 2, each local), solarize on
global crop 2 only; finally float in [0, 1] and Normalize(mean, std).

The random draws for one crop are made first (``sample_crop_params``) and applied afterwards
(``apply_crops``, batched over many crops) so the decisions are inspectable and tests can count
them. Draws come from a ``torch.Generator`` when given, else from torch's global RNG.

The ops are torchvision's uint8 kernels, written once more on a batch of crops with a factor
per crop (torchvision's take one factor per call, so per crop they cost ~8 small calls each:
~0.1 CPU s per training batch, a quarter of a CPU-profile step). The arithmetic and the rounding
to uint8 after each op are kept, so the crops equal torchvision's per-crop ops; like the
reference (which works on PIL images) intermediate results stay uint8 until the normalisation.
1-channel images: saturation and hue are no-ops (PIL's behaviour), grayscale keeps 1 channel.
3-channel images: grayscale gives 3 equal channels.
"""

from __future__ import annotations

import functools
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
    def apply_crops(
        self, images: Sequence[torch.Tensor], params: Sequence[CropParams], size: int
    ) -> torch.Tensor:
        """Crop i of images[i] (uint8 (C, H_i, W_i)) with params[i] -> uint8 (N, C, size, size).

        Every per-crop op except normalisation, in the order of the module docstring, batched
        over the N crops: torchvision's kernels take one factor per call, so each op is written
        here on the whole batch with per-crop factors, keeping the arithmetic (and the rounding
        to uint8 after each op) of torchvision's uint8 kernel: the result equals torchvision's
        per-crop ops (``tests/unit/test_augment.py``), at a few batched ops instead of ~8 per crop.
        """
        if len(images) != len(params):
            raise ValueError(f"{len(images)} images but {len(params)} crop parameters")
        x = _resized_crops(images, params, size)  # float32 holding uint8 values from here on
        rgb = x.shape[1] == 3
        jittered = [i for i, p in enumerate(params) if p.jitter is not None]
        if jittered:
            factors = torch.tensor([params[i].jitter[1] for i in jittered], dtype=torch.float64)
            orders = [params[i].jitter[0] for i in jittered]
            for position in range(4):
                for op in range(4) if rgb else (0, 1):  # saturation and hue: no-ops on 1 channel
                    rows = [k for k, order in enumerate(orders) if order[position] == op]
                    if rows:
                        at = torch.tensor([jittered[k] for k in rows])
                        x[at] = _COLOUR_OPS[op](x[at], factors[rows, op])
        if rgb:
            grey = torch.tensor([p.grayscale for p in params])
            x[grey] = _luma(x[grey]).trunc_().expand(-1, 3, -1, -1)
        blurred = [i for i, p in enumerate(params) if p.blur_sigma is not None]
        if blurred:
            at = torch.tensor(blurred)
            sigma = torch.tensor([params[i].blur_sigma for i in blurred], dtype=torch.float32)
            x[at] = _gaussian_blur(x[at], effective_blur_kernel(self.blur_kernel, size), sigma)
        solar = torch.tensor([p.solarize for p in params])
        x[solar] = torch.where(x[solar] >= self.solarize_threshold, 255 - x[solar], x[solar])
        return x.to(torch.uint8)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> float32 (..., C, H, W): /255 then (x - mean) / std."""
        return normalize(x, self.mean, self.std)

    def views(
        self, images: Sequence[torch.Tensor], generators: Sequence[torch.Generator | None]
    ) -> dict[str, torch.Tensor | int]:
        """B images (uint8 (C, H_i, W_i), C in {1, 3}), image b's draws from generators[b] ->
        {"global_crops": (2B, C, G, G) ordered [view 0 of every image, then view 1],
         "local_crops": (N*B, C, L, L) ordered by view then image ((0, C, G, G) if N = 0),
         "n_local": N, "batch_size": B}, float32, normalised.

        Image b's crops depend on its generator only, not on the batch it is in.
        """
        if not images or len(images) != len(generators):
            raise ValueError(f"views of {len(images)} images with {len(generators)} generators")
        for img in images:
            if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] not in (1, 3):
                raise ValueError(
                    f"expected uint8 tensors (C, H, W) with C in (1, 3), got {img.dtype} "
                    f"{tuple(img.shape)}"
                )
        if len({img.shape[0] for img in images}) != 1:
            raise ValueError("images in a batch have different numbers of channels")
        kinds = ("global1", "global2") + ("local",) * self.n_local
        drawn = [  # per image, in the order global 1, global 2, locals
            [self.sample_crop_params(img.shape[1], img.shape[2], k, g) for k in kinds]
            for img, g in zip(images, generators, strict=True)
        ]
        b = len(images)

        def group(view_range: range, size: int) -> torch.Tensor:
            crops = [(images[i], drawn[i][v]) for v in view_range for i in range(b)]
            sources, params = zip(*crops, strict=True)
            return self.normalize(self.apply_crops(sources, params, size))

        glob = group(range(2), self.global_size)
        if self.n_local:
            loc = group(range(2, 2 + self.n_local), self.local_size)
        else:
            loc = glob.new_empty((0, *glob.shape[1:]))
        return {"global_crops": glob, "local_crops": loc, "n_local": self.n_local, "batch_size": b}

    def __call__(
        self, img: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """img uint8 (C, H, W) -> {"global_crops": [2 x (C,G,G)], "local_crops": [n x (C,L,L)]}:
        ``views`` of one image."""
        out = self.views([img], [generator])
        return {"global_crops": list(out["global_crops"]), "local_crops": list(out["local_crops"])}


# ---------------------------------------------------------------------- batched uint8 kernels
@functools.cache
def _resize_weights(n_in: int, n_out: int, flip: bool = False) -> torch.Tensor:
    """(n_out, n_in) float64: torch's uint8 antialiased bicubic resize of one axis as a matrix
    (its rows reversed for a flip).

    The coefficients are torch's own (a resize of the identity, in float64 as its uint8 kernel
    computes them), quantised to int16 at the precision that kernel picks; with integer pixels
    the products and sums are then exact in float64. Same size: the identity (torch skips it).
    """
    eye = torch.eye(n_in, dtype=torch.float64).reshape(1, 1, n_in, n_in)
    w = torch.nn.functional.interpolate(
        eye, size=(n_out, n_in), mode="bicubic", align_corners=False, antialias=True
    )[0, 0]
    if n_in != n_out:
        w_max, bits = float(w.max()), 0
        while bits < 22 and int(0.5 + w_max * (1 << (bits + 1))) < (1 << 15):
            bits += 1
        scaled = w * (1 << bits)
        w = torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc_() / (1 << bits)
    return w.flip(0) if flip else w


def _round_uint8(x: torch.Tensor) -> torch.Tensor:
    """The fixed-point kernel's rounding of a pass: round half up, saturate to [0, 255]."""
    return x.add_(0.5).floor_().clamp_(0, 255)


# Sources up to this many values (28 x 28 grey: 784) go through the dense batched matmuls; for
# larger ones (48 x 48 RGB on) torch's per-crop kernel, which touches only the kernel's taps, is
# faster (measured 1 thread: 0.12 against 0.23 ms a crop at 28 px grey, 0.36 against 0.09 at 48 px RGB).
_MATMUL_RESIZE_MAX_PIXELS = 2048


def _resized_crops(
    images: Sequence[torch.Tensor], params: Sequence[CropParams], size: int
) -> torch.Tensor:
    """resized_crop (bicubic, antialias) + flip of each crop; for small sources as two batched
    matmuls (larger ones: torchvision per crop, ``_MATMUL_RESIZE_MAX_PIXELS``).

    Image i is padded into a common (C, H, W) canvas; its crop is R_y @ image @ R_x^T with R_y
    (size, H) and R_x (size, W) the resize weights placed at the crop box (zeros elsewhere, so
    the padding never contributes), R_x's rows reversed for a flip. As torch's uint8 kernel:
    the horizontal pass first, each pass rounded to uint8. -> float32 (N, C, size, size).
    """
    n, c = len(images), images[0].shape[0]
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    if c * height * width > _MATMUL_RESIZE_MAX_PIXELS:  # torch's per-crop kernel: same numbers
        return torch.stack(
            [_resized_crop(img, p, size) for img, p in zip(images, params, strict=True)]
        )
    if all(i.shape[1:] == (height, width) for i in images):
        canvas = torch.stack(list(images)).double()
    else:
        canvas = torch.zeros(n, c, height, width, dtype=torch.float64)
        for k, img in enumerate(images):
            canvas[k, :, : img.shape[1], : img.shape[2]] = img
    rows = torch.zeros(n, 1, size, height, dtype=torch.float64)
    cols = torch.zeros(n, 1, size, width, dtype=torch.float64)
    for k, p in enumerate(params):
        top, left, h, w = p.box
        rows[k, 0, :, top : top + h] = _resize_weights(h, size)
        cols[k, 0, :, left : left + w] = _resize_weights(w, size, p.flip)
    horizontal = _round_uint8(canvas @ cols.transpose(-1, -2))
    return _round_uint8(rows @ horizontal).to(torch.float32)


def _resized_crop(img: torch.Tensor, p: CropParams, size: int) -> torch.Tensor:
    """One crop with torchvision's resized_crop (bicubic, antialias) and flip -> float32."""
    top, left, h, w = p.box
    x = TF.resized_crop(
        img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    return (TF.horizontal_flip(x) if p.flip else x).to(torch.float32)


def _per_crop(factor: torch.Tensor) -> torch.Tensor:
    """(N,) float64 factors -> (N, 1, 1, 1) float32, as torch casts a Python float factor."""
    return factor.to(torch.float32).view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) float: torchvision's grayscale weights, unrounded."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's uint8 blend, factor per crop: x * f + other * (1 - f), clamp, truncate."""
    # torch's add_(other, alpha=1 - f) is one fused multiply-add: the product other * (1 - f)
    # of two float32 is exact in float64, so the sum is rounded once, as there
    scaled = x.mul(_per_crop(factor)).double()
    keep = _per_crop(1.0 - factor).double()
    return scaled.add_(other.double() * keep).float().clamp_(0, 255).trunc_()


def _brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul(_per_crop(factor)).clamp_(0, 255).trunc_()


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    grey = _luma(x).floor_() if x.shape[1] == 3 else x
    return _blend(x, grey.mean(dim=(-3, -2, -1), keepdim=True), factor)


def _saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _luma(x).floor_(), factor)


def _hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # the HSV round trip is torchvision's, one crop per call (it takes one factor): RGB only
    crops = [TF.adjust_hue(c.to(torch.uint8), float(f)) for c, f in zip(x, factor, strict=True)]
    return torch.stack(crops).to(torch.float32)


_COLOUR_OPS = (_brightness, _contrast, _saturation, _hue)  # CropParams.jitter's op indices


def _gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's uint8 Gaussian blur (reflect padding, rounded) with a sigma per crop:
    one grouped convolution, a (kernel x kernel) filter per crop and channel."""
    n, c, h, w = x.shape
    lim = (kernel - 1) / (2.0 * math.sqrt(2.0))
    grid = torch.linspace(-lim, lim, steps=kernel, dtype=torch.float32)
    k1 = torch.softmax(grid.div(sigma.view(-1, 1)).pow(2).neg(), dim=1)  # (N, kernel)
    k2 = (k1.unsqueeze(-1) * k1.unsqueeze(1)).repeat_interleave(c, dim=0).unsqueeze(1)
    pad = kernel // 2
    padded = torch.nn.functional.pad(x.reshape(1, n * c, h, w), [pad] * 4, mode="reflect")
    out = torch.nn.functional.conv2d(padded, k2, groups=n * c)
    return out.round_().reshape(n, c, h, w)


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
