"""Thin node: validated parameters + catalog inputs -> ``dinoflow.registry.register_pretrained``."""

from __future__ import annotations

from typing import Any

from dinoflow.config import validate
from dinoflow.pipelines.hooks import git_commit
from dinoflow.registry import RegistrationConfig, register_pretrained


def register_backbone(
    pretrain_summary: dict[str, Any] | None,
    metrics: dict[str, Any],
    evaluation_report: dict[str, Any] | None,
    registration: dict,
) -> dict[str, Any]:
    """Register the pretrained teacher as ``dinoflow-backbone`` and decide champion/challenger.

    Reads pretrain_summary (teacher_backbone, mean, std, image_size, channels, mlflow_run_id, ...),
    metrics (knn_top1) and evaluation_report (eval_data_id, files); returns registration.json.
    """
    cfg = validate(RegistrationConfig, registration, "registration")
    if pretrain_summary is None:
        raise FileNotFoundError(
            "registration: pretrain_summary (data/06_models/pretrain_summary.json) is missing: "
            "run the pretrain pipeline first"
        )
    return register_pretrained(pretrain_summary, metrics, cfg, git_commit=git_commit(),
                               report=evaluation_report)
