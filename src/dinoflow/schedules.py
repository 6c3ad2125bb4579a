"""Per-step schedules for lr, weight decay, teacher momentum and temperature (docs/method.md section 5).

Schedules are precomputed numpy arrays indexed by the global step. convention="dinov2" (the
default) gives the values of dinov2's ``CosineScheduler`` and ``build_schedulers``
(dinov2/utils/utils.py, dinov2/train/train.py) step for step: the warm-up is
``linspace(start, base, W)``, so it reaches the peak at step W - 1 and the cosine starts at the
peak again at step W, and the cosine stops one step short of ``final``; the teacher temperature
is its own ``linspace`` warm-up, then constant. Checked against the official code's arrays
(tests/unit/test_faithful_reference.py): equal to float64 rounding, 3.3e-16 relative at most
(docs/faithfulness.md). dinoflow adds one thing: warm-ups longer than ``max_warmup_fraction`` of
the run are capped (notes say so), as a short run must still reach its peak and final values.

convention="exact_ends" makes the ends exact instead: the warm-up reaches ``base`` at step
``warmup_steps`` (the peak once, not repeated) and the cosine reaches ``final`` exactly at the
last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Square-root scaling rule of dinov2: base_lr * sqrt(global_batch / 1024)."""
    return base_lr * math.sqrt(global_batch / 1024)


CONVENTIONS = ("dinov2", "exact_ends")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    convention: str = "dinov2",
) -> np.ndarray:
    """(total_steps,) linear warm-up warmup_start -> base, then half-cosine base -> final.

    dinov2 (``CosineScheduler``): warm-up linspace(warmup_start, base, W), so step W - 1 is
    ``base``; the cosine final + (base - final)(1 + cos(pi i / n)) / 2 for i < n = total - W
    starts at ``base`` at step W and ends one step short of ``final``.
    exact_ends: step W is ``base`` (the warm-up stops just below it) and the last step is
    ``final``.
    """
    _check_convention(convention)
    warmup_steps = min(warmup_steps, total_steps)
    n = total_steps - warmup_steps
    if convention == "dinov2":
        warmup = np.linspace(warmup_start, base, warmup_steps)
        progress = np.arange(n) / max(n, 1)
    else:
        warmup = warmup_start + (base - warmup_start) * np.arange(warmup_steps) / max(
            warmup_steps, 1
        )
        progress = np.arange(n) / max(n - 1, 1)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def linear_schedule(base: float, final: float, total_steps: int) -> np.ndarray:
    """(total_steps,) straight line base -> final; step 0 is ``base``, the last step ``final``."""
    return base + (final - base) * np.arange(total_steps) / max(total_steps - 1, 1)


def linear_warmup_then_constant(
    start: float, end: float, warmup_steps: int, total_steps: int, convention: str = "dinov2"
) -> np.ndarray:
    """(total_steps,) linear start -> end over warmup_steps, then end.

    dinov2 (its teacher-temperature ``CosineScheduler``): linspace(start, end, W), so step
    W - 1 is ``end``; exact_ends: step W is ``end``.
    """
    _check_convention(convention)
    if warmup_steps <= 0:
        return np.full(total_steps, float(end))
    if convention == "dinov2":
        warmup = np.linspace(start, end, min(warmup_steps, total_steps))
        return np.concatenate([warmup, np.full(total_steps - len(warmup), float(end))])
    frac = np.minimum(np.arange(total_steps) / warmup_steps, 1.0)
    return start + (end - start) * frac


