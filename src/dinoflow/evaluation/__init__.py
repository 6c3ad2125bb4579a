"""Evaluation of a frozen backbone (docs/method.md section 6): label-free feature quality (any data),
kNN, linear probe, linear segmentation (with labels), feature pictures, and the report that runs
them all with baselines (``evaluate_backbone``, over the tasks of ``dinoflow.evaluation.tasks``).

Heavy imports (matplotlib) happen inside the picture functions.
"""

from dinoflow.evaluation.features import FeatureSet, extract_features, raw_pixel_features
from dinoflow.evaluation.knn import backbone_knn, knn_classify, knn_predict
from dinoflow.evaluation.labelfree import (
    LABEL_FREE_KEYS,
    ViewSettings,
    alignment,
    label_free_metrics,
    rankme,
    uniformity,
    view_retrieval_top1,
)
from dinoflow.evaluation.linear import DEFAULT_LRS, VARIANTS, linear_probe
from dinoflow.evaluation.metric_spec import data_is_labelled, direction, splits_are_labelled
from dinoflow.evaluation.pictures import (
    confusion_matrix_figure,
    pca_feature_maps,
    segmentation_figure,
)
from dinoflow.evaluation.report import TASKS, EvalSettings, evaluate_backbone
from dinoflow.evaluation.scenes import generate_scenes, load_mask_folder, make_scenes
from dinoflow.evaluation.segmentation import LinearSegHead, mean_iou, train_linear_segmentation
from dinoflow.evaluation.tasks.baselines import random_init_like

__all__ = [
    "DEFAULT_LRS",
    "TASKS",
    "backbone_knn",
    "LABEL_FREE_KEYS",
    "VARIANTS",
    "EvalSettings",
    "FeatureSet",
    "LinearSegHead",
    "ViewSettings",
    "alignment",
    "confusion_matrix_figure",
    "data_is_labelled",
    "direction",
    "evaluate_backbone",
    "extract_features",
    "generate_scenes",
    "knn_classify",
    "knn_predict",
    "label_free_metrics",
    "linear_probe",
    "load_mask_folder",
    "make_scenes",
    "mean_iou",
    "pca_feature_maps",
    "random_init_like",
    "rankme",
    "raw_pixel_features",
    "segmentation_figure",
    "splits_are_labelled",
    "train_linear_segmentation",
    "uniformity",
    "view_retrieval_top1",
]
