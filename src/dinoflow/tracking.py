"""MLflow helpers for the library: log only when a run is active and only on rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinoflow.distributed import is_main_process


def active() -> bool:
    if not is_main_process():
        return False
    try:  # a training node without MLflow installed (a bare cluster image) trains untracked
        import mlflow
    except ImportError:
        return False

    return mlflow.active_run() is not None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if active():
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    if active():
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def set_tags(tags: dict[str, Any]) -> None:
    if active():
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_text(text: str, artifact_file: str) -> None:
    if active():
        import mlflow

        mlflow.log_text(text, artifact_file)


def flatten(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: params that compare column by column in the MLflow UI."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out
