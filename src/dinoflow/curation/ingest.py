"""Ingest: decode every image safely and record its metadata, one row per item.

A row never holds pixels. It holds what the later steps need: size, mode, channels, frames,
the sha256 of the decoded pixels (exact duplicates), a 64-bit perceptual hash (near duplicates),
grey-level std and entropy (low-information filter), and the label. A small RGB thumbnail per
item (``pixel_size`` square) is returned beside the table for the pixel embedder.

``describe_split`` describes the items of a split (or of one chunk of it) in this process;
``dinoflow.curation.ingest_run`` runs it over chunks in worker processes, on disk, resumable
(the pipeline's ingest).

Decoding is ``dinoflow.data.decode`` (the one decoder training and the registered model use too),
which survives what real folders hold: truncated and empty files, decompression bombs, EXIF
orientation, CMYK, transparency, 16-bit grey, animations. With ``decode_min_side``
(``curation.ingest.decode_min_side``) a JPEG is decoded reduced (shorter side >= it): width and
height are still the file's full size, the hashes, statistics and thumbnail those of the
reduced pixels (docs/architecture.md, "Curation ingest at scale").
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from dinoflow.data import Split
from dinoflow.data.decode import (  # noqa: F401  (re-exported: the decoder curation uses)
    Decoded,
    array_to_rgb,
    decode_file,
    pil_to_rgb,
    rgb_to_luma,
    to_uint8_grey,
)
from dinoflow.errors import DataError

# Row schema of the metadata table (the order is the CSV order).
COLUMNS = [
    "split",
    "index",
    "item_id",
    "path",
    "label",
    "readable",
    "width",
    "height",
    "mode",
    "channels",
    "n_frames",
    "file_bytes",
    "sha256",
    "phash",
    "std",
    "entropy",
    "reason",
    "detail",
]
# The table's dtypes: the same whatever the chunking (a chunk of unreadable files included).
DTYPES = {
    **dict.fromkeys(["split", "item_id", "path", "mode", "sha256", "phash", "reason"], str),
    **dict.fromkeys(["index", "label", "width", "height", "channels", "n_frames"], np.int64),
    "file_bytes": np.int64,
    "readable": bool,
    "std": np.float64,
    "entropy": np.float64,
    "detail": str,
}
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
    return decode_item(split, i, max_pixels).rgb


def decode_item(split: Split, i: int, max_pixels: int, min_side: int | None = None) -> Decoded:
    """``decode_file`` of item i's file: a path, or a shard member's bytes (a member the shard
    cannot give is unreadable, as a broken file is). ``min_side``: a JPEG decoded reduced
    (``decode_file``); the meta's width/height are then still the file's full size."""
    try:
        source = split.file(i)
    except DataError as exc:
        return Decoded(None, {"file_bytes": -1}, "unreadable", str(exc))
    decoded = decode_file(source, max_pixels, min_side)
    meta = decoded.meta
    if "full_width" in meta:
        meta["width"], meta["height"] = meta.pop("full_width"), meta.pop("full_height")
    return decoded


def box_thumbnails(rgb: np.ndarray, size: int) -> np.ndarray:
    """(N, H, H, 3) uint8 -> (N, size, size, 3): exactly Pillow's BOX resize of each image.

    Pillow resizes in two 1-D passes (uint8 rounding between them) and each output row of a
    horizontal pass depends on its input row only. So the batch is stacked into one tall image and
    resized horizontally, then its tiles are transposed and the same is done again: two Pillow calls
    instead of N. Square images only: for H != W Pillow picks the cheaper pass first, which this
    does not follow (tests/unit/curation/test_ingest.py checks the equality).
    """
    from PIL import Image

    n, h, w = rgb.shape[:3]
    if h != w:
        raise ValueError(f"box_thumbnails takes square images, got {h} x {w}")

    def horizontal(x: np.ndarray) -> np.ndarray:
        tall = Image.fromarray(x.reshape(n * x.shape[1], x.shape[2], 3))
        return np.asarray(tall.resize((size, tall.height), Image.Resampling.BOX)).reshape(
            n, x.shape[1], size, 3
        )

    once = horizontal(rgb)  # (N, H, size, 3)
    return np.ascontiguousarray(
        horizontal(np.ascontiguousarray(once.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    )


def describe_arrays(
    images: np.ndarray, thumb_size: int, compute_phash: bool, phash_min_side: int = 0
) -> tuple[dict[str, list], np.ndarray]:
    """``describe`` of a batch of in-memory images (N, H, W) or (N, H, W, C) uint8 with array
    operations: their metadata columns and (N, s, s, 3) thumbnails, the same numbers."""
    import imagehash
    from PIL import Image

    n, h, w = images.shape[:3]
    channels = 1 if images.ndim == 3 else images.shape[3]
    rgb = np.ascontiguousarray(
        np.repeat(images[..., None] if images.ndim == 3 else images, 3, axis=3)
        if channels == 1
        else images[..., :3]
    )
    grey = rgb_to_luma(rgb).reshape(n, -1)
    # the images' histograms in one bincount: image j's levels are offset by 256 j
    counts = np.bincount((grey + (np.arange(n) * 256)[:, None]).ravel(), minlength=256 * n).reshape(
        n, 256
    )
    p = counts / grey.shape[1]
    plogp = np.where(counts > 0, p * np.log2(np.where(counts > 0, p, 1.0)), 0.0)
    phash = (
        [str(imagehash.phash(Image.fromarray(g.reshape(h, w)))) for g in grey]
        if compute_phash and min(h, w) >= phash_min_side
        else [""] * n
    )
    columns = {
        "width": [w] * n,
        "height": [h] * n,
        "channels": [channels] * n,
        "mode": [{1: "L", 3: "RGB", 4: "RGBA"}.get(channels, "L")] * n,
        "file_bytes": [images[0].nbytes] * n,
        "sha256": [pixel_sha256(x) for x in rgb],
        "phash": phash,
        "std": list(grey.std(axis=1)),
        "entropy": list(-plogp.sum(axis=1) + 0.0),
        "readable": [True] * n,
    }
    thumbs = (
        box_thumbnails(rgb, thumb_size)
        if h == w
        else np.stack([describe(x, thumb_size, False)[1] for x in rgb])
    )
    return columns, thumbs


def _blank_rows(split: Split, name: str, start: int = 0) -> list[dict]:
    """One metadata row per item: its identity, every measure unknown (not yet read). ``index``
    counts from ``start`` (the split's first item when ``split`` is one chunk of it)."""
    return [
        {
            "split": name,
            "index": start + i,
            "item_id": split.ids[i],
            "label": int(split.labels[i]),
            "path": split.location(i),
            "readable": False,
            "width": -1,
            "height": -1,
            "mode": "",
            "channels": -1,
            "n_frames": 1,
            "file_bytes": -1,
            "sha256": "",
            "phash": "",
            "std": np.nan,
            "entropy": np.nan,
            "reason": "",
            "detail": "",
        }
        for i in range(len(split))
    ]


def describe_split(
    split: Split,
    name: str,
    thumb_size: int,
    max_pixels: int,
    compute_phash: bool = True,
    phash_min_side: int = 0,
    start: int = 0,
    decode_min_side: int | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Metadata rows (COLUMNS, dtypes ``DTYPES``) and (N, s, s, 3) thumbnails of every item of
    ``split``, in this process: in-memory images with array operations, files one by one.
    ``start``: the index of the first item when ``split`` is one chunk of a larger split.
    ``decode_min_side``: JPEG files decoded reduced (shorter side >= it): sha256, pHash,
    std/entropy and thumbnail of the reduced pixels, width/height the full size."""
    thumbs = np.zeros((len(split), thumb_size, thumb_size, 3), dtype=np.uint8)
    rows = _blank_rows(split, name, start)
    if split.images is not None and len(split):
        columns, thumbs = describe_arrays(
            np.asarray(split.images), thumb_size, compute_phash, phash_min_side
        )
        frame = pd.DataFrame(rows, columns=COLUMNS)
        for key, values in columns.items():
            frame[key] = values
        return frame.astype(DTYPES), thumbs
    for i, row in enumerate(rows):
        decoded = decode_item(split, i, max_pixels, decode_min_side)
        row.update(decoded.meta)
        row["reason"], row["detail"] = decoded.reason, decoded.detail
        if decoded.rgb is not None:
            want_phash = compute_phash and min(row["width"], row["height"]) >= phash_min_side
            info, thumbs[i] = describe(decoded.rgb, thumb_size, want_phash)
            row.update(info, readable=True)
    return pd.DataFrame(rows, columns=COLUMNS).astype(DTYPES), thumbs


def list_skipped_files(
    root: str | Path, follow_out_of_root: bool = False
) -> list[tuple[str, str, str]]:
    """Files under root that the folder source does not list: (path, reason, detail), reason
    ``hidden``, ``not_an_image`` or ``outside_root`` (``dinoflow.data.image_folder.walk_folder``)."""
    from dinoflow.data.image_folder import walk_folder

    return [
        (str(p), status, detail)
        for p, status, detail in walk_folder(root, follow_out_of_root)
        if status != "image"
    ]
