"""Thin node: validated parameters + catalog inputs -> ``dinoflow.registry.register_pretrained``."""

from __future__ import annotations

from typing import Any

from dinoflow.config import DataConfig, validate
from dinoflow.evaluation.metric_spec import data_is_labelled
from dinoflow.pipelines.hooks import git_commit
from dinoflow.registry import RegistrationConfig, register_pretrained, resolve_registration_metric


def register_backbone(
    pretrain_summary: dict[str, Any] | None,
    metrics: dict[str, Any],
    evaluation_report: dict[str, Any] | None,
    registration: dict,
    data: dict | None = None,
) -> dict[str, Any]:
    """Register the pretrained teacher as ``dinoflow-backbone`` and decide champion/challenger.

    Reads pretrain_summary (teacher_backbone, mean, std, image_size, channels, mlflow_run_id, ...),
    metrics (the promotion metric: ``registration.metric``, auto = knn_top1 with labels,
    view_retrieval_top1 without), evaluation_report (eval_data_id, files, labelled) and
    ``params:data`` (whether the data is labelled); returns registration.json.
    """
    cfg = validate(RegistrationConfig, registration, "registration")
    labelled = None
    if data is not None:  # before any work: a metric the data cannot have stops here
        labelled = data_is_labelled(validate(DataConfig, data, "data"))
        resolve_registration_metric(cfg.metric, labelled)
    if pretrain_summary is None:
        raise FileNotFoundError(
            "registration: pretrain_summary (data/06_models/pretrain_summary.json) is missing: "
            "run the pretrain pipeline first"
        )
    return register_pretrained(pretrain_summary, metrics, cfg, git_commit=git_commit(),
                               report=evaluation_report, labelled=labelled)
