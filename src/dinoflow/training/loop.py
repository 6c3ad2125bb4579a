"""DINOv2 pretraining, read top to bottom: build, resume, wrap, loop, export.

Re-running after a kill resumes by itself from the newest readable checkpoint. Under
torch.distributed (torchrun, SLURM) each process takes its slice of the global batch; only the
main process writes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinoflow.config import PretrainConfig
from dinoflow.data import Split
from dinoflow.distributed import barrier, resolve_device, world
from dinoflow.errors import TrainingDiverged
from dinoflow.results import PretrainSummary
from dinoflow.training.budget import fix_run_length, start_budget
from dinoflow.training.checkpoint import Checkpointer
from dinoflow.training.components import (
    Components,
    backbone_from_config,
    build_components,
    build_student,
)
from dinoflow.training.data import UnreadableFiles, build_loader
from dinoflow.training.export import export_teacher, write_history
from dinoflow.training.metrics import MetricLogger
from dinoflow.training.online_knn import OnlineKNN
from dinoflow.training.parallel import seed_ranks, wrap_for_training
from dinoflow.training.step import precision_choice, train_step

log = logging.getLogger(__name__)

# Loader processes for image files on a CPU: at least this many. benchmarks/bench_loader.py (AMD
# EPYC, 2 cores, the ViT-S/14 profile's step fed by its loader): 4.3 / 5.3 / 7.8 images/s with
# 0 / 1 / 2 workers on 2-5K photos, 6.9 / 6.9 / 7.1 from the image cache (workers that wait cost
# the step nothing). Decoding and augmenting the photos took ~40 % of the loop's CPU, so larger
# machines get a third of their cores.
CPU_FILE_WORKERS = 2


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
    budget = start_budget(cfg.train.time_budget_min)  # counts from here
    device = resolve_device(cfg.train.device)
    cfg = resolve_auto(cfg, train, device)
    rank, world_size = world()
    main, t = rank == 0, cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    fsdp = world_size > 1 and cfg.launcher.strategy == "fsdp"
    run = build_components(cfg, len(train), train.channels, world_size, device, shard=fsdp)
    checkpoints = Checkpointer(t.run_dir, run.fingerprint, t.checkpoint_every_steps,
                               t.keep_checkpoints, fsdp, main)
    start_step, history = checkpoints.restore(run) if t.resume else (0, [])
    cfg, why = pin_precision(run, cfg, checkpoints.restored_precision, device)
    precision = cfg.train.precision
    seed_ranks(t.seed, start_step, rank, world_size)
    model = wrap_for_training(run.student, run.teacher, cfg, world_size, device, fsdp)
    loader_for = partial(build_loader, cfg, train, mean, std, rank, world_size, start_step,
                         device=device)
    log.info("precision %s (%s)", precision, why)
    knn = None
    if knn_bank is not None and knn_queries is not None:
        knn = OnlineKNN(cfg, knn_bank, knn_queries, mean, std, run.steps_per_epoch, device, fsdp,
                        main, lambda: backbone_from_config(cfg.backbone, cfg.crops.global_size,
                                                           train.channels), on_knn)
        if start_step == 0:
            knn.check(run.teacher, 0, history)  # the starting point: random init or loaded weights

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        return train_step(batch, step, model, run.teacher, run.losses, run.optimizer,
                          run.schedules, cfg, device)

    if budget is not None:  # the length, fixed before training: then a fixed-length run
        fix_run_length(budget, run, cfg, start_step, checkpoints.restored_chosen_steps, step_fn,
                       loader_for, knn, device)
    _tag_run(run.fingerprint, world_size, run.notes, precision, main)
    metrics = MetricLogger(cfg, run.schedules, history, start_step, run.last_step, world_size, main)
    run_steps(loader_for(run.last_step), model, run, metrics, knn, checkpoints, history,
              cfg.model_dump(mode="json"), stop_after_steps, step_fn,
              UnreadableFiles(run.unreadable_files, len(train), t.max_unreadable_fraction,
                              t.log_every_steps))

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
        precision=precision, unreadable_files=run.unreadable_files,
        n_unreadable_files=len(run.unreadable_files),
        **(budget.summary_fields() if budget else {}),
    )  # fmt: skip


def run_steps(loader, model: nn.Module, run: Components, metrics: MetricLogger,
              knn: OnlineKNN | None, checkpoints: Checkpointer, history: list[dict[str, float]],
              config: dict[str, Any], stop_after_steps: int | None,
              step_fn: Callable[[dict[str, Any], int], dict[str, torch.Tensor]],
              unreadable: UnreadableFiles | None = None) -> None:
    """The loop of pretraining and distillation: ``step_fn(batch, step)`` per batch, the metrics,
    the online kNN of the EMA and the checkpoints when due; a divergence names the checkpoint
    kept; ``stop_after_steps`` ends the process after a checkpoint (tests of resumption).
    ``unreadable``: counts the train files replaced (``run.unreadable_files``) and stops the run
    past its limit."""
    try:
        for batch in loader:
            step, done = batch["step"], batch["step"] + 1
            run.teacher.train(False)
            model.train(True)
            out = step_fn(batch, step)
            metrics.record(step, out, batch["batch_size"])
            if unreadable is not None:  # counted over processes when due; kept in checkpoints
                unreadable.add(batch)
                if unreadable.due(done) or checkpoints.due(done, run.last_step):
                    run.unreadable_files = unreadable.sync(done)
            if knn is not None and knn.due(done, run.last_step):
                knn.check(run.teacher, done, history)
            if checkpoints.due(done, run.last_step):
                path = checkpoints.save(done, run, history, config)
                if stop_after_steps is not None and done >= stop_after_steps:
                    raise SystemExit(f"stopped after step {done} as asked (checkpoint {path})")
        if unreadable is not None:
            unreadable.log_names()
    except TrainingDiverged as exc:
        last = checkpoints.latest()
        kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(f"{exc} ({kept})") from None
    finally:
        metrics.close()


def pin_precision(run: Components, cfg: PretrainConfig, restored: str | None,
                  device: torch.device) -> tuple[PretrainConfig, str]:
    """``train.precision`` resolved once for the run. A resumed run keeps the precision its
    checkpoint was trained in (exact resume, also when it resumes on another kind of CPU).
    -> (cfg with the precision fixed, why)."""
    precision, why = precision_choice(cfg, device)
    if restored is not None and restored != precision:
        why = f"as the checkpoint resumed was trained (now: {precision}, {why})"
        precision = restored
    run.precision = precision
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})}), why


def resolve_auto(cfg: PretrainConfig, train: Split, device: torch.device) -> PretrainConfig:
    """``train.num_workers: auto`` -> loader processes for this process's share of the cores.

    CUDA: the cores per local process, one left for the training process itself (the GPU does
    the compute; the loader is the CPU's work). CPU: the loader's processes take cores from
    the training threads, so none for in-memory images (Fashion-MNIST: the augmentation alone,
    ~0.02 s per batch, measured faster in the training process, docs/dev/performance.md) nor
    with ``train.compile`` (compiled kernels crashed once a worker had been forked, parallel.py);
    for image files a third of the cores, at least ``CPU_FILE_WORKERS`` (none on one core).
    """
    if cfg.train.num_workers != "auto":
        return cfg
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cuda":
        workers = max(0, cores - 1)
    elif train.images is not None or cfg.train.compile:
        workers = 0
    else:
        workers = 0 if cores < 2 else max(CPU_FILE_WORKERS, cores // 3)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": workers})})


def _tag_run(fp: str, world_size: int, notes: list[str], precision: str, main: bool) -> None:
    if not main:
        return
    from dinoflow import tracking

    tracking.set_tags({"dinoflow.fingerprint": fp, "dinoflow.world_size": world_size,
                       "dinoflow.precision": precision})
    tracking.log_text("\n".join(notes) or "no schedule capping", "schedule_notes.txt")
