"""Thin nodes: validated parameters + catalog inputs -> ``dinoflow.jobs.distill``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from dinoflow.config import DataConfig, DistillationConfig, validate
from dinoflow.jobs.distill import evaluate_distillation, register_distillation, run_distillation
from dinoflow.pipelines.datasets import ReportSet
from dinoflow.pipelines.evaluation.nodes import log_to_mlflow
from dinoflow.pipelines.hooks import git_commit
from dinoflow.registry import RegistrationConfig
from dinoflow.results import DistillationSummary, RegistrationDecision
from dinoflow.tracking import active_run_id


def distill(data: dict, distillation: dict, curated_manifest: pd.DataFrame | None) -> DistillationSummary:
    """Distil the teacher ``distillation.teacher`` names into the student it describes."""
    data_cfg = validate(DataConfig, data, "data")
    cfg = validate(DistillationConfig, distillation, "distillation")
    ids = None if curated_manifest is None else curated_manifest["item_id"].astype(str).tolist()
    return run_distillation(data_cfg, cfg, ids)


def evaluate_distilled(data: dict, evaluation: dict, distillation: dict,
                       distillation_summary: DistillationSummary) -> ReportSet:
    """The student and the teacher by the evaluation pipeline's code and settings: metrics,
    report and the student's and teacher's pictures, in a folder the catalog moves into place."""
    data_cfg = validate(DataConfig, data, "data")
    cfg = validate(DistillationConfig, distillation, "distillation")
    folder = Path(tempfile.mkdtemp(prefix="dinoflow-distillation-"))
    metrics, report = evaluate_distillation(data_cfg, evaluation, cfg, distillation_summary, folder)
    report = report.model_copy(update={"mlflow_run_id": active_run_id()})
    log_to_mlflow(metrics, report)
    return ReportSet(metrics, report, folder)


def register_distilled(distillation_summary: DistillationSummary,
                       distillation_evaluation: ReportSet,
                       distillation_registration: dict) -> RegistrationDecision:
    """Register the student as ``dinoflow-backbone-distilled``, champion by the default's rule."""
    cfg = validate(RegistrationConfig, distillation_registration, "distillation_registration")
    evaluation = distillation_evaluation
    decision = register_distillation(distillation_summary, evaluation.metrics, evaluation.report,
                                     cfg, git_commit=git_commit())
    return RegistrationDecision.model_validate(decision)

