"""Distillation (DINOv2 section 5): the distillation method on the one trainer
(``dinoflow.training.trainer``). Re-running after a kill resumes from the newest checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dinoflow.config import DistillationConfig
from dinoflow.data import Split
from dinoflow.distributed import resolve_device, world
from dinoflow.errors import ConfigError
from dinoflow.files import atomic_write_json
from dinoflow.methods.distillation import Distillation
from dinoflow.methods.frozen_teacher import FrozenTeacher
from dinoflow.results import DistillationSummary
from dinoflow.training.budget import start_budget
from dinoflow.training.trainer import RunData, train

log = logging.getLogger(__name__)


def distill(
    cfg: DistillationConfig,
    teacher: FrozenTeacher,
    train_split: Split,
    mean: list[float],
    std: list[float],
    knn_bank: Split | None = None,
    knn_queries: Split | None = None,
    stop_after_steps: int | None = None,
    teacher_info: dict[str, Any] | None = None,
) -> DistillationSummary:
    """Distil ``teacher`` into the student ``cfg`` describes on ``train_split``; export its EMA.

    ``mean``/``std``: the normalisation the teacher was trained with. ``stop_after_steps`` ends
    the process after a checkpoint (tests of resumption). One process (no launcher).
    """
    budget = start_budget(cfg.train.time_budget_min, "distillation")  # counts from here
    if world()[1] > 1:
        raise ConfigError("distillation runs in one process (no distillation.launcher yet)")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    method = Distillation(
        cfg, teacher, train_split.channels, resolve_device(cfg.train.device), teacher_info
    )
    flops = method.flops
    log.info(
        "distillation: FLOPs per image student %.3g, teacher %.3g (%.3f)",
        flops["student_flops"],
        flops["teacher_flops"],
        flops["student_flops"] / flops["teacher_flops"],
    )
    result = train(
        method,
        RunData(train_split, mean, std, knn_bank, knn_queries),
        stop_after_steps=stop_after_steps,
        section="distillation",
        config=cfg.model_dump(mode="json"),
        budget=budget,
    )
    atomic_write_json(
        Path(result.run_dir) / "distillation_config.json", cfg.model_dump(mode="json")
    )
    return DistillationSummary(
        **result.summary_fields(mean, std, train_split.channels, method.cfg.crops.global_size),
        student_backbone=result.backbone,
        student_heads=result.heads,
        teacher=method.teacher_info,
        mode=method.mode,
        train_seconds=result.train_seconds,
        **flops,
    )
