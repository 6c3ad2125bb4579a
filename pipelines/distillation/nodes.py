"""Thin nodes: validated parameters + catalog inputs -> ``dinoflow.jobs.distill``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from dinoflow.config import DataConfig, DistillationConfig, validate
from dinoflow.files import atomic_write_json, staging_folder, swap_in
from dinoflow.jobs.distill import evaluate_distillation, register_distillation, run_distillation
from dinoflow.pipelines.evaluation.nodes import log_to_mlflow
from dinoflow.pipelines.hooks import git_commit
from dinoflow.registry import RegistrationConfig
from dinoflow.results import DistillationSummary, EvaluationReport, RegistrationDecision

# data/08_reporting/distillation: student/ and teacher/ pictures, metrics.json and
# distillation_report.json, replaced together (a kill mid-evaluation leaves the previous set)
REPORT_DIR = Path("data/08_reporting/distillation")


def distill(data: dict, distillation: dict, curated_manifest: pd.DataFrame | None) -> DistillationSummary:
    """Distil the teacher ``distillation.teacher`` names into the student it describes."""
    data_cfg = validate(DataConfig, data, "data")
    cfg = validate(DistillationConfig, distillation, "distillation")
    ids = None if curated_manifest is None else curated_manifest["item_id"].astype(str).tolist()
    return run_distillation(data_cfg, cfg, ids)


def evaluate_distilled(data: dict, evaluation: dict, distillation: dict,
                       distillation_summary: DistillationSummary) -> tuple[dict, EvaluationReport]:
    """The student and the teacher by the evaluation pipeline's code and settings."""
    data_cfg = validate(DataConfig, data, "data")
    cfg = validate(DistillationConfig, distillation, "distillation")
    staging = staging_folder(REPORT_DIR)
    metrics, report = evaluate_distillation(data_cfg, evaluation, cfg, distillation_summary, staging)
    def moved(files: dict[str, str]) -> dict[str, str]:
        return {k: str(REPORT_DIR / Path(v).relative_to(staging)) for k, v in files.items()}

    teacher_report = {**report.teacher_report, "files": moved(report.teacher_report["files"])}
    report = report.model_copy(update={"files": moved(report.files), "teacher_report": teacher_report,
                                       "mlflow_run_id": _active_run_id()})
    atomic_write_json(staging / "metrics.json", metrics)
    atomic_write_json(staging / "distillation_report.json", report.model_dump(mode="json"))
    swap_in(staging, REPORT_DIR)
    log_to_mlflow(metrics, report)
    return metrics, report


def register_distilled(distillation_summary: DistillationSummary, distillation_metrics: dict[str, Any],
                       distillation_report: EvaluationReport | None,
                       distillation_registration: dict) -> RegistrationDecision:
    """Register the student as ``dinoflow-backbone-distilled``, champion by the default's rule."""
    cfg = validate(RegistrationConfig, distillation_registration, "distillation_registration")
    decision = register_distillation(distillation_summary, distillation_metrics, distillation_report,
                                     cfg, git_commit=git_commit())
    return RegistrationDecision.model_validate(decision)


def _active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None
