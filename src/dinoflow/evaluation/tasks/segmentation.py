"""Linear segmentation (``dinoflow.evaluation.segmentation``) on composite scenes of the labelled
images (``dinoflow.evaluation.scenes``), or on a user's mask folder (which needs only its masks).

Metrics: seg_miou, seg_pixel_accuracy, seg_iou_<class> (classes present in the test masks),
baseline_random_seg_miou. Details: every class's IoU (``seg_per_class_iou``). Files: the
predictions picture (``segmentation``)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import model_validator
from torch import nn

from dinoflow.config import Strict
from dinoflow.evaluation.features import ImageSource
from dinoflow.evaluation.pictures import segmentation_figure
from dinoflow.evaluation.scenes import IGNORE_INDEX, load_mask_folder, make_scenes
from dinoflow.evaluation.segmentation import train_linear_segmentation
from dinoflow.evaluation.tasks.context import (
    AtLeastOne,
    EvalContext,
    EvaluationTask,
    Positive,
    TaskResult,
)

log = logging.getLogger(__name__)


class SegmentationSettings(Strict):
    """Where the scenes come from, their making, the linear head's training."""

    seg_enabled: bool = True
    seg_source: Literal["scenes", "folder"] = "scenes"
    seg_folder: str | None = None  # source "folder": <seg_folder>/{train,test}/{images,masks}/
    seg_train_scenes: AtLeastOne = 1000
    seg_test_scenes: AtLeastOne = 250
    seg_canvas: AtLeastOne = 56
    seg_objects_per_scene: tuple[int, int] = (2, 4)
    seg_scale_range: tuple[float, float] = (0.6, 1.2)
    seg_threshold: int = 32
    seg_epochs: AtLeastOne = 10
    seg_lr: Positive = 1e-3
    seg_batch_size: AtLeastOne = 64
    # patch-token extraction on the (larger) scenes
    seg_feature_batch_size: AtLeastOne = 64
    seg_image_size: int | None = None  # None: the canvas (or mask-folder image) size

    @model_validator(mode="after")
    def _check_segmentation(self) -> SegmentationSettings:
        if self.seg_source == "folder" and self.seg_enabled and not self.seg_folder:
            raise ValueError("evaluation.seg_folder: required when seg_source=folder")
        return self


class SegmentationBenchmark(NamedTuple):
    """Train and test images (N, H, W[, C]) uint8 with masks (N, H, W), and the mask classes."""

    train_images: np.ndarray
    train_masks: np.ndarray
    test_images: np.ndarray
    test_masks: np.ndarray
    class_names: list[str]


@dataclass
class SegmentationResult(TaskResult):
    """The task's result, with the benchmark it measured on (None: none could be made) and the
    scenes' input size (``seg_image_size``), for pictures of the same scenes."""

    benchmark: SegmentationBenchmark | None = None
    image_size: int | None = None


def segmentation_benchmark(
    splits: Mapping[str, ImageSource],
    settings: SegmentationSettings,
    class_names: list[str],
    seed: int = 0,
) -> SegmentationBenchmark | None:
    """The mask folder's images, or scenes of the train images (``seed``) and of the test images
    (``seed + 1``); None when the data cannot make scenes (they need in-memory grayscale
    images)."""
    if settings.seg_source == "folder":
        return _folder_benchmark(Path(settings.seg_folder), settings.seg_image_size)
    train, test = splits["train"], splits["test"]
    for split in (train, test):
        images = getattr(split, "images", None)
        if not (isinstance(images, np.ndarray) and images.ndim == 3):
            log.warning(
                "evaluation: segmentation skipped: composite scenes need in-memory grayscale images "
                "(Fashion-MNIST); for your own data set seg_source=folder and seg_folder"
            )
            return None
    common = dict(
        canvas=settings.seg_canvas,
        objects_per_scene=tuple(settings.seg_objects_per_scene),
        scale_range=tuple(settings.seg_scale_range),
        threshold=settings.seg_threshold,
    )
    # train scenes from train images, test scenes from test images, different seeds
    tr_x, tr_y = make_scenes(
        train.images, train.labels, settings.seg_train_scenes, seed=seed, **common
    )
    te_x, te_y = make_scenes(
        test.images, test.labels, settings.seg_test_scenes, seed=seed + 1, **common
    )
    return SegmentationBenchmark(tr_x, tr_y, te_x, te_y, ["background", *class_names])


