"""The whole evaluation of one backbone, with baselines, as flat metrics and PNG pictures.

``evaluate_backbone`` is the single entry point the evaluation pipeline calls:

1. features of train/val/test extracted once (``extract_features``) and shared by kNN and the
   linear probe;
2. kNN (DINOV2.md section 6) for every k, linear probe (selected on val, test read once), linear
   segmentation on composite scenes (or a user's mask folder);
3. the same for baselines: the same architecture at random initialisation and raw pixels, so each
   report shows what pretraining added;
4. pictures: PCA of patch features, confusion matrix, segmentation predictions.

Metric keys (all in [0, 1]):
    knn_top1 (k = knn_primary_k, 20), knn_top5, knn_top1_k{k}, knn_top5_k{k} for k in knn_ks,
    linear_top1 (test), linear_val_top1, seg_miou, seg_pixel_accuracy, seg_iou_<class>,
    baseline_random_{knn_top1, knn_top5, linear_top1, seg_miou},
    baseline_pixels_{knn_top1, knn_top5, linear_top1}.
Everything else (chosen linear candidate, its learning rate, all validation accuracies, timings,
the settings) goes to ``<out_dir>/evaluation_details.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dinoflow.evaluation.features import (
    FeatureSet,
    ImageSource,
    extract_features,
    load_batch,
    raw_pixel_features,
)
from dinoflow.evaluation.knn import knn_classify
from dinoflow.evaluation.linear import linear_probe
from dinoflow.evaluation.pictures import (
    confusion_matrix_figure,
    pca_feature_maps,
    segmentation_figure,
)
from dinoflow.evaluation.scenes import IGNORE_INDEX, load_mask_folder, make_scenes
from dinoflow.evaluation.segmentation import train_linear_segmentation

log = logging.getLogger(__name__)

BASELINES = ("random", "pixels")
SPLITS = ("train", "val", "test")
# The reference grid (linear.DEFAULT_LRS, 1e-5..0.1) is tuned for 12,500 iterations; with a few CPU
# epochs the higher rates win (raw Fashion-MNIST pixels, 10 epochs: best 0.3), so this default
# grid spans 1e-3..1 with 7 values (28 heads with the 4 variants instead of 52).
SHORT_SCHEDULE_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


@dataclass
class EvalSettings:
    """Every knob of the evaluation. Defaults fit the CPU budget of conf/base (see the README)."""

    out_dir: str | Path = "data/08_reporting"
    image_size: int | None = None  # None: the images' own size (must be a multiple of the patch)
    mean: tuple[float, ...] = (0.5,)  # in [0, 1] units, one value or one per channel
    std: tuple[float, ...] = (0.5,)
    batch_size: int = 256  # feature extraction
    n_last_blocks: int = 4
    device: str = "cpu"
    progress: bool = True
    seed: int = 0
    # kNN
    knn_ks: tuple[int, ...] = (10, 20, 100, 200)
    knn_primary_k: int = 20
    knn_temperature: float = 0.07
    knn_test_chunk: int = 256
    knn_train_chunk: int = 65536
    # linear probe
    linear_lrs: tuple[float, ...] = SHORT_SCHEDULE_LRS  # linear.DEFAULT_LRS: the reference
    linear_epochs: int = 10
    linear_batch_size: int = 256
    # linear segmentation
    seg_enabled: bool = True
    seg_source: Literal["scenes", "folder"] = "scenes"
    seg_folder: str | None = None  # source "folder": <seg_folder>/{train,test}/{images,masks}/
    seg_train_scenes: int = 1000
    seg_test_scenes: int = 250
    seg_canvas: int = 56
    seg_objects_per_scene: tuple[int, int] = (2, 4)
    seg_scale_range: tuple[float, float] = (0.6, 1.2)
    seg_threshold: int = 32
    seg_epochs: int = 10
    seg_lr: float = 1e-3
    seg_batch_size: int = 64
    seg_feature_batch_size: int = 64  # patch-token extraction on the (larger) scenes
    seg_image_size: int | None = None  # None: the canvas (or mask-folder image) size
    # baselines
    baselines: tuple[str, ...] = BASELINES
    baseline_max_train: int | None = None  # subsample train for the baselines, to bound time
    # pictures
    n_pictures: int = 8
    pca_foreground_threshold: float | None = None

    def __post_init__(self) -> None:
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(
                f"evaluation.baselines: unknown {sorted(unknown)} (choose from {BASELINES})"
            )
        if self.knn_primary_k not in self.knn_ks:
            raise ValueError(
                f"evaluation.knn_primary_k {self.knn_primary_k} is not in knn_ks {self.knn_ks}"
            )
        if self.seg_source == "folder" and self.seg_enabled and not self.seg_folder:
            raise ValueError("evaluation.seg_folder: required when seg_source=folder")


class _Subset:
    """Rows ``indices`` of an image source, with the same protocol (len, load, labels, images)."""

    def __init__(self, source: ImageSource, indices: np.ndarray) -> None:
        self.source, self.indices = source, indices
        self.labels = np.asarray(source.labels)[indices]
        images = getattr(source, "images", None)
        self.images = images[indices] if isinstance(images, np.ndarray) else None

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> torch.Tensor:
        return self.source.load(int(self.indices[i]))


def random_init_like(
    backbone: nn.Module, seed: int = 0, factory: Callable[[], nn.Module] | None = None
) -> nn.Module:
    """The same architecture at random initialisation.

    ``factory()`` when given; else ``type(backbone)(**backbone.backbone_kwargs())`` (dinoflow's
    DinoVisionTransformer); else a deep copy whose submodules are ``reset_parameters()``-ed
    (parameters held directly by a module without that method keep their values).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if factory is not None:
            return factory()
        if hasattr(backbone, "backbone_kwargs"):
            return type(backbone)(**backbone.backbone_kwargs())
        model = copy.deepcopy(backbone)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return model


