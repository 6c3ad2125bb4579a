"""Hyper-parameter tuning of pretraining with Optuna, one nested MLflow run per trial.

The search space is configuration (``parameters_tuning.yml``): dotted paths into the pretrain
parameters (``optim.momentum_teacher_start``...) with a distribution each. Every path is checked
against ``PretrainConfig`` before any trial runs. A trial is a short pretraining run (the
``budget`` overrides) whose objective is the online kNN top-1 (k=20) of the teacher on a fixed
train bank / validation query subset, never test. Each kNN check is reported to the trial so a
median or Hyperband pruner stops bad trials early.

The study lives on disk (SQLite or an Optuna journal file): re-running after a kill resumes it.
The trial left RUNNING by the killed process is marked FAIL and its parameters are tried again;
``n_trials`` counts finished (complete or pruned) trials of the study, not of one invocation.
The study itself runs in ``dinoflow.jobs.tune.run_study``. The best parameters are written as a
Kedro ``--config`` file, so that tuning -> pretrain is::

    kedro run --pipelines=pretrain --config data/07_model_output/tuning/best_params.yml
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from dinoflow.config import ConfigError, DataConfig, PretrainConfig, Strict, fingerprint, validate
from dinoflow.files import atomic_write_text
from dinoflow.tracking import flatten
from dinoflow.training.plan import run_fingerprint

log = logging.getLogger(__name__)

OBJECTIVE_METRIC = "knn/top1_k20"  # what pretrain logs at each online kNN check


# --------------------------------------------------------------------------- configuration
class ParamSpec(Strict):
    """One searched parameter: float / int range (optionally log-scaled or stepped) or choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes 'choices', not low/high")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"a {self.type} parameter needs 'low' and 'high' (and no 'choices')")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log=true needs low > 0 and no step")
        return self

    def corners(self) -> list[Any]:
        """The extreme values a trial can get (each must give a valid config)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


class PrunerConfig(Strict):
    """Median pruner (stop a trial below the median of earlier ones at the same step), Hyperband
    (successive halving over kNN steps), or none. Steps are training steps."""

    type: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(2, ge=0)  # median: trials that are never pruned
    n_warmup_steps: int = Field(0, ge=0)  # median: steps before pruning starts in a trial
    interval_steps: int = Field(1, ge=1)
    min_resource: int = Field(1, ge=1)  # hyperband: steps a trial gets at least
    reduction_factor: int = Field(3, ge=2)


class TuningConfig(Strict):
    """``params:tuning``: the study, its storage, the trial budget and the search space."""

    study_name: str = "dinoflow-tuning"
    storage: str = "data/07_model_output/tuning/optuna.db"  # .db/.sqlite: SQLite; .log: journal
    output_dir: str = "data/07_model_output/tuning"  # trial run dirs, plots, summary
    best_params_path: str = "data/07_model_output/tuning/best_params.yml"
    n_trials: int = Field(20, ge=1)  # finished trials the study should hold
    timeout: float | None = Field(None, gt=0)  # seconds; no new trial starts after it
    seed: int = 0  # TPE sampler seed
    startup_trials: int = Field(5, ge=1)  # random trials before TPE models the space
    enqueue_base: bool = True  # trial 0 of a new study: the base parameters' own values
    pruner: PrunerConfig = PrunerConfig()
    budget: dict[str, Any] = {}  # dotted pretrain paths fixed in every trial (the short budget)
    space: dict[str, ParamSpec]
    experiment: str = "dinoflow"  # MLflow experiment, when no run is active to nest under

    @model_validator(mode="after")
    def _disjoint(self) -> TuningConfig:
        both = sorted(set(self.budget) & set(self.space))
        if both:
            raise ValueError(f"paths both fixed in 'budget' and searched in 'space': {both}")
        if not self.space:
            raise ValueError("the search space is empty")
        return self


# --------------------------------------------------------------------------- config paths
def _check_path(path: str, where: str) -> None:
    """Raise ConfigError unless ``path`` (e.g. "optim.teacher_temp_end") is a PretrainConfig leaf."""
    model: type[BaseModel] = PretrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"{where}: '{path}' is not a pretrain parameter "
                f"('{'.'.join(parts[: i + 1])}' unknown; known here: {known})"
            )
        annotation = fields[part].annotation
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1 and not is_model:
            raise ConfigError(
                f"{where}: '{path}' goes below the value '{'.'.join(parts[: i + 1])}'"
            )
        if i == len(parts) - 1 and is_model:
            raise ConfigError(f"{where}: '{path}' is a group, not a single parameter")
        if is_model:
            model = annotation


def apply_overrides(
    base: PretrainConfig, overrides: dict[str, Any], where: str = "pretrain"
) -> PretrainConfig:
    """``base`` with dotted-path values replaced, validated (one clear error naming the keys)."""
    d = base.model_dump(mode="python")
    for path, value in overrides.items():
        _check_path(path, where)
        node = d
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return validate(PretrainConfig, d, where)


def base_values(base: PretrainConfig, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """The base parameters' own value of each searched path inside the space (the hand-picked
    trial); a value outside its range is left to the sampler."""
    values: dict[str, Any] = {}
    for path, spec in space.items():
        node: Any = base
        for part in path.split("."):
            node = getattr(node, part)
        inside = (
            node in (spec.choices or [])
            if spec.type == "categorical"
            else spec.low <= node <= spec.high
        )
        if inside:
            values[path] = node
    return values


def check_tuning_config(base: PretrainConfig, tuning: TuningConfig) -> None:
    """Before any trial: every path exists, the budget is valid, each extreme of the space is valid."""
    budgeted = apply_overrides(base, tuning.budget, "tuning.budget")
    for path, spec in tuning.space.items():
        for value in spec.corners():
            apply_overrides(budgeted, {path: value}, f"tuning.space.{path}")


# --------------------------------------------------------------------------- optuna parts
def make_storage(spec: str, root: Path | None = None):
    """An Optuna storage on disk: ``*.db``/``*.sqlite`` -> SQLite, ``*.log``/``*.jsonl`` ->
    journal file, anything with ``://`` -> that database URL. Relative paths are under ``root``."""
    import optuna

    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    path = Path(spec)
    if not path.is_absolute() and root is not None:
        path = root / path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")
    if path.suffix in (".log", ".jsonl", ".journal"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    raise ConfigError(
        f"tuning.storage: '{spec}' should end in .db/.sqlite (SQLite) or .log "
        "(Optuna journal file), or be a database URL"
    )


def make_pruner(cfg: PrunerConfig):
    import optuna

    if cfg.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.n_startup_trials,
            n_warmup_steps=cfg.n_warmup_steps,
            interval_steps=cfg.interval_steps,
        )
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor
        )
    return optuna.pruners.NopPruner()


