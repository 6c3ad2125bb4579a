"""``data.source: shards``: tar shards in the WebDataset layout (``key.jpg`` members).

``data.path`` is a brace pattern of local paths or fsspec URLs; ``dinoflow.data.shards`` lists
the shards (tar headers only) and reads each image member by a range read. Labels are the class
names the samples carry (``.txt``/``.json``, or ``.cls`` integers); test is
``data.test_fraction`` of the samples, carved as for an image folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinoflow.config import DataConfig
from dinoflow.data.shards import list_shards
from dinoflow.data.sources.base import Split, carve_test


class ShardsSource:
    """Tar shards: the images are members read by index, not files of a folder, so the image
    cache and the quarantine of skipped files do not apply (``reads_files`` False); a member
    that does not decode is an unreadable item as a broken file is (curation, training)."""

    name = "shards"
    reads_files = False
    needs_path = True

    def splits(self, data: DataConfig) -> tuple[Split, Split]:
        """(train, test): the samples in pattern order, test carved with seed + 1."""
        listing = list_shards(data.path)
        index = {name: i for i, name in enumerate(listing.class_names)}
        everything = Split(
            ids=listing.ids,
            labels=np.array([index.get(n, -1) for n in listing.label_names], dtype=np.int64),
            class_names=listing.class_names,
            channels=data.channels or 3,
            members=listing.members,
            short_side=data.cache.short_side,  # no image cache: each member decoded reduced
        )
        return carve_test(everything, data)

    def val_size(self, requested: int | float, n_train: int) -> int | float:
        """As for an image folder: a fraction as it is; a count at most a tenth of full_train."""
        return requested if isinstance(requested, float) else min(requested, n_train // 10)

    def files(self, data: DataConfig) -> list[Path]:
        del data
        return []

    def is_labelled(self, data: DataConfig) -> bool:
        """Every sample carries a label and there are >= 2 classes (the shards are listed)."""
        return list_shards(data.path).labelled


SHARDS = ShardsSource()
