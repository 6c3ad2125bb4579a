"""Thin nodes: validated parameters + catalog inputs -> dinoflow library calls."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from dinoflow.config import DataConfig, validate
from dinoflow.jobs.evaluate import run_evaluation
from dinoflow.pipelines.datasets import ReportSet
from dinoflow.results import EvaluationReport, PretrainSummary
from dinoflow.tracking import active_run_id


def evaluate(data: dict, evaluation: dict, pretrain_summary: PretrainSummary | None) -> ReportSet:
    """Evaluate the backbone pretrain made (or ``evaluation.model``): metrics, report and the
    pictures and details, in a temporary folder the catalog moves into place."""
    data_cfg = validate(DataConfig, data, "data")
    folder = Path(tempfile.mkdtemp(prefix="dinoflow-evaluation-"))
    metrics, report = run_evaluation(data_cfg, evaluation, pretrain_summary, None, folder)
    report = report.model_copy(update={"mlflow_run_id": active_run_id()})
    log_to_mlflow(metrics, report)
    return ReportSet(metrics, report, folder)


def log_to_mlflow(metrics: dict[str, float], report: EvaluationReport) -> None:
    """Metrics and pictures on this run; metrics also on the pretraining run that made the model
    (one row in the MLflow UI holds training and evaluation), linked both ways by tags."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return
    mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
    for path in report.files.values():
        mlflow.log_artifact(path, "evaluation")
    mlflow.log_text(json.dumps(metrics, indent=2), "evaluation/metrics.json")
    mlflow.set_tags({"dinoflow.eval_data_id": report.eval_data_id,
                     "dinoflow.evaluated_model": report.model[:250],
                     "dinoflow.eval_precision": report.precision})
    pretrain_run = report.pretrain_run_id
    if pretrain_run and pretrain_run != run.info.run_id:
        client = mlflow.MlflowClient()
        mlflow.set_tag("dinoflow.pretrain_run_id", pretrain_run)
        try:
            for key, value in metrics.items():
                client.log_metric(pretrain_run, f"eval/{key}", value)
            client.set_tag(pretrain_run, "dinoflow.evaluation_run_id", run.info.run_id)
        except Exception:  # noqa: BLE001 - the pretrain run may live in another store
            pass
