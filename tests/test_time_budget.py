"""train.time_budget_min: the run's length is what fits, fitted again on the later steps, kept
across a resume."""

from pathlib import Path

import pytest
import torch

from dinoflow.config import ConfigError, PretrainConfig, validate
from dinoflow.data import Split, channel_stats, load_splits
from dinoflow.training import budget as budget_module
from dinoflow.training import pretrain
from dinoflow.training.budget import (
    PROBE_FROM,
    PROBE_STEPS,
    REFIT_EVERY,
    REFIT_MARGIN,
    STEP_TIME_MARGIN,
    StepBudget,
    budget_for,
    fitting_steps,
)
from dinoflow.training.components import schedules_for

TINY = {
    "crops": {"global_size": 16, "local_size": 8, "n_local": 2},
    "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
    "head": {"n_prototypes": 32, "hidden_dim": 16, "bottleneck_dim": 8},
    "optim": {"warmup_epochs": 1, "teacher_temp_warmup_epochs": 1, "freeze_last_layer_epochs": 1},
    "train": {"epochs": 15, "steps_per_epoch": 20, "batch_size": 8, "num_workers": 0,
              "checkpoint_every_steps": 20, "log_every_steps": 1, "progress": False},
}  # fmt: skip
CAP = 300  # 15 epochs of 20 steps: past the timed steps (10-210)


def _cfg(run_dir: Path, **train) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {**TINY, "train": {**TINY["train"], "run_dir": str(run_dir), **train}})


@pytest.fixture(scope="module")
def tiny_train() -> tuple[Split, list[float], list[float]]:
    train = load_splits(allow_download=False)["train"].subset(range(64))
    return (train, *channel_stats(train))


def test_fitting_steps_by_hand() -> None:
    # 100 s left at 0.5 s per step after step 60: 200 more steps, no checks
    assert fitting_steps(100.0, 0.5, 60, 10_000) == 260
    # checks every 100 steps at 10 s each: 260 -> checks at 100, 200 and the end (260) = 30 s:
    # (100 - 30) / 0.5 = 140 more -> 200, whose checks are at 100 and 200 (20 s): 160 more -> 220
    # (checks 100, 200, end: 30 s) -> 140: the fixed point alternates; three rounds end on 200
    assert fitting_steps(100.0, 0.5, 60, 10_000, knn_every=100, knn_seconds=10.0) in (200, 220)
    assert fitting_steps(100.0, 0.5, 60, 150) == 150  # never past the cap
    assert fitting_steps(-5.0, 0.5, 60, 10_000) == 61  # the budget is spent: one more step


class _Clock:
    """A step clock: 1 s per step up to step 210, 0.5 s after it, 10 s per online kNN check
    (every 800 steps, run after the step it is due at)."""

    def __init__(self) -> None:
        self.done = 0

    def perf_counter(self) -> float:
        d = self.done
        return min(d, 210) * 1.0 + max(d - 210, 0) * 0.5 + 10.0 * ((d - 1) // 800 if d else 0)


def _observe_until(budget: StepBudget, clock: _Clock, last: int) -> dict[int, int]:
    """{done: new length} for every step at which the budget (re)fitted the length."""
    fits = {}
    for done in range(1, last + 1):
        clock.done = done
        total = budget.observe(done, 800, 10.0)
        if total is not None:
            fits[done] = total
    return fits


def test_the_length_is_fitted_again_on_the_later_steps(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(budget_module, "time", clock)
    budget = StepBudget(minutes=50, cap=100_000, started=0.0)  # 3,000 s
    fits = _observe_until(budget, clock, 2210)
    first, refit = PROBE_FROM + PROBE_STEPS, PROBE_FROM + PROBE_STEPS + REFIT_EVERY
    assert list(fits)[:2] == [first, refit]
    # at step 210: 2,790 s left at 1 s per step (x 1.05), less the kNN checks on the way
    assert fits[first] == fitting_steps(2790.0, STEP_TIME_MARGIN, first, 100_000, 800, 10.0)
    # at step 1,210: 710 s of steps and one 10 s check spent; 1,000 steps at 0.5 s each (the
    # check taken out), so the run gets about twice the steps the first fit gave it
    assert fits[refit] == fitting_steps(3000.0 - 720.0, 0.5 * REFIT_MARGIN, refit, 100_000, 800, 10.0)
    assert fits[refit] > 1.8 * fits[first]
    assert budget.decided == fits[max(fits)] and "re-fitted at step 1210" in budget.note


def test_a_length_restored_from_a_checkpoint_is_never_fitted_again(monkeypatch, tmp_path) -> None:
    clock = _Clock()
    monkeypatch.setattr(budget_module, "time", clock)
    cfg = _cfg(tmp_path, time_budget_min=50.0)
    budget = budget_for(cfg, 100_000, 500, restored=4000, started=0.0)
    assert _observe_until(budget, clock, 3000) == {} and budget.decided == 4000


def test_a_spent_budget_ends_the_run_on_rebuilt_schedules(tmp_path, tiny_train) -> None:
    train, mean, std = tiny_train
    cfg = _cfg(tmp_path, time_budget_min=1e-4)  # 6 ms: spent before the decision
    result = pretrain(cfg, train, mean, std)
    decided = PROBE_FROM + PROBE_STEPS + 1
    assert result.steps == decided < CAP
    assert any("train.time_budget_min" in note and f"{decided} steps fit" in note
               for note in result.notes)
    # from the decision on, the schedules are those of a run of `decided` steps: the cosine ends
    # at min_lr on the last step, where the cap's schedules would still be near the peak
    fitted, _ = schedules_for(cfg, decided, 20, 8)
    cap, _ = schedules_for(cfg, CAP, 20, 8)
    assert result.final["schedule/lr"] == pytest.approx(float(fitted.lr[decided - 1]))
    assert float(fitted.lr[decided - 1]) < 0.05 * float(cap.lr[decided - 1])


def test_an_ample_budget_trains_the_cap_and_resumes_on_it(tmp_path, tiny_train) -> None:
    train, mean, std = tiny_train
    whole = pretrain(_cfg(tmp_path / "whole", time_budget_min=60.0), train, mean, std)
    assert whole.steps == CAP

    killed = tmp_path / "killed"
    with pytest.raises(SystemExit):  # after the checkpoint of step 240: the length is chosen
        pretrain(_cfg(killed, time_budget_min=60.0), train, mean, std, stop_after_steps=240)
    state = torch.load(next((killed / "checkpoints").rglob("step_*240.pt")), weights_only=True)
    assert state["chosen_steps"] == CAP
    resumed = pretrain(_cfg(killed, time_budget_min=60.0), train, mean, std)
    assert (resumed.resumed_from_step, resumed.steps) == (240, CAP)
    assert any("chosen before the resume" in note for note in resumed.notes)
    a = torch.load(tmp_path / "whole" / "teacher_backbone.pt", weights_only=False)["state_dict"]
    b = torch.load(killed / "teacher_backbone.pt", weights_only=False)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_budget_is_validated() -> None:
    with pytest.raises(ConfigError, match="time_budget_min"):
        validate(PretrainConfig, {"train": {"time_budget_min": 0}}, "pretrain")
