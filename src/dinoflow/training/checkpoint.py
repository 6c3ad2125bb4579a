"""Checkpoints holding everything needed to continue a run exactly, the newest N of them.

``<run_dir>/checkpoints/<fingerprint>/step_<step>.pt``: weights, optimizer, loss centers, step,
RNG state, history, config and the train files found unreadable so far (the data order and the
augmentations are functions of (seed, step), so they need no state). Written atomically
(``dinoflow.files``); loaded with ``torch.load(weights_only=True)``: tensors and plain types
only, nothing is unpickled. An unreadable newest file (a truncated copy, a disk error) falls back
to the one before it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from dinoflow.errors import CheckpointError
from dinoflow.files import atomic_torch_save
from dinoflow.training.components import Components

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_state(run: Components, modules: bool = True) -> dict[str, Any]:
    """What a training step changes, by checkpoint key: the losses' centers and the RNG, and
    with ``modules`` the student, teacher and optimizer as they are (sharded stays sharded)."""
    state = {"dino_loss": run.losses.dino.state_dict(), "ibot_loss": run.losses.ibot.state_dict(),
             "rng": rng_state()}  # fmt: skip
    if modules:
        state.update(student=run.student.state_dict(), teacher=run.teacher.state_dict(),
                     optimizer=run.optimizer.state_dict())  # fmt: skip
    return state


def load_step_state(run: Components, state: dict[str, Any], gathered: bool = False) -> None:
    """``step_state`` back into ``run`` in place; ``gathered``: the modules' state is the plain
    (unsharded) form an FSDP run's checkpoint holds."""
    if gathered:
        from dinoflow.distributed import load_full_state

        load_full_state(run.student, state["student"], run.optimizer, state["optimizer"])
        load_full_state(run.teacher, state["teacher"])
    else:
        run.student.load_state_dict(state["student"])
        run.teacher.load_state_dict(state["teacher"])
        run.optimizer.load_state_dict(state["optimizer"])
    run.losses.dino.load_state_dict(state["dino_loss"])
    run.losses.ibot.load_state_dict(state["ibot_loss"])
    set_rng_state(state["rng"])


class Checkpointer:
    """Save every ``every`` steps (and at the end), keep the newest ``keep``, resume from the newest
    readable one. ``fsdp``: state is gathered from the shards (a collective) and stored unsharded,
    so any number of processes can resume it. Only the main process writes."""

    def __init__(self, run_dir: str | Path, fp: str, every: int, keep: int = 2,
                 fsdp: bool = False, main: bool = True):
        self.folder = Path(run_dir) / "checkpoints" / fp
        self.legacy = Path(run_dir) / "checkpoints" / f"{fp}.pt"  # one-file layout of older runs
        self.every, self.keep, self.fsdp, self.main = every, keep, fsdp, main
        self.restored_chosen_steps: int | None = None  # the length a time budget chose
        self.restored_precision: str | None = None  # the precision the run was trained in

    # ------------------------------------------------------------------ reading
    def files(self) -> list[Path]:
        """This run's checkpoints, newest first."""
        found = [(int(m.group(1)), p) for p in self.folder.glob("step_*.pt")
                 if (m := _STEP_FILE.match(p.name))]
        ordered = [p for _, p in sorted(found, reverse=True)]
        return ordered + ([self.legacy] if self.legacy.is_file() else [])

    def latest(self) -> Path | None:
        files = self.files()
        return files[0] if files else None

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """(state, path) of the newest readable checkpoint; None when there is none."""
        files = self.files()
        failed: list[tuple[Path, str]] = []
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file: try the one before
                failed.append((path, f"{type(exc).__name__}: {str(exc)[:200]}"))
                continue
            if failed:
                log.warning("checkpoint %s is unreadable (%s); resuming from the previous one, %s",
                            failed[0][0], failed[0][1], path)
            return state, path
        if failed:
            listed = "; ".join(f"{p} ({why})" for p, why in failed)
            raise CheckpointError(f"no readable checkpoint to resume from: {listed}. Move them away "
                                  "(or set pretrain.train.resume=false) to start over")
        return None

    def restore(self, run: Components) -> tuple[int, list[dict[str, float]]]:
        """Load the newest readable checkpoint into ``run``: (start step, history); (0, []) if none."""
        found = self.load_latest()
        if found is None:
            return 0, []
        state, path = found
        # the checkpoint holds plain (unsharded) state, whoever wrote it
        load_step_state(run, state, gathered=self.fsdp)
        self.restored_chosen_steps = state.get("chosen_steps")
        self.restored_precision = state.get("precision")
        run.unreadable_files = list(state.get("unreadable_files", []))
        log.info("resuming %s from step %d of %d (checkpoint %s)", run.fingerprint, state["step"],
                 run.last_step, path)
        return int(state["step"]), list(state["history"])

    # ------------------------------------------------------------------ writing
    def due(self, done: int, last_step: int) -> bool:
        return done % self.every == 0 or done == last_step

    def save(self, done: int, run: Components, history: list[dict[str, float]], config: dict) -> Path:
        """Write step ``done`` (every process takes part under FSDP; the main one writes)."""
        parts = None
        if self.fsdp:
            from dinoflow.distributed import gather_full_state

            student_sd, optim_sd = gather_full_state(run.student, run.optimizer)
            teacher_sd = gather_full_state(run.teacher)[0]
            parts = {**step_state(run, modules=False), "student": student_sd,
                     "teacher": teacher_sd, "optimizer": optim_sd}  # fmt: skip
        elif self.main:
            parts = step_state(run)
        path = self.folder / f"step_{done:08d}.pt"
        if self.main:
            atomic_torch_save({
                "step": done, **parts, "history": history, "config": config,
                "fingerprint": run.fingerprint, "chosen_steps": run.chosen_steps,
                "precision": run.precision, "unreadable_files": list(run.unreadable_files),
            }, path)  # fmt: skip
            for old in self.files()[self.keep:]:
                old.unlink(missing_ok=True)
        return path

    def clear(self) -> None:
        """The run finished: its exported model is the product."""
        for path in self.files():
            path.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
