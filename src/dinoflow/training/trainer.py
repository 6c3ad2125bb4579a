"""One trainer for every method (``dinoflow.methods``): build, resume, wrap, loop, export.

The method owns its networks and loss terms; the trainer owns the rest: the optimizer over the
student's parameter groups, the schedules, the precision, gradient clipping, checkpoints (every
part the method names, the optimizer, the RNG and the run state), metrics and the progress bar,
the time budget and the online kNN. Re-running after a kill resumes by itself from the newest
readable checkpoint. Under torch.distributed (torchrun, SLURM) each process takes its slice of
the global batch; only the main process writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinoflow.config import PretrainConfig, fingerprint
from dinoflow.data import Split
from dinoflow.distributed import barrier, resolve_device, world
from dinoflow.errors import TrainingDiverged
from dinoflow.methods.base import Method, StepContext
from dinoflow.monitor import check_finite
from dinoflow.optim import apply_schedules, build_optimizer, clip_gradients, param_groups
from dinoflow.training.budget import TimeBudget, fix_run_length, start_budget
from dinoflow.training.checkpoint import Checkpointer, rng_state, set_rng_state
from dinoflow.training.data import UnreadableFiles, build_loader, resolve_num_workers
from dinoflow.training.history import write_history
from dinoflow.training.metrics import MetricLogger
from dinoflow.training.online_knn import OnlineKNN
from dinoflow.training.parallel import seed_ranks, wrap_for_training
from dinoflow.training.plan import (
    autocast_for,
    precision_choice,
    run_fingerprint,
    schedules_for,
    total_steps_for,
)
from dinoflow.training.state import RunState

log = logging.getLogger(__name__)


def _sharded(part: Any) -> bool:
    """A module whose parameters FSDP2 sharded (DTensors): gathered to save, scattered to load."""
    from torch.distributed.tensor import DTensor

    return isinstance(part, nn.Module) and any(isinstance(p, DTensor) for p in part.parameters())


class Trainer:
    """A method's optimizer, schedules and run state, and the training step around its terms.

    ``cfg``: the run's settings (the method's ``cfg`` with ``num_workers`` and ``precision``
    resolved); ``n_images``: the train split's size; ``world_size``: processes sharing the
    global batch.
    """

    def __init__(
        self,
        method: Method,
        cfg: PretrainConfig,
        n_images: int,
        world_size: int,
        device: torch.device,
    ):
        t, o = cfg.train, cfg.optim
        self.method, self.cfg, self.device = method, cfg, device
        self.global_batch = t.batch_size * world_size
        total_steps, steps_per_epoch = total_steps_for(cfg, n_images, world_size)
        self.schedules, notes = schedules_for(cfg, total_steps, steps_per_epoch, self.global_batch)
        for note in notes:
            log.warning(note)
        student = method.student
        groups = param_groups(
            student.backbone, student.heads(), o.layer_decay, o.patch_embed_lr_mult
        )
        self.optimizer = build_optimizer(groups, o.betas, fused=t.fused_optimizer or None)
        self.fingerprint = run_fingerprint(cfg, n_images, world_size)
        if extra := method.fingerprint_extra():
            self.fingerprint = fingerprint({"student": self.fingerprint, **extra})
        self.state = RunState(
            total_steps, steps_per_epoch, min(total_steps, t.max_steps or total_steps), notes=notes
        )

    # ------------------------------------------------------------------ the plan
    def set_length(self, total_steps: int) -> None:
        """A time budget chose the run's length: the schedules rebuilt for ``total_steps``."""
        self.schedules, notes = schedules_for(
            self.cfg, total_steps, self.state.steps_per_epoch, self.global_batch
        )
        for note in notes:
            log.warning(note)
        s = self.state
        s.total_steps = s.chosen_steps = total_steps
        s.last_step = min(total_steps, self.cfg.train.max_steps or total_steps)

    def pin_precision(self) -> tuple[str, str]:
        """``train.precision`` resolved once for the run -> (precision, why). A resumed run keeps
        the precision its checkpoint was trained in (exact resume, also on another kind of CPU)."""
        precision, why = precision_choice(self.cfg, self.device)
        restored = self.state.precision
        if restored is not None and restored != precision:
            why = f"as the checkpoint resumed was trained (now: {precision}, {why})"
            precision = restored
        self.state.precision = precision
        self.cfg = self.cfg.model_copy(
            update={"train": self.cfg.train.model_copy(update={"precision": precision})}
        )
        return precision, why

    # ------------------------------------------------------------------ state
    def step_state(self, gathered: bool = False) -> dict[str, Any]:
        """What a training step changes, by checkpoint key: every part the method names, the
        optimizer and the RNG. ``gathered``: sharded parts in their plain form (a collective)."""
        parts, student = self.method.parts(), self.method.student
        if not gathered:
            state = {name: part.state_dict() for name, part in parts.items()}
            return {**state, "optimizer": self.optimizer.state_dict(), "rng": rng_state()}
        from dinoflow.distributed import gather_full_state

        student_sd, optim_sd = gather_full_state(student, self.optimizer)
        state = {
            name: student_sd
            if part is student
            else gather_full_state(part)[0]
            if _sharded(part)
            else part.state_dict()
            for name, part in parts.items()
        }
        return {**state, "optimizer": optim_sd, "rng": rng_state()}

    def load_step_state(self, state: dict[str, Any], gathered: bool = False) -> None:
        """``step_state`` back in place; ``gathered``: written by ``step_state(gathered=True)``
        (or by one process) and loaded into sharded parts."""
        student = self.method.student
        for name, part in self.method.parts().items():
            if gathered and _sharded(part):
                from dinoflow.distributed import load_full_state

                optim = (self.optimizer, state["optimizer"]) if part is student else (None, None)
                load_full_state(part, state[name], *optim)
            else:
                part.load_state_dict(state[name])
        if not (gathered and _sharded(student)):
            self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])

    # ------------------------------------------------------------------ one step
    def train_mode(self, model: nn.Module) -> None:
        self.method.ema.train(False)
        model.train(True)

    def step(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """One step: the schedules, the method's terms, the finite check, backward, clipping,
        AdamW, the teacher's update; the step's logged numbers."""
        cfg, s = self.cfg, self.schedules
        # continued pretraining: the backbone stays frozen (or nearly) while fresh heads settle
        warming_up = step < cfg.init.head_warmup_steps
        apply_schedules(
            self.optimizer,
            s.lr[step],
            s.wd[step],
            freeze_last_layer=bool(s.last_layer_lr_zero[step]),
            backbone_lr_scale=cfg.init.head_warmup_backbone_lr_mult if warming_up else 1.0,
        )
        ctx = StepContext(step, s, self.device, partial(autocast_for, cfg, self.device))
        out = self.method.terms(model, batch, ctx)
        check_finite(step, out.terms, None, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        out.terms["total"].backward()
        student, grad_norms = self.method.student, {}
        if cfg.optim.clip_grad:
            parts = {"backbone": student.backbone, **student.heads()}
            grad_norms = clip_gradients(parts, cfg.optim.clip_grad)
        self.optimizer.step()
        self.method.update_teacher(step, s)
        return {
            **{f"loss/{n}": v.detach() for n, v in out.terms.items()},
            **out.monitors,
            **{f"grad_norm/{n}": torch.tensor(v) for n, v in grad_norms.items()},
        }

    # ------------------------------------------------------------------ the loop
    def loop(
        self,
        loader,
        model: nn.Module,
        metrics: MetricLogger,
        knn: OnlineKNN | None,
        checkpoints: Checkpointer,
        config: dict[str, Any],
        stop_after_steps: int | None,
        unreadable: UnreadableFiles,
    ) -> None:
        """A step per batch, the metrics, the replaced files, the online kNN of the EMA and the
        checkpoints when due; a divergence names the checkpoint kept; ``stop_after_steps``
        ends the process after a checkpoint (tests of resumption)."""
        state = self.state
        try:
            for batch in loader:
                step, done = batch["step"], batch["step"] + 1
                self.train_mode(model)
                metrics.record(step, self.step(model, batch, step), batch["batch_size"])
                state.step = done
                checkpoint_due = checkpoints.due(done, state.last_step)
                unreadable.add(batch)  # counted over processes when due; kept in checkpoints
                if unreadable.due(done) or checkpoint_due:
                    state.unreadable_files = unreadable.sync(done)
                if knn is not None and knn.due(done, state.last_step):
                    knn.check(self.method.ema, done, state.history)
                if checkpoint_due:
                    path = checkpoints.save(done, self, config)
                    if stop_after_steps is not None and done >= stop_after_steps:
                        raise SystemExit(f"stopped after step {done} as asked (checkpoint {path})")
            unreadable.log_names()
        except TrainingDiverged as exc:
            last = checkpoints.latest()
            kept = (
                f"the last good checkpoint is kept at {last}"
                if last
                else "no checkpoint was written yet"
            )
            raise TrainingDiverged(f"{exc} ({kept})") from None
        finally:
            metrics.close()


@dataclass
class TrainResult:
    """What a finished run reports, whatever the method."""

    run_dir: str
    backbone: str
    heads: str
    steps: int
    resumed_from_step: int
    final: dict[str, float]
    knn_history: list[dict[str, float]]
    images_per_second: float
    train_seconds: float
    notes: list[str]
    fingerprint: str
    precision: str
    world_size: int
    unreadable_files: list[str]
    budget: dict[str, Any] = field(default_factory=dict)

    def summary_fields(
        self, mean: list[float], std: list[float], channels: int, image_size: int
    ) -> dict[str, Any]:
        """The fields every method's summary (``dinoflow.results``) has, by their names there."""
        return {
            "run_dir": self.run_dir,
            "steps": self.steps,
            "resumed_from_step": self.resumed_from_step,
            "final": self.final,
            "knn_history": self.knn_history,
            "images_per_second": self.images_per_second,
            "notes": self.notes,
            "fingerprint": self.fingerprint,
            "precision": self.precision,
            "mean": list(mean),
            "std": list(std),
            "channels": channels,
            "image_size": image_size,
            **self.budget,
        }


@dataclass
class RunData:
    """What a run trains on and reports against: the train split with its normalisation, the
    online kNN's labelled bank and queries (optional) and what is told of each check."""

    train: Split
    mean: list[float]
    std: list[float]
    knn_bank: Split | None = None
    knn_queries: Split | None = None
    on_knn: Callable[[int, float], None] | None = None


def train(
    method: Method,
    data: RunData,
    *,
    stop_after_steps: int | None = None,
    section: str = "pretrain",
    config: dict[str, Any] | None = None,
    fsdp: bool = False,
    budget: TimeBudget | None = None,
) -> TrainResult:
    """Train ``method`` on ``data``; export its model. ``section``: the config section
    (messages, the progress bar); ``config``: what checkpoints record (default the method's);
    ``budget``: a time budget started by the caller (counted from then);
    ``stop_after_steps`` ends the process after a checkpoint (tests of resumption)."""
    trainer, checkpoints, start_step = _resume(method, data.train, fsdp, section)
    rank, world_size = world()
    model = wrap_for_training(
        method.student, method.teacher, trainer.cfg, world_size, trainer.device, fsdp
    )
    loader_for = partial(
        build_loader,
        trainer.cfg,
        data.train,
        data.mean,
        data.std,
        rank,
        world_size,
        start_step,
        device=trainer.device,
    )
    knn = _online_knn(trainer, data, fsdp, rank == 0, start_step)
    if budget is not None:  # the length, fixed before training: then a fixed-length run
        fix_run_length(budget, trainer, start_step, partial(trainer.step, model), loader_for, knn)
    _tag_run(trainer, world_size, rank == 0)
    metrics, unreadable = _run_monitors(trainer, len(data.train), start_step, section)
    started = time.perf_counter()
    config = config or method.cfg.model_dump(mode="json")
    loader = loader_for(trainer.state.last_step)
    trainer.loop(loader, model, metrics, knn, checkpoints, config, stop_after_steps, unreadable)
    seconds = time.perf_counter() - started
    return _finish(trainer, checkpoints, metrics, seconds, start_step, fsdp, budget)


def _resume(
    method: Method, train_split: Split, fsdp: bool, section: str
) -> tuple[Trainer, Checkpointer, int]:
    """The trainer of ``method`` (loader workers resolved for this machine), its checkpoints,
    and the step it starts from: the newest readable checkpoint's, or 0; the precision pinned."""
    t = method.cfg.train
    device = resolve_device(t.device)
    rank, world_size = world()
    cfg = resolve_num_workers(method.cfg, train_split, device)
    trainer = Trainer(method, cfg, len(train_split), world_size, device)
    checkpoints = Checkpointer(
        t.run_dir,
        trainer.fingerprint,
        t.checkpoint_every_steps,
        t.keep_checkpoints,
        fsdp,
        rank == 0,
    )
    start_step = checkpoints.restore(trainer) if t.resume else 0
    log.info("%s: precision %s (%s)", section, *trainer.pin_precision())
    seed_ranks(t.seed, start_step, rank, world_size)
    return trainer, checkpoints, start_step


def _run_monitors(
    trainer: Trainer, n_images: int, start_step: int, section: str
) -> tuple[MetricLogger, UnreadableFiles]:
    """The metric logger with its progress bar (the method's loss names) and the count of the
    train files replaced (from the run state: a resumed run goes on counting)."""
    s, t = trainer.state, trainer.cfg.train
    rank, world_size = world()
    metrics = MetricLogger(
        trainer.cfg,
        trainer.schedules,
        s.history,
        start_step,
        s.last_step,
        world_size,
        rank == 0,
        trainer.method.loss_names,
        section,
    )
    unreadable = UnreadableFiles(
        s.unreadable_files,
        n_images,
        t.max_unreadable_fraction,
        t.log_every_steps,
        f"{section}.train.max_unreadable_fraction",
    )
    return metrics, unreadable


def _finish(
    trainer: Trainer,
    checkpoints: Checkpointer,
    metrics: MetricLogger,
    seconds: float,
    start_step: int,
    fsdp: bool,
    budget: TimeBudget | None,
) -> TrainResult:
    """The end of a run: the method's model exported, the history written, the checkpoints
    cleared (the exported model is the product)."""
    run_dir, s, main = Path(trainer.cfg.train.run_dir), trainer.state, checkpoints.main
    backbone, heads = trainer.method.export(run_dir, main, fsdp)
    if main:
        write_history(s.history, run_dir, trainer.cfg)
        checkpoints.clear()
    barrier()
    return TrainResult(
        run_dir=str(run_dir),
        backbone=str(backbone),
        heads=str(heads),
        steps=s.last_step,
        resumed_from_step=start_step,
        final=metrics.final,
        knn_history=[h for h in s.history if "knn/top1_k20" in h],
        images_per_second=metrics.images_per_second(),
        train_seconds=seconds,
        notes=s.notes,
        fingerprint=trainer.fingerprint,
        precision=s.precision,
        world_size=world()[1],
        unreadable_files=s.unreadable_files,
        budget=budget.summary_fields() if budget else {},
    )


def _online_knn(
    trainer: Trainer, data: RunData, fsdp: bool, main: bool, start_step: int
) -> OnlineKNN | None:
    """The EMA's kNN during training (with labelled bank and queries); a fresh run checks it at
    step 0 too: the starting point, random init or loaded weights."""
    if data.knn_bank is None or data.knn_queries is None:
        return None
    knn = OnlineKNN(
        trainer.cfg,
        data.knn_bank,
        data.knn_queries,
        data.mean,
        data.std,
        trainer.state.steps_per_epoch,
        trainer.device,
        fsdp,
        main,
        trainer.method.fresh_backbone,
        data.on_knn,
    )
    if start_step == 0:
        knn.check(trainer.method.ema, 0, trainer.state.history)
    return knn


def _tag_run(trainer: Trainer, world_size: int, main: bool) -> None:
    if not main:
        return
    from dinoflow import tracking

    tracking.set_tags(
        {
            "dinoflow.fingerprint": trainer.fingerprint,
            "dinoflow.world_size": world_size,
            "dinoflow.precision": trainer.state.precision,
            **trainer.method.tags(),
        }
    )
    tracking.log_text("\n".join(trainer.state.notes) or "no schedule capping", "schedule_notes.txt")


__all__ = ["RunData", "TrainResult", "Trainer", "start_budget", "train"]