def _n_classes(splits: Mapping[str, ImageSource]) -> tuple[int, list[str]]:
    names = list(getattr(splits["train"], "class_names", None) or [])
    top = max(int(np.max(np.asarray(s.labels), initial=-1)) for s in splits.values()) + 1
    if len(names) < top:
        names = names + [str(i) for i in range(len(names), top)]
    return len(names), names


def _labelled(split: ImageSource) -> bool:
    return bool((np.asarray(split.labels) >= 0).any())


def _metric_name(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower()


class _Timer:
    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        log.info("evaluation: %s", self.name)

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = round(time.perf_counter() - self.start, 2)


def _classification(
    feats: Mapping[str, FeatureSet], n_classes: int, cfg: EvalSettings, prefix: str, full: bool
) -> tuple[dict[str, float], dict[str, Any]]:
    """kNN + linear probe metrics on cached features, keys prefixed; ``full``: every k."""
    knn = knn_classify(
        feats["train"].cls_last, feats["train"].labels, feats["test"].cls_last, feats["test"].labels,
        n_classes, cfg.knn_ks, cfg.knn_temperature, cfg.knn_test_chunk, cfg.knn_train_chunk, cfg.device,
    )  # fmt: skip
    k = cfg.knn_primary_k
    metrics = {f"{prefix}knn_top1": knn[f"top1_k{k}"], f"{prefix}knn_top5": knn[f"top5_k{k}"]}
    if full:
        metrics.update({f"{prefix}knn_{name}": value for name, value in knn.items()})
    lin = linear_probe(
        feats["train"], feats["val"], feats["test"], n_classes=n_classes, lrs=cfg.linear_lrs,
        epochs=cfg.linear_epochs, batch_size=cfg.linear_batch_size, seed=cfg.seed, progress=cfg.progress,
    )  # fmt: skip
    metrics[f"{prefix}linear_top1"] = lin["linear_top1"]
    metrics[f"{prefix}linear_val_top1"] = lin["val_top1"]
    return metrics, lin


def segmentation_benchmark(
    splits: Mapping[str, ImageSource], cfg: EvalSettings, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]] | None:
    """(train images, train masks, test images, test masks, segmentation class names), or None
    when the data cannot make one (scenes need in-memory grayscale images)."""
    if cfg.seg_source == "folder":
        root = Path(cfg.seg_folder)
        size = cfg.seg_image_size
        tr_x, tr_y = load_mask_folder(root / "train", size=size)
        te_x, te_y = load_mask_folder(root / "test", size=size)
        top = max(int(y[y != IGNORE_INDEX].max(initial=0)) for y in (tr_y, te_y)) + 1
        return tr_x, tr_y, te_x, te_y, [str(c) for c in range(top)]
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
        canvas=cfg.seg_canvas, objects_per_scene=tuple(cfg.seg_objects_per_scene),
        scale_range=tuple(cfg.seg_scale_range), threshold=cfg.seg_threshold,
    )  # fmt: skip
    # train scenes from train images, test scenes from test images, different seeds
    tr_x, tr_y = make_scenes(
        train.images, train.labels, cfg.seg_train_scenes, seed=cfg.seed, **common
    )
    te_x, te_y = make_scenes(
        test.images, test.labels, cfg.seg_test_scenes, seed=cfg.seed + 1, **common
    )
    return tr_x, tr_y, te_x, te_y, ["background", *class_names]


