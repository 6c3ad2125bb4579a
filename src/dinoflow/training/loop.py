"""DINOv2 pretraining, read top to bottom: build, resume, wrap, loop, export.

Re-running after a kill resumes by itself from the newest readable checkpoint. Under
torch.distributed (torchrun, SLURM) each process takes its slice of the global batch; only the
main process writes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinoflow.config import PretrainConfig
from dinoflow.data import Split
from dinoflow.distributed import barrier, resolve_device, world
from dinoflow.errors import TrainingDiverged
from dinoflow.results import PretrainSummary
from dinoflow.training.budget import StepBudget, budget_for
from dinoflow.training.checkpoint import Checkpointer
from dinoflow.training.components import (
    Components,
    backbone_from_config,
    build_components,
    build_student,
    set_run_length,
)
from dinoflow.training.data import build_loader
from dinoflow.training.export import export_teacher, write_history
from dinoflow.training.metrics import MetricLogger
from dinoflow.training.online_knn import OnlineKNN
from dinoflow.training.parallel import seed_ranks, wrap_for_training
from dinoflow.training.step import precision_choice, train_step

log = logging.getLogger(__name__)


def pretrain(
    cfg: PretrainConfig,
    train: Split,
    mean: list[float],
    std: list[float],
    knn_bank: Split | None = None,
    knn_queries: Split | None = None,
    stop_after_steps: int | None = None,
    on_knn: Callable[[int, float], None] | None = None,
) -> PretrainSummary:
    """Train a DINOv2 student/teacher on ``train``; write the teacher backbone and heads.

    ``stop_after_steps`` ends the process early after a checkpoint (tests of resumption).
    ``on_knn(step, top1)`` is called after each online kNN check (e.g. an Optuna pruner); it may
    raise to stop the run. A fresh run checks kNN at step 0 too: the starting point.
    """
    started = time.perf_counter()  # a time budget counts from here
    cfg = resolve_auto(cfg)
    rank, world_size = world()
    main, device, t = rank == 0, resolve_device(cfg.train.device), cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    fsdp = world_size > 1 and cfg.launcher.strategy == "fsdp"
    run = build_components(cfg, len(train), train.channels, world_size, device, shard=fsdp)
    checkpoints = Checkpointer(t.run_dir, run.fingerprint, t.checkpoint_every_steps,
                               t.keep_checkpoints, fsdp, main)
    start_step, history = checkpoints.restore(run) if t.resume else (0, [])
    budget = budget_for(cfg, run.total_steps, start_step, checkpoints.restored_chosen_steps, started,
                        device)
    global_batch = t.batch_size * world_size
    if budget is not None and budget.decided is not None:
        set_run_length(run, cfg, budget.decided, global_batch)  # the length it was resumed on
    cfg, why = pin_precision(run, cfg, checkpoints.restored_precision, device)
    precision = cfg.train.precision
    seed_ranks(t.seed, start_step, rank, world_size)
    model = wrap_for_training(run.student, run.teacher, cfg, world_size, device, fsdp)
    loader = build_loader(cfg, train, mean, std, rank, world_size, start_step, run.last_step, device)
    log.info("precision %s (%s)", precision, why)
    _tag_run(run.fingerprint, world_size, run.notes, precision, main)
    knn = None
    if knn_bank is not None and knn_queries is not None:
        knn = OnlineKNN(cfg, knn_bank, knn_queries, mean, std, run.steps_per_epoch, device, fsdp,
                        main, lambda: backbone_from_config(cfg.backbone, cfg.crops.global_size,
                                                           train.channels), on_knn)
        if start_step == 0:
            knn.check(run.teacher, 0, history)  # the starting point: random init or loaded weights
    metrics = MetricLogger(cfg, run.schedules, history, start_step, run.last_step, world_size, main)
    run_steps(loader, model, run, metrics, knn, checkpoints, history, cfg.model_dump(mode="json"),
              stop_after_steps,
              lambda batch, step: train_step(batch, step, model, run.teacher, run.losses,
                                             run.optimizer, run.schedules, cfg, device),
              budget, lambda total: set_run_length(run, cfg, total, global_batch))
    if budget is not None and budget.decided is not None:
        run.notes.append(budget.note or f"train.time_budget_min: {budget.decided} steps")

    run_dir = Path(t.run_dir)
    backbone_path, heads_path = export_teacher(run.teacher, run_dir, main, fsdp,
                                               lambda: build_student(cfg, train.channels))
    if main:
        write_history(history, run_dir, cfg)
        checkpoints.clear()
    barrier()
    return PretrainSummary(
        run_dir=str(run_dir), teacher_backbone=str(backbone_path), teacher_heads=str(heads_path),
        steps=run.last_step, resumed_from_step=start_step, final=metrics.final,
        knn_history=[h for h in history if "knn/top1_k20" in h],
        images_per_second=metrics.images_per_second(), notes=run.notes,
        fingerprint=run.fingerprint, mean=list(mean), std=list(std), channels=train.channels,
        image_size=cfg.crops.global_size, world_size=world_size,
        precision=precision,
    )  # fmt: skip


def run_steps(loader, model: nn.Module, run: Components, metrics: MetricLogger,
              knn: OnlineKNN | None, checkpoints: Checkpointer, history: list[dict[str, float]],
              config: dict[str, Any], stop_after_steps: int | None,
              step_fn: Callable[[dict[str, Any], int], dict[str, torch.Tensor]],
              budget: StepBudget | None = None,
              set_length: Callable[[int], None] | None = None) -> None:
    """The loop of pretraining and distillation: ``step_fn(batch, step)`` per batch, the metrics,
    the online kNN of the EMA and the checkpoints when due; a divergence names the checkpoint
    kept; ``stop_after_steps`` ends the process after a checkpoint (tests of resumption).
    ``budget``: a time budget, which chooses the run's length early on; ``set_length(total)``
    rebuilds the run's schedules for it (the loader then ends early: the loop stops)."""
    try:
        for batch in loader:
            step, done = batch["step"], batch["step"] + 1
            run.teacher.train(False)
            model.train(True)
            out = step_fn(batch, step)
            if budget is not None and set_length is not None:
                total = budget.observe(done, knn.every if knn else None, knn.seconds if knn else 0.0)
                if total is not None:
                    set_length(total)
                    metrics.set_length(run.last_step, run.schedules)
            metrics.record(step, out, batch["batch_size"])
            if knn is not None and knn.due(done, run.last_step):
                knn.check(run.teacher, done, history)
            if checkpoints.due(done, run.last_step):
                path = checkpoints.save(done, run, history, config)
                if stop_after_steps is not None and done >= stop_after_steps:
                    raise SystemExit(f"stopped after step {done} as asked (checkpoint {path})")
            if done >= run.last_step:  # a time budget ended the run before the loader's end
                break
    except TrainingDiverged as exc:
        last = checkpoints.latest()
        kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(f"{exc} ({kept})") from None
    finally:
        metrics.close()


