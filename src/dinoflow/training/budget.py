"""``train.time_budget_min``: a run's length chosen once, by timing, before it trains.

Machines differ (an AVX2-only CPU trains conf/base at ~80 images/s in fp32, one with bf16 units
at ~130 in bf16), so a fixed step count either overruns a time limit on the slow one or leaves the
fast one idle. A budget is an explicit option (null by default: ``epochs`` steps on any machine)
whose only effect is the run's length N. Before a fresh run trains, a probe times its real step on
its real parts and data for ``PROBE_FROM + PROBE_STEPS`` steps (the first ``PROBE_FROM`` not
timed: compiling and warm-up), then puts back everything those steps changed (student, teacher,
optimizer, loss centers, RNG state) and fixes N: what the budget has left after the time spent
(the probe included), less the online kNN checks due (each as long as the one at step 0), over
the measured seconds per step taken ``STEP_TIME_MARGIN`` high, at most ``epochs``' worth. The
schedules are then built for N and the run trains steps 0..N through the same loop as a run
without a budget: it is exactly the fixed-length run of N steps (``replay_params``), whatever the
clock said. Nothing of the probe reaches the history, the metrics, the checkpoints or the online
kNN.

The length is not fitted again later, although steps drift from the probe's pace (5-10 % within
a run on conf/base, 2 cores): a re-fit would rebuild the schedules mid-run from the clock, and
replaying a run exactly is worth more than the last ~2 % of the budget a re-fit could use. The
margin covers the drift: the budget is a limit, not a target.

N is kept in every checkpoint: a resumed run keeps it and does not time again. A run killed
during the probe has written no checkpoint and times again from scratch. A run no longer than
the probe trains its cap without timing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dinoflow import tracking
from dinoflow.distributed import broadcast_from_main
from dinoflow.training.checkpoint import Resumable

if TYPE_CHECKING:
    from dinoflow.training.online_knn import OnlineKNN

log = logging.getLogger(__name__)

StepFn = Callable[[dict[str, Any], int], Any]

PROBE_FROM = 10  # the first timed step: compiling and warm-up are before it
# timed steps. Measured (conf/base, 2 cores): the mean of 50 steps came out 9 % below the run's
# own later mean once and 4 % above it in the run before; 200 steps hold it within ~3 %. The
# probe costs its 210 steps' time (~7 % of conf/base's 3,100), taken out of the budget.
PROBE_STEPS = 200
# the measured step time is taken this much high: 800-step blocks of one run differ by up to
# 6 %, and the budget is a limit (make run's demo), not a target
STEP_TIME_MARGIN = 1.05


@dataclass
class TimeBudget:
    """``train.time_budget_min`` of one run, counted from ``started`` (``time.perf_counter()``
    when the run began). ``steps``, ``per_step``, ``note``, ``replay``: once the length is fixed."""

    minutes: float
    section: str = "pretrain"  # the parameters' section, for the replay instruction
    # the clock read when the budget is made (looked up then, not when this module loads)
    started: float = field(default_factory=lambda: time.perf_counter())
    steps: int | None = None
    per_step: float | None = None  # None: the length came from a checkpoint, or no probe ran
    note: str = ""
    replay: str = ""

    def summary_fields(self) -> dict[str, Any]:
        """The length and its replay, for the job's summary."""
        return {"budget_steps": self.steps, "budget_replay": self.replay or None}


def start_budget(minutes: float | None, section: str = "pretrain") -> TimeBudget | None:
    """The run's budget, counted from now (None without ``train.time_budget_min``)."""
    return None if minutes is None else TimeBudget(minutes, section)