@dataclass
class Schedules:
    """Per-step values, each an array of length total_steps indexed by the global step."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr_zero: np.ndarray  # bool: the prototype layer is frozen at this step

    def __len__(self) -> int:
        return len(self.lr)


def _fmt(epochs: float) -> str:
    return f"{round(epochs, 2):g}"


def _cap(
    what: str, steps: int, max_steps: int, steps_per_epoch: int, run_epochs: float, notes: list[str]
) -> int:
    """Cap a warm-up length at max_steps, recording a note when it is shortened."""
    if steps <= max_steps:
        return steps
    notes.append(
        f"{what} capped from {_fmt(steps / steps_per_epoch)} to {_fmt(max_steps / steps_per_epoch)}"
        f" epochs (run has {_fmt(run_epochs)})"
    )
    return max_steps


def _check_arguments(
    total_steps: int, steps_per_epoch: int, momentum_shape: str, convention: str
) -> None:
    """Refuse an unknown momentum shape or convention, and runs or epochs of no step."""
    if momentum_shape not in ("cosine", "linear"):
        raise ValueError(f"momentum_shape must be 'cosine' or 'linear', got {momentum_shape!r}")
    _check_convention(convention)
    if total_steps < 1 or steps_per_epoch < 1:
        raise ValueError(
            f"total_steps ({total_steps}) and steps_per_epoch ({steps_per_epoch}) must be >= 1"
        )


def _warmups(
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    teacher_temp_warmup_epochs: float,
    freeze_last_layer_epochs: float,
    max_warmup_fraction: float,
) -> tuple[int, int, int, list[str]]:
    """(lr warm-up, temperature warm-up, last-layer freeze) in steps, each capped at
    max_warmup_fraction of the run, and the notes about the capped ones."""
    notes: list[str] = []
    run_epochs = total_steps / steps_per_epoch
    max_steps = int(max_warmup_fraction * total_steps)

    def epochs_to_steps(epochs: float) -> int:
        return int(round(epochs * steps_per_epoch))

    lr_warmup = _cap(
        "lr warm-up", epochs_to_steps(warmup_epochs), max_steps, steps_per_epoch, run_epochs, notes
    )
    temp_warmup = _cap(
        "teacher temperature warm-up",
        epochs_to_steps(teacher_temp_warmup_epochs),
        max_steps,
        steps_per_epoch,
        run_epochs,
        notes,
    )
    freeze = _cap(
        "last-layer freeze",
        epochs_to_steps(freeze_last_layer_epochs),
        max_steps,
        steps_per_epoch,
        run_epochs,
        notes,
    )
    return lr_warmup, temp_warmup, freeze, notes


def build_schedules(
    total_steps: int,
    steps_per_epoch: int,
    base_lr: float,
    min_lr: float,
    warmup_epochs: float,
    wd_start: float,
    wd_end: float,
    momentum_start: float,
    momentum_end: float,
    teacher_temp_start: float,
    teacher_temp_end: float,
    teacher_temp_warmup_epochs: float,
    freeze_last_layer_epochs: float,
    max_warmup_fraction: float = 0.3,
    momentum_shape: str = "cosine",
    convention: str = "dinov2",
) -> tuple[Schedules, list[str]]:
    """All training schedules plus human-readable notes about any capping, for the logs.

    base_lr is the peak lr (already scaled with ``scaled_lr``). Warm-ups (lr, teacher
    temperature, last-layer freeze) longer than max_warmup_fraction of the run are capped to
    that fraction so that a short run still reaches its peak lr and final temperature.
    The teacher momentum goes start -> end over the whole run, ``momentum_shape`` "cosine"
    (the reference) or "linear". ``convention``: see ``cosine_schedule``; the last-layer freeze
    zeroes the first steps of the lr schedule, as the reference's ``last_layer_lr_schedule``.
    """
    _check_arguments(total_steps, steps_per_epoch, momentum_shape, convention)
    lr_warmup, temp_warmup, freeze, notes = _warmups(
        total_steps,
        steps_per_epoch,
        warmup_epochs,
        teacher_temp_warmup_epochs,
        freeze_last_layer_epochs,
        max_warmup_fraction,
    )
    schedules = Schedules(
        lr=cosine_schedule(base_lr, min_lr, total_steps, lr_warmup, convention=convention),
        wd=cosine_schedule(wd_start, wd_end, total_steps, convention=convention),
        momentum=(
            cosine_schedule(momentum_start, momentum_end, total_steps, convention=convention)
            if momentum_shape == "cosine"
            else linear_schedule(momentum_start, momentum_end, total_steps)
        ),
        teacher_temp=linear_warmup_then_constant(
            teacher_temp_start, teacher_temp_end, temp_warmup, total_steps, convention
        ),
        last_layer_lr_zero=np.arange(total_steps) < freeze,
    )
    return schedules, notes
