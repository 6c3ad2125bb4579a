"""``data.source: fashion_mnist``: the official 60k/10k train/test, held in memory.

The IDX files are found (or downloaded) by ``dinoflow.data.fashion_mnist``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinoflow.config import DataConfig
from dinoflow.data import fashion_mnist
from dinoflow.data.sources.base import Split


class FashionMNISTSource:
    """Fashion-MNIST: ``data.path`` overrides the local lookup folder of the IDX files."""

    name = "fashion_mnist"
    reads_files = False
    needs_path = False

    def splits(self, data: DataConfig) -> tuple[Split, Split]:
        """(train, test): the official 60k/10k, ids ``train/000123`` and ``test/000123``."""
        local = Path(data.path) if data.path else fashion_mnist.DEFAULT_LOCAL_DIR
        arrays = fashion_mnist.load_fashion_mnist(
            fashion_mnist.find_fashion_mnist(local_dir=local, allow_download=data.allow_download)
        )
        return (
            _split(arrays["train_images"], arrays["train_labels"], "train"),
            _split(arrays["test_images"], arrays["test_labels"], "test"),
        )

    def val_size(self, requested: int | float, n_train: int) -> int | float:
        """A count is carved as it is (the default 5000 of 60000), a fraction as a fraction."""
        del n_train
        return requested

    def files(self, data: DataConfig) -> list[Path]:
        del data
        return []

    def is_labelled(self, data: DataConfig) -> bool:
        """Always: 10 classes."""
        del data
        return True


def _split(images: np.ndarray, labels: np.ndarray, name: str) -> Split:
    return Split(
        ids=[f"{name}/{i:06d}" for i in range(len(labels))],
        labels=labels.astype(np.int64),
        class_names=fashion_mnist.CLASS_NAMES,
        channels=1,
        images=images,
        name=name,
    )


FASHION_MNIST = FashionMNISTSource()
