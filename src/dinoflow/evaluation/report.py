"""The whole evaluation of one backbone, with baselines, as flat metrics and PNG pictures.

``evaluate_backbone`` is the single entry point the evaluation pipeline calls:

1. always, labels or not: label-free feature quality on the test split (``labelfree``: RankMe,
   alignment, uniformity, view retrieval) of the backbone and of its random-init twin;
2. with labels (``metric_spec.splits_are_labelled``): features of train/val/test extracted once
   (``extract_features``) and shared by kNN (docs/method.md section 6, every k) and the linear probe
   (selected on val, test read once); linear segmentation on composite scenes (or a user's mask
   folder, which needs only its masks);
3. the same for baselines: the same architecture at random initialisation and raw pixels, so each
   report shows what pretraining added;
4. pictures: PCA of patch features (always), confusion matrix, segmentation predictions.

Metric keys (ranges in ``metric_spec.RANGES``; all others in [0, 1]):
    always: rankme (>= 1), alignment (in [0, 4]), uniformity (in [-4, 0]), view_retrieval_top1,
    and the same four prefixed baseline_random_;
    with labels: knn_top1 (k = knn_primary_k, 20), knn_top5, knn_top1_k{k}, knn_top5_k{k} for k
    in knn_ks, linear_top1 (test), linear_val_top1, seg_miou, seg_pixel_accuracy,
    seg_iou_<class>, baseline_random_{knn_top1, knn_top5, linear_top1, seg_miou},
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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import nn

from dinoflow.data.transforms import DEFAULT_CROP_RATIO
from dinoflow.evaluation.features import (
    FeatureSet,
    ImageSource,
    extract_features,
    load_batch,
    raw_pixel_features,
)
from dinoflow.evaluation.knn import knn_classify
from dinoflow.evaluation.labelfree import ViewSettings, held_out_indices, label_free_metrics
from dinoflow.evaluation.linear import linear_probe
from dinoflow.evaluation.metric_spec import out_of_range, splits_are_labelled
from dinoflow.evaluation.pictures import (
    confusion_matrix_figure,
    pca_feature_maps,
    segmentation_figure,
)
from dinoflow.evaluation.scenes import IGNORE_INDEX, load_mask_folder, make_scenes
from dinoflow.evaluation.segmentation import train_linear_segmentation
from dinoflow.files import atomic_write_text
from dinoflow.precision import auto_precision

log = logging.getLogger(__name__)

BASELINES = ("random", "pixels")
SPLITS = ("train", "val", "test")
# The reference grid (linear.DEFAULT_LRS, 1e-5..0.1) is tuned for 12,500 iterations; with a few CPU
# epochs the higher rates win (raw Fashion-MNIST pixels, 10 epochs: best 0.3), so this default
# grid spans 1e-3..1 with 7 values (28 heads with the 4 variants instead of 52).
SHORT_SCHEDULE_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


@pydantic_dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class EvalSettings:
    """Every knob of the evaluation, validated (a bad value or an unknown key is one error naming
    it, before any work). Defaults fit the CPU budget of conf/base (see the README)."""

    out_dir: str | Path = "data/08_reporting"
    image_size: int | None = None  # None: the images' own size (must be a multiple of the patch)
    # every image: shorter side to round(image_size / crop_ratio), centre image_size crop
    # (dinoflow.data.transforms.resize_center_crop; DINOv2's 224 / 256)
    crop_ratio: Annotated[float, Field(gt=0, le=1)] = DEFAULT_CROP_RATIO
    mean: tuple[float, ...] = (0.5,)  # in [0, 1] units, one value or one per channel
    std: tuple[float, ...] = (0.5,)
    batch_size: Annotated[int, Field(ge=1)] = 256  # feature extraction
    n_last_blocks: Annotated[int, Field(ge=1)] = 4
    device: str = "cpu"
    # the frozen backbone's forward: fp32, or bf16 autocast as DINOv2's evaluations run their
    # feature models (features, heads and probes stay float32); auto: train.precision's rule
    # (dinoflow.precision.auto_precision) for the evaluation's shapes
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    progress: bool = True
    seed: int = 0
    # kNN
    knn_ks: tuple[Annotated[int, Field(ge=1)], ...] = (10, 20, 100, 200)
    knn_primary_k: Annotated[int, Field(ge=1)] = 20
    knn_temperature: Annotated[float, Field(gt=0)] = 0.07
    knn_test_chunk: Annotated[int, Field(ge=1)] = 256
    knn_train_chunk: Annotated[int, Field(ge=1)] = 65536
    # linear probe
    linear_lrs: tuple[Annotated[float, Field(gt=0)], ...] = SHORT_SCHEDULE_LRS  # linear.DEFAULT_LRS: the reference
    linear_epochs: Annotated[int, Field(ge=1)] = 10
    linear_batch_size: Annotated[int, Field(ge=1)] = 256
    # linear segmentation
    seg_enabled: bool = True
    seg_source: Literal["scenes", "folder"] = "scenes"
    seg_folder: str | None = None  # source "folder": <seg_folder>/{train,test}/{images,masks}/
    seg_train_scenes: Annotated[int, Field(ge=1)] = 1000
    seg_test_scenes: Annotated[int, Field(ge=1)] = 250
    seg_canvas: Annotated[int, Field(ge=1)] = 56
    seg_objects_per_scene: tuple[int, int] = (2, 4)
    seg_scale_range: tuple[float, float] = (0.6, 1.2)
    seg_threshold: int = 32
    seg_epochs: Annotated[int, Field(ge=1)] = 10
    seg_lr: Annotated[float, Field(gt=0)] = 1e-3
    seg_batch_size: Annotated[int, Field(ge=1)] = 64
    seg_feature_batch_size: Annotated[int, Field(ge=1)] = 64  # patch-token extraction on the (larger) scenes
    seg_image_size: int | None = None  # None: the canvas (or mask-folder image) size
    # baselines
    baselines: tuple[str, ...] = BASELINES
    baseline_max_train: int | None = None  # subsample train for the baselines, to bound time
    # the random-init baseline alone (its features cost a forward pass per image; pixels' do not)
    baseline_random_max_train: int | None = None
    # pictures
    n_pictures: Annotated[int, Field(ge=0)] = 8
    pca_foreground_threshold: float | None = None
    # label-free metrics (labelfree.py) on at most this many test images (a fixed-seed sample)
    labelfree_max_images: int | None = 2000
    # their two views: DINOv2's global crops 1 and 2 (labelfree.ViewSettings; reference defaults)
    views_scale: tuple[float, float] = ViewSettings.scale
    views_flip_p: float = ViewSettings.flip_p
    views_jitter: tuple[float, float, float, float] = ViewSettings.jitter
    views_jitter_p: float = ViewSettings.jitter_p
    views_grayscale_p: float = ViewSettings.grayscale_p
    views_blur_kernel: int = ViewSettings.blur_kernel
    views_blur_sigma: tuple[float, float] = ViewSettings.blur_sigma
    views_blur_p: tuple[float, float] = ViewSettings.blur_p
    views_solarize_p: float = ViewSettings.solarize_p

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
        if self.labelfree_max_images is not None and self.labelfree_max_images < 2:
            raise ValueError(
                f"evaluation.labelfree_max_images: must be >= 2 (or null: the whole test split), "
                f"got {self.labelfree_max_images}"
            )
        try:
            self.view_settings().augmentation(max(self.views_blur_kernel, 8), self.mean, self.std)
        except ValueError as exc:
            raise ValueError(f"evaluation.views_*: {exc}") from None

    def view_settings(self) -> ViewSettings:
        """The two views of the label-free metrics, from the ``views_*`` keys."""
        return ViewSettings(
            scale=tuple(self.views_scale), flip_p=self.views_flip_p,
            jitter=tuple(self.views_jitter), jitter_p=self.views_jitter_p,
            grayscale_p=self.views_grayscale_p, blur_kernel=self.views_blur_kernel,
            blur_sigma=tuple(self.views_blur_sigma), blur_p=tuple(self.views_blur_p),
            solarize_p=self.views_solarize_p,
        )  # fmt: skip


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
        device=cfg.device, progress=cfg.progress, precision=cfg.precision,
    )  # fmt: skip


def _picture_images(
    split: ImageSource, n: int, image_size: int | None, crop_ratio: float
) -> np.ndarray:
    """The first n images as uint8 (n, H, W) or (n, H, W, C)."""
    x = load_batch(split, 0, min(n, len(split)), image_size, crop_ratio)  # (n, C, H, W)
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
            precision=cfg.precision,
            crop_ratio=cfg.crop_ratio,
        )  # fmt: skip
        for name in SPLITS
    }


class _Report:
    """What one evaluation accumulates: flat metrics, picture/details files, timings, details."""

    def __init__(self, cfg: EvalSettings) -> None:
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics: dict[str, float] = {}
        self.files: dict[str, Path] = {}
        self.timings: dict[str, float] = {}
        self.details: dict[str, Any] = {"settings": _jsonable(asdict(cfg)), "timings_s": self.timings}

    def timer(self, name: str) -> _Timer:
        return _Timer(self.timings, name)

    def finish(self) -> tuple[dict[str, float], dict[str, Path]]:
        """Check every metric is in its range, write the details JSON; (metrics, files)."""
        bad = out_of_range(self.metrics)
        if bad:
            raise RuntimeError(f"evaluation: metrics outside their range: {bad}")
        self.details["metrics"] = self.metrics
        self.files["details"] = self.out_dir / "evaluation_details.json"
        atomic_write_text(self.files["details"], json.dumps(self.details, indent=2, sort_keys=True))
        log.info("evaluation: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(self.metrics.items())))
        return self.metrics, self.files


def evaluate_backbone(
    backbone: nn.Module,
    splits: Mapping[str, ImageSource],
    cfg: EvalSettings,
    random_backbone_factory: Callable[[], nn.Module] | None = None,
) -> tuple[dict[str, float], dict[str, Path]]:
    """Evaluate a frozen backbone and its baselines.

    backbone: forward_patches(x) -> (B, N, D), get_intermediate_layers(x, n), attributes patch_size
    and embed_dim (evaluation.precision auto: the rule for its shapes; the choice is in the details).
    splits: {"train", "val", "test"}: each with len, load(i) -> uint8 (C, H, W), labels (-1 =
    unlabelled); in-memory ``images`` arrays are used directly when present.

    Always: the label-free metrics on the test split (``labelfree``) and the PCA pictures. With
    labelled splits (``metric_spec.splits_are_labelled``): kNN, linear probe, confusion matrix and
    segmentation on composite scenes; segmentation from a mask folder needs only its masks.
    Returns (metrics: flat {name: float}, files: {name: Path} of the PNG pictures and the
    "details" JSON).
    """
    for name in SPLITS:
        if name not in splits:
            raise ValueError(f"evaluation: split {name!r} missing (got {sorted(splits)})")
    precision, why = evaluation_precision(cfg, backbone)
    cfg = replace(cfg, precision=precision)
    log.info("evaluation: precision %s (%s)", precision, why)
    report = _Report(cfg)
    report.details["precision"] = {"precision": precision, "why": why}
    labelled = splits_are_labelled(splits)
    report.details["labelled"] = labelled
    if not labelled:
        log.warning("evaluation: no labels (every train/val/test item needs one, and 2 classes): "
                    "label-free metrics only, no kNN, linear probe or segmentation on scenes")
    random_backbone = None
    if "random" in cfg.baselines:
        random_backbone = random_init_like(backbone, cfg.seed, random_backbone_factory)
    _evaluate_label_free(report, backbone, random_backbone, splits["test"], cfg)
    class_names = _n_classes(splits)[1] if labelled else []
    if labelled:
        _evaluate_classification(report, backbone, splits, cfg, class_names)
    bench = None
    if cfg.seg_enabled and (labelled or cfg.seg_source == "folder"):
        with report.timer("seg_benchmark"):
            bench = segmentation_benchmark(splits, cfg, class_names)
    if bench is not None:
        _evaluate_segmentation(report, backbone, bench, cfg)
    pictures = _picture_images(splits["test"], cfg.n_pictures, cfg.image_size, cfg.crop_ratio)
    _draw_pca(report, backbone, "", "pretrained backbone", pictures, bench, cfg)
    _evaluate_baselines(report, random_backbone, splits, bench, pictures, cfg, labelled)
    return report.finish()


def evaluation_precision(cfg: EvalSettings, backbone: nn.Module) -> tuple[str, str]:
    """(precision, why) of the backbone's forward: ``evaluation.precision``, or for auto the
    rule of ``train.precision`` for one MLP layer of a feature batch's shapes."""
    if cfg.precision != "auto":
        return cfg.precision, f"evaluation.precision={cfg.precision}"
    dim, patch = int(backbone.embed_dim), int(backbone.patch_size)
    tokens = (cfg.image_size // patch) ** 2 + 1 if cfg.image_size else 197  # None: 224 px at 16
    return auto_precision(cfg.device, min(4096, cfg.batch_size * tokens), dim, 4 * dim)


def _evaluate_label_free(
    report: _Report,
    backbone: nn.Module,
    random_backbone: nn.Module | None,
    held_out: ImageSource,
    cfg: EvalSettings,
) -> None:
    """rankme, alignment, uniformity, view_retrieval_top1 (and baseline_random_ ones)."""
    backbones = {"": backbone}
    if random_backbone is not None:
        backbones["baseline_random_"] = random_backbone
    size = cfg.image_size or int(held_out.load(0).shape[-1])
    with report.timer("label_free"):
        found = label_free_metrics(
            backbones, held_out, size, cfg.mean, cfg.std, cfg.view_settings(),
            max_images=cfg.labelfree_max_images, seed=cfg.seed, batch_size=cfg.batch_size,
            device=cfg.device, progress=cfg.progress, precision=cfg.precision,
            crop_ratio=cfg.crop_ratio,
        )  # fmt: skip
    for prefix, numbers in found.items():
        report.metrics.update({f"{prefix}{k}": v for k, v in numbers.items()})
    n = len(held_out_indices(len(held_out), cfg.labelfree_max_images, cfg.seed))
    report.details["label_free"] = {"split": "test", "images": n, "image_size": size}


def _evaluate_classification(
    report: _Report,
    backbone: nn.Module,
    splits: Mapping[str, ImageSource],
    cfg: EvalSettings,
    class_names: list[str],
) -> None:
    """kNN (every k) and linear probe of the pretrained backbone, and the confusion matrix."""
    with report.timer("features"):
        feats = _extract_all(backbone, splits, cfg, "features")
    with report.timer("knn_linear"):
        found, lin = _classification(feats, len(class_names), cfg, "", full=True)
    report.metrics.update(found)
    report.details["linear"] = _linear_details(lin)
    report.files["confusion_matrix"] = confusion_matrix_figure(
        lin["test_labels"], lin["test_predictions"], class_names,
        report.out_dir / "confusion_matrix.png",
    )  # fmt: skip


def _evaluate_segmentation(
    report: _Report, backbone: nn.Module, bench: tuple, cfg: EvalSettings
) -> None:
    """Linear segmentation of the pretrained backbone: mIoU, pixel accuracy, per-class IoU, figure."""
    names = bench[4]
    with report.timer("segmentation"):
        seg = _segment(backbone, bench, cfg)
    report.metrics["seg_miou"] = seg["seg_miou"]
    report.metrics["seg_pixel_accuracy"] = seg["pixel_accuracy"]
    for name, iou in zip(names, seg["per_class_iou"], strict=True):
        if not math.isnan(iou):
            report.metrics[f"seg_iou_{_metric_name(name)}"] = float(iou)
    report.details["seg_per_class_iou"] = {
        n: _num(v) for n, v in zip(names, seg["per_class_iou"], strict=True)
    }
    ex = seg["examples"]
    report.files["segmentation"] = segmentation_figure(
        ex["images"], ex["masks"], ex["predictions"], report.out_dir / "segmentation.png",
        len(names), title=f"linear segmentation (mIoU {seg['seg_miou']:.3f})",
    )  # fmt: skip


def _draw_pca(
    report: _Report,
    backbone: nn.Module,
    suffix: str,
    title: str,
    pictures: np.ndarray,
    bench: tuple | None,
    cfg: EvalSettings,
) -> None:
    """PCA maps of the test pictures (pca_features{suffix}.png); for the pretrained backbone
    (no suffix) also of the segmentation scenes, whose larger inputs give a finer patch grid."""
    name = f"pca_features{suffix}"
    report.files[name] = pca_feature_maps(
        backbone, pictures, cfg.mean, cfg.std, report.out_dir / f"{name}.png", cfg.image_size,
        cfg.pca_foreground_threshold, title=title, crop_ratio=cfg.crop_ratio,
    )  # fmt: skip
    if bench is not None and not suffix:
        report.files["pca_scenes"] = pca_feature_maps(
            backbone, bench[2][: cfg.n_pictures], cfg.mean, cfg.std,
            report.out_dir / "pca_scenes.png", cfg.seg_image_size, cfg.pca_foreground_threshold,
            title=f"{title}, scenes", crop_ratio=1.0,  # dense scenes: the whole (square) canvas
        )  # fmt: skip


def _baseline_splits(splits: Mapping[str, ImageSource], cfg: EvalSettings,
                     *caps: int | None) -> dict[str, ImageSource]:
    """The splits with train subsampled (fixed seed) to the smallest of ``caps`` that is set."""
    base_splits = dict(splits)
    n_train = len(splits["train"])
    cap = min((c for c in caps if c is not None), default=None)
    if cap is not None and n_train > cap:
        order = np.random.default_rng(cfg.seed).permutation(n_train)
        base_splits["train"] = _Subset(splits["train"], np.sort(order[:cap]))
    return base_splits


def _evaluate_baselines(
    report: _Report,
    random_backbone: nn.Module | None,
    splits: Mapping[str, ImageSource],
    bench: tuple | None,
    pictures: np.ndarray,
    cfg: EvalSettings,
    labelled: bool,
) -> None:
    """Random init (classification, segmentation, PCA) and raw pixels (classification)."""
    base_splits = _baseline_splits(splits, cfg, cfg.baseline_max_train)
    random_splits = _baseline_splits(splits, cfg, cfg.baseline_max_train, cfg.baseline_random_max_train)
    report.details["baseline_train_size"] = len(base_splits["train"])
    report.details["baseline_random_train_size"] = len(random_splits["train"])
    n_classes = _n_classes(splits)[0] if labelled else 0
    if random_backbone is not None:
        if labelled:
            with report.timer("baseline_random"):
                feats = _extract_all(random_backbone, random_splits, cfg, "random init")
                found, lin = _classification(feats, n_classes, cfg, "baseline_random_", full=False)
            report.metrics.update(found)
            report.details["baseline_random_linear"] = _linear_details(lin)
            del feats
        if bench is not None:
            with report.timer("baseline_random_segmentation"):
                random_seg = _segment(random_backbone, bench, cfg)
            report.metrics["baseline_random_seg_miou"] = random_seg["seg_miou"]
        _draw_pca(report, random_backbone, "_random", "random initialisation", pictures, bench, cfg)
    if "pixels" in cfg.baselines and labelled:
        with report.timer("baseline_pixels"):
            feats = {
                n: raw_pixel_features(base_splits[n], cfg.image_size, crop_ratio=cfg.crop_ratio)
                for n in SPLITS
            }
            found, lin = _classification(feats, n_classes, cfg, "baseline_pixels_", full=False)
        report.metrics.update(found)
        report.details["baseline_pixels_linear"] = _linear_details(lin)


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