def fitting_steps(
    seconds_left: float,
    per_step: float,
    done: int,
    cap: int,
    knn_every: int | None = None,
    knn_seconds: float = 0.0,
) -> int:
    """The run's length: ``done`` plus the steps that fit in ``seconds_left`` at ``per_step``
    seconds each, less the online kNN checks due on the way (at multiples of ``knn_every`` and
    at the end), within [done + 1, cap]."""
    n = max(0, math.floor(seconds_left / per_step))
    for _ in range(3):  # the checks depend on the length: settle it (converges in one or two)
        total = min(cap, done + n)
        checks = (
            (total // knn_every - done // knn_every + (total % knn_every != 0)) if knn_every else 0
        )
        n = max(0, math.floor((seconds_left - checks * knn_seconds) / per_step))
    return max(done + 1, min(cap, done + n))


def replay_params(section: str, steps: int, steps_per_epoch: int) -> str:
    """The ``--params`` of the fixed-length run a budgeted run is: schedules of exactly ``steps``
    (``epochs * steps_per_epoch``, rounded, is ``steps``; the warm-ups stay the same epochs)."""
    epochs = steps / steps_per_epoch  # the float quotient: times steps_per_epoch it rounds back
    return (
        f"{section}.train.time_budget_min=null,{section}.train.epochs={epochs!r},"
        f"{section}.train.steps_per_epoch={steps_per_epoch}"
    )


def _clone(obj: Any) -> Any:
    """A copy of a state dict whose tensors share nothing with the live ones."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # the steps queued count in the time they took


def probe_run_length(
    trainer: Resumable,
    step_fn: StepFn,
    batches: Iterable[dict[str, Any]],
    budget: TimeBudget,
    done: int,
    knn: OnlineKNN | None = None,
) -> tuple[int, float]:
    """Time ``step_fn(batch, step)`` over ``batches`` (the ``PROBE_FROM + PROBE_STEPS`` steps
    from ``done``), put the trainer's state back as it was, and -> (the run's length, seconds
    per step). The length is rank 0's on every rank (their clocks differ)."""
    saved = _clone(trainer.step_state())  # what the probe's steps change
    device = trainer.device
    began = 0.0
    for i, batch in enumerate(batches):
        if i == PROBE_FROM:
            _sync(device)
            began = time.perf_counter()
        trainer.train_mode(trainer.method.student)  # as the loop trains
        step_fn(batch, batch["step"])
    _sync(device)
    per_step = (time.perf_counter() - began) / PROBE_STEPS
    trainer.load_step_state(saved)
    seconds_left = budget.minutes * 60 - (time.perf_counter() - budget.started)
    steps = fitting_steps(
        seconds_left,
        per_step * STEP_TIME_MARGIN,
        done,
        trainer.state.total_steps,
        knn.every if knn else None,
        knn.seconds if knn else 0.0,
    )
    steps = broadcast_from_main(torch.tensor([steps], dtype=torch.int64, device=device))
    return int(steps.item()), per_step


def fix_run_length(
    budget: TimeBudget,
    trainer: Resumable,
    start_step: int,
    step_fn: StepFn,
    loader_for: Callable[[int], Iterable[dict[str, Any]]],
    knn: OnlineKNN | None = None,
) -> None:
    """The run's length under ``budget``: the one its checkpoint kept, else what a probe of
    ``step_fn`` on ``loader_for(last_step)`` chose; the schedules rebuilt for it."""
    minutes, cap, restored = budget.minutes, trainer.state.total_steps, trainer.state.chosen_steps
    if restored is not None:
        steps, how = restored, "chosen before the resume"
    elif cap - start_step <= PROBE_FROM + PROBE_STEPS:
        steps, how = cap, f"the cap: a run no longer than the {PROBE_FROM + PROBE_STEPS}-step probe"
    else:
        log.info(
            "train.time_budget_min %g: timing %d steps before training",
            minutes,
            PROBE_FROM + PROBE_STEPS,
        )
        last = start_step + PROBE_FROM + PROBE_STEPS
        steps, budget.per_step = probe_run_length(
            trainer, step_fn, loader_for(last), budget, start_step, knn
        )
        spent = time.perf_counter() - budget.started
        how = (
            f"of at most {cap}: {budget.per_step:.3f} s per step over {PROBE_STEPS} timed "
            f"steps, {spent:.0f} s spent before training (the timing included)"
            + (f", {knn.seconds:.1f} s per online kNN check" if knn else "")
        )
    trainer.set_length(steps)
    budget.steps = steps
    budget.replay = replay_params(budget.section, steps, trainer.state.steps_per_epoch)
    budget.note = (
        f"train.time_budget_min {minutes:g}: {steps} steps ({how}); the same run "
        f"without the budget: --params {budget.replay}"
    )
    log.info(budget.note)
    trainer.state.notes.append(budget.note)
    tags = {"dinoflow.time_budget_steps": steps, "dinoflow.time_budget_replay": budget.replay}
    if budget.per_step is not None:
        tags["dinoflow.time_budget_s_per_step"] = round(budget.per_step, 4)
    tracking.set_tags(tags)