def _segment(backbone: nn.Module, bench: tuple, cfg: EvalSettings) -> dict[str, Any]:
    tr_x, tr_y, te_x, te_y, names = bench
    return train_linear_segmentation(
        backbone, tr_x, tr_y, te_x, te_y, cfg.mean, cfg.std, len(names), epochs=cfg.seg_epochs,
        lr=cfg.seg_lr, batch_size=cfg.seg_batch_size, image_size=cfg.seg_image_size,
        n_examples=cfg.n_pictures, seed=cfg.seed, feature_batch_size=cfg.seg_feature_batch_size,
        device=cfg.device, progress=cfg.progress,
    )  # fmt: skip


def _picture_images(split: ImageSource, n: int, image_size: int | None) -> np.ndarray:
    """The first n images as uint8 (n, H, W) or (n, H, W, C)."""
    x = load_batch(split, 0, min(n, len(split)), image_size)  # (n, C, H, W)
    x = x.permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def _extract_all(
    backbone: nn.Module, splits: Mapping[str, ImageSource], cfg: EvalSettings, tag: str
) -> dict[str, FeatureSet]:
    return {
        name: extract_features(
            backbone,
            splits[name],
            cfg.image_size,
            cfg.mean,
            cfg.std,
            cfg.batch_size,
            cfg.n_last_blocks,
            cfg.device,
            desc=f"{tag} {name}",
            progress=cfg.progress,
        )  # fmt: skip
        for name in SPLITS
    }


