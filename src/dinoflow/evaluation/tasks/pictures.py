"""PCA pictures of patch features (``dinoflow.evaluation.pictures.pca_feature_maps``), labels or
not: the first test images through the backbone (``pca_features``) and its random-init twin
(``pca_features_random``), and the segmentation task's test scenes (``pca_scenes``), whose larger
inputs give a finer patch grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from dinoflow.config import Strict
from dinoflow.evaluation.features import ImageSource, load_batch
from dinoflow.evaluation.pictures import pca_feature_maps
from dinoflow.evaluation.tasks.context import EvalContext, EvaluationTask, TaskResult
from dinoflow.evaluation.tasks.segmentation import TASK as SEGMENTATION
from dinoflow.evaluation.tasks.segmentation import SegmentationResult


class PictureSettings(Strict):
    """The PCA maps (how many images: ``n_pictures``, shared with the segmentation picture)."""

    pca_foreground_threshold: float | None = None


def picture_images(
    split: ImageSource, n: int, image_size: int | None, crop_ratio: float
) -> np.ndarray:
    """The first n images as uint8 (n, H, W) or (n, H, W, C)."""
    x = load_batch(split, 0, min(n, len(split)), image_size, crop_ratio)  # (n, C, H, W)
    x = x.permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def draw_pca(
    context: EvalContext,
    settings: PictureSettings,
    backbone: nn.Module,
    name: str,
    images: np.ndarray,
    image_size: int | None,
    crop_ratio: float,
    title: str,
) -> Path:
    """``<out_dir>/<name>.png``: the PCA maps of ``backbone`` on ``images``."""
    shared = context.settings
    return pca_feature_maps(
        backbone,
        images,
        shared.mean,
        shared.std,
        context.out_dir / f"{name}.png",
        image_size,
        settings.pca_foreground_threshold,
        title=title,
        crop_ratio=crop_ratio,
    )


def run(context: EvalContext, settings: PictureSettings) -> TaskResult:
    """PCA maps of the backbone and its random-init twin on the first test images, and of the
    backbone on the segmentation scenes when the segmentation task made some."""
    shared, backbone, random = context.settings, context.backbone, context.baselines.random
    size, ratio = shared.image_size, shared.crop_ratio
    images = picture_images(context.splits["test"], shared.n_pictures, size, ratio)
    title = "pretrained backbone"
    files = {
        "pca_features": draw_pca(
            context, settings, backbone, "pca_features", images, size, ratio, title
        )
    }
    seg = context.results.get(SEGMENTATION.name)
    if isinstance(seg, SegmentationResult) and seg.benchmark is not None:
        scenes = seg.benchmark.test_images[: shared.n_pictures]
        # dense scenes: the whole (square) canvas
        files["pca_scenes"] = draw_pca(
            context,
            settings,
            backbone,
            "pca_scenes",
            scenes,
            seg.image_size,
            1.0,
            f"{title}, scenes",
        )
    if random is not None:
        files["pca_features_random"] = draw_pca(
            context,
            settings,
            random,
            "pca_features_random",
            images,
            size,
            ratio,
            "random initialisation",
        )
    return TaskResult(files=files)


TASK = EvaluationTask("pictures", PictureSettings, run)
