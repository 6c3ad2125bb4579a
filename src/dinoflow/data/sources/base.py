"""What an image source is: the ``ImageSource`` protocol and the ``Split`` it gives.

A source turns ``params:data`` into (full_train, test); ``dinoflow.data.splits`` carves val out
of full_train the same way for every source. The registry (``dinoflow.data.sources``) looks a
source up by its ``data.source`` name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dinoflow.config import DataConfig
from dinoflow.data.decode import decode_image
from dinoflow.errors import DataError


class Members(Protocol):
    """Image files that are not paths: the members of tar shards (``dinoflow.data.shards``)."""

    def __len__(self) -> int: ...

    def read(self, i: int) -> bytes:
        """The encoded file of item i; a ``DataError`` naming it when it cannot be read."""
        ...

    def name(self, i: int) -> str:
        """Item i's file, named in errors and tables (``<shard>#<member>``)."""
        ...

    def identity(self, i: int) -> str:
        """What item i's bytes are, cheaply (where it lies and its size, the container's size and
        time where known): equal identities, equal bytes (curation's resumable chunks)."""
        ...

    def subset(self, indices: np.ndarray) -> Members: ...


@dataclass
class Split:
    """One split of a source: in-memory uint8 images (Fashion-MNIST), image paths (folders) or
    ``members`` (encoded files read by index: tar shards).

    ids: stable item ids ("train/000123", the path relative to the folder root, or
    "<shard file name>/<key>").
    labels: int64 (N,), -1 where unlabelled. channels: 1 (grayscale) or 3 (RGB) for load().
    short_side, cached (files, ``data.cache``): images read with their shorter side at
    ``short_side`` px, from ``cached[i]`` (the image cache's copy) where there is one.
    """

    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    channels: int
    images: np.ndarray | None = None
    paths: list[Path] | None = None
    name: str = ""
    extra: dict = field(default_factory=dict)
    short_side: int | None = None
    cached: list[Path | None] | None = None
    members: Members | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> torch.Tensor:
        """Image i as a uint8 tensor (C, H, W)."""
        if self.images is not None:
            # a copy: the array may be a read-only view (numpy >= 2 warns, torch would alias it)
            img = torch.from_numpy(np.array(self.images[i], copy=True))
            return img.unsqueeze(0) if img.ndim == 2 else img.permute(2, 0, 1)
        if self.cached is not None and self.cached[i] is not None:
            # a cached copy gone or damaged since the split was listed: the original below
            with contextlib.suppress(DataError):
                return decode_image(self.cached[i], self.channels)
        if self.members is not None:
            return decode_image(
                self.members.read(i),
                self.channels,
                short_side=self.short_side,
                name=self.members.name(i),
            )
        return decode_image(self.paths[i], self.channels, short_side=self.short_side)

    def file(self, i: int) -> Path | bytes:
        """Item i's encoded file for the decoder: its path, or its bytes (a ``DataError`` when a
        shard cannot give them). Not for in-memory images."""
        if self.members is not None:
            return self.members.read(i)
        return self.paths[i]

    def location(self, i: int) -> str:
        """Where item i's file is: its path, ``<shard>#<member>``, or "" (in memory)."""
        if self.members is not None:
            return self.members.name(i)
        return "" if self.paths is None else str(self.paths[i])

    def subset(self, indices: np.ndarray | list[int]) -> Split:
        """A new split holding the given rows, in the given order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Split(
            ids=[self.ids[i] for i in indices],
            labels=self.labels[indices],
            class_names=self.class_names,
            channels=self.channels,
            images=None if self.images is None else self.images[indices],
            paths=None if self.paths is None else [self.paths[i] for i in indices],
            name=self.name,
            short_side=self.short_side,
            cached=None if self.cached is None else [self.cached[i] for i in indices],
            members=None if self.members is None else self.members.subset(indices),
        )

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def carve(n: int, size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into (rest, carved) with a fixed seed; size is a count or a fraction."""
    count = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
    if not 0 <= count < n:
        raise DataError(
            f"cannot carve {count} items out of {n} (data.val_size / data.test_fraction)"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[count:]), np.sort(order[:count])


def carve_test(everything: Split, data: DataConfig) -> tuple[Split, Split]:
    """(full_train, test) of a source that has no test split of its own: test is
    ``data.test_fraction`` of ``everything``, carved with seed + 1."""
    rest, test_idx = carve(len(everything), float(data.test_fraction), data.seed + 1)
    full_train, test = everything.subset(rest), everything.subset(test_idx)
    test.name = "test"
    return full_train, test


class ImageSource(Protocol):
    """An image source, registered in ``dinoflow.data.sources.SOURCES`` under ``name``."""

    name: str  # the value of ``data.source``
    # the images are files under ``data.path``: the image cache (``data.cache``) and the
    # quarantine of unreadable files apply to them. False: held in memory or in tar shards
    reads_files: bool
    # ``data.path`` must be set (``dinoflow.config.SOURCE_NEEDS_PATH`` holds the same answer)
    needs_path: bool

    def splits(self, data: DataConfig) -> tuple[Split, Split]:
        """(full_train, test): val is carved out of full_train afterwards, for every source."""
        ...

    def val_size(self, requested: int | float, n_train: int) -> int | float:
        """The ``data.val_size`` to carve out of a full_train of ``n_train`` items."""
        ...

    def files(self, data: DataConfig) -> list[Path]:
        """Every image file of every split, listed (not decoded); [] for in-memory images."""
        ...

    def is_labelled(self, data: DataConfig) -> bool:
        """Whether every image has a label and there are >= 2 classes, decoding nothing."""
        ...
