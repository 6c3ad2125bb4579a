"""DINOv2 pretraining: the DINOv2 method on the one trainer (``dinoflow.training.trainer``).

Re-running after a kill resumes by itself from the newest readable checkpoint. Under
torch.distributed (torchrun, SLURM) each process takes its slice of the global batch; only the
main process writes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dinoflow.config import PretrainConfig
from dinoflow.data import Split
from dinoflow.distributed import resolve_device, world
from dinoflow.methods.dinov2 import DINOv2
from dinoflow.results import PretrainSummary
from dinoflow.training.budget import start_budget
from dinoflow.training.trainer import RunData, train


def pretrain(
    cfg: PretrainConfig,
    train_split: Split,
    mean: list[float],
    std: list[float],
    knn_bank: Split | None = None,
    knn_queries: Split | None = None,
    stop_after_steps: int | None = None,
    on_knn: Callable[[int, float], None] | None = None,
) -> PretrainSummary:
    """Train a DINOv2 student/teacher on ``train_split``; write the teacher backbone and heads.

    ``stop_after_steps`` ends the process early after a checkpoint (tests of resumption).
    ``on_knn(step, top1)`` is called after each online kNN check (e.g. an Optuna pruner); it may
    raise to stop the run. A fresh run checks kNN at step 0 too: the starting point.
    """
    budget = start_budget(cfg.train.time_budget_min)  # counts from here
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    world_size = world()[1]
    fsdp = world_size > 1 and cfg.launcher.strategy == "fsdp"
    method = DINOv2(cfg, train_split.channels, resolve_device(cfg.train.device), shard=fsdp)
    data = RunData(train_split, mean, std, knn_bank, knn_queries, on_knn)
    result = train(method, data, stop_after_steps=stop_after_steps, fsdp=fsdp, budget=budget)
    return PretrainSummary(
        **result.summary_fields(mean, std, train_split.channels, cfg.crops.global_size),
        teacher_backbone=result.backbone,
        teacher_heads=result.heads,
        world_size=result.world_size,
        unreadable_files=result.unreadable_files,
        n_unreadable_files=len(result.unreadable_files),
    )
