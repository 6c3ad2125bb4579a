"""A user's own folder of images: any tree; labels from first-level sub-folders when present."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def list_image_folder(root: str | Path) -> tuple[list[Path], list[str], list[str]]:
    """List images under ``root`` (recursive, hidden entries skipped, symlink loops survived).

    Returns (paths, label_names, class_names): label_names[i] is the first-level sub-folder of
    paths[i], or "" for files directly under root. class_names are the sorted sub-folder names
    that hold images (empty when the tree is flat: unlabelled).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: {root} is not a directory")
    paths: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        stat = os.stat(dirpath)
        key = (stat.st_dev, stat.st_ino)
        if key in seen_dirs:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(Path(dirpath) / name)
    labels = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in paths]
    class_names = sorted({label for label in labels if label})
    return paths, labels, class_names
