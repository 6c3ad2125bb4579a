"""``train.time_budget_min``: as many steps as fit in a wall-clock budget, at most ``epochs``' worth.

Machines differ (an AVX2-only CPU trains conf/base at ~80 images/s in fp32, one with bf16 units
at ~130 in bf16), so a fixed step count either overruns a time limit on the slow one or leaves the
fast one idle. With a budget the run starts on the schedules of its ``epochs`` (the cap), times
its steps 10 to 210 (compile and warm-up are before them), and then fixes its
length: what the budget has left after the time already spent, less the online kNN checks still
due (each as long as the last one), over the measured seconds per step (taken 5 % high). The schedules are rebuilt
for that length from there on. The steps before the decision keep the cap's values; the lr and
teacher-temperature warm-ups are set in epochs, not as fractions of the run, so they are the same,
and the cosine schedules move by under 3e-3 of their range in those first steps either way.

Steps do not keep the pace of the timed ones (measured on conf/base, 2 cores: 5-10 % slower
or faster later in the same run), so the length is fitted again every ``REFIT_EVERY`` steps on
the steps since the last fit (their online kNN checks taken out), with a smaller margin,
until ``REFIT_UNTIL`` of the run: the run ends close to its budget instead of a margin early or
late. Each re-fit rebuilds the schedules for the new length; a change of the length by a
fraction d moves the cosine schedules by at most d times their progress (a few 1e-3 of their
range for the few per cent a re-fit changes), and the last fifth of the run is not touched.

The length chosen is kept in every checkpoint: a resumed run keeps it and does not measure again.
A run resumed before it was chosen measures its own steps 10 to 210 after the resume, on its
own clock.
Set ``time_budget_min: null`` for a fixed length (``epochs``), as reproducible runs and
comparisons at equal steps want.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from dinoflow import tracking
from dinoflow.config import PretrainConfig
from dinoflow.distributed import broadcast_from_main

log = logging.getLogger(__name__)

PROBE_FROM = 10  # the first timed step (after the run's first step): compiling is over
# timed steps; the decision is made after them. Measured (conf/base, 2 cores): the mean of 50
# steps came out 9 % below the run's own later mean once and 4 % above it in the run before;
# 200 steps hold it within ~3 %. The cosine schedules are still within 0.3 % of their range of
# their start at step 210 of a 3,000-step run, and the lr warm-up (200 steps) is set in epochs.
PROBE_STEPS = 200
# the measured step time is taken this much high: 800-step blocks of one run differ by up to
# 6 %, and the budget is a limit (make run's 30 minutes), not a target
STEP_TIME_MARGIN = 1.05
# re-fits: every 1,000 steps on the steps since the last fit (a mean over 1,000 steps is
# within ~2 % of the next 1,000's), taken 2 % high, not in the last fifth of the run
REFIT_EVERY = 1000
REFIT_MARGIN = 1.02
REFIT_UNTIL = 0.8


@dataclass
class StepBudget:
    """The budget of one run: ``observe(done)`` after every step; after the timed steps it
    returns the run's length, else None. ``started``: the run's start (``time.perf_counter()``)."""

    minutes: float
    cap: int  # the most steps (the schedules' length without a budget)
    started: float = field(default_factory=time.perf_counter)
    probe_from: int = PROBE_FROM  # the step (done) the timing starts at
    device: torch.device | str = "cpu"  # where the length is broadcast from rank 0 (NCCL: CUDA)
    decided: int | None = None  # the length, once chosen (or restored from a checkpoint)
    note: str | None = None  # how the length was chosen (the run's notes, the summary)
    # (step done, perf_counter) where the timed window began: the probe's start, then the last
    # fit; None before the probe and for a length restored from a checkpoint (never re-fitted)
    window: tuple[int, float] | None = None

    def observe(self, done: int, knn_every: int | None, knn_seconds: float) -> int | None:
        """The run's new length when this step ends a timed window (the probe, then every
        ``REFIT_EVERY`` steps until ``REFIT_UNTIL`` of the run), else None."""
        first = self.decided is None
        if first and done == self.probe_from:
            self.window = (done, time.perf_counter())
        if self.window is None:
            return None
        start, began = self.window
        if done - start < (PROBE_STEPS if first else REFIT_EVERY) or (
                not first and done > REFIT_UNTIL * self.decided):
            return None
        now = time.perf_counter()
        # the online kNN checks run after the step they are due at: those of [start, done)
        checks = ((done - 1) // knn_every - (start - 1) // knn_every) if knn_every else 0
        per_step = max(now - began - checks * knn_seconds, 0.0) / (done - start)
        margin = STEP_TIME_MARGIN if first else REFIT_MARGIN
        steps = fitting_steps(self.minutes * 60 - (now - self.started), per_step * margin, done,
                              self.cap, knn_every, knn_seconds)
        # rank 0's length on every rank (their clocks differ)
        steps = int(broadcast_from_main(torch.tensor([steps], dtype=torch.int64,
                                                     device=self.device)).item())
        self.window = (done, now)
        if steps == self.decided:
            return None
        if first:
            self.note = (f"train.time_budget_min {self.minutes:g}: {steps} steps fit (of at most "
                         f"{self.cap}): {per_step:.3f} s per step over steps {start}-{done}, "
                         f"{now - self.started:.0f} s spent before step {done}"
                         + (f", {knn_seconds:.1f} s per online kNN check" if knn_every else ""))
            log.info(self.note)
        else:
            log.info("train.time_budget_min %g: %d steps instead of %d (%.3f s per step over "
                     "steps %d-%d)", self.minutes, steps, self.decided, per_step, start, done)
            self.note += (f"; re-fitted at step {done}: {steps} steps ({per_step:.3f} s per step "
                          f"over steps {start}-{done})")
        self.decided = steps
        tracking.set_tags({"dinoflow.time_budget_steps": steps,
                           "dinoflow.time_budget_s_per_step": round(per_step, 4)})
        return steps


def fitting_steps(seconds_left: float, per_step: float, done: int, cap: int,
                  knn_every: int | None = None, knn_seconds: float = 0.0) -> int:
    """The run's length: ``done`` plus the steps that fit in ``seconds_left`` at ``per_step``
    seconds each, less the online kNN checks due on the way (at multiples of ``knn_every`` and
    at the end), within [done + 1, cap]."""
    n = max(0, math.floor(seconds_left / per_step))
    for _ in range(3):  # the checks depend on the length: settle it (converges in one or two)
        total = min(cap, done + n)
        checks = (total // knn_every - done // knn_every + (total % knn_every != 0)) if knn_every else 0
        n = max(0, math.floor((seconds_left - checks * knn_seconds) / per_step))
    return max(done + 1, min(cap, done + n))


def budget_for(cfg: PretrainConfig, cap: int, start_step: int, restored: int | None,
               started: float, device: torch.device | str = "cpu") -> StepBudget | None:
    """The run's budget (None without ``train.time_budget_min``). A resumed run takes the length
    its checkpoint holds (``restored``); one resumed before the length was chosen times its own
    steps after the resume."""
    minutes = cfg.train.time_budget_min
    if minutes is None:
        return None
    budget = StepBudget(minutes, cap, started, probe_from=start_step + PROBE_FROM, device=device)
    if restored is not None:
        budget.decided = restored
        budget.note = f"train.time_budget_min {minutes:g}: {restored} steps, chosen before the resume"
    return budget
