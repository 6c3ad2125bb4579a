"""Thin node: validated parameters + catalog inputs -> ``dinoflow.launch.launch_pretraining``."""

from __future__ import annotations

import pandas as pd

from dinoflow.config import DataConfig, PretrainConfig, validate
from dinoflow.launch import launch_pretraining
from dinoflow.results import PretrainSummary


def pretrain(data: dict, pretrain: dict, curated_manifest: pd.DataFrame | None) -> PretrainSummary:
    """Train the student/teacher (in process, torchrun or SLURM, as ``pretrain.launcher`` says)
    in ``pretrain.train.run_dir``; the summary names the teacher backbone it wrote there."""
    data_cfg = validate(DataConfig, data, "data")
    cfg = validate(PretrainConfig, pretrain, "pretrain")
    manifest_ids = None if curated_manifest is None else curated_manifest["item_id"].astype(str).tolist()
    return launch_pretraining(data_cfg, cfg, manifest_ids)
