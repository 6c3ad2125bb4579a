"""Per-step schedules for lr, weight decay, teacher momentum and temperature (DINOV2.md 5).

Schedules are precomputed numpy arrays indexed by the global step, as in dinov2's
CosineScheduler. Two deliberate differences: the cosine reaches ``final`` exactly at the last
step, and the warm-up ramp reaches ``base`` at step ``warmup_steps`` (no repeated peak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Square-root scaling rule of dinov2: base_lr * sqrt(global_batch / 1024)."""
    return base_lr * math.sqrt(global_batch / 1024)


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """(total_steps,) linear warm-up warmup_start -> base, then half-cosine base -> final.

    Step ``warmup_steps`` is ``base`` and the last step is ``final``.
    """
    warmup_steps = min(warmup_steps, total_steps)
    warmup = warmup_start + (base - warmup_start) * np.arange(warmup_steps) / max(warmup_steps, 1)
    n = total_steps - warmup_steps
    progress = np.arange(n) / max(n - 1, 1)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def linear_schedule(base: float, final: float, total_steps: int) -> np.ndarray:
    """(total_steps,) straight line base -> final; step 0 is ``base``, the last step ``final``."""
    return base + (final - base) * np.arange(total_steps) / max(total_steps - 1, 1)


def linear_warmup_then_constant(
    start: float, end: float, warmup_steps: int, total_steps: int
) -> np.ndarray:
    """(total_steps,) linear start -> end over warmup_steps (step warmup_steps is end), then end."""
    if warmup_steps <= 0:
        return np.full(total_steps, float(end))
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
) -> tuple[Schedules, list[str]]:
    """All training schedules plus human-readable notes about any capping, for the logs.

    base_lr is the peak lr (already scaled with ``scaled_lr``). Warm-ups (lr, teacher
    temperature, last-layer freeze) longer than max_warmup_fraction of the run are capped to
    that fraction so that a short run still reaches its peak lr and final temperature.
    The teacher momentum goes start -> end over the whole run, ``momentum_shape`` "cosine"
    (the reference) or "linear".
    """
    if momentum_shape not in ("cosine", "linear"):
        raise ValueError(f"momentum_shape must be 'cosine' or 'linear', got {momentum_shape!r}")
    if total_steps < 1 or steps_per_epoch < 1:
        raise ValueError(
            f"total_steps ({total_steps}) and steps_per_epoch ({steps_per_epoch}) must be >= 1"
        )
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
    schedules = Schedules(
        lr=cosine_schedule(base_lr, min_lr, total_steps, warmup_steps=lr_warmup),
        wd=cosine_schedule(wd_start, wd_end, total_steps),
        momentum=(cosine_schedule if momentum_shape == "cosine" else linear_schedule)(
            momentum_start, momentum_end, total_steps
        ),
        teacher_temp=linear_warmup_then_constant(
            teacher_temp_start, teacher_temp_end, temp_warmup, total_steps
        ),
        last_layer_lr_zero=np.arange(total_steps) < freeze,
    )
    return schedules, notes
