"""Thin nodes: validated parameters + catalog inputs -> dinoflow library calls."""

from __future__ import annotations

from typing import Any

from dinoflow.config import DataConfig, validate


def evaluate(data: dict, evaluation: dict, pretrain_summary: dict | None) -> tuple[dict, dict]:
    """Evaluate the model pretrain just wrote (or ``evaluation.model``); metrics + report."""
    from dinoflow.workflow import run_evaluation

    data_cfg = validate(DataConfig, data, "data")
    # one folder for pictures and details: the evaluate stage's DVC out (dvc.yaml)
    metrics, report = run_evaluation(data_cfg, evaluation, pretrain_summary,
                                     out_dir="data/08_reporting/evaluation")
    # the run that evaluated: registration links it on the model card (same or a later run)
    report["mlflow_run_id"] = log_to_mlflow(metrics, report)
    return metrics, report


def log_to_mlflow(metrics: dict[str, float], report: dict[str, Any]) -> str | None:
    """Metrics and pictures on this run; metrics also on the pretraining run that made the model
    (one row in the MLflow UI holds training and evaluation), linked both ways by tags.
    Returns this run's id (None without an active run)."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None
    mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
    for path in report["files"].values():
        mlflow.log_artifact(path, "evaluation")
    mlflow.set_tags({"dinoflow.eval_data_id": report["eval_data_id"],
                     "dinoflow.evaluated_model": report["model"][:250]})
    pretrain_run = report.get("pretrain_run_id")
    if pretrain_run and pretrain_run != run.info.run_id:
        client = mlflow.MlflowClient()
        mlflow.set_tag("dinoflow.pretrain_run_id", pretrain_run)
        try:
            for key, value in metrics.items():
                client.log_metric(pretrain_run, f"eval/{key}", value)
            client.set_tag(pretrain_run, "dinoflow.evaluation_run_id", run.info.run_id)
        except Exception:  # noqa: BLE001 - the pretrain run may live in another store
            pass
    return run.info.run_id
