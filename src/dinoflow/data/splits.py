"""The train/val/test split every pipeline uses, and per-dataset normalisation statistics."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dinoflow.config import DataConfig
from dinoflow.data import fashion_mnist
from dinoflow.data.cache import cache_folder, cached_paths
from dinoflow.data.decode import decode_image
from dinoflow.data.image_folder import list_image_folder
from dinoflow.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """One split of a source: in-memory uint8 images (Fashion-MNIST) or image paths (folders).

    ids: stable item ids ("train/000123" or the path relative to the folder root).
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
        return decode_image(self.paths[i], self.channels, short_side=self.short_side)

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
        )

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def _carve(n: int, size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into (rest, carved) with a fixed seed; size is a count or a fraction."""
    count = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
    if not 0 <= count < n:
        raise DataError(
            f"cannot carve {count} items out of {n} (data.val_size / data.test_fraction)"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[count:]), np.sort(order[:count])


def _fashion_mnist_splits(path: str | None, allow_download: bool) -> tuple[Split, Split]:
    """(train, test): the official 60k/10k; ``path`` overrides the local lookup folder."""
    local = Path(path) if path else fashion_mnist.DEFAULT_LOCAL_DIR
    arrays = fashion_mnist.load_fashion_mnist(
        fashion_mnist.find_fashion_mnist(local_dir=local, allow_download=allow_download)
    )
    names = fashion_mnist.CLASS_NAMES
    full_train = Split(
        ids=[f"train/{i:06d}" for i in range(len(arrays["train_labels"]))],
        labels=arrays["train_labels"].astype(np.int64),
        class_names=names,
        channels=1,
        images=arrays["train_images"],
        name="train",
    )
    test = Split(
        ids=[f"test/{i:06d}" for i in range(len(arrays["test_labels"]))],
        labels=arrays["test_labels"].astype(np.int64),
        class_names=names,
        channels=1,
        images=arrays["test_images"],
        name="test",
    )
    return full_train, test


def _image_folder_splits(
    path: str | None,
    test_fraction: float,
    seed: int,
    channels: int | None,
    follow_symlinks_out_of_root: bool,
) -> tuple[Split, Split]:
    """(train, test) of a tree of images under ``path``: test is ``test_fraction`` of it."""
    if not path:
        raise DataError("data.path: required when data.source=image_folder")
    root = Path(path)
    paths, label_names, class_names = list_image_folder(root, follow_symlinks_out_of_root)
    if not paths:
        raise DataError(f"data.path: no images under {root}")
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index.get(name, -1) for name in label_names], dtype=np.int64)
    everything = Split(
        ids=[p.relative_to(root).as_posix() for p in paths],
        labels=labels,
        class_names=class_names,
        channels=channels or 3,
        paths=paths,
    )
    rest, test_idx = _carve(len(everything), float(test_fraction), seed + 1)
    full_train, test = everything.subset(rest), everything.subset(test_idx)
    test.name = "test"
    return full_train, test


def load_splits(
    source: str = "fashion_mnist",
    path: str | None = None,
    val_size: int | float = 5000,
    test_fraction: float = 0.1,
    seed: int = 0,
    channels: int | None = None,
    allow_download: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
    follow_symlinks_out_of_root: bool = False,
) -> dict[str, Split]:
    """{"train", "val", "test"}: val carved from train with ``seed``; the same for every pipeline.

    fashion_mnist: the official 60k/10k train/test; ``path`` overrides the local lookup folder.
    image_folder: any tree of images under ``path``; test is ``test_fraction`` of it.
    """
    if source == "fashion_mnist":
        full_train, test = _fashion_mnist_splits(path, allow_download)
    elif source == "image_folder":
        full_train, test = _image_folder_splits(
            path, test_fraction, seed, channels, follow_symlinks_out_of_root
        )
    else:
        raise DataError(f"data.source: unknown source {source!r} (fashion_mnist or image_folder)")
    if isinstance(val_size, float) or source == "image_folder":
        val_size = val_size if isinstance(val_size, float) else min(val_size, len(full_train) // 10)
    train_idx, val_idx = _carve(len(full_train), val_size, seed)
    train, val = full_train.subset(train_idx), full_train.subset(val_idx)
    if train_limit is not None and train_limit < len(train):
        train = train.subset(_carve(len(train), train_limit, seed + 2)[1])
    if test_limit is not None and test_limit < len(test):
        test = test.subset(_carve(len(test), test_limit, seed + 3)[1])
    train.name, val.name, test.name = "train", "val", "test"
    return {"train": train, "val": val, "test": test}


def load_data(data: DataConfig) -> dict[str, Split]:
    """``params:data`` -> the train/val/test splits (every pipeline loads them this way)."""
    splits = load_splits(
        source=data.source,
        path=data.path,
        val_size=data.val_size,
        test_fraction=data.test_fraction,
        seed=data.seed,
        channels=data.channels,
        allow_download=data.allow_download,
        train_limit=data.train_limit,
        test_limit=data.test_limit,
        follow_symlinks_out_of_root=data.follow_symlinks_out_of_root,
    )
    if data.source == "image_folder" and data.cache.short_side is not None:
        use_image_cache(splits, data)
    return splits


def use_image_cache(splits: dict[str, Split], data: DataConfig) -> None:
    """``data.cache``: every split reads its images at ``short_side`` px, from the image cache
    where it holds them (the same files, listed as without the cache)."""
    folder = cache_folder(data.cache)
    found = 0
    for split in splits.values():
        split.short_side = data.cache.short_side
        split.cached = cached_paths(split.paths, data.path, folder)
        found += sum(p is not None for p in split.cached)
    total = sum(len(split) for split in splits.values())
    if found < total:
        log.warning(
            "data.cache: %d of %d images are not in the image cache %s (not built, or "
            "changed since: the curation pipeline builds it); those are decoded from the "
            "originals at %d px",
            total - found,
            total,
            folder,
            data.cache.short_side,
        )


def data_identity(ids: Sequence[str]) -> str:
    """16 hex digits of a sha256 over a split's item ids, in order: two numbers are comparable
    ("the same evaluation data") only when their identities are equal."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def channel_stats(
    split: Split, max_images: int = 10000, seed: int = 0
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] over (a sample of) a split: the normalisation."""
    n = len(split)
    idx = np.random.default_rng(seed).permutation(n)[: min(n, max_images)]
    if split.images is not None:
        x = split.images[np.sort(idx)].astype(np.float64) / 255.0
        axes = tuple(range(x.ndim - 1)) if x.ndim == 4 else None
        mean, std = x.mean(axis=axes), x.std(axis=axes)
        return np.atleast_1d(mean).tolist(), np.atleast_1d(std).tolist()
    sums = np.zeros(split.channels)
    sq = np.zeros(split.channels)
    count = 0
    for i in idx:
        x = split.load(int(i)).double().div(255.0).flatten(1).numpy()
        sums += x.sum(1)
        sq += (x**2).sum(1)
        count += x.shape[1]
    mean = sums / count
    return mean.tolist(), np.sqrt(np.maximum(sq / count - mean**2, 1e-12)).tolist()