def evaluate_backbone(
    backbone: nn.Module,
    splits: Mapping[str, ImageSource],
    cfg: EvalSettings,
    random_backbone_factory: Callable[[], nn.Module] | None = None,
) -> tuple[dict[str, float], dict[str, Path]]:
    """Evaluate a frozen backbone and its baselines.

    backbone: forward_patches(x) -> (B, N, D), get_intermediate_layers(x, n), attribute patch_size.
    splits: {"train", "val", "test"}: each with len, load(i) -> uint8 (C, H, W), labels (-1 =
    unlabelled); in-memory ``images`` arrays are used directly when present.

    Returns (metrics: flat {name: float}, files: {name: Path} of the PNG pictures and the
    "details" JSON). Classification metrics need labelled splits, segmentation needs a dense
    benchmark; what cannot be computed is left out with a warning.
    """
    for name in SPLITS:
        if name not in splits:
            raise ValueError(f"evaluation: split {name!r} missing (got {sorted(splits)})")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_classes, class_names = _n_classes(splits)
    labelled = all(_labelled(splits[s]) for s in SPLITS)
    if not labelled:
        log.warning("evaluation: kNN and linear probe skipped: train, val and test need labels")
    metrics: dict[str, float] = {}
    files: dict[str, Path] = {}
    timings: dict[str, float] = {}
    details: dict[str, Any] = {"settings": _jsonable(asdict(cfg)), "timings_s": timings}

    # -- the pretrained backbone
    if labelled:
        with _Timer(timings, "features"):
            feats = _extract_all(backbone, splits, cfg, "features")
        with _Timer(timings, "knn_linear"):
            found, lin = _classification(feats, n_classes, cfg, "", full=True)
        metrics.update(found)
        details["linear"] = _linear_details(lin)
        files["confusion_matrix"] = confusion_matrix_figure(
            lin["test_labels"],
            lin["test_predictions"],
            class_names,
            out_dir / "confusion_matrix.png",
        )
        del feats
    bench = None
    if cfg.seg_enabled:
        with _Timer(timings, "seg_benchmark"):
            bench = segmentation_benchmark(splits, cfg, class_names)
    if bench is not None:
        with _Timer(timings, "segmentation"):
            seg = _segment(backbone, bench, cfg)
        metrics["seg_miou"] = seg["seg_miou"]
        metrics["seg_pixel_accuracy"] = seg["pixel_accuracy"]
        for name, iou in zip(bench[4], seg["per_class_iou"], strict=True):
            if not math.isnan(iou):
                metrics[f"seg_iou_{_metric_name(name)}"] = float(iou)
        details["seg_per_class_iou"] = {
            n: _num(v) for n, v in zip(bench[4], seg["per_class_iou"], strict=True)
        }
        ex = seg["examples"]
        files["segmentation"] = segmentation_figure(
            ex["images"], ex["masks"], ex["predictions"], out_dir / "segmentation.png", len(bench[4]),
            title=f"linear segmentation (mIoU {seg['seg_miou']:.3f})",
        )  # fmt: skip
    pictures = _picture_images(splits["test"], cfg.n_pictures, cfg.image_size)
    files["pca_features"] = pca_feature_maps(
        backbone, pictures, cfg.mean, cfg.std, out_dir / "pca_features.png", cfg.image_size,
        cfg.pca_foreground_threshold, title="pretrained backbone",
    )  # fmt: skip
    if bench is not None:  # larger inputs: a finer patch grid, several objects per picture
        files["pca_scenes"] = pca_feature_maps(
            backbone, bench[2][: cfg.n_pictures], cfg.mean, cfg.std, out_dir / "pca_scenes.png",
            cfg.seg_image_size, cfg.pca_foreground_threshold, title="pretrained backbone, scenes",
        )  # fmt: skip

    # -- baselines
    base_splits = dict(splits)
    n_train = len(splits["train"])
    if cfg.baseline_max_train is not None and n_train > cfg.baseline_max_train:
        order = np.random.default_rng(cfg.seed).permutation(n_train)
        base_splits["train"] = _Subset(splits["train"], np.sort(order[: cfg.baseline_max_train]))
    details["baseline_train_size"] = len(base_splits["train"])
    if "random" in cfg.baselines:
        random_backbone = random_init_like(backbone, cfg.seed, random_backbone_factory)
        if labelled:
            with _Timer(timings, "baseline_random"):
                feats = _extract_all(random_backbone, base_splits, cfg, "random init")
                found, lin = _classification(feats, n_classes, cfg, "baseline_random_", full=False)
            metrics.update(found)
            details["baseline_random_linear"] = _linear_details(lin)
            del feats
        if bench is not None:
            with _Timer(timings, "baseline_random_segmentation"):
                random_seg = _segment(random_backbone, bench, cfg)
            metrics["baseline_random_seg_miou"] = random_seg["seg_miou"]
        files["pca_features_random"] = pca_feature_maps(
            random_backbone, pictures, cfg.mean, cfg.std, out_dir / "pca_features_random.png",
            cfg.image_size, cfg.pca_foreground_threshold, title="random initialisation",
        )  # fmt: skip
    if "pixels" in cfg.baselines and labelled:
        with _Timer(timings, "baseline_pixels"):
            feats = {n: raw_pixel_features(base_splits[n], cfg.image_size) for n in SPLITS}
            found, lin = _classification(feats, n_classes, cfg, "baseline_pixels_", full=False)
        metrics.update(found)
        details["baseline_pixels_linear"] = _linear_details(lin)

    bad = {k: v for k, v in metrics.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise RuntimeError(f"evaluation: metrics outside [0, 1]: {bad}")
    details["metrics"] = metrics
    files["details"] = out_dir / "evaluation_details.json"
    files["details"].write_text(json.dumps(details, indent=2, sort_keys=True))
    log.info("evaluation: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return metrics, files


def _num(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _linear_details(lin: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "best": lin["best"], "best_variant": lin["best_variant"], "best_lr": lin["best_lr"],
        "val_top1": lin["val_top1"], "test_top1": lin["linear_top1"],
        "val_accuracies": lin["val_accuracies"],
    }  # fmt: skip


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
