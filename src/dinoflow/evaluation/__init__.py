"""Evaluation of a frozen backbone (DINOV2.md section 6): kNN, linear probe, linear segmentation,
feature pictures, and the report that runs them all with baselines (``evaluate_backbone``).

Heavy imports (matplotlib) happen inside the picture functions.
"""

from dinoflow.evaluation.features import FeatureSet, extract_features, raw_pixel_features
from dinoflow.evaluation.knn import backbone_knn, knn_classify, knn_predict
from dinoflow.evaluation.linear import DEFAULT_LRS, VARIANTS, linear_probe
from dinoflow.evaluation.pictures import (
    confusion_matrix_figure,
    pca_feature_maps,
    segmentation_figure,
)
from dinoflow.evaluation.report import EvalSettings, evaluate_backbone, random_init_like
from dinoflow.evaluation.scenes import generate_scenes, load_mask_folder, make_scenes
from dinoflow.evaluation.segmentation import LinearSegHead, mean_iou, train_linear_segmentation

__all__ = [
    "DEFAULT_LRS",
    "backbone_knn",
    "VARIANTS",
    "EvalSettings",
    "FeatureSet",
    "LinearSegHead",
    "confusion_matrix_figure",
    "evaluate_backbone",
    "extract_features",
    "generate_scenes",
    "knn_classify",
    "knn_predict",
    "linear_probe",
    "load_mask_folder",
    "make_scenes",
    "mean_iou",
    "pca_feature_maps",
    "random_init_like",
    "raw_pixel_features",
    "segmentation_figure",
    "train_linear_segmentation",
]
