"""Thin node: validated parameters + catalog inputs -> ``dinoflow.registry.register_pretrained``."""

from __future__ import annotations

from typing import Any

from dinoflow.config import DataConfig, validate
from dinoflow.errors import DataError
from dinoflow.evaluation.metric_spec import data_is_labelled
from dinoflow.models.vit import DinoVisionTransformer
from dinoflow.pipelines.hooks import git_commit
from dinoflow.registry import RegistrationConfig, register_pretrained, resolve_registration_metric
from dinoflow.results import EvaluationReport, PretrainSummary, RegistrationDecision


def register_backbone(
    pretrain_summary: PretrainSummary | None,
    teacher_backbone: DinoVisionTransformer | None,
    metrics: dict[str, Any],
    evaluation_report: EvaluationReport | None,
    registration: dict,
    data: dict | None = None,
) -> RegistrationDecision:
    """Register the pretrained teacher as ``dinoflow-backbone`` and decide champion/challenger.

    ``registration.metric`` auto is knn_top1 with labels, view_retrieval_top1 without; a metric
    the data cannot have (``params:data`` says whether it is labelled) stops here, before any work.
    """
    cfg = validate(RegistrationConfig, registration, "registration")
    labelled = None
    if data is not None:
        labelled = data_is_labelled(validate(DataConfig, data, "data"))
        resolve_registration_metric(cfg.metric, labelled)
    if pretrain_summary is None or teacher_backbone is None:
        raise DataError(
            "registration: pretrain_summary / teacher_backbone (data/06_models/) are missing: "
            "run the pretrain pipeline first"
        )
    decision = register_pretrained(pretrain_summary, metrics, cfg, git_commit=git_commit(),
                                   report=evaluation_report, backbone=teacher_backbone,
                                   labelled=labelled)
    return RegistrationDecision.model_validate(decision)
