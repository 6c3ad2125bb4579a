"""Per-step metrics: reduced over steps and processes, logged to MLflow, shown on a progress bar."""

from __future__ import annotations

import logging
import time

import torch

from dinoflow import tracking
from dinoflow.config import PretrainConfig
from dinoflow.distributed import all_reduce_mean
from dinoflow.monitor import collapse_warning
from dinoflow.schedules import Schedules

log = logging.getLogger(__name__)


def reduce_metrics(pending: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of each metric over the steps since the last log and over the processes (one sync
    per log, not per step): the loss of the global batch, as one process would log it."""
    keys = list(pending[0].keys())
    device = pending[0]["loss/total"].device  # the training device (NCCL reduces CUDA tensors)
    means = torch.stack(
        [torch.stack([p[k].float() for p in pending]).mean().to(device) for k in keys]
    )
    all_reduce_mean(means)  # equal local batches: the mean of the means is the global mean
    return dict(zip(keys, means.tolist(), strict=True))


class ProgressBar:
    """A rich progress bar with loss, images/s and ETA (quiet on other ranks or when disabled)."""

    _active: ProgressBar | None = (
        None  # a run that raised (e.g. a pruned trial) leaves its bar open
    )

    def __init__(
        self,
        enabled: bool,
        start: int,
        total: int,
        label: str = "pretrain",
        loss_names: tuple[str, ...] = ("dino", "ibot", "koleo"),
    ):
        self.bar, self.loss_names = None, loss_names
        if ProgressBar._active is not None:
            ProgressBar._active.close()
        if enabled:
            ProgressBar._active = self
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=start, info="")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar:
            terms = " ".join(f"{n} {metrics[f'loss/{n}']:.3f}" for n in self.loss_names)
            info = (
                f"loss {metrics['loss/total']:.3f} ({terms}) "
                f"{metrics['perf/images_per_second']:.0f} img/s"
            )
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None
        if ProgressBar._active is self:
            ProgressBar._active = None


class MetricLogger:
    """Collects the trainer's step outputs; every ``log_every_steps`` (and at the end) reduces
    them, appends a row to ``history``, logs it (MLflow, main process), moves the bar (the
    method's ``loss_names`` on it) and checks for collapse (warned once, also as an MLflow tag)."""

    def __init__(
        self,
        cfg: PretrainConfig,
        schedules: Schedules,
        history: list[dict[str, float]],
        start_step: int,
        last_step: int,
        world_size: int,
        main: bool,
        loss_names: tuple[str, ...] = ("dino", "ibot", "koleo"),
        label: str = "pretrain",
    ):
        self.cfg, self.schedules, self.history = cfg, schedules, history
        self.last_step, self.world_size, self.main = last_step, world_size, main
        self.bar = ProgressBar(
            main and cfg.train.progress, start_step, last_step, label, loss_names
        )
        self.pending: list[dict[str, torch.Tensor]] = []
        self.final: dict[str, float] = {}
        self.t0, self.images, self.warned = time.perf_counter(), 0, False

    def record(self, step: int, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """Metrics of step ``step`` (0-based) of a batch of ``batch_size`` images per process."""
        self.pending.append(metrics)
        self.images += batch_size * self.world_size
        done = step + 1
        if done % self.cfg.train.log_every_steps and done != self.last_step:
            return
        s = self.schedules
        final = reduce_metrics(self.pending)
        self.pending = []
        final.update(
            {
                "schedule/lr": float(s.lr[step]),
                "schedule/wd": float(s.wd[step]),
                "schedule/momentum": float(s.momentum[step]),
                "schedule/teacher_temp": float(s.teacher_temp[step]),
                "perf/images_per_second": self.images_per_second(),
            }
        )
        self.final = final
        self.history.append({"step": done, **final})
        if self.main:
            tracking.log_metrics(final, step=done)
            self.bar.update(done, final)
        m = self.cfg.monitor
        message = collapse_warning(
            final["monitor/teacher_entropy"],
            self.cfg.head.n_prototypes,
            m.uniform_entropy_fraction,
            m.onehot_entropy,
        )
        if message and done >= m.check_after_steps and not self.warned:
            log.warning("step %d: %s", done, message)
            tracking.set_tags({"dinoflow.collapse_warning": message[:250]})
            self.warned = True

    def images_per_second(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return self.images / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        self.bar.close()
