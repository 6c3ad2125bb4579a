"""Checkpoints holding everything needed to continue a run exactly, the newest N of them.

``<run_dir>/checkpoints/<fingerprint>/step_<step>.pt``: every part the method names by its name
(networks, loss centers, ...), the optimizer, the RNG state, the run state (step, history, the
length a budget chose, the precision, the train files found unreadable so far) and the config
(the data order and the augmentations are functions of (seed, step), so they need no state). Written atomically
(``dinoflow.files``); loaded with ``torch.load(weights_only=True)``: tensors and plain types
only, nothing is unpickled. An unreadable newest file (a truncated copy, a disk error) falls back
to the one before it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Protocol

import torch

from dinoflow.errors import CheckpointError
from dinoflow.files import atomic_torch_save

log = logging.getLogger(__name__)


class Resumable(Protocol):
    """What a checkpoint saves and restores (``dinoflow.training.trainer.Trainer``)."""

    fingerprint: str
    state: Any  # the run state: ``state_dict`` / ``load_state_dict``, ``step``, ``last_step``

    def step_state(self, gathered: bool = False) -> dict[str, Any]: ...

    def load_step_state(self, state: dict[str, Any], gathered: bool = False) -> None: ...


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


class Checkpointer:
    """Save every ``every`` steps (and at the end), keep the newest ``keep``, resume from the newest
    readable one. ``fsdp``: state is gathered from the shards (a collective) and stored unsharded,
    so any number of processes can resume it. Only the main process writes."""

    def __init__(
        self,
        run_dir: str | Path,
        fp: str,
        every: int,
        keep: int = 2,
        fsdp: bool = False,
        main: bool = True,
    ):
        self.folder = Path(run_dir) / "checkpoints" / fp
        # the one-file layout, checkpoints/<fingerprint>.pt: read (oldest), never written
        self.one_file = Path(run_dir) / "checkpoints" / f"{fp}.pt"
        self.every, self.keep, self.fsdp, self.main = every, keep, fsdp, main

    # ------------------------------------------------------------------ reading
    def files(self) -> list[Path]:
        """This run's checkpoints, newest first."""
        found = [
            (int(m.group(1)), p)
            for p in self.folder.glob("step_*.pt")
            if (m := _STEP_FILE.match(p.name))
        ]
        ordered = [p for _, p in sorted(found, reverse=True)]
        return ordered + ([self.one_file] if self.one_file.is_file() else [])

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
                log.warning(
                    "checkpoint %s is unreadable (%s); resuming from the previous one, %s",
                    failed[0][0],
                    failed[0][1],
                    path,
                )
            return state, path
        if failed:
            listed = "; ".join(f"{p} ({why})" for p, why in failed)
            raise CheckpointError(
                f"no readable checkpoint to resume from: {listed}. Move them away "
                "(or set pretrain.train.resume=false) to start over"
            )
        return None

    def restore(self, trainer: Resumable) -> int:
        """Load the newest readable checkpoint into ``trainer`` (the method's parts, optimizer,
        RNG, run state) -> the step it resumes from; 0 when there is none."""
        found = self.load_latest()
        if found is None:
            return 0
        state, path = found
        # the checkpoint holds plain (unsharded) state, whoever wrote it
        trainer.load_step_state(state, gathered=self.fsdp)
        trainer.state.load_state_dict(state)
        log.info(
            "resuming %s from step %d of %d (checkpoint %s)",
            trainer.fingerprint,
            state["step"],
            trainer.state.last_step,
            path,
        )
        return trainer.state.step

    # ------------------------------------------------------------------ writing
    def due(self, done: int, last_step: int) -> bool:
        return done % self.every == 0 or done == last_step

    def save(self, done: int, trainer: Resumable, config: dict) -> Path:
        """Write step ``done`` (every process takes part under FSDP; the main one writes)."""
        parts = trainer.step_state(gathered=True) if self.fsdp else None
        path = self.folder / f"step_{done:08d}.pt"
        if self.main:
            parts = parts or trainer.step_state()
            state = {
                **parts,
                **trainer.state.state_dict(),
                "step": done,
                "config": config,
                "fingerprint": trainer.fingerprint,
            }
            atomic_torch_save(state, path)
            for old in self.files()[self.keep :]:
                old.unlink(missing_ok=True)
        return path

    def clear(self) -> None:
        """The run finished: its exported model is the product."""
        for path in self.files():
            path.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
