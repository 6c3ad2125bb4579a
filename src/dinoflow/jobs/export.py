"""The export job: the champion (or any registered version) as ONNX and as a timm state dict."""

from __future__ import annotations

from typing import Any

from dinoflow import tracking
from dinoflow.distributed import resolve_device
from dinoflow.export import ExportConfig, export_backbone
from dinoflow.serving import load_registered_backbone


def export_job(cfg: ExportConfig) -> dict[str, Any]:
    """The export pipeline's job: load ``cfg.model`` (the champion by default), export, log.

    The files go to the active MLflow run under ``export/`` (and the max abs differences as
    metrics ``export/...``) when ``cfg.log_to_mlflow``.
    """
    model = load_registered_backbone(cfg.model).to(resolve_device(cfg.device, "export.device"))
    summary = export_backbone(model, cfg, source=cfg.model)
    if cfg.log_to_mlflow:
        for path in summary["files"].values():
            tracking.log_artifact(path, "export")
        tracking.log_metrics({f"export/{k}": v for k, v in summary["max_abs_diff"].items()})
        tracking.set_tags({"dinoflow.exported_model": cfg.model[:250]})
    return summary
