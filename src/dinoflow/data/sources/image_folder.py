"""``data.source: image_folder``: any tree of images under ``data.path``, read from disk.

Labels are the first-level sub-folders when there are some (``dinoflow.data.image_folder``
lists the tree); test is ``data.test_fraction`` of the images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinoflow.config import DataConfig
from dinoflow.data.image_folder import list_image_folder
from dinoflow.data.sources.base import Split, carve_test
from dinoflow.errors import DataError


class ImageFolderSource:
    """A folder of image files: the image cache and the unreadable-file quarantine apply."""

    name = "image_folder"
    reads_files = True
    needs_path = True

    def splits(self, data: DataConfig) -> tuple[Split, Split]:
        """(train, test): test is ``data.test_fraction`` of the tree, carved with seed + 1."""
        root = _root(data)
        paths, label_names, class_names = list_image_folder(root, data.follow_symlinks_out_of_root)
        if not paths:
            raise DataError(f"data.path: no images under {root}")
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index.get(name, -1) for name in label_names], dtype=np.int64)
        everything = Split(
            ids=[p.relative_to(root).as_posix() for p in paths],
            labels=labels,
            class_names=class_names,
            channels=data.channels or 3,
            paths=paths,
        )
        return carve_test(everything, data)

    def val_size(self, requested: int | float, n_train: int) -> int | float:
        """A fraction as it is; a count at most a tenth of full_train (small folders)."""
        return requested if isinstance(requested, float) else min(requested, n_train // 10)

    def files(self, data: DataConfig) -> list[Path]:
        paths, _, _ = list_image_folder(_root(data), data.follow_symlinks_out_of_root)
        return paths

    def is_labelled(self, data: DataConfig) -> bool:
        """Every image sits under a first-level sub-folder (its label) and at least 2
        sub-folders hold images. The folder is only listed."""
        paths, label_names, class_names = list_image_folder(
            _root(data), getattr(data, "follow_symlinks_out_of_root", False)
        )
        return bool(paths) and all(label_names) and len(class_names) >= 2


def _root(data: DataConfig) -> Path:
    if not data.path:
        raise DataError("data.path: required when data.source=image_folder")
    return Path(data.path)


IMAGE_FOLDER = ImageFolderSource()
