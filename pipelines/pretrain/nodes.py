"""Thin nodes: validated parameters + catalog inputs -> dinoflow library calls."""

from __future__ import annotations

from typing import Any

import pandas as pd

from dinoflow.config import DataConfig, PretrainConfig, validate


def pretrain(data: dict, pretrain: dict, curated_manifest: pd.DataFrame | None) -> dict[str, Any]:
    """Train the student/teacher; returns the summary (model paths, steps, losses, kNN, speed)."""
    data_cfg = validate(DataConfig, data, "data")
    cfg = validate(PretrainConfig, pretrain, "pretrain")
    manifest_ids = None if curated_manifest is None else curated_manifest["item_id"].astype(str).tolist()
    if cfg.launcher.type != "local":
        from dinoflow.launch import launch_pretraining

        return launch_pretraining(data_cfg, cfg, manifest_ids)
    from dinoflow.workflow import run_pretraining

    return run_pretraining(data_cfg, cfg, manifest_ids)
