"""What a self-supervised method is to the trainer (``dinoflow.training.trainer``).

A method owns its networks and losses: it builds them from its config, turns a batch into named
loss terms, moves its teacher after each optimizer step and names every part of its state. The
trainer owns everything else (optimizer, schedules, precision, clipping, checkpoints, metrics,
time budget, online kNN) and is the same for every method. A new method is one module here plus
its config; a new loss term of an existing method is a loss module and the method's ``terms``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from dinoflow.config import PretrainConfig
from dinoflow.schedules import Schedules


@runtime_checkable
class Stateful(Protocol):
    """Anything a checkpoint saves by name: modules, losses with centers, the run state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class StepContext:
    """What a method's ``terms`` needs of the trainer for one step."""

    step: int
    schedules: Schedules
    device: torch.device
    autocast: Callable[[], AbstractContextManager]  # the run's precision for the networks


@dataclass
class StepTerms:
    """One step's loss terms by name (``total``: their weighted sum, what is minimised) and its
    monitored numbers (``monitor/...``), all scalar tensors."""

    terms: dict[str, torch.Tensor]
    monitors: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(Protocol):
    """A self-supervised method.

    ``cfg``: the run's settings as a ``PretrainConfig`` (schedules, optimizer, loader, train).
    ``student``: the trained network, a plain module with ``backbone`` and ``heads()`` (the
    trainer wraps it for DDP / compile and builds the optimizer over its parameter groups).
    ``teacher``: the network whose ``teacher_forward`` gives the targets (compiled with the
    student). ``ema``: the student's exponential moving average, what the online kNN reads and
    what is exported. ``loss_names``: the terms ``terms`` returns besides ``total``, in order.
    """

    name: str
    loss_names: tuple[str, ...]
    cfg: PretrainConfig
    student: nn.Module
    teacher: nn.Module
    ema: nn.Module

    def parts(self) -> dict[str, Stateful]:
        """Every part whose ``state_dict`` a checkpoint holds, by name (stable names: they are
        the checkpoint's keys)."""
        ...

    def terms(self, model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> StepTerms:
        """The loss terms of ``batch`` at ``ctx.step``; ``model`` is ``student`` as wrapped."""
        ...

    def update_teacher(self, step: int, schedules: Schedules) -> None:
        """After the optimizer step of ``step``: the EMA (and any other teacher) moves."""
        ...

    def fingerprint_extra(self) -> dict[str, Any]:
        """What enters the run's fingerprint besides its config and data (e.g. a teacher's
        weights); empty for a method defined by its config alone."""
        ...

    def fresh_backbone(self) -> nn.Module:
        """An unsharded backbone of the student's architecture (gathered FSDP weights go there)."""
        ...

    def export(self, run_dir: Path, main: bool, fsdp: bool) -> tuple[Path, Path]:
        """Write the final model: (backbone file, heads file)."""
        ...

    def tags(self) -> dict[str, Any]:
        """MLflow tags the method adds to the run."""
        ...
