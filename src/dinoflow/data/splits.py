"""The train/val/test split every pipeline uses, and per-dataset normalisation statistics.

The images come from the source named by ``data.source`` (``dinoflow.data.sources``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np

from dinoflow.config import DataConfig
from dinoflow.data.cache import cache_folder, cached_paths
from dinoflow.data.sources import Split, carve, get_source

log = logging.getLogger(__name__)


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
    """``split_data`` on these settings, taken as given (not validated as ``params:data`` is:
    scripts and tests pass edge values such as ``val_size=0``)."""
    data = DataConfig.model_construct(
        source=source,
        path=path,
        val_size=val_size,
        test_fraction=test_fraction,
        seed=seed,
        channels=channels,
        allow_download=allow_download,
        train_limit=train_limit,
        test_limit=test_limit,
        follow_symlinks_out_of_root=follow_symlinks_out_of_root,
    )
    return split_data(data)


def split_data(data: DataConfig) -> dict[str, Split]:
    """{"train", "val", "test"}: the source's (full_train, test), then val carved from
    full_train with ``data.seed``; the same for every pipeline (``dinoflow.data.sources``)."""
    source = get_source(data.source)
    full_train, test = source.splits(data)
    val_size = source.val_size(data.val_size, len(full_train))
    train_idx, val_idx = carve(len(full_train), val_size, data.seed)
    train, val = full_train.subset(train_idx), full_train.subset(val_idx)
    if data.train_limit is not None and data.train_limit < len(train):
        train = train.subset(carve(len(train), data.train_limit, data.seed + 2)[1])
    if data.test_limit is not None and data.test_limit < len(test):
        test = test.subset(carve(len(test), data.test_limit, data.seed + 3)[1])
    train.name, val.name, test.name = "train", "val", "test"
    return {"train": train, "val": val, "test": test}


def load_data(data: DataConfig) -> dict[str, Split]:
    """``params:data`` -> the train/val/test splits (every pipeline loads them this way)."""
    splits = split_data(data)
    if data.cache.short_side is not None and get_source(data.source).reads_files:
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
