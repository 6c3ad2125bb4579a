"""MLflow helpers for the library: log only when a run is active and only on rank 0."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def active_run_id() -> str | None:
    """The id of the MLflow run in progress (Kedro's, kedro-mlflow's), None outside one."""
    try:
        import mlflow
    except ImportError:  # a bare training node trains untracked
        return None
    run = mlflow.active_run()
    return run.info.run_id if run else None


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


# MLflow 3 has two workflows, GenAI and model training; the experiment tag ``mlflow.experimentKind``
# records which one an experiment belongs to (dinoflow's: model training). MLflow 3.17's UI no
# longer reads it to pick its view (dinoflow.mlflow_app does that); the tag stays the record.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"


def mark_training_experiment(experiment_id: str, client=None) -> bool:
    """Tag an experiment as model training unless it already says what it is; True if tagged."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    tags = client.get_experiment(experiment_id).tags or {}
    kind = tags.get(EXPERIMENT_KIND_TAG, "")
    if kind and not kind.endswith("_inferred") and kind != "no_inferred_type":
        return False
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
    return True


def use_experiment(name: str) -> str:
    """``mlflow.set_experiment(name)`` (created if missing), tagged as model training; its id."""
    import mlflow

    experiment = mlflow.set_experiment(name)
    mark_training_experiment(experiment.experiment_id)
    return experiment.experiment_id


def experiment_runs_url(base_url: str, experiment_id: str) -> str:
    """The MLflow UI address that opens an experiment on its training runs.

    MLflow 3.17's UI picks the GenAI or the model-training view from the ``workflowType`` URL
    parameter, else from the browser's last choice (GenAI by default), not from the experiment's
    tag; this address names the model-training view, which opens on the runs table.
    """
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def ui_landing_url(base_url: str, tracking_uri: str | None = None, name: str = "dinoflow") -> str:
    """``experiment_runs_url`` of experiment ``name`` (tagged as model training on the way), or
    the UI's home when the experiment does not exist yet. Creates nothing."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return base_url
    mark_training_experiment(experiment.experiment_id, client)
    return experiment_runs_url(base_url, experiment.experiment_id)


@contextmanager
def job_run(
    experiment: str | None,
    run_name: str,
    params: dict[str, Any],
    run_id: str | None = None,
    training: bool = True,
) -> Iterator[bool]:
    """Rank 0 of a torchrun job tracks it: continue run ``run_id`` (the launching Kedro run's),
    or open ``run_name`` in ``experiment`` with ``params`` (flattened); ended FINISHED, or FAILED
    when the block raises. Yields whether this process tracks (False: other ranks, or neither
    ``run_id`` nor ``experiment``). ``training``: tag the experiment as a training one."""
    if not is_main_process() or not (run_id or experiment):
        yield False
        return
    import mlflow

    if run_id:
        mlflow.start_run(run_id=run_id)
    else:
        if training:
            use_experiment(experiment)
        else:
            mlflow.set_experiment(experiment)
        mlflow.start_run(run_name=run_name)
        mlflow.log_params(flatten(params))
    status = "FAILED"
    try:
        yield True
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)
