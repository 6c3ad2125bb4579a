"""Thin nodes: validated parameters + catalog inputs -> dinoflow library calls."""

from __future__ import annotations

import json
from pathlib import Path

from dinoflow.config import DataConfig, validate
from dinoflow.files import atomic_write_json, staging_folder, swap_in
from dinoflow.jobs.evaluate import run_evaluation
from dinoflow.models.vit import DinoVisionTransformer
from dinoflow.results import EvaluationReport, PretrainSummary

# The evaluate stage's DVC outs (dvc.yaml) and the catalog's metrics / evaluation_report paths:
# the three are replaced together, so a kill mid-evaluation leaves the previous set whole.
REPORT_DIR = Path("data/08_reporting/evaluation")
METRICS_FILE = Path("data/08_reporting/metrics.json")
REPORT_FILE = Path("data/08_reporting/evaluation_report.json")


def evaluate(data: dict, evaluation: dict, pretrain_summary: PretrainSummary | None,
             teacher_backbone: DinoVisionTransformer | None) -> tuple[dict, EvaluationReport]:
    """Evaluate the backbone pretrain made (or ``evaluation.model``); metrics + report.

    Pictures and details are written into a staging folder, then swapped in with metrics.json
    and evaluation_report.json (``dinoflow.files.swap_in``)."""
    data_cfg = validate(DataConfig, data, "data")
    staging = staging_folder(REPORT_DIR)
    metrics, report = run_evaluation(data_cfg, evaluation, pretrain_summary, teacher_backbone,
                                     out_dir=str(staging))
    files = {k: str(REPORT_DIR / Path(v).relative_to(staging)) for k, v in report.files.items()}
    report = report.model_copy(update={"files": files, "mlflow_run_id": _active_run_id()})
    atomic_write_json(staging / "metrics.json", metrics)
    atomic_write_json(staging / "evaluation_report.json", report.model_dump(mode="json"))
    swap_in(staging, REPORT_DIR, {"metrics.json": METRICS_FILE,
                                  "evaluation_report.json": REPORT_FILE})
    log_to_mlflow(metrics, report)
    return metrics, report


def _active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


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
