"""The one image decoder: curation checks, training trains on, evaluation and the registered
model embed exactly the same pixels.

``decode_file`` survives what real folders hold: zero-byte and truncated files, text named .png,
decompression bombs (the header is checked against ``max_pixels`` before any pixel is decoded;
Pillow's own guard is an error too), EXIF orientation, CMYK, RGBA / LA / palette with
transparency (composited on white), 16-bit and 32-bit grey (scaled, not clipped), float images,
animations (frame 0). It gives RGB (H, W, 3) uint8, or a reason. ``decode_image`` is the same
decoding for a consumer: uint8 (C, H, W) with C = 1 (luma, as Pillow's "L") or 3, or a
``DataError`` naming the file.

Reduced decoding: with ``min_side``, a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale
(``Image.draft``), as small as keeps its shorter side >= ``min_side``; everything above holds
as at full scale. ``decode_short_side`` is that plus an antialiased resize to a shorter side of exactly
``side`` px (never up): the pixels the image cache (``dinoflow.data.cache``) stores.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dinoflow.errors import DataError

DEFAULT_MAX_PIXELS = 40_000_000
# decode_short_side decodes at >= 2x the target side, then resizes (Pillow's reducing_gap=2):
# on camera photos, draft at 1x gave up to 3.5 uint8 levels of mean difference from a full
# decode + the same resize (99th percentile 23), at 2x at most 0.9 (99th percentile 5)
REDUCING_GAP = 2


@dataclass
class Decoded:
    """Result of decoding one file: rgb (H, W, 3) uint8 or None with a reason and detail."""

    rgb: np.ndarray | None
    meta: dict = field(default_factory=dict)
    reason: str = ""
    detail: str = ""


def to_uint8_grey(arr: np.ndarray, mode: str) -> np.ndarray:
    """16-bit / 32-bit / float grey (H, W) -> uint8 (H, W), keeping the full range visible."""
    if mode.startswith("I;16"):
        return (arr.astype(np.uint32) >> 8).astype(np.uint8)
    arr = arr.astype(np.float64)
    if mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
        arr = arr * 255.0
    elif mode == "I" and arr.size and arr.max() > 255:
        arr = arr / 257.0  # 16-bit PNGs open as "I" in some Pillow versions
    return np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)


def pil_to_rgb(im) -> np.ndarray:
    """Any Pillow image -> (H, W, 3) uint8; transparency composited on white."""
    from PIL import Image

    mode = im.mode
    if mode.startswith("I") or mode == "F":
        grey = to_uint8_grey(np.asarray(im), mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _draft(im, min_side: int) -> int:
    """Ask libjpeg for the smallest 1/2, 1/4, 1/8 scale that keeps the shorter side >= min_side;
    -> the scale (1: none). The request is square: Pillow takes min(W // w, H // h), and the
    shorter side is the same whether or not EXIF orientation turns the stored image by 90
    degrees, so the request holds in the stored orientation and the displayed one alike."""
    width = im.size[0]
    if im.format not in ("JPEG", "MPO") or im.draft("RGB", (min_side, min_side)) is None:
        return 1
    return max(1, round(width / im.size[0]))


def decode_file(
    source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> Decoded:
    """Decode one file (a path, or the file's bytes) to RGB; never raises: failures come back as
    reason unreadable / too_large with a detail. ``min_side``: JPEGs decoded reduced (module
    docstring); meta then adds ``draft_scale`` and the full size ``full_height``/``full_width``."""
    from PIL import Image, ImageOps

    meta: dict = {"file_bytes": -1}
    if isinstance(source, bytes | bytearray):
        meta["file_bytes"], opened = len(source), io.BytesIO(source)
    else:
        opened = Path(source)
        try:
            meta["file_bytes"] = opened.stat().st_size
        except OSError as exc:
            return Decoded(None, meta, "unreadable", f"stat failed: {exc}")
    if meta["file_bytes"] == 0:
        return Decoded(None, meta, "unreadable", "empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow warns between MAX_IMAGE_PIXELS and twice that; here any bomb warning is fatal.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(opened)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return Decoded(None, meta, "too_large", f"decompression bomb guard: {exc}")
        except Exception as exc:  # noqa: BLE001 - any decoder failure is an unreadable file
            return Decoded(None, meta, "unreadable", f"{type(exc).__name__}: {exc}")
        with im:
            width, height = im.size
            meta.update(
                width=width,
                height=height,
                mode=im.mode,
                channels=len(im.getbands()),
                n_frames=int(getattr(im, "n_frames", 1)),
            )
            if width * height > max_pixels:
                detail = f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
                return Decoded(None, meta, "too_large", f"decompression bomb guard: {detail}")
            try:
                im.seek(0)  # animated: the first frame
                scale = _draft(im, min_side) if min_side else 1
                im.load()  # truncated data fails here
                # EXIF: a quarter turn (read only where the full size is reported: draft)
                turned = bool(min_side) and im.getexif().get(0x0112) in (5, 6, 7, 8)
                rgb = pil_to_rgb(ImageOps.exif_transpose(im))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                return Decoded(None, meta, "too_large", f"decompression bomb guard: {exc}")
            except Exception as exc:  # noqa: BLE001
                return Decoded(None, meta, "unreadable", f"{type(exc).__name__}: {exc}")
    if min_side:
        meta.update(
            draft_scale=scale,
            full_height=width if turned else height,
            full_width=height if turned else width,
        )
    meta["height"], meta["width"] = rgb.shape[:2]  # after EXIF orientation
    return Decoded(np.ascontiguousarray(rgb), meta)


def array_to_rgb(image: np.ndarray) -> np.ndarray:
    """An in-memory uint8 image (H, W) or (H, W, C) -> (H, W, 3) uint8."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def rgb_to_luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8, exactly Pillow's ``convert("L")`` (ITU-R 601-2 luma in
    16-bit fixed point): a grey image gives back its grey levels unchanged."""
    x = rgb.astype(np.uint32)
    return ((x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16).astype(
        np.uint8
    )


def to_channels(rgb: np.ndarray, channels: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> uint8 tensor (C, H, W): C = 3 as it is, C = 1 its luma."""
    if channels == 1:
        return torch.from_numpy(rgb_to_luma(rgb)).unsqueeze(0)
    if channels == 3:
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def short_side_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) scaled so that the shorter side is ``side``, the aspect kept; an image
    whose shorter side is at most ``side`` keeps its size (never upscaled)."""
    short = min(height, width)
    if short <= side:
        return height, width
    return max(1, round(height * side / short)), max(1, round(width * side / short))


def decode_short_side(
    source: str | Path | bytes, side: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Decoded:
    """``decode_file`` reduced to a shorter side of ``side`` px (never up): JPEGs decoded at
    >= ``REDUCING_GAP`` x ``side`` by libjpeg, then an antialiased bicubic resize (the filter
    of the augmentation's resized crops). The target size is computed from the full size, so a
    reduced and a full decode give the same shape."""
    from PIL import Image

    decoded = decode_file(source, max_pixels, min_side=REDUCING_GAP * side)
    if decoded.rgb is None:
        return decoded
    meta = decoded.meta
    height, width = short_side_size(meta["full_height"], meta["full_width"], side)
    if (height, width) != decoded.rgb.shape[:2]:
        resized = Image.fromarray(decoded.rgb).resize((width, height), Image.Resampling.BICUBIC)
        decoded.rgb = np.asarray(resized)
        meta["height"], meta["width"] = height, width
    return decoded


def decode_image(
    source: str | Path | bytes,
    channels: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    short_side: int | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """A file (path or bytes) -> uint8 (C, H, W): the pixels curation checked, in ``channels``;
    with ``short_side``, reduced as ``decode_short_side`` does. ``name``: the file's name in the
    error (bytes read from a shard: "<shard>#<member>"); default the path, or "image bytes"."""
    if short_side:
        decoded = decode_short_side(source, short_side, max_pixels)
    else:
        decoded = decode_file(source, max_pixels)
    if decoded.rgb is None:
        if name is None:
            name = "image bytes" if isinstance(source, bytes | bytearray) else str(source)
        raise DataError(f"cannot read image {name}: {decoded.reason} ({decoded.detail})")
    return to_channels(decoded.rgb, channels)
