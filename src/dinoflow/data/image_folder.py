"""A user's own folder of images: any tree; labels from first-level sub-folders when present.

Links are not followed out of the data root (a linked file from another folder would be kept
under this tree's label, and the real file taken for its duplicate) unless
``data.follow_symlinks_out_of_root`` allows it; what is skipped is warned once and listed in
curation's quarantine. Symlink loops are survived.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from dinoflow.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

log = logging.getLogger(__name__)


def walk_folder(
    root: str | Path, follow_out_of_root: bool = False
) -> Iterator[tuple[Path, str, str]]:
    """Every entry under ``root`` once, sorted: (path, status, detail) with status ``image``,
    ``hidden``, ``not_an_image`` or ``outside_root`` (a link that leads out of ``root``)."""
    root = Path(root)
    real_root = root.resolve()
    seen_dirs: set[tuple[int, int]] = set()

    def outside(path: Path) -> bool:
        return path.is_symlink() and not path.resolve().is_relative_to(real_root)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in seen_dirs:  # a loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        here = Path(dirpath)
        kept = []
        for d in sorted(dirnames):
            if d.startswith("."):
                yield here / d, "hidden", "hidden folder skipped"
            elif outside(here / d) and not follow_out_of_root:
                yield (
                    here / d,
                    "outside_root",
                    f"link to {(here / d).resolve()}, outside {real_root}",
                )
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            p = here / name
            if name.startswith("."):
                yield p, "hidden", "hidden file skipped"
            elif not name.lower().endswith(IMAGE_EXTENSIONS):
                yield p, "not_an_image", f"extension {p.suffix or '(none)'} skipped"
            elif outside(p) and not follow_out_of_root:
                yield p, "outside_root", f"link to {p.resolve()}, outside {real_root}"
            else:
                yield p, "image", ""


def list_image_folder(
    root: str | Path, follow_out_of_root: bool = False
) -> tuple[list[Path], list[str], list[str]]:
    """List images under ``root`` (recursive, hidden entries skipped, see ``walk_folder``).

    Returns (paths, label_names, class_names): label_names[i] is the first-level sub-folder of
    paths[i], or "" for files directly under root. class_names are the sorted sub-folder names
    that hold images (empty when the tree is flat: unlabelled).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a directory")
    paths, outside = [], []
    for path, status, _ in walk_folder(root, follow_out_of_root):
        if status == "image":
            paths.append(path)
        elif status == "outside_root":
            outside.append(path)
    if outside:
        log.warning(
            "%s: %d link(s) out of the data root not followed (e.g. %s); set "
            "data.follow_symlinks_out_of_root=true to include them",
            root,
            len(outside),
            outside[0],
        )
    labels = [
        p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in paths
    ]
    class_names = sorted({label for label in labels if label})
    return paths, labels, class_names
