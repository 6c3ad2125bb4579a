"""Ingest: decode every image safely and record its metadata, one row per item.

A row never holds pixels. It holds what the later steps need: size, mode, channels, frames,
the sha256 of the decoded pixels (exact duplicates), a 64-bit perceptual hash (near duplicates),
grey-level std and entropy (low-information filter), and the label. A small RGB thumbnail per
item (``pixel_size`` square) is returned beside the table for the pixel embedder.

Decoding is ``dinoflow.data.decode`` (the one decoder training and the registered model use too),
which survives what real folders hold: truncated and empty files, decompression bombs, EXIF
orientation, CMYK, transparency, 16-bit grey, animations.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from dinoflow.data import Split
from dinoflow.data.decode import (  # noqa: F401  (re-exported: the decoder curation uses)
    Decoded,
    _to_uint8_grey,
    array_to_rgb,
    decode_file,
    pil_to_rgb,
    rgb_to_luma,
)

# Row schema of the metadata table (the order is the CSV order).
COLUMNS = [
    "split", "index", "item_id", "path", "label", "readable", "width", "height", "mode",
    "channels", "n_frames", "file_bytes", "sha256", "phash", "std", "entropy", "reason", "detail",
]  # fmt: skip
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"}


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
    grey = rgb_to_luma(rgb)  # what a 1-channel model trains on
    grey_pil = Image.fromarray(grey)
    std, entropy = grey_stats(grey)
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


def list_skipped_files(root: str | Path, follow_out_of_root: bool = False) -> list[tuple[str, str, str]]:
    """Files under root that the folder source does not list: (path, reason, detail), reason
    ``hidden``, ``not_an_image`` or ``outside_root`` (``dinoflow.data.image_folder.walk_folder``)."""
    from dinoflow.data.image_folder import walk_folder

    return [(str(p), status, detail) for p, status, detail in walk_folder(root, follow_out_of_root)
            if status != "image"]
