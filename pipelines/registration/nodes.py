"""Thin node: validated parameters + catalog inputs -> ``dinoflow.registry.register_pretrained``."""

from __future__ import annotations

from dinoflow.config import DataConfig, validate
from dinoflow.errors import DataError
from dinoflow.evaluation.metric_spec import data_is_labelled
from dinoflow.pipelines.datasets import ReportSet
from dinoflow.pipelines.hooks import git_commit
from dinoflow.registry import RegistrationConfig, register_pretrained, resolve_registration_metric
from dinoflow.results import PretrainSummary, RegistrationDecision


def register_backbone(
    pretrain_summary: PretrainSummary | None,
    evaluation: ReportSet,
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
    if pretrain_summary is None:
        raise DataError("registration: no pretrain summary: run the pretrain pipeline first")
    decision = register_pretrained(pretrain_summary, evaluation.metrics, cfg,
                                   git_commit=git_commit(), report=evaluation.report,
                                   labelled=labelled)
    return RegistrationDecision.model_validate(decision)