def make_sampler(seed: int, startup_trials: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)


def sample_params(trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """One value per searched path, drawn by the trial's sampler."""
    values: dict[str, Any] = {}
    for path, s in space.items():
        if s.type == "categorical":
            values[path] = trial.suggest_categorical(path, s.choices)
        elif s.type == "int":
            values[path] = trial.suggest_int(
                path, int(s.low), int(s.high), step=int(s.step or 1), log=s.log
            )
        else:
            values[path] = trial.suggest_float(path, s.low, s.high, step=s.step, log=s.log)
    return values


def knn_reporter(
    trial, history: list[tuple[int, float]] | None = None
) -> Callable[[int, float], None]:
    """``on_knn(step, top1)`` for pretrain: report to the trial, stop it when the pruner says so."""
    import optuna

    def on_knn(step: int, top1: float) -> None:
        if history is not None:
            history.append((step, top1))
        trial.report(top1, step)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"trial {trial.number} pruned at step {step} (kNN top-1 {top1:.4f})"
            )

    return on_knn


def finished_trials(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def recover_stale_trials(study, storage) -> list[int]:
    """Trials left RUNNING by a killed process: mark them FAIL and queue their parameters again.

    One process per study is assumed (a RUNNING trial found at start is a dead one).
    """
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"dinoflow.retry_of": t.number})
        log.warning(
            "trial %d was left unfinished by an interrupted run: retrying its parameters", t.number
        )
    return [t.number for t in stale]


# --------------------------------------------------------------------------- best params file
def write_best_params(path: str | Path, params: dict[str, Any], header: str = "") -> Path:
    """Write ``params`` (dotted pretrain paths) as a ``kedro run --config`` file."""
    nested: dict[str, Any] = {}
    for dotted, value in sorted(params.items()):
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    text = comment + yaml.safe_dump({"run": {"params": {"pretrain": nested}}}, sort_keys=True)
    atomic_write_text(path, text)
    return path


def read_best_params(path: str | Path) -> dict[str, Any]:
    """The dotted pretrain paths -> values of a file written by ``write_best_params``."""
    data = yaml.safe_load(Path(path).read_text())
    try:
        pretrain = data["run"]["params"]["pretrain"]
    except (KeyError, TypeError):
        raise ConfigError(
            f"{path}: expected run.params.pretrain (a tuning best-params file)"
        ) from None
    return flatten(pretrain)


# --------------------------------------------------------------------------- plots
def save_study_plots(study, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Optimisation history, kNN curves per trial and parameter importances as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    paths, notes = [], []
    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "intermediate_values": ovm.plot_intermediate_values,
        "param_importances": ovm.plot_param_importances,
    }
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna's ExperimentalWarning
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(7, 4.5)
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
        except Exception as exc:  # noqa: BLE001 - e.g. importances need 2 complete trials
            notes.append(f"{name}: not drawn ({exc})")
            plt.close("all")
    return paths, notes


# --------------------------------------------------------------------------- study identity
def run_name(prefix: str, base: PretrainConfig, data: DataConfig, run_id: str) -> str:
    dataset = data.source + (f":{Path(data.path).name}" if data.path else "")
    return f"{prefix} | {base.backbone.arch}/{base.backbone.patch_size} | {dataset} | {run_id[:6]}"


def study_fingerprint(
    data: DataConfig, base: PretrainConfig, tuning: TuningConfig, manifest_ids: list[str] | None
) -> str:
    """What makes trial values comparable: data, base config, budget, space (not n_trials...)."""
    return fingerprint(
        {
            "data": data.model_dump(mode="json"),
            "pretrain": run_fingerprint(apply_overrides(base, tuning.budget, "tuning.budget"), 0),
            "space": {k: v.model_dump(mode="json") for k, v in tuning.space.items()},
            "manifest": fingerprint({"ids": manifest_ids}) if manifest_ids is not None else None,
        }
    )
