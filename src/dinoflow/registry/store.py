"""Everything of the registry that talks to MLflow: logging and registering a version, promotion
recorded as aliases and tags, the model card attached, one registration at a time (a lock), the
repair of a half-made version, the lineage searched in the tracking store, and the registration
job ``register_pretrained`` that does it all.

The registered model ``dinoflow-backbone`` is a ``RegisteredBackbone``
(``dinoflow.registry.model``), logged with ``mlflow.pytorch`` in the pickle format
(``torch.export``'s "pt2" keeps only ``forward`` and fixes the image size; the contract also needs
``forward_patches`` and any multiple of the patch size); the package source also travels with the
model (``code_paths``) for machines without dinoflow. The promotion numbers, the metric's name,
the data identities and the decision are kept as version tags, so each decision can be checked
later from the registry alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from dinoflow.config import ConfigError
from dinoflow.data import data_identity
from dinoflow.data.transforms import DEFAULT_CROP_RATIO
from dinoflow.registry.card import model_card
from dinoflow.registry.model import RegisteredBackbone, weights_sha256
from dinoflow.registry.promotion import (
    AUTO_LABELLED_METRIC,
    CHALLENGER,
    CHAMPION,
    MODEL_NAME,
    RegistrationConfig,
    decide,
    metric_tag,
    metric_why,
    resolve_registration_metric,
)

log = logging.getLogger(__name__)

__all__ = [
    "EXPERIMENT",
    "log_and_register",
    "promote",
    "register_pretrained",
    "registered_with_weights",
    "registry_lock",
    "repair_half_made_versions",
]

EXPERIMENT = "dinoflow"
# Model-version tags: what promotion compares, and where the version came from. The value is kept
# under "dinoflow.<metric name>" (``promotion.metric_tag``: "dinoflow.knn_top1" for kNN), the
# name under TAG_PROMOTION_METRIC (also a tag of the registration run).
TAG_METRIC = "dinoflow.knn_top1"
TAG_PROMOTION_METRIC = "dinoflow.promotion_metric"
TAG_EVAL_DATA = "dinoflow.eval_data_id"
TAG_DECISION = "dinoflow.decision"
# Atomic registration: a version is born "started" (its creation tags) and becomes "complete"
# as the very last step; the next registration removes a started, incomplete one.
TAG_STARTED = "dinoflow.registration_started"
TAG_COMPLETE = "dinoflow.registration_complete"
TAG_WEIGHTS = "dinoflow.weights_sha256"
TAG_PREVIOUS_CHAMPION = "dinoflow.previous_champion"
MAX_DESCRIPTION = 4900  # MLflow's SQL store keeps descriptions in a 5000-character column
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/dinoflow: the code logged with a model


def _example_input(model: RegisteredBackbone, batch: int) -> np.ndarray:
    """A fixed, normalised-looking input (batch, C, S, S) float32 for the signature/example."""
    rng = np.random.default_rng(0)
    s = model.image_size
    return rng.standard_normal((batch, model.in_chans, s, s)).astype(np.float32)


def _signature(model: RegisteredBackbone):
    """Tensor signature with a free batch and free H, W (multiples of the patch size).

    Unnamed specs: a named one makes the serving input a dict, which the PyTorch flavor rejects.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.in_chans, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.embed_dim))]),
    )


def _requirements() -> list[str]:
    from dinoflow.serving import pinned_requirements

    return pinned_requirements()


