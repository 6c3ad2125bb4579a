"""Which metrics.json keys exist for which data, their ranges and which way is better.

Label-free keys (``rankme``, ``alignment``, ``uniformity``, ``view_retrieval_top1``) exist for every
data set; the classification and segmentation keys (``knn_*``, ``linear_*``, ``seg_*``) only when the
data is *labelled*: every train, val and test item has a label and there are at least 2 classes.
A flat folder, or a folder whose images all sit in ONE sub-folder, is unlabelled: one class
cannot be classified.

``data_is_labelled`` answers from the configuration and a listing of the folder (no image is
decoded), so a pipeline can refuse a metric that cannot exist before any work starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from dinoflow.evaluation.labelfree import LABEL_FREE_KEYS

# Keys compared the other way round: smaller is better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"alignment", "uniformity"})
# Prefixes of the same metric measured on another network (random init, raw pixels, a teacher).
BASELINE_PREFIXES: tuple[str, ...] = ("baseline_random_", "baseline_pixels_", "teacher_")
# Labelled keys: kNN (every k, top-1/top-5), linear probe (test, val), segmentation.
_LABELLED = re.compile(
    r"knn_top[15](_k\d+)?|linear_top1|linear_val_top1|seg_miou|seg_pixel_accuracy|seg_iou_\w+"
)
# Closed ranges of the label-free keys (for normalised embeddings); labelled keys are in [0, 1].
RANGES: dict[str, tuple[float, float]] = {
    "rankme": (1.0, float("inf")),
    "alignment": (0.0, 4.0),
    "uniformity": (-4.0, 0.0),
    "view_retrieval_top1": (0.0, 1.0),
}


def base_name(key: str) -> str:
    """The metric a key measures, without a baseline/teacher prefix."""
    for prefix in BASELINE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def is_known_metric(key: str) -> bool:
    """A key the evaluation can write (with or without a baseline prefix)."""
    name = base_name(key)
    return name in LABEL_FREE_KEYS or _LABELLED.fullmatch(name) is not None


def needs_labels(key: str) -> bool:
    return _LABELLED.fullmatch(base_name(key)) is not None


def direction(key: str) -> Literal["higher", "lower"]:
    """Which way is better for ``key``: "lower" for alignment and uniformity, else "higher"."""
    return "lower" if base_name(key) in LOWER_IS_BETTER else "higher"


def metric_range(key: str) -> tuple[float, float]:
    return RANGES.get(base_name(key), (0.0, 1.0))


def out_of_range(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics outside their range (NaN included): a bug, never a result."""
    bad = {}
    for key, value in metrics.items():
        lo, hi = metric_range(key)
        if not lo - 1e-9 <= value <= hi + 1e-9:
            bad[key] = value
    return bad


def labels_are_usable(labels: np.ndarray) -> bool:
    """Every item labelled (>= 0) and at least 2 distinct classes."""
    labels = np.asarray(labels)
    return bool(len(labels)) and bool((labels >= 0).all()) and len(np.unique(labels)) >= 2


def splits_are_labelled(splits: Mapping[str, Any]) -> bool:
    """The loaded {"train", "val", "test"} splits: each fully labelled, >= 2 classes over them all."""
    parts = [np.asarray(splits[name].labels) for name in ("train", "val", "test")]
    if any(len(p) == 0 or (p < 0).any() for p in parts):
        return False
    return labels_are_usable(np.concatenate(parts))


def data_is_labelled(data: Any) -> bool:
    """Whether ``data`` (a ``dinoflow.config.DataConfig``) is labelled, without decoding an image.

    The source's own answer (``ImageSource.is_labelled``): Fashion-MNIST always (10 classes);
    an image folder when every image sits under a first-level sub-folder (its label) and at
    least 2 sub-folders hold images. A folder is only listed.
    """
    from dinoflow.data.sources import get_source

    return get_source(data.source).is_labelled(data)