def pin_precision(run: Components, cfg: PretrainConfig, restored: str | None,
                  device: torch.device) -> tuple[PretrainConfig, str]:
    """``train.precision`` resolved once for the run: ``auto`` measures, and a measurement can
    come out otherwise in a later process, so a resumed run keeps the precision its checkpoint
    was trained in (exact resume). -> (cfg with the precision fixed, why)."""
    precision, why = precision_choice(cfg, device)
    if restored is not None and restored != precision:
        why = f"as the checkpoint resumed was trained (now: {precision}, {why})"
        precision = restored
    run.precision = precision
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})}), why


def resolve_auto(cfg: PretrainConfig) -> PretrainConfig:
    """``train.num_workers: auto``: the cores of this process's share of the machine, one left
    for the training process itself."""
    if cfg.train.num_workers != "auto":
        return cfg
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    workers = max(0, (os.cpu_count() or 1) // local - 1)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": workers})})


def _tag_run(fp: str, world_size: int, notes: list[str], precision: str, main: bool) -> None:
    if not main:
        return
    from dinoflow import tracking

    tracking.set_tags({"dinoflow.fingerprint": fp, "dinoflow.world_size": world_size,
                       "dinoflow.precision": precision})
    tracking.log_text("\n".join(notes) or "no schedule capping", "schedule_notes.txt")
