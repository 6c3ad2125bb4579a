"""Thin node: validated parameters + catalog inputs -> ``dinoflow.registry.register_pretrained``."""

from __future__ import annotations

from typing import Any

from dinoflow.config import validate
from dinoflow.errors import DataError
from dinoflow.models.vit import DinoVisionTransformer
from dinoflow.pipelines.hooks import git_commit
from dinoflow.registry import RegistrationConfig, register_pretrained
from dinoflow.results import EvaluationReport, PretrainSummary, RegistrationDecision


def register_backbone(
    pretrain_summary: PretrainSummary | None,
    teacher_backbone: DinoVisionTransformer | None,
    metrics: dict[str, Any],
    evaluation_report: EvaluationReport | None,
    registration: dict,
) -> RegistrationDecision:
    """Register the pretrained teacher as ``dinoflow-backbone`` and decide champion/challenger."""
    cfg = validate(RegistrationConfig, registration, "registration")
    if pretrain_summary is None or teacher_backbone is None:
        raise DataError(
            "registration: pretrain_summary / teacher_backbone (data/06_models/) are missing: "
            "run the pretrain pipeline first"
        )
    decision = register_pretrained(pretrain_summary, metrics, cfg, git_commit=git_commit(),
                                   report=evaluation_report, backbone=teacher_backbone)
    return RegistrationDecision.model_validate(decision)
