"""Thin node: validated parameters -> ``dinoflow.jobs.export.export_job``."""

from __future__ import annotations

from typing import Any

from dinoflow.config import validate
from dinoflow.export import ExportConfig
from dinoflow.jobs.export import export_job


def export_model(export: dict) -> dict[str, Any]:
    """Export ``export.model`` (default models:/dinoflow-backbone@champion); returns the summary
    (files, timm.create_model kwargs, preprocessing, max abs differences to PyTorch)."""
    return export_job(validate(ExportConfig, export, "export"))
