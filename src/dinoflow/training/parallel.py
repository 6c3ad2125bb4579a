"""The student as it trains: DDP across processes, ``torch.compile`` where it pays."""

from __future__ import annotations

import logging
import os
import shutil

import torch
from torch import nn

from dinoflow.config import PretrainConfig
from dinoflow.models.ssl import SSLModel

log = logging.getLogger(__name__)


def compile_for_training(model: nn.Module, teacher: SSLModel | None) -> nn.Module:
    """``train.compile``: the student's module compiled, and the teacher's pass compiled in place.

    The teacher's ``teacher_forward`` (inference mode, parameters moved by the EMA between
    calls: they are graph inputs, not constants) is replaced on the instance only; its state
    dict is unchanged. FSDP registers that method itself, so it passes ``teacher=None``.
    """
    if teacher is not None:
        teacher.teacher_forward = torch.compile(teacher.teacher_forward)
    return torch.compile(model)


def can_compile(device: torch.device) -> bool:
    """torch.compile on CPU needs a C++ compiler (inductor builds its kernels with it)."""
    return device.type != "cpu" or bool(os.environ.get("CXX") or shutil.which("g++"))


def wrap_for_training(
    student: SSLModel,
    teacher: SSLModel,
    cfg: PretrainConfig,
    world_size: int,
    device: torch.device,
    fsdp: bool,
) -> nn.Module:
    """The module the step calls: the student, in DDP over processes (not under FSDP, which
    shards in place), compiled when ``train.compile`` asks and the machine can."""
    model: nn.Module = student
    if world_size > 1 and not fsdp:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    t = cfg.train
    if not t.compile:
        return model
    if not can_compile(device):
        log.warning(
            "train.compile: no C++ compiler (g++ or $CXX), which torch.compile needs on "
            "CPU; training with the eager step"
        )
        return model
    if device.type == "cpu" and t.num_workers:
        log.warning(
            "train.compile with %s loader worker process(es) on CPU: with torch 2.14 "
            "inside `kedro run` the compiled kernels crashed (SIGSEGV) once a worker "
            "had been forked; conf/base uses num_workers 0 (docs/dev/performance.md)",
            t.num_workers,
        )
    return compile_for_training(model, None if fsdp else teacher)


def seed_ranks(seed: int, start_step: int, rank: int, world_size: int) -> None:
    """Distinct random streams per process (drop-path): the weights are equal on every rank
    (DDP broadcasts rank 0's), the per-image drop decisions must not be."""
    if world_size > 1:
        torch.manual_seed((seed * 1_000_003 + start_step) * 1_009 + rank)
