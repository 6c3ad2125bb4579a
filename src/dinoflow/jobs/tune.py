"""The tuning job: an Optuna study of short pretraining runs, one nested MLflow run per trial.

``run_study`` runs (or resumes) the study until it holds ``n_trials`` finished trials, then writes
the best parameters as a ``kedro run --config`` file, the study plots and a summary. The parts
(config paths, storage, pruner, best-params file, plots) are in ``dinoflow.tuning``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dinoflow.config import ConfigError, DataConfig, PretrainConfig
from dinoflow.data import load_data
from dinoflow.errors import TrainingDiverged
from dinoflow.files import atomic_write_json
from dinoflow.jobs.pretrain import knn_subsets, run_pretraining
from dinoflow.tracking import flatten, use_experiment
from dinoflow.tuning import (
    OBJECTIVE_METRIC,
    TuningConfig,
    apply_overrides,
    base_values,
    check_tuning_config,
    finished_trials,
    knn_reporter,
    make_pruner,
    make_sampler,
    make_storage,
    recover_stale_trials,
    run_name,
    sample_params,
    save_study_plots,
    study_fingerprint,
    write_best_params,
)

log = logging.getLogger(__name__)

PretrainFn = Callable[..., Any]  # (data, cfg, manifest_ids, on_knn=...) -> PretrainSummary


def open_study(
    data: DataConfig,
    base: PretrainConfig,
    tuning: TuningConfig,
    manifest_ids: list[str] | None,
    root: Path,
):
    """(study, storage): created or loaded; refuses a study made with other settings."""
    import optuna

    storage = make_storage(tuning.storage, root)
    study = optuna.create_study(
        study_name=tuning.study_name,
        storage=storage,
        direction="maximize",
        sampler=make_sampler(tuning.seed, tuning.startup_trials),
        pruner=make_pruner(tuning.pruner),
        load_if_exists=True,
    )
    fp = study_fingerprint(data, base, tuning, manifest_ids)
    known = study.user_attrs.get("dinoflow.fingerprint")
    if known is None:
        study.set_user_attr("dinoflow.fingerprint", fp)
        study.set_user_attr("dinoflow.space", sorted(tuning.space))
        if tuning.enqueue_base:  # the hand-picked values, scored on the same budget as the rest
            study.enqueue_trial(base_values(base, tuning.space), user_attrs={"dinoflow.base": True})
    elif known != fp:
        raise ConfigError(
            f"study '{tuning.study_name}' in {tuning.storage} was made with other data, base "
            "parameters, budget or search space: its trial values would not compare. Set another "
            "tuning.study_name, or delete the storage file to start over."
        )
    return study, storage


def _trial_config(budgeted: PretrainConfig, params: dict, run_dir: Path, number: int):
    """The budgeted configuration with the trial's sampled values and its own run directory."""
    return apply_overrides(
        budgeted,
        {
            **params,
            "train.run_dir": str(run_dir),
            # a rich bar left open by a pruned trial blocks the next one
            "train.progress": False,
        },
        f"tuning trial {number}",
    )


def _tag_trial_run(
    run,
    trial,
    params: dict,
    cfg: PretrainConfig,
    data: DataConfig,
    tuning: TuningConfig,
    parent_tags: dict[str, str],
) -> None:
    """The nested run's tags and parameters; the trial remembers its MLflow run id."""
    import mlflow

    mlflow.set_tags(
        {
            **parent_tags,
            "dinoflow.pipeline": "tuning",
            "mlflow.runName": run_name(f"tuning trial {trial.number}", cfg, data, run.info.run_id),
            "optuna.study": tuning.study_name,
            "optuna.trial": trial.number,
            "optuna.tuned_params": ",".join(f"pretrain.{p}" for p in params),
        }
    )
    mlflow.log_params(
        flatten({"pretrain": cfg.model_dump(mode="json"), "data": data.model_dump(mode="json")})
    )
    trial.set_user_attr("mlflow_run_id", run.info.run_id)


def _run_trial(
    trial, data: DataConfig, cfg: PretrainConfig, manifest_ids, run_dir: Path, curve, pretrain_fn
) -> tuple[str, float | None]:
    """(outcome, value) of one pretraining run, inside its nested MLflow run."""
    import mlflow
    import optuna

    outcome, value = "FAILED", None
    try:
        summary = pretrain_fn(data, cfg, manifest_ids, on_knn=knn_reporter(trial, curve))
        history = summary.knn_history
        if not history:
            raise RuntimeError("pretraining made no kNN check: nothing to optimise")
        value = float(history[-1][OBJECTIVE_METRIC])
        mlflow.log_metric("tuning/value", value, step=int(history[-1]["step"]))
        outcome = "COMPLETE"
    except optuna.TrialPruned:
        outcome = "PRUNED"
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # never resumed
    except TrainingDiverged as exc:
        mlflow.set_tag("dinoflow.error", str(exc)[:250])
        outcome = "FAIL"
    finally:
        mlflow.set_tag("optuna.state", outcome)
    return outcome, value


