"""Ingest: decode every image safely and record its metadata, one row per item.

A row never holds pixels. It holds what the later steps need: size, mode, channels, frames,
the sha256 of the decoded pixels (exact duplicates), a 64-bit perceptual hash (near duplicates),
grey-level std and entropy (low-information filter), and the label. A small RGB thumbnail per
item (``pixel_size`` square) is returned beside the table for the pixel embedder.

Decoding (``decode_file``) survives what real folders hold: zero-byte and truncated files, text
named .png, decompression bombs (the header is checked against ``max_pixels`` before any pixel is
decoded; Pillow's own guard is an error too), EXIF orientation, CMYK, RGBA / LA / palette with
transparency (composited on white), 16-bit and 32-bit grey, float images, animations (frame 0).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dinoflow.data import IMAGE_EXTENSIONS, Split

# Row schema of the metadata table (the order is the CSV order).
COLUMNS = [
    "split", "index", "item_id", "path", "label", "readable", "width", "height", "mode",
    "channels", "n_frames", "file_bytes", "sha256", "phash", "std", "entropy", "reason", "detail",
]  # fmt: skip
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"}


@dataclass
class Decoded:
    """Result of decoding one file: rgb (H, W, 3) uint8 or None with a reason and detail."""

    rgb: np.ndarray | None
    meta: dict = field(default_factory=dict)
    reason: str = ""
    detail: str = ""


def _to_uint8_grey(arr: np.ndarray, mode: str) -> np.ndarray:
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
        grey = _to_uint8_grey(np.asarray(im), mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def decode_file(path: str | Path, max_pixels: int) -> Decoded:
    """Decode one file to RGB; never raises: failures come back as reason unreadable/too_large."""
    from PIL import Image, ImageOps

    path = Path(path)
    meta: dict = {"file_bytes": -1}
    try:
        meta["file_bytes"] = path.stat().st_size
    except OSError as exc:
        return Decoded(None, meta, "unreadable", f"stat failed: {exc}")
    if meta["file_bytes"] == 0:
        return Decoded(None, meta, "unreadable", "empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow warns between MAX_IMAGE_PIXELS and twice that; here any bomb warning is fatal.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
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
                im.load()  # truncated data fails here
                oriented = ImageOps.exif_transpose(im)
                rgb = pil_to_rgb(oriented)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                return Decoded(None, meta, "too_large", f"decompression bomb guard: {exc}")
            except Exception as exc:  # noqa: BLE001
                return Decoded(None, meta, "unreadable", f"{type(exc).__name__}: {exc}")
    meta["height"], meta["width"] = rgb.shape[:2]  # after EXIF orientation
    return Decoded(np.ascontiguousarray(rgb), meta)


def array_to_rgb(image: np.ndarray) -> np.ndarray:
    """An in-memory uint8 image (H, W) or (H, W, C) -> (H, W, 3) uint8."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def pixel_sha256(rgb: np.ndarray) -> str:
    """sha256 of the decoded pixels (shape included): equal iff the pixels are equal."""
    h = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}:".encode())
    h.update(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes())
    return h.hexdigest()


def grey_stats(grey: np.ndarray) -> tuple[float, float]:
    """(std, entropy in bits) of a uint8 grey image's levels."""
    counts = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(grey.std()), float(-(p * np.log2(p)).sum() + 0.0)


def describe(rgb: np.ndarray, thumb_size: int, compute_phash: bool) -> tuple[dict, np.ndarray]:
    """Hashes and statistics of one RGB image, and its (thumb_size, thumb_size, 3) thumbnail."""
    import imagehash
    from PIL import Image

    pil = Image.fromarray(rgb)
    grey_pil = pil.convert("L")
    std, entropy = grey_stats(np.asarray(grey_pil))
    info = {
        "sha256": pixel_sha256(rgb),
        "phash": str(imagehash.phash(grey_pil)) if compute_phash else "",
        "std": std,
        "entropy": entropy,
    }
    thumb = np.asarray(pil.resize((thumb_size, thumb_size), Image.Resampling.BOX))
    return info, thumb