def _folder_benchmark(root: Path, size: int | None) -> SegmentationBenchmark:
    tr_x, tr_y = load_mask_folder(root / "train", size=size)
    te_x, te_y = load_mask_folder(root / "test", size=size)
    top = max(int(y[y != IGNORE_INDEX].max(initial=0)) for y in (tr_y, te_y)) + 1
    return SegmentationBenchmark(tr_x, tr_y, te_x, te_y, [str(c) for c in range(top)])


def segment(
    context: EvalContext,
    settings: SegmentationSettings,
    backbone: nn.Module,
    bench: SegmentationBenchmark,
) -> dict[str, Any]:
    """``train_linear_segmentation``'s answer for ``backbone`` on the benchmark."""
    shared = context.settings
    return train_linear_segmentation(
        backbone,
        bench.train_images,
        bench.train_masks,
        bench.test_images,
        bench.test_masks,
        shared.mean,
        shared.std,
        len(bench.class_names),
        epochs=settings.seg_epochs,
        lr=settings.seg_lr,
        batch_size=settings.seg_batch_size,
        image_size=settings.seg_image_size,
        n_examples=shared.n_pictures,
        seed=shared.seed,
        feature_batch_size=settings.seg_feature_batch_size,
        device=shared.device,
        progress=shared.progress,
        precision=shared.precision,
    )


def metric_name(text: str) -> str:
    """A class name as a metric key part: lower case, runs of other characters as one ``_``."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower()


def run(context: EvalContext, settings: SegmentationSettings) -> SegmentationResult:
    """Linear segmentation of the backbone and of its random-init twin; nothing when disabled,
    without labels (scenes) or when no benchmark can be made."""
    if not settings.seg_enabled or not (context.labelled or settings.seg_source == "folder"):
        return SegmentationResult()
    with context.timer("seg_benchmark"):
        bench = segmentation_benchmark(
            context.splits, settings, context.class_names, seed=context.settings.seed
        )
    if bench is None:
        return SegmentationResult()
    result = SegmentationResult(benchmark=bench, image_size=settings.seg_image_size)
    with context.timer("segmentation"):
        seg = segment(context, settings, context.backbone, bench)
    names, per_class = bench.class_names, seg["per_class_iou"]
    result.metrics["seg_miou"] = seg["seg_miou"]
    result.metrics["seg_pixel_accuracy"] = seg["pixel_accuracy"]
    for name, iou in zip(names, per_class, strict=True):
        if not math.isnan(iou):
            result.metrics[f"seg_iou_{metric_name(name)}"] = float(iou)
    result.details["seg_per_class_iou"] = {
        name: None if math.isnan(iou) else float(iou)
        for name, iou in zip(names, per_class, strict=True)
    }
    ex = seg["examples"]
    result.files["segmentation"] = segmentation_figure(
        ex["images"],
        ex["masks"],
        ex["predictions"],
        context.out_dir / "segmentation.png",
        len(names),
        title=f"linear segmentation (mIoU {seg['seg_miou']:.3f})",
    )
    if context.baselines.random is not None:
        with context.timer("baseline_random_segmentation"):
            random_seg = segment(context, settings, context.baselines.random, bench)
        result.metrics["baseline_random_seg_miou"] = random_seg["seg_miou"]
    return result


TASK = EvaluationTask("segmentation", SegmentationSettings, run)