def make_objective(
    data: DataConfig,
    budgeted: PretrainConfig,
    tuning: TuningConfig,
    manifest_ids: list[str] | None,
    out_dir: Path,
    parent_tags: dict[str, str],
    pretrain_fn: PretrainFn,
) -> Callable:
    """The Optuna objective: one short pretraining run in a nested MLflow run; the value is the
    last online kNN top-1; pruned by the study's pruner at each kNN check."""
    import mlflow
    import optuna

    def objective(trial) -> float:
        params = sample_params(trial, tuning.space)
        run_dir = out_dir / "trials" / f"trial_{trial.number:04d}"
        cfg = _trial_config(budgeted, params, run_dir, trial.number)
        curve: list[tuple[int, float]] = []
        with mlflow.start_run(nested=True) as run:
            _tag_trial_run(run, trial, params, cfg, data, tuning, parent_tags)
            log.info("trial %d: %s", trial.number, params)
            outcome, value = _run_trial(trial, data, cfg, manifest_ids, run_dir, curve, pretrain_fn)
        if outcome == "PRUNED":
            step, top1 = curve[-1]
            raise optuna.TrialPruned(f"pruned at step {step} (kNN top-1 {top1:.4f})")
        if outcome == "FAIL":
            raise TrainingDiverged(f"trial {trial.number} diverged")
        return value

    return objective


def _log_progress(study, trial) -> None:
    """After each trial: its value and the best so far on the parent run."""
    import mlflow
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        mlflow.log_metric("tuning/value", trial.value, step=trial.number)
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if completed:
        mlflow.log_metric("tuning/best_so_far", max(t.value for t in completed), step=trial.number)


def _check_labels(data: DataConfig, pretrain_fn: PretrainFn) -> None:
    """The objective is a kNN top-1 on validation images: refuse a source without labels."""
    if pretrain_fn is run_pretraining and knn_subsets(load_data(data), 10, 10, 0)[0] is None:
        raise ConfigError(
            "tuning needs labelled train and val splits: its objective is the "
            "kNN top-1 on validation images (data.source has no labels)"
        )


def _open_parent_run(
    own_parent: bool, tuning: TuningConfig, budgeted: PretrainConfig, data: DataConfig
) -> dict[str, str]:
    """Start the parent tuning run unless one is active; tag it; its dinoflow tags, for the
    trials."""
    import mlflow

    if own_parent:
        use_experiment(tuning.experiment)
        mlflow.start_run()
        mlflow.set_tags(
            {
                "dinoflow.pipeline": "tuning",
                "mlflow.runName": run_name(
                    "tuning", budgeted, data, mlflow.active_run().info.run_id
                ),
            }
        )
    parent = mlflow.active_run()
    parent_tags = {
        k: v
        for k, v in mlflow.get_run(parent.info.run_id).data.tags.items()
        if k.startswith("dinoflow.") and k not in ("dinoflow.fingerprint",)
    }
    mlflow.set_tags({"optuna.study": tuning.study_name, "optuna.storage": tuning.storage})
    return parent_tags


