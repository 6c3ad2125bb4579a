"""The state of a run that is neither a network nor a loss: where it is and what it found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    """Saved in every checkpoint beside the method's parts (``Stateful``).

    ``step``: steps done; ``history``: one row per logged step (and per online kNN check);
    ``total_steps``: the schedules' length, ``last_step`` where this run stops
    (``train.max_steps`` may stop it early), ``steps_per_epoch``; ``chosen_steps``: the length
    a time budget chose (kept so a resumed run keeps it); ``precision``: what
    ``train.precision`` resolved to (a resumed run keeps it); ``unreadable_files``: the ids of
    the train files replaced so far; ``notes``: schedule capping and budget notes for the logs.
    """

    total_steps: int
    steps_per_epoch: int
    last_step: int
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    chosen_steps: int | None = None
    precision: str | None = None
    unreadable_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "history": self.history,
            "chosen_steps": self.chosen_steps,
            "precision": self.precision,
            "unreadable_files": list(self.unreadable_files),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.chosen_steps = state.get("chosen_steps")
        self.precision = state.get("precision")
        self.unreadable_files = list(state.get("unreadable_files", []))
