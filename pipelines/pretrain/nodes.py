"""Thin node: validated parameters + catalog inputs -> ``dinoflow.launch.launch_pretraining``."""

from __future__ import annotations

import pandas as pd

from dinoflow.config import DataConfig, PretrainConfig, validate
from dinoflow.launch import launch_pretraining
from dinoflow.models.vit import DinoVisionTransformer, load_backbone
from dinoflow.results import PretrainSummary


def pretrain(data: dict, pretrain: dict,
             curated_manifest: pd.DataFrame | None) -> tuple[PretrainSummary, DinoVisionTransformer]:
    """Train the student/teacher (in process, torchrun or SLURM, as ``pretrain.launcher`` says);
    returns the summary and the teacher backbone."""
    data_cfg = validate(DataConfig, data, "data")
    cfg = validate(PretrainConfig, pretrain, "pretrain")
    manifest_ids = None if curated_manifest is None else curated_manifest["item_id"].astype(str).tolist()
    summary = launch_pretraining(data_cfg, cfg, manifest_ids)
    return summary, load_backbone(summary.teacher_backbone)
