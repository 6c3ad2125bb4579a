"""Every parameter of a run validated before its first node (``RunGuardHooks``).

Each top-level section of ``parameters*.yml`` (and of ``--params``) has one validator: the same
pydantic model the node validates with, so the node and the check can never disagree. Sections
that no pipeline knows are named with the closest known name (``pretrian`` -> ``pretrain``).
Cross-section rules (tuning's paths into ``pretrain``, registration's metric against the data)
run here too. Everything is cheap: nothing reads an image.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

from dinoflow.config import ConfigError, DataConfig, PretrainConfig, validate

Validator = Callable[[dict[str, Any], dict[str, Any]], None]  # (section params, all params)


def _data(p: dict, _: dict) -> None:
    validate(DataConfig, p, "data")


def _pretrain(p: dict, _: dict) -> None:
    validate(PretrainConfig, p, "pretrain")


def _curation(p: dict, _: dict) -> None:
    from dinoflow.curation import curation_config

    curation_config(p)


def _evaluation(p: dict, _: dict) -> None:
    from pathlib import Path

    from dinoflow.artifacts import is_mlflow_uri
    from dinoflow.jobs.evaluate import evaluation_settings

    params = dict(p or {})
    model = params.pop("model", None)
    evaluation_settings(params, "data/08_reporting", (0.5,), (0.5,), None)
    if model and not is_mlflow_uri(model) and not Path(model).exists():
        raise ConfigError(f"evaluation.model: {model} does not exist (a models:/ or runs:/ URI, "
                          "a run directory or a backbone file)")


def _registration(p: dict, everything: dict) -> None:
    from dinoflow.evaluation.metric_spec import data_is_labelled
    from dinoflow.registry import RegistrationConfig, resolve_registration_metric

    cfg = validate(RegistrationConfig, p, "registration")
    data = validate(DataConfig, everything.get("data"), "data")
    try:
        labelled = data_is_labelled(data)  # lists a folder, decodes nothing
    except Exception:  # noqa: BLE001 - a missing folder is the data section's (and the run's) error
        return
    resolve_registration_metric(cfg.metric, labelled)


def _tuning(p: dict, everything: dict) -> None:
    from dinoflow.tuning import TuningConfig, check_tuning_config

    tuning = validate(TuningConfig, p, "tuning")
    check_tuning_config(validate(PretrainConfig, everything.get("pretrain"), "pretrain"), tuning)


def _export(p: dict, _: dict) -> None:
    from dinoflow.export import ExportConfig

    validate(ExportConfig, p, "export")


def _embed(p: dict, _: dict) -> None:
    from dinoflow.embeddings import EmbedConfig

    validate(EmbedConfig, p, "embed")


def _distillation(p: dict, _: dict) -> None:
    from pathlib import Path

    from dinoflow.artifacts import is_mlflow_uri
    from dinoflow.config import DistillationConfig

    cfg = validate(DistillationConfig, p, "distillation")
    source = cfg.teacher.source
    if not is_mlflow_uri(source) and not Path(source).exists():
        raise ConfigError(f"distillation.teacher.source: {source} does not exist (a models:/ or "
                          "runs:/ URI, a run directory or a backbone file)")
    if cfg.teacher.heads and not Path(cfg.teacher.heads).is_file():
        raise ConfigError(f"distillation.teacher.heads: {cfg.teacher.heads} does not exist")


def _distillation_registration(p: dict, _: dict) -> None:
    from dinoflow.registry import RegistrationConfig

    validate(RegistrationConfig, p, "distillation_registration")


VALIDATORS: dict[str, Validator] = {
    "data": _data,
    "curation": _curation,
    "pretrain": _pretrain,
    "evaluation": _evaluation,
    "registration": _registration,
    "tuning": _tuning,
    "export": _export,
    "embed": _embed,
    "distillation": _distillation,
    "distillation_registration": _distillation_registration,
}


def validate_run_parameters(params: dict[str, Any], used: Iterable[str] | None = None) -> list[str]:
    """Check the sections the run uses (``used``: section names; None: those present) and refuse
    unknown sections. Returns the sections checked; raises one ConfigError naming every problem."""
    problems: list[str] = []
    for name in sorted(set(params) - set(VALIDATORS)):
        close = difflib.get_close_matches(name, list(VALIDATORS), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(f"  {name}: unknown parameter section{hint}; known: {', '.join(VALIDATORS)}")
    checked = [s for s in VALIDATORS if (s in params if used is None else s in set(used))]
    for section in checked:
        try:
            VALIDATORS[section](params.get(section) or {}, params)
        except ConfigError as exc:
            problems.append("  " + str(exc).replace("\n", "\n  "))
    if problems:
        raise ConfigError("invalid parameters, nothing was run:\n" + "\n".join(problems))
    return checked


def sections_used(pipeline) -> set[str]:
    """The top-level parameter sections a Kedro pipeline's nodes read (``params:<section>``)."""
    return {name.split(":", 1)[1].split(".", 1)[0] for name in pipeline.inputs()
            if name.startswith("params:")}
