"""A dense benchmark made from real images: composite scenes of labelled objects.

Each scene is a black canvas with a few objects (e.g. Fashion-MNIST images) pasted at random
positions and scales, all drawn from one seed. The pixel label is the class of the object whose
pixel is "on" there (its scaled intensity > ``threshold``), background elsewhere:

    class 0          background
    class c + 1      an object of source class c (Fashion-MNIST: 1..10)

Later objects occlude earlier ones where their pixels are on. Off pixels of an object (its dark
surroundings) do not occlude; its faint pixels (0 < value <= threshold) only show over background,
so every pixel above the threshold belongs to the object its mask names.

``load_mask_folder`` reads a user's own dense benchmark instead: ``images/`` and ``masks/`` with
the same file stems, masks as PNG class indices (255 = ignore).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKGROUND = 0
IGNORE_INDEX = 255


@dataclass(frozen=True)
class PlacedObject:
    """One pasted object: source row, its class in the mask, top-left corner, pasted size."""

    source_index: int
    mask_class: int
    top: int
    left: int
    size: int


@dataclass
class Scenes:
    """images uint8 (S, H, W), masks int64 (S, H, W), layout[s] = the objects of scene s in paint order."""

    images: np.ndarray
    masks: np.ndarray
    layout: list[list[PlacedObject]]


def resize_object(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w) -> uint8 (size, size), bilinear (PIL, deterministic)."""
    from PIL import Image

    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def generate_scenes(
    images: np.ndarray,
    labels: np.ndarray,
    n_scenes: int,
    canvas: int = 56,
    objects_per_scene: tuple[int, int] = (2, 4),
    scale_range: tuple[float, float] = (0.6, 1.2),
    seed: int = 0,
    threshold: int = 32,
) -> Scenes:
    """Compose ``n_scenes`` scenes from grayscale ``images`` (N, h, w) uint8 with ``labels`` (N,).

    Each scene gets between objects_per_scene[0] and [1] objects (inclusive); an object is a random
    source image (labelled rows only) resized to round(h * scale), scale ~ U(scale_range), clipped
    to the canvas, at a uniformly random position where it fits. Everything follows from ``seed``.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"scenes: need grayscale uint8 images (N, h, w), got {images.dtype} {images.shape}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    pool = np.flatnonzero(labels >= 0)
    if len(pool) == 0:
        raise ValueError("scenes: no labelled source images")
    lo, hi = objects_per_scene
    if not 1 <= lo <= hi:
        raise ValueError(
            f"scenes: objects_per_scene must satisfy 1 <= low <= high, got {objects_per_scene}"
        )
    rng = np.random.default_rng(seed)
    out_images = np.zeros((n_scenes, canvas, canvas), dtype=np.uint8)
    out_masks = np.full((n_scenes, canvas, canvas), BACKGROUND, dtype=np.int64)
    layout: list[list[PlacedObject]] = []
    base = images.shape[1]
    for s in range(n_scenes):
        placed = []
        img, mask = out_images[s], out_masks[s]
        for _ in range(int(rng.integers(lo, hi + 1))):
            src = int(pool[rng.integers(len(pool))])
            size = int(np.clip(round(base * rng.uniform(*scale_range)), 2, canvas))
            top = int(rng.integers(0, canvas - size + 1))
            left = int(rng.integers(0, canvas - size + 1))
            obj = resize_object(images[src], size)
            region_img = img[top : top + size, left : left + size]
            region_mask = mask[top : top + size, left : left + size]
            on = obj > threshold
            faint = (obj > 0) & ~on & (region_mask == BACKGROUND)
            region_img[faint] = np.maximum(region_img[faint], obj[faint])
            region_img[on] = obj[on]
            region_mask[on] = labels[src] + 1
            placed.append(PlacedObject(src, int(labels[src]) + 1, top, left, size))
        layout.append(placed)
    return Scenes(out_images, out_masks, layout)


def make_scenes(
    images: np.ndarray,
    labels: np.ndarray,
    n_scenes: int,
    canvas: int = 56,
    objects_per_scene: tuple[int, int] = (2, 4),
    scale_range: tuple[float, float] = (0.6, 1.2),
    seed: int = 0,
    threshold: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """(scene images uint8 (S, canvas, canvas), masks int64 (S, canvas, canvas)); see generate_scenes.

    Masks: 0 background, label + 1 for objects, so n_classes = n_source_classes + 1.
    """
    scenes = generate_scenes(
        images, labels, n_scenes, canvas, objects_per_scene, scale_range, seed, threshold
    )
    return scenes.images, scenes.masks


def load_mask_folder(
    root: str | Path, size: int | None = None, channels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """A user's dense benchmark: ``root/images/<stem>.<ext>`` with ``root/masks/<stem>.png``.

    Masks hold class indices (palette or grayscale PNG; 255 = ignore). Returns images uint8
    (S, H, W, C) (or (S, H, W) when channels == 1) and masks int64 (S, H, W). All pairs must share
    one size unless ``size`` is given: then images are resized bilinearly and masks by nearest
    neighbour to (size, size).
    """
    from PIL import Image

    from dinoflow.data.image_folder import IMAGE_EXTENSIONS

    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"{root}: a mask folder needs images/ and masks/ sub-folders")
    image_paths = sorted(
        p
        for p in image_dir.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not image_paths:
        raise ValueError(f"{image_dir}: no images")
    out_images, out_masks = [], []
    for path in image_paths:
        mask_path = mask_dir / f"{path.stem}.png"
        if not mask_path.is_file():
            raise FileNotFoundError(f"{path}: no mask {mask_path}")
        try:
            with Image.open(path) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                with Image.open(mask_path) as m:
                    if m.mode not in ("L", "P", "I", "I;16"):
                        raise ValueError(f"mask mode {m.mode} is not a class-index PNG (L, P or I)")
                    if im.size != m.size:
                        raise ValueError(f"image size {im.size} != mask size {m.size}")
                    if size is not None:
                        im = im.resize((size, size), Image.BILINEAR)
                        m = m.resize((size, size), Image.NEAREST)
                    mask = np.asarray(m).astype(np.int64)
                image = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
        out_images.append(image)
        out_masks.append(mask)
    shapes = {m.shape for m in out_masks}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images differ in size {sorted(shapes)[:3]}...; pass a size")
    return np.stack(out_images), np.stack(out_masks)