def load_rgb(split: Split, i: int, max_pixels: int) -> np.ndarray | None:
    """Item i of a split as (H, W, 3) uint8, or None if it cannot be decoded."""
    if split.images is not None:
        return array_to_rgb(np.asarray(split.images[i]))
    return decode_file(split.paths[i], max_pixels).rgb


def ingest_split(
    split: Split,
    name: str,
    thumb_size: int,
    max_pixels: int,
    compute_phash: bool = True,
    progress: bool = True,
    phash_min_side: int = 0,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Metadata rows (COLUMNS) and thumbnails (N, s, s, 3) uint8 for every item of a split.

    pHash is computed only for images whose short side is at least phash_min_side (dedup ignores
    it below; skipping it saves a third of the ingest time on Fashion-MNIST).
    """
    from tqdm.auto import tqdm

    n = len(split)
    thumbs = np.zeros((n, thumb_size, thumb_size, 3), dtype=np.uint8)
    rows = []
    for i in tqdm(range(n), desc=f"ingest {name}", disable=not progress, mininterval=1.0):
        row = {
            "split": name, "index": i, "item_id": split.ids[i], "label": int(split.labels[i]),
            "path": "" if split.paths is None else str(split.paths[i]), "readable": False,
            "width": -1, "height": -1, "mode": "", "channels": -1, "n_frames": 1,
            "file_bytes": -1, "sha256": "", "phash": "", "std": np.nan, "entropy": np.nan,
            "reason": "", "detail": "",
        }  # fmt: skip
        if split.images is not None:
            image = np.asarray(split.images[i])
            rgb = array_to_rgb(image)
            channels = 1 if image.ndim == 2 else image.shape[2]
            row.update(
                width=rgb.shape[1], height=rgb.shape[0], channels=channels,
                mode={1: "L", 3: "RGB", 4: "RGBA"}.get(channels, "L"), file_bytes=image.nbytes,
            )  # fmt: skip
        else:
            decoded = decode_file(split.paths[i], max_pixels)
            row.update(decoded.meta)
            row["reason"], row["detail"] = decoded.reason, decoded.detail
            rgb = decoded.rgb
        if rgb is not None:
            want_phash = compute_phash and min(rgb.shape[:2]) >= phash_min_side
            info, thumbs[i] = describe(rgb, thumb_size, want_phash)
            row.update(info, readable=True)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame, thumbs


def ingest_splits(
    splits: dict[str, Split],
    thumb_size: int,
    max_pixels: int,
    compute_phash: bool = True,
    progress: bool = True,
    phash_min_side: int = 0,
) -> tuple[pd.DataFrame, np.ndarray]:
    """All splits stacked (train first): one metadata table and aligned thumbnails."""
    frames, thumbs = [], []
    for name in ("train", "val", "test"):
        if name in splits:
            f, t = ingest_split(
                splits[name], name, thumb_size, max_pixels, compute_phash, progress, phash_min_side
            )
            frames.append(f)
            thumbs.append(t)
    frame = pd.concat(frames, ignore_index=True)
    return frame, np.concatenate(thumbs, axis=0)


def list_skipped_files(root: str | Path) -> list[tuple[str, str, str]]:
    """Files under root that the folder source does not list: (path, reason, detail).

    reason is ``hidden`` (a dot-file or inside a dot-folder) or ``not_an_image`` (extension not
    in IMAGE_EXTENSIONS). Walks like ``list_image_folder``: follows links, survives loops.
    """
    root = Path(root)
    out: list[tuple[str, str, str]] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        for d in sorted(dirnames):
            if d.startswith("."):
                out.append((str(Path(dirpath) / d), "hidden", "hidden folder skipped"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith("."):
                out.append((str(p), "hidden", "hidden file skipped"))
            elif not name.lower().endswith(IMAGE_EXTENSIONS):
                out.append((str(p), "not_an_image", f"extension {p.suffix or '(none)'} skipped"))
    return out