def log_and_register(
    model: RegisteredBackbone,
    model_name: str = MODEL_NAME,
    tags: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    input_example_batch: int = 2,
    log_code: bool = True,
):
    """Log ``model`` to the active MLflow run (artifact ``backbone``) and register it.

    Returns the ``ModelVersion`` (its ``version`` is a string); ``tags`` go on the version.
    Needs an active run (``mlflow.start_run`` or kedro-mlflow's).
    """
    import mlflow

    if mlflow.active_run() is None:
        raise RuntimeError("log_and_register needs an active MLflow run")
    model = model.eval()
    example = _example_input(model, input_example_batch)
    code_paths = [str(PACKAGE_DIR)] if log_code else None
    info = mlflow.pytorch.log_model(
        model,
        name="backbone",
        serialization_format="pickle",
        signature=_signature(model),
        input_example=example,
        pip_requirements=_requirements(),
        code_paths=code_paths,
        metadata={
            "dinoflow": {
                "mean": list(model.mean),
                "std": list(model.std),
                "image_size": model.image_size,
                "crop_ratio": model.crop_ratio,
                "in_chans": model.in_chans,
                "patch_size": model.patch_size,
                "embed_dim": model.embed_dim,
                "preprocessing": model.preprocessing,
                **(metadata or {}),
            }
        },
    )
    version = mlflow.register_model(
        info.model_uri, model_name, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    log.info("registered %s version %s (%s)", model_name, version.version, info.model_uri)
    return version


def _alias_version(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def _tag_candidate(
    client,
    model_name: str,
    version: str,
    tag_metric: str,
    metric_value: float,
    metric_name: str,
    data_id: str,
) -> None:
    """The version's metric value, promotion metric and evaluation data id, as its tags."""
    for tag, value in (
        (tag_metric, repr(metric_value)),
        (TAG_PROMOTION_METRIC, metric_name),
        (TAG_EVAL_DATA, data_id),
    ):
        client.set_model_version_tag(model_name, version, tag, value)


def _champion(
    client, model_name: str, version: str, tag_metric: str
) -> tuple[str | None, float | None, str | None]:
    """(version, metric, eval data id) of the champion (None if there is none); another
    champion than ``version`` is recorded on it, given back if this one is undone."""
    champ = _alias_version(client, model_name, CHAMPION)
    other = champ if champ is not None and str(champ.version) != version else None
    if other is not None:  # given back if this one is undone
        client.set_model_version_tag(model_name, version, TAG_PREVIOUS_CHAMPION, str(other.version))
    raw = other.tags.get(tag_metric) if other is not None else None
    champ_metric = float(raw) if raw is not None else None
    champ_data = other.tags.get(TAG_EVAL_DATA) if other is not None else None
    champ_version = None if champ is None else str(champ.version)
    return champ_version, champ_metric, champ_data


def promote(
    version: str | int,
    metric_value: float,
    data_id: str,
    model_name: str = MODEL_NAME,
    min_improvement: float = 0.0,
    client=None,
    metric_name: str = "knn_top1",
) -> dict[str, Any]:
    """Give ``version`` the alias champion if it beats the champion on the same data, else challenger.

    ``metric_value`` (the metrics.json key ``metric_name``; better = higher, or lower for
    alignment and uniformity: ``metric_spec.direction``) and ``data_id`` (``eval_data_id``) are
    stored as tags of the version; the champion's are read from its tags ("dinoflow.<metric_name>":
    a champion promoted on another metric has none, and stays). The policy is
    ``promotion.decide``. Returns the decision: {version, alias, promoted, metric, metric_name,
    champion_metric, champion_version, eval_data_id, champion_eval_data_id, reason}.
    """
    from mlflow import MlflowClient

    client = client or MlflowClient()
    version = str(version)
    metric_value = float(metric_value)
    if not math.isfinite(metric_value):
        raise ValueError(f"promote: metric value {metric_value} is not finite")
    tag_metric = metric_tag(metric_name)
    _tag_candidate(client, model_name, version, tag_metric, metric_value, metric_name, data_id)
    champ_version, champ_metric, champ_data = _champion(client, model_name, version, tag_metric)
    promoted, reason = decide(
        version,
        metric_name,
        metric_value,
        data_id,
        champ_version,
        champ_metric,
        champ_data,
        min_improvement,
    )
    alias = CHAMPION if promoted else CHALLENGER
    client.set_registered_model_alias(model_name, alias, version)
    decision = {
        "model_name": model_name,
        "version": version,
        "alias": alias,
        "promoted": promoted,
        "metric": metric_value,
        "metric_name": metric_name,
        "champion_metric": champ_metric,
        "champion_version": champ_version,
        "eval_data_id": data_id,
        "champion_eval_data_id": champ_data,
        "reason": reason,
    }
    client.set_model_version_tag(model_name, version, TAG_DECISION, f"{alias}: {reason}")
    log.info("%s v%s -> %s (%s)", model_name, version, alias, reason)
    return decision


@contextlib.contextmanager
def _active_run(experiment: str = EXPERIMENT) -> Iterator[Any]:
    """The active run, or a new one in ``experiment`` (closed on exit)."""
    import mlflow

    from dinoflow.tracking import use_experiment

    run = mlflow.active_run()
    if run is not None:
        yield run
        return
    use_experiment(experiment)
    with mlflow.start_run(run_name="registration") as run:
        # which process owns it: a later run ends it as KILLED if this one dies
        mlflow.set_tags({"dinoflow.pid": str(os.getpid()), "dinoflow.host": socket.gethostname()})
        yield run


# --------------------------------------------------------------------------- atomic registration
@contextlib.contextmanager
def registry_lock() -> Iterator[None]:
    """One registration at a time per SQLite store: a lock file beside the database (another
    kind of store serialises on its own side)."""
    import mlflow

    uri = mlflow.get_registry_uri() or mlflow.get_tracking_uri()
    if not str(uri).startswith("sqlite:///"):
        yield
        return
    from dinoflow.files import FolderLock

    db = Path(str(uri).removeprefix("sqlite:///"))
    with FolderLock(db.parent, "registration", name=f".{db.name}.registration.lock"):
        yield


def repair_half_made_versions(client, model_name: str) -> list[str]:
    """Versions a killed registration left without their decision: removed, and the champion
    alias they may have taken given back. Returns the versions removed."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return []
    removed = []
    champion = _alias_version(client, model_name, CHAMPION)
    for v in versions:
        if v.tags.get(TAG_STARTED) != "true" or v.tags.get(TAG_COMPLETE) == "true":
            continue  # complete, or registered before these tags existed
        previous = v.tags.get(TAG_PREVIOUS_CHAMPION)
        if champion is not None and str(champion.version) == str(v.version):
            if previous:
                client.set_registered_model_alias(model_name, CHAMPION, previous)
            else:
                client.delete_registered_model_alias(model_name, CHAMPION)
        client.delete_model_version(model_name, v.version)
        removed.append(str(v.version))
    if removed:
        log.warning(
            "registration: removed %s version(s) %s left unfinished by a killed registration",
            model_name,
            ", ".join(removed),
        )
    return removed


def registered_with_weights(client, model_name: str, sha: str):
    """The complete version of ``model_name`` that holds exactly these weights, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(
            f"name='{model_name}' and tag.`{TAG_WEIGHTS}` = '{sha}'"
        )
    except MlflowException:
        return None
    complete = [v for v in found if v.tags.get(TAG_COMPLETE) == "true"]
    return max(complete, key=lambda v: int(v.version)) if complete else None


def _already_registered(client, version, cfg: RegistrationConfig) -> dict[str, Any]:
    """The decision of an existing version with the same weights: nothing new is made."""
    aliases = [
        a
        for a in (CHAMPION, CHALLENGER)
        if (held := _alias_version(client, cfg.model_name, a)) is not None
        and str(held.version) == str(version.version)
    ]
    metric_name = version.tags.get("dinoflow.promotion_metric", "knn_top1")
    metric = float(version.tags.get(f"dinoflow.{metric_name}", "nan"))
    return {
        "model_name": cfg.model_name,
        "version": str(version.version),
        "alias": aliases[0] if aliases else "",
        "promoted": False,
        "metric": metric,
        "metric_name": metric_name,
        "eval_data_id": version.tags.get(TAG_EVAL_DATA),
        "reason": f"already registered as v{version.version} (the same weights): no new version",
        "model_uri": f"models:/{cfg.model_name}/{version.version}",
        "lineage": {
            k.removeprefix("dinoflow."): v
            for k, v in version.tags.items()
            if k.endswith("_run_id") or k in ("dinoflow.curated_data_md5", "dinoflow.git_commit")
        },
    }


def _run_tags(client, run_id: str | None) -> dict[str, str]:
    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.tags)
    except Exception:  # noqa: BLE001 - a run from another tracking store: lineage says unknown
        log.warning("registration: run %s not found in this tracking store", run_id)
        return {}


def _pictures(
    summary: Mapping[str, Any], report: Mapping[str, Any], patterns: Sequence[str]
) -> list[Path]:
    """Training curves (pretrain run dir), the evaluation report's PNGs, files matching ``patterns``."""
    found: list[Path] = []
    run_dir = summary.get("run_dir")
    if run_dir:
        found.append(Path(run_dir) / "training_curves.png")
    found += [Path(p) for p in (report.get("files") or {}).values() if str(p).endswith(".png")]
    for pattern in patterns:
        found += sorted(Path(".").glob(pattern))
    unique: dict[str, Path] = {}
    for p in found:
        if p.is_file():
            unique.setdefault(p.name, p)  # the card refers to pictures by file name
    return list(unique.values())


def _evaluation_run(client, run_id: str, pretrain_run_id: str | None, data_id: str) -> str | None:
    """The latest evaluation run of this pretrain run on this data (when no file names it).

    In a single ``kedro run`` of the default pipeline (or of evaluation + registration) the
    evaluation ran in this same run: it is found too (only an evaluation tags a run with
    ``dinoflow.eval_data_id``; registration never does).
    """
    if not pretrain_run_id:
        return None
    if pretrain_run_id == run_id:
        return run_id
    try:
        experiment = client.get_run(run_id).info.experiment_id
        runs = client.search_runs(
            [experiment],
            filter_string=(
                f"tags.`dinoflow.pretrain_run_id` = '{pretrain_run_id}' and "
                f"tags.`dinoflow.eval_data_id` = '{data_id}'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=5,
        )
    except Exception:  # noqa: BLE001 - lineage is best effort; the decision does not need it
        return None
    return runs[0].info.run_id if runs else None


def _register_embedder(
    version, model: RegisteredBackbone, cfg: RegistrationConfig, tags: Mapping[str, str]
) -> dict[str, Any]:
    """``dinoflow-embedder`` over the backbone ``version`` just promoted, with its aliases."""
    from dinoflow.serving import register_embedder

    return register_embedder(
        version, model, cfg.model_name, cfg.embedder_name, tags=tags, log_code=cfg.log_code
    )


def _lineage(
    client,
    run_id: str,
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    report: Mapping[str, Any],
    data_id: str,
    git_commit: str,
) -> dict[str, Any]:
    """Where the version came from: its runs, data hash, code, env and config fingerprint."""
    own_tags = _run_tags(client, run_id)
    pretrain_tags = _run_tags(client, summary.get("mlflow_run_id"))
    return {
        "pretrain_run_id": summary.get("mlflow_run_id"),
        "evaluation_run_id": metrics.get("mlflow_run_id")
        or report.get("mlflow_run_id")
        or _evaluation_run(client, run_id, summary.get("mlflow_run_id"), data_id),
        "registration_run_id": run_id,
        "curated_data_md5": pretrain_tags.get("dinoflow.curated_data_md5", "unknown"),
        "pretrain_git_commit": pretrain_tags.get("dinoflow.git_commit", "unknown"),
        "git_commit": git_commit,
        "kedro_env": own_tags.get("dinoflow.env", pretrain_tags.get("dinoflow.env", "unknown")),
        "fingerprint": summary.get("fingerprint", ""),
    }


def _attach_card(
    client,
    cfg: RegistrationConfig,
    version: str,
    decision: Mapping[str, Any],
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    report: Mapping[str, Any],
    lineage: Mapping[str, Any],
    model: RegisteredBackbone,
    card_extra: str = "",
) -> None:
    """The model card (``card_extra`` appended): logged with its pictures on the run and as the
    version's description."""
    import mlflow

    pictures = _pictures(summary, report, cfg.pictures)
    card = (
        model_card(
            cfg.model_name,
            decision,
            summary,
            metrics,
            lineage,
            model.backbone.backbone_kwargs(),
            [p.name for p in pictures],
            cfg.embedder_name,
        )
        + card_extra
    )
    for p in pictures:
        mlflow.log_artifact(str(p), artifact_path="model_card")
    mlflow.log_text(card, "model_card/model_card.md")
    description = card
    if len(description) > MAX_DESCRIPTION:
        description = card[:MAX_DESCRIPTION] + "\n\n(truncated: model_card/model_card.md)"
    client.update_model_version(cfg.model_name, version, description=description)


def _registered_model(
    summary: Mapping[str, Any], report: Mapping[str, Any], backbone: nn.Module | None
) -> RegisteredBackbone:
    """The backbone with the preprocessing its metrics were measured with: the evaluation's crop
    size and crop ratio (evaluation_report.json), else the training size and the default ratio."""
    if backbone is None:
        backbone = RegisteredBackbone.from_summary(summary).backbone
    return RegisteredBackbone(
        backbone.eval(),
        summary["mean"],
        summary["std"],
        report.get("image_size") or summary["image_size"],
        summary.get("channels"),
        crop_ratio=report.get("crop_ratio") or DEFAULT_CROP_RATIO,
    )


def _promotion_inputs(
    cfg: RegistrationConfig,
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    report: Mapping[str, Any],
    labelled: bool | None,
) -> tuple[str, float, str, str]:
    """(metric, its value, why it decides, eval_data_id), checked before any work."""
    if labelled is None:
        labelled = bool(report.get("labelled", AUTO_LABELLED_METRIC in metrics))
    metric = resolve_registration_metric(cfg.metric, labelled)
    if metric not in metrics:
        raise ConfigError(
            f"registration.metric: {metric!r} is not in metrics.json "
            f"(keys: {sorted(metrics)}); run the evaluation pipeline first"
        )
    why = metric_why(metric, cfg.metric, labelled)
    log.info("registration: promotion metric %s", why)
    data_id = metrics.get("eval_data_id") or report.get("eval_data_id")
    if not data_id:
        # older metrics files: the data config fixes the splits for a given source
        data_id = "data:" + data_identity([json.dumps(summary.get("data"), sort_keys=True)])
        log.warning(
            "no eval_data_id in metrics or report: using %s (from the data config)", data_id
        )
    return metric, float(metrics[metric]), why, data_id


def _unchanged(client, existing, cfg: RegistrationConfig) -> dict[str, Any]:
    """The same weights are registered already: their decision, nothing new made."""
    import mlflow

    result = _already_registered(client, existing, cfg)
    log.info("%s: %s", cfg.model_name, result["reason"])
    mlflow.set_tags(
        {
            "dinoflow.registered_version": f"{cfg.model_name}/{existing.version}",
            "dinoflow.registration_decision": "unchanged",
        }
    )
    return result


def _version_tags(
    lineage: Mapping[str, Any], extra_tags: Mapping[str, str] | None
) -> dict[str, str]:
    """The new version's tags (its lineage and ``extra_tags``); the parents and the extra ones
    also go on the registration run."""
    import mlflow

    known = {f"dinoflow.{k}": str(v) for k, v in lineage.items() if v not in (None, "")}
    known.update({k: str(v) for k, v in (extra_tags or {}).items()})
    parents = ("dinoflow.pretrain_run_id", "dinoflow.evaluation_run_id")
    mlflow.set_tags({k: v for k, v in known.items() if k in parents or k in (extra_tags or {})})
    return known


def _log_decision(
    cfg: RegistrationConfig, version: str, value: float, decision: Mapping[str, Any]
) -> None:
    """The numbers and the decision on the registration run."""
    import mlflow

    numbers = {
        "registration/metric": value,
        "registration/promoted": float(decision["promoted"]),
        "registration/version": float(version),
    }
    if decision["champion_metric"] is not None:
        numbers["registration/champion_metric"] = decision["champion_metric"]
    mlflow.log_metrics(numbers)
    mlflow.set_tags(
        {
            "dinoflow.registered_version": f"{cfg.model_name}/{version}",
            "dinoflow.registration_decision": decision["alias"],
        }
    )


def _repair_and_find(client, cfg: RegistrationConfig, model: RegisteredBackbone) -> tuple[str, Any]:
    """Remove what a killed registration left (half-made versions, their embedders), then
    (the weights' hash, the complete version that holds these weights already or None)."""
    repair_half_made_versions(client, cfg.model_name)
    if cfg.embedder_name:
        from dinoflow.serving import remove_orphan_embedders

        remove_orphan_embedders(cfg.model_name, cfg.embedder_name, client)
    sha = weights_sha256(model)
    return sha, registered_with_weights(client, cfg.model_name, sha)


def _log_version(
    model: RegisteredBackbone,
    cfg: RegistrationConfig,
    known: Mapping[str, str],
    sha: str,
    summary: Mapping[str, Any],
):
    """A new version of the weights, tagged as started (complete once the job is done)."""
    return log_and_register(
        model,
        cfg.model_name,
        tags={**known, TAG_STARTED: "true", TAG_WEIGHTS: sha},
        metadata={"fingerprint": summary.get("fingerprint", "")},
        input_example_batch=cfg.input_example_batch,
        log_code=cfg.log_code,
    )


def _promote_version(
    client, cfg: RegistrationConfig, version, metric: str, value: float, data_id: str, why: str
) -> dict[str, Any]:
    """``promote`` the new version on ``metric``; the decision, with why that metric."""
    import mlflow

    mlflow.set_tag(TAG_PROMOTION_METRIC, metric)
    decision = promote(
        version.version,
        value,
        data_id,
        cfg.model_name,
        cfg.min_improvement,
        client,
        metric_name=metric,
    )
    decision["metric_why"] = why
    return decision


def _registration_result(
    cfg: RegistrationConfig,
    version,
    decision: Mapping[str, Any],
    metric: str,
    lineage: Mapping[str, Any],
    model: RegisteredBackbone,
    known: Mapping[str, str],
) -> dict[str, Any]:
    """The registration summary; the embedder registered beside the backbone, if configured."""
    result = {
        **decision,
        "metric_name": metric,
        "model_uri": f"models:/{cfg.model_name}/{version.version}",
        "lineage": lineage,
    }
    if cfg.embedder_name:
        result["embedder"] = _register_embedder(version, model, cfg, known)
    return result


def register_pretrained(
    summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    cfg: RegistrationConfig | None = None,
    git_commit: str = "unknown",
    report: Mapping[str, Any] | None = None,
    backbone: nn.Module | None = None,
    labelled: bool | None = None,
    extra_tags: Mapping[str, str] | None = None,
    card_extra: str = "",
) -> dict[str, Any]:
    """The registration job: log + register the teacher backbone, promote it, attach the card.

    summary: pretrain_summary.json (teacher_backbone, mean, std, image_size, channels,
    mlflow_run_id, fingerprint, data, ...). metrics: metrics.json (the promotion metric; optional
    ``eval_data_id``, ``mlflow_run_id``). report: evaluation_report.json (``eval_data_id``,
    ``files``, ``labelled``, optional ``mlflow_run_id``), read where metrics lacks a key.
    labelled: whether the data has labels (for ``registration.metric: auto``; default: the
    report's ``labelled``, else whether metrics.json holds knn_top1). ``extra_tags`` go on the
    version and the run (a distilled student: its teacher's version and run); ``card_extra`` is
    markdown appended to the model card. Runs in the active MLflow run or a new one. Returns the
    registration summary (version, alias, metric name and why, both numbers, reason, lineage).
    """
    import mlflow
    from mlflow import MlflowClient

    summary = summary.model_dump(mode="json") if hasattr(summary, "model_dump") else summary
    report = report.model_dump(mode="json") if hasattr(report, "model_dump") else report
    cfg, report = cfg or RegistrationConfig(), report or {}
    metric, value, why, data_id = _promotion_inputs(cfg, summary, metrics, report, labelled)
    model = _registered_model(summary, report, backbone)
    client = MlflowClient()
    with registry_lock(), _active_run() as run:
        sha, existing = _repair_and_find(client, cfg, model)
        if existing is not None:
            return _unchanged(client, existing, cfg)
        lineage = _lineage(client, run.info.run_id, summary, metrics, report, data_id, git_commit)
        known = _version_tags(lineage, extra_tags)
        version = _log_version(model, cfg, known, sha, summary)
        decision = _promote_version(client, cfg, version, metric, value, data_id, why)
        _attach_card(
            client,
            cfg,
            version.version,
            decision,
            summary,
            metrics,
            report,
            lineage,
            model,
            card_extra,
        )
        _log_decision(cfg, version.version, value, decision)
        result = _registration_result(cfg, version, decision, metric, lineage, model, known)
        mlflow.log_dict(result, "registration/decision.json")
        client.set_model_version_tag(cfg.model_name, version.version, TAG_COMPLETE, "true")
    return result