def run_study(
    data: DataConfig,
    base: PretrainConfig,
    tuning: TuningConfig,
    manifest_ids: list[str] | None = None,
    pretrain_fn: PretrainFn | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study until it holds ``n_trials`` finished trials; write the best params.

    ``pretrain_fn(data, cfg, manifest_ids, on_knn=...) -> PretrainSummary`` defaults to
    ``jobs.pretrain.run_pretraining``. Relative paths of ``tuning`` are under ``root``
    (default: the current directory). Returns a JSON-able summary.
    """
    import mlflow

    pretrain_fn = pretrain_fn or run_pretraining
    root = Path(root or ".")
    out_dir = root / tuning.output_dir
    check_tuning_config(base, tuning)
    budgeted = apply_overrides(base, tuning.budget, "tuning.budget")
    _check_labels(data, pretrain_fn)
    study, storage = open_study(data, base, tuning, manifest_ids, root)
    retried = recover_stale_trials(study, storage)
    already = finished_trials(study)
    remaining = max(0, tuning.n_trials - already)
    log.info(
        "study %s: %d finished trials, running %d more (n_trials=%d)",
        tuning.study_name,
        already,
        remaining,
        tuning.n_trials,
    )

    own_parent = mlflow.active_run() is None
    parent_tags = _open_parent_run(own_parent, tuning, budgeted, data)
    objective = make_objective(
        data, budgeted, tuning, manifest_ids, out_dir, parent_tags, pretrain_fn
    )
    t0 = time.perf_counter()
    try:
        if remaining:
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=tuning.timeout,
                catch=(TrainingDiverged,),
                callbacks=[_log_progress],
                gc_after_trial=True,
            )
        return finish_study(study, tuning, out_dir, root, retried, time.perf_counter() - t0)
    finally:
        if own_parent:
            mlflow.end_run()


def _state_counts(tuning: TuningConfig, trials) -> dict[str, int]:
    """Complete, pruned and failed trials; refuses a study with no complete trial."""
    from optuna.trial import TrialState

    counts = {
        s.name.lower(): sum(t.state == s for t in trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    if not counts["complete"]:
        raise RuntimeError(
            f"study '{tuning.study_name}' has no complete trial "
            f"({counts['pruned']} pruned, {counts['fail']} failed): nothing to write"
        )
    return counts


def _best_params_header(tuning: TuningConfig, best, counts: dict[str, int]) -> str:
    """The comment at the top of the best-parameters file."""
    return (
        f"Best parameters of Optuna study '{tuning.study_name}' ({tuning.storage}):\n"
        f"trial {best.number}, kNN top-1 (k=20) on validation images {best.value:.4f}, "
        f"{counts['complete']} complete / {counts['pruned']} pruned / {counts['fail']} failed.\n"
        f"Pretrain with them: kedro run --pipelines=pretrain --config {tuning.best_params_path}\n"
        "(a --params option on that command line replaces these values: use one or the other)"
    )


def _study_summary(
    tuning: TuningConfig,
    trials,
    counts: dict[str, int],
    best,
    best_path: Path,
    out_dir: Path,
    retried: list[int],
    seconds: float,
    plots: list[Path],
) -> dict[str, Any]:
    """The JSON-able summary of the study."""
    return {
        "study_name": tuning.study_name,
        "storage": tuning.storage,
        "n_trials": len(trials),
        "states": counts,
        "retried_trials": retried,
        "seconds": round(seconds, 1),
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": {f"pretrain.{k}": v for k, v in best.params.items()},
        "best_params_file": str(best_path),
        "best_run_dir": str(out_dir / "trials" / f"trial_{best.number:04d}"),
        "best_mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
        "plots": [str(p) for p in plots],
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            }
            for t in trials
        ],
    }


def _log_study_to_mlflow(
    summary: dict[str, Any], best, counts: dict[str, int], best_path: Path, out_dir: Path, plots
) -> None:
    """The best params, counts, tags and files on the (parent) tuning run."""
    import mlflow

    mlflow.log_params({f"best.{k}": v for k, v in summary["best_params"].items()})
    mlflow.log_metrics(
        {
            "tuning/best_value": best.value,
            "tuning/n_complete": counts["complete"],
            "tuning/n_pruned": counts["pruned"],
            "tuning/n_failed": counts["fail"],
        }
    )
    mlflow.set_tags(
        {
            "optuna.best_trial": best.number,
            "optuna.best_mlflow_run_id": str(best.user_attrs.get("mlflow_run_id")),
        }
    )
    mlflow.log_artifact(str(best_path), "tuning")
    mlflow.log_artifact(str(out_dir / "tuning_summary.json"), "tuning")
    for p in plots:
        mlflow.log_artifact(str(p), "tuning/plots")


def finish_study(
    study, tuning: TuningConfig, out_dir: Path, root: Path, retried: list[int], seconds: float
) -> dict[str, Any]:
    """Best params file, plots and summary, logged to the (parent) tuning run."""
    trials = study.get_trials(deepcopy=False)
    counts = _state_counts(tuning, trials)
    best = study.best_trial
    best_path = root / tuning.best_params_path
    write_best_params(best_path, best.params, _best_params_header(tuning, best, counts))
    plots, notes = save_study_plots(study, out_dir / "plots")
    for note in notes:
        log.info("tuning plots: %s", note)
    summary = _study_summary(
        tuning, trials, counts, best, best_path, out_dir, retried, seconds, plots
    )
    atomic_write_json(out_dir / "tuning_summary.json", summary)
    _log_study_to_mlflow(summary, best, counts, best_path, out_dir, plots)
    log.info(
        "study %s: best trial %d, kNN top-1 %.4f, params %s -> %s",
        tuning.study_name,
        best.number,
        best.value,
        best.params,
        best_path,
    )
    return summary
