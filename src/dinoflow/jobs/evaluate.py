"""The evaluation job: the model (pretrain's backbone, a file or a registered version), the data,
every protocol with its baselines -> metrics and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from dinoflow.config import ConfigError, DataConfig
from dinoflow.data import channel_stats, data_identity, load_data
from dinoflow.distributed import resolve_device
from dinoflow.errors import DataError
from dinoflow.results import EvaluationReport, PretrainSummary


def load_model_for_evaluation(
    model: str | None, summary: PretrainSummary | None, backbone: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """(backbone, info) from ``evaluation.model`` (any source ``dinoflow.artifacts.load_model``
    takes: a registered-model URI, a run directory, a backbone file), else ``backbone`` (loaded
    by the caller), else the teacher backbone the pretrain summary names.

    info: {"source", "mean", "std", "image_size", "pretrain_run_id"} (None where unknown); the
    source's own preprocessing (a registered model's, a run directory's) replaces the summary's.
    """
    from dinoflow.artifacts import load_model

    info: dict[str, Any] = {
        "mean": summary.mean if summary else None,
        "std": summary.std if summary else None,
        "image_size": summary.image_size if summary else None,
        "pretrain_run_id": summary.mlflow_run_id if summary else None,
    }
    if model is None and backbone is not None:
        info["source"] = summary.teacher_backbone if summary else "a loaded backbone"
        return backbone.eval(), info
    source = model or (summary.teacher_backbone if summary else None)
    if not source:
        raise DataError(
            "evaluation.model: no model to evaluate. Run the pretrain pipeline first, or "
            "pass --params evaluation.model=<checkpoint path or models:/name@alias>"
        )
    info["source"] = str(source)
    artifact = load_model(str(source), key="evaluation.model")
    for key in ("mean", "std", "image_size"):
        if getattr(artifact, key) is not None:
            info[key] = getattr(artifact, key)
    return artifact.backbone, info


def evaluation_settings(params: dict[str, Any], out_dir: str, mean, std, image_size):
    """``params:evaluation`` (without ``model``) -> EvalSettings, one error naming the keys."""
    from pydantic import ValidationError

    from dinoflow.evaluation.report import EvalSettings

    params = dict(params)
    known = set(EvalSettings.model_fields) - {"out_dir", "mean", "std"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            "invalid parameters in evaluation: unknown key(s) "
            + ", ".join("evaluation." + k for k in unknown)
        )
    if params.get("image_size") is None and image_size:
        params["image_size"] = int(image_size)
    try:
        settings = EvalSettings.model_validate(
            {**params, "out_dir": out_dir, "mean": mean, "std": std}
        )
        # auto: the training device (the GPU on a GPU node, else the CPU)
        device = str(resolve_device(settings.device, "evaluation.device"))
        return settings.model_copy(update={"device": device})
    except ValidationError as exc:
        lines = [
            f"  evaluation.{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        ]
        raise ConfigError("invalid parameters in evaluation:\n" + "\n".join(lines)) from None
    except ValueError as exc:  # EvalSettings' own cross-field checks
        raise ConfigError(str(exc)) from None


def run_evaluation(
    data: DataConfig,
    params: dict[str, Any],
    summary: PretrainSummary | None,
    backbone: nn.Module | None,
    out_dir: str | Path,
) -> tuple[dict[str, float], EvaluationReport]:
    """Evaluate a teacher backbone: label-free metrics always; kNN, linear probe and segmentation
    with labels; baselines and pictures.

    Returns (metrics for metrics.json, report with details, files and provenance).
    """
    from dinoflow.evaluation.metric_spec import splits_are_labelled
    from dinoflow.evaluation.report import evaluate_backbone
    from dinoflow.models.vit import DinoVisionTransformer

    params, out_dir = dict(params or {}), str(out_dir)
    model = params.pop("model", None)
    evaluation_settings(params, out_dir, (0.5,), (0.5,), None)  # the keys, before any work
    backbone, info = load_model_for_evaluation(model, summary, backbone)
    splits = load_data(data)
    if info["mean"] is None or info["std"] is None:
        info["mean"], info["std"] = channel_stats(splits["train"])
    settings = evaluation_settings(
        params, out_dir, info["mean"], info["std"], info.get("image_size")
    )
    kwargs = backbone.backbone_kwargs()
    metrics, files = evaluate_backbone(
        backbone, splits, settings, random_backbone_factory=lambda: DinoVisionTransformer(**kwargs)
    )
    # the precision evaluate_backbone resolved (evaluation.precision auto) is in its details
    precision = json.loads(Path(files["details"]).read_text())["precision"]["precision"]
    report = EvaluationReport(
        model=info["source"],
        pretrain_run_id=info["pretrain_run_id"],
        eval_data_id=data_identity(splits["test"].ids),
        val_data_id=data_identity(splits["val"].ids),
        data=data.model_dump(mode="json"),
        files={k: str(v) for k, v in files.items()},
        metrics=metrics,
        labelled=splits_are_labelled(splits),
        precision=precision,
        image_size=settings.image_size,
        crop_ratio=settings.crop_ratio,
    )
    return metrics, report
