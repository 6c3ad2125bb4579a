"""Classification with labels: kNN (docs/method.md section 6, every k) and the linear probe
(selected on val, test read once), both on one feature extraction per split, and the confusion
matrix; for the random-init twin and raw pixels the primary-k kNN and the linear probe.

Metrics: knn_top1 and knn_top5 (k = knn_primary_k), knn_top1_k{k} and knn_top5_k{k} for k in
knn_ks, linear_top1 (test), linear_val_top1; baseline_{random,pixels}_{knn_top1, knn_top5,
linear_top1, linear_val_top1}. Details: the chosen linear candidate of each (``linear``,
``baseline_random_linear``, ``baseline_pixels_linear``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import model_validator
from torch import nn

from dinoflow.config import Strict
from dinoflow.evaluation.features import (
    FeatureSet,
    ImageSource,
    extract_features,
    raw_pixel_features,
)
from dinoflow.evaluation.knn import knn_classify
from dinoflow.evaluation.linear import linear_probe
from dinoflow.evaluation.pictures import confusion_matrix_figure
from dinoflow.evaluation.tasks.context import (
    SPLITS,
    AtLeastOne,
    EvalContext,
    EvaluationTask,
    Positive,
    TaskResult,
)

# The reference grid (linear.DEFAULT_LRS, 1e-5..0.1) is tuned for 12,500 iterations; with a few CPU
# epochs the higher rates win (raw Fashion-MNIST pixels, 10 epochs: best 0.3), so this default
# grid spans 1e-3..1 with 7 values (28 heads with the 4 variants instead of 52).
SHORT_SCHEDULE_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


class ClassificationSettings(Strict):
    """kNN and linear probe."""

    knn_ks: tuple[AtLeastOne, ...] = (10, 20, 100, 200)
    knn_primary_k: AtLeastOne = 20
    knn_temperature: Positive = 0.07
    knn_test_chunk: AtLeastOne = 256
    knn_train_chunk: AtLeastOne = 65536
    # linear.DEFAULT_LRS: the reference
    linear_lrs: tuple[Positive, ...] = SHORT_SCHEDULE_LRS
    linear_epochs: AtLeastOne = 10
    linear_batch_size: AtLeastOne = 256

    @model_validator(mode="after")
    def _check_classification(self) -> ClassificationSettings:
        if self.knn_primary_k not in self.knn_ks:
            raise ValueError(
                f"evaluation.knn_primary_k {self.knn_primary_k} is not in knn_ks {self.knn_ks}"
            )
        return self


@dataclass(frozen=True)
class ProbeResult:
    """kNN and linear probe of one network: its metrics (keys prefixed) and ``linear_probe``'s
    answer (chosen candidate, validation accuracies, test labels and predictions)."""

    metrics: dict[str, float]
    linear: dict[str, Any]

    def linear_details(self) -> dict[str, Any]:
        """The chosen linear candidate, for evaluation_details.json."""
        lin = self.linear
        return {
            "best": lin["best"],
            "best_variant": lin["best_variant"],
            "best_lr": lin["best_lr"],
            "val_top1": lin["val_top1"],
            "test_top1": lin["linear_top1"],
            "val_accuracies": lin["val_accuracies"],
        }


def extract_splits(
    context: EvalContext, backbone: nn.Module, splits: Mapping[str, ImageSource], tag: str
) -> dict[str, FeatureSet]:
    """Features of train, val and test, extracted once and shared by kNN and the linear probe."""
    shared = context.settings
    return {
        name: extract_features(
            backbone,
            splits[name],
            shared.image_size,
            shared.mean,
            shared.std,
            shared.batch_size,
            shared.n_last_blocks,
            shared.device,
            desc=f"{tag} {name}",
            progress=shared.progress,
            precision=shared.precision,
            crop_ratio=shared.crop_ratio,
        )
        for name in SPLITS
    }


def probe(
    context: EvalContext,
    settings: ClassificationSettings,
    feats: Mapping[str, FeatureSet],
    prefix: str = "",
    every_k: bool = False,
) -> ProbeResult:
    """kNN + linear probe on cached features, keys prefixed; ``every_k``: a kNN key per k."""
    shared, n_classes = context.settings, len(context.class_names)
    train, test = feats["train"], feats["test"]
    knn = knn_classify(
        train.cls_last,
        train.labels,
        test.cls_last,
        test.labels,
        n_classes,
        settings.knn_ks,
        settings.knn_temperature,
        settings.knn_test_chunk,
        settings.knn_train_chunk,
        shared.device,
    )
    k = settings.knn_primary_k
    metrics = {f"{prefix}knn_top1": knn[f"top1_k{k}"], f"{prefix}knn_top5": knn[f"top5_k{k}"]}
    if every_k:
        metrics.update({f"{prefix}knn_{name}": value for name, value in knn.items()})
    lin = linear_probe(
        train,
        feats["val"],
        test,
        n_classes=n_classes,
        lrs=settings.linear_lrs,
        epochs=settings.linear_epochs,
        batch_size=settings.linear_batch_size,
        seed=shared.seed,
        progress=shared.progress,
    )
    metrics[f"{prefix}linear_top1"] = lin["linear_top1"]
    metrics[f"{prefix}linear_val_top1"] = lin["val_top1"]
    return ProbeResult(metrics, lin)


def run(context: EvalContext, settings: ClassificationSettings) -> TaskResult:
    """The backbone's kNN (every k), linear probe and confusion matrix, then its baselines'.
    Nothing without labels."""
    result = TaskResult()
    if not context.labelled:
        return result
    with context.timer("features"):
        feats = extract_splits(context, context.backbone, context.splits, "features")
    with context.timer("knn_linear"):
        found = probe(context, settings, feats, every_k=True)
    del feats
    result.metrics.update(found.metrics)
    result.details["linear"] = found.linear_details()
    result.files["confusion_matrix"] = confusion_matrix_figure(
        found.linear["test_labels"],
        found.linear["test_predictions"],
        context.class_names,
        context.out_dir / "confusion_matrix.png",
    )
    for prefix, baseline in run_baselines(context, settings).items():
        result.metrics.update(baseline.metrics)
        result.details[f"{prefix}linear"] = baseline.linear_details()
    return result


def run_baselines(context: EvalContext, settings: ClassificationSettings) -> dict[str, ProbeResult]:
    """{prefix: result} of the random-init twin and raw pixels, each on its train subset."""
    baselines, found = context.baselines, {}
    if baselines.random is not None:
        with context.timer("baseline_random"):
            feats = extract_splits(
                context, baselines.random, baselines.random_splits, "random init"
            )
            found["baseline_random_"] = probe(context, settings, feats, "baseline_random_")
        del feats
    if baselines.pixels:
        shared = context.settings
        with context.timer("baseline_pixels"):
            feats = {
                name: raw_pixel_features(
                    baselines.splits[name], shared.image_size, crop_ratio=shared.crop_ratio
                )
                for name in SPLITS
            }
            found["baseline_pixels_"] = probe(context, settings, feats, "baseline_pixels_")
    return found


TASK = EvaluationTask("classification", ClassificationSettings, run)
