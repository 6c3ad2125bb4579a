"""The whole evaluation of one backbone, with baselines, as flat metrics and PNG pictures.

``evaluate_backbone`` is the single entry point the evaluation pipeline calls. It runs the tasks
of ``TASKS`` in order (``dinoflow.evaluation.tasks``, one module each, each with its settings):

1. ``label_free``: always, labels or not: feature quality on the test split (RankMe, alignment,
   uniformity, view retrieval) of the backbone and of its random-init twin;
2. ``classification``: with labels (``metric_spec.splits_are_labelled``): features of
   train/val/test extracted once and shared by kNN (docs/method.md section 6, every k) and the
   linear probe (selected on val, test read once), the confusion matrix;
3. ``segmentation``: linear segmentation on composite scenes (labels) or a user's mask folder
   (which needs only its masks);
4. ``pictures``: PCA of patch features (always).

Each task measures its baselines too (``tasks.baselines``): the same architecture at random
initialisation and raw pixels, so each report shows what pretraining added.

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

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from dinoflow.evaluation.features import ImageSource
from dinoflow.evaluation.metric_spec import out_of_range, splits_are_labelled
from dinoflow.evaluation.tasks import classification, label_free, pictures, segmentation
from dinoflow.evaluation.tasks.baselines import BaselineSettings, prepare_baselines
from dinoflow.evaluation.tasks.context import (
    SPLITS,
    EvalContext,
    EvaluationTask,
    SharedSettings,
    TaskResult,
    class_names,
    settings_part,
)
from dinoflow.files import atomic_write_text
from dinoflow.precision import auto_precision

log = logging.getLogger(__name__)

# The evaluation's tasks, in the order they run (pictures draws the segmentation task's scenes).
TASKS: tuple[EvaluationTask, ...] = (
    label_free.TASK,
    classification.TASK,
    segmentation.TASK,
    pictures.TASK,
)


# pydantic lists the last base's fields first: the shared ones, the baselines', each task's
class EvalSettings(*(task.settings for task in reversed(TASKS)), BaselineSettings, SharedSettings):
    """Every knob of the evaluation, validated (a bad value or an unknown key is one error naming
    it, before any work): the shared ones, the baselines' and each task's settings, as the flat
    keys of ``evaluation`` in conf/*/parameters_evaluation.yml. Defaults fit the CPU budget of
    conf/base (see the README)."""


def evaluate_backbone(
    backbone: nn.Module,
    splits: Mapping[str, ImageSource],
    cfg: EvalSettings,
    random_backbone_factory: Callable[[], nn.Module] | None = None,
    tasks: Sequence[EvaluationTask] = TASKS,
) -> tuple[dict[str, float], dict[str, Path]]:
    """Evaluate a frozen backbone and its baselines.

    backbone: forward_patches(x) -> (B, N, D), get_intermediate_layers(x, n), attributes patch_size
    and embed_dim (evaluation.precision auto: the rule for its shapes; the choice is in the details).
    splits: {"train", "val", "test"}: each with len, load(i) -> uint8 (C, H, W), labels (-1 =
    unlabelled); in-memory ``images`` arrays are used directly when present.
    random_backbone_factory: builds the random-init twin (``tasks.baselines.random_init_like``).
    tasks: the tasks to run, in order (default ``TASKS``: all of them), each with its settings
    taken from ``cfg``.

    Returns (metrics: flat {name: float}, files: {name: Path} of the PNG pictures and the
    "details" JSON).
    """
    for name in SPLITS:
        if name not in splits:
            raise ValueError(f"evaluation: split {name!r} missing (got {sorted(splits)})")
    precision, why = evaluation_precision(cfg, backbone)
    cfg = cfg.model_copy(update={"precision": precision})
    log.info("evaluation: precision %s (%s)", precision, why)
    context = make_context(backbone, splits, cfg, random_backbone_factory)
    details: dict[str, Any] = {
        "settings": _jsonable(cfg.model_dump()),
        "timings_s": context.timings,
        "precision": {"precision": precision, "why": why},
        "labelled": context.labelled,
        **context.baselines.details(),
    }
    results = []
    for task in tasks:
        results.append(task.run(context, task.settings_from(cfg)))
        context.results[task.name] = results[-1]
    return write_report(context.out_dir, results, details)


def make_context(
    backbone: nn.Module,
    splits: Mapping[str, ImageSource],
    cfg: EvalSettings,
    random_backbone_factory: Callable[[], nn.Module] | None = None,
) -> EvalContext:
    """What the tasks share: labels or not, class names, the baselines, the output folder."""
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    labelled = splits_are_labelled(splits)
    if not labelled:
        log.warning(
            "evaluation: no labels (every train/val/test item needs one, and 2 classes): "
            "label-free metrics only, no kNN, linear probe or segmentation on scenes"
        )
    baselines = prepare_baselines(backbone, splits, cfg, cfg.seed, random_backbone_factory)
    return EvalContext(
        backbone=backbone,
        splits=splits,
        settings=settings_part(SharedSettings, cfg),
        baselines=baselines,
        labelled=labelled,
        class_names=class_names(splits) if labelled else [],
    )


def write_report(
    out_dir: Path, results: Iterable[TaskResult], details: dict[str, Any]
) -> tuple[dict[str, float], dict[str, Path]]:
    """The tasks' metrics, checked to be in their ranges, and files; their details with the
    metrics in ``<out_dir>/evaluation_details.json``. Returns (metrics, files)."""
    metrics: dict[str, float] = {}
    files: dict[str, Path] = {}
    for result in results:
        metrics.update(result.metrics)
        files.update(result.files)
        details.update(result.details)
    bad = out_of_range(metrics)
    if bad:
        raise RuntimeError(f"evaluation: metrics outside their range: {bad}")
    details["metrics"] = metrics
    files["details"] = out_dir / "evaluation_details.json"
    atomic_write_text(files["details"], json.dumps(details, indent=2, sort_keys=True))
    log.info("evaluation: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return metrics, files


def evaluation_precision(cfg: SharedSettings, backbone: nn.Module) -> tuple[str, str]:
    """(precision, why) of the backbone's forward: ``evaluation.precision``, or for auto the
    rule of ``train.precision`` for one MLP layer of a feature batch's shapes."""
    if cfg.precision != "auto":
        return cfg.precision, f"evaluation.precision={cfg.precision}"
    dim, patch = int(backbone.embed_dim), int(backbone.patch_size)
    tokens = (cfg.image_size // patch) ** 2 + 1 if cfg.image_size else 197  # None: 224 px at 16
    return auto_precision(cfg.device, min(4096, cfg.batch_size * tokens), dim, 4 * dim)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
