"""train.time_budget_min: the length is chosen once, by timing, before training; the run is then
exactly the fixed-length run of that length, and a resumed run keeps it.

The clock is simulated: a machine whose training step takes a fixed time and nothing else any.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dinoflow.config import ConfigError, DistillationConfig, PretrainConfig, deep_merge, validate
from dinoflow.data import Split
from dinoflow.methods.frozen_teacher import FrozenTeacher
from dinoflow.training import Trainer, build_student, pretrain, schedules_for, total_steps_for
from dinoflow.training import budget as budget_module
from dinoflow.training.budget import PROBE_FROM, PROBE_STEPS, fitting_steps, replay_params
from dinoflow.training.distill import distill

TINY = {
    "crops": {"global_size": 16, "local_size": 8, "n_local": 2},
    "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
    "head": {"n_prototypes": 32, "hidden_dim": 16, "bottleneck_dim": 8},
    "optim": {"warmup_epochs": 1, "teacher_temp_warmup_epochs": 1, "freeze_last_layer_epochs": 1},
    "train": {
        "epochs": 15,  # 300 steps: past the probe's 210
        "steps_per_epoch": 20,
        "batch_size": 8,
        "num_workers": 0,
        "precision": "fp32",  # pinned: runs compared bit for bit train in one precision
        "checkpoint_every_steps": 20,
        "log_every_steps": 1,
        "progress": False,
    },
}
PROBE = PROBE_FROM + PROBE_STEPS


def _cfg(run_dir: Path, **train) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {**TINY, "train": {**TINY["train"], "run_dir": str(run_dir), **train}}
    )


def _replayed(cfg: PretrainConfig, replay: str, section: str, run_dir: Path) -> dict:
    """The parameters of ``cfg`` with the replay's --params applied as `kedro run` parses them."""
    params = OmegaConf.to_container(OmegaConf.from_dotlist(replay.split(",")))[section]
    merged = deep_merge(cfg.model_dump(mode="json"), params)
    merged["train"]["run_dir"] = str(run_dir)
    return merged


@pytest.fixture(scope="module")
def data() -> tuple[Split, list[float], list[float]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 20, 20), dtype=np.uint8)
    split = Split(
        ids=[str(i) for i in range(64)],
        labels=np.zeros(64, np.int64),
        class_names=["a"],
        channels=1,
        images=images,
    )
    return split, [0.5], [0.25]


class StepClock:
    """A machine whose training step takes ``per_step`` seconds; nothing else takes any time."""

    def __init__(self, per_step: float) -> None:
        self.per_step, self.now, self.steps = per_step, 0.0, 0

    def perf_counter(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.per_step
        self.steps += 1


@pytest.fixture
def machine(monkeypatch):
    """``machine(seconds_per_step, fail_at=None)``: the budget's clock; the trainer's step (of
    any method) advances it, and the one numbered ``fail_at`` is a kill."""

    def install(per_step: float, fail_at: int | None = None) -> StepClock:
        clock = StepClock(per_step)
        monkeypatch.setattr(budget_module, "time", SimpleNamespace(perf_counter=clock.perf_counter))
        real_step = Trainer.step

        def timed(self, *args, **kwargs):
            clock.tick()
            if clock.steps == fail_at:
                raise SystemExit("killed")
            return real_step(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, "step", timed)
        return clock

    return install


def _teacher(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "teacher_backbone.pt", weights_only=False)["state_dict"]
    heads = torch.load(run_dir / "teacher_heads.pt", weights_only=False)
    return {**state, **{f"head.{k}": v for k, v in heads["dino_head"].items()}}


def _history(run_dir: Path) -> list[dict[str, float]]:
    """Every logged row, without the measured speed (the one thing the clock changes)."""
    rows = json.loads((run_dir / "history.json").read_text())
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def test_fitting_steps_by_hand() -> None:
    # 100 s left at 0.5 s per step after step 60: 200 more steps, no checks
    assert fitting_steps(100.0, 0.5, 60, 10_000) == 260
    # checks every 100 steps at 10 s each: 260 -> checks at 100, 200 and the end (260) = 30 s:
    # (100 - 30) / 0.5 = 140 more -> 200, whose checks are at 100 and 200 (20 s): 160 more -> 220
    # (checks 100, 200, end: 30 s) -> 140: the fixed point alternates; three rounds end on 200
    assert fitting_steps(100.0, 0.5, 60, 10_000, knn_every=100, knn_seconds=10.0) in (200, 220)
    assert fitting_steps(100.0, 0.5, 60, 150) == 150  # never past the cap
    assert fitting_steps(-5.0, 0.5, 60, 10_000) == 61  # the budget is spent: one more step


@pytest.mark.parametrize("steps_per_epoch", [1, 3, 7, 20, 200, 781, 1250])
def test_the_replay_parameters_give_exactly_the_length(steps_per_epoch: int) -> None:
    base = PretrainConfig()
    for steps in [*range(1, 120), 3099, 3100, 4099, 123_457]:
        replay = replay_params("pretrain", steps, steps_per_epoch)
        params = OmegaConf.to_container(OmegaConf.from_dotlist(replay.split(",")))["pretrain"]
        cfg = base.model_copy(update={"train": base.train.model_copy(update=params["train"])})
        assert cfg.train.time_budget_min is None
        assert total_steps_for(cfg, 50_000, 1) == (steps, steps_per_epoch), replay


def test_a_budgeted_run_is_the_fixed_length_run_it_chose(tmp_path, data, machine) -> None:
    import mlflow

    clock = machine(0.1)
    cfg = _cfg(tmp_path / "budget", time_budget_min=0.46)
    mlflow.set_experiment("budget")  # this test's store: not an experiment id left by another
    with mlflow.start_run() as active:
        budgeted = pretrain(cfg, *data)
    # 27.6 s: the probe's 210 steps took 21 s (its 200 timed ones: 0.1 s per step); 6.6 s left
    # at 0.105 s per step (5 % margin) fit 62 steps, fewer than the cap (300)
    assert budgeted.steps == budgeted.budget_steps == 62
    assert clock.steps == PROBE + 62  # the probe's steps, then the run's from step 0
    assert budgeted.budget_replay == (
        "pretrain.train.time_budget_min=null,pretrain.train.epochs"
        "=3.1,pretrain.train.steps_per_epoch=20"
    )
    assert any("62 steps" in n and budgeted.budget_replay in n for n in budgeted.notes)
    client = mlflow.MlflowClient()
    tags = client.get_run(active.info.run_id).data.tags
    assert (tags["dinoflow.time_budget_steps"], tags["dinoflow.time_budget_s_per_step"]) == (
        "62",
        "0.1",
    )
    logged = [m.step for m in client.get_metric_history(active.info.run_id, "loss/total")]
    assert logged == list(range(1, 63))  # nothing of the probe is logged

    params = _replayed(cfg, budgeted.budget_replay, "pretrain", tmp_path / "fixed")
    fixed = pretrain(PretrainConfig.model_validate(params), *data)
    assert fixed.steps == 62 and fixed.budget_steps is None
    a, b = _teacher(tmp_path / "budget"), _teacher(tmp_path / "fixed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = _history(tmp_path / "budget")
    assert [row["step"] for row in history] == list(range(1, 63))
    assert history == _history(tmp_path / "fixed")


def test_the_clock_chooses_the_length_only_with_a_budget(tmp_path, data, machine) -> None:
    quiet = {"log_every_steps": 20, "checkpoint_every_steps": 300}
    steps, teachers = {}, {}
    for per_step in (0.1, 0.2):
        machine(per_step)
        plain = pretrain(_cfg(tmp_path / f"plain_{per_step}", epochs=3, **quiet), *data)
        budgeted = pretrain(
            _cfg(tmp_path / f"budget_{per_step}", time_budget_min=0.75, **quiet), *data
        )
        steps[per_step] = (plain.steps, budgeted.steps)
        teachers[per_step] = _teacher(tmp_path / f"plain_{per_step}")
    # 45 s: 0.1 s per step leaves 24 s after the probe (228 steps at 0.105 s), 0.2 s leaves
    # 3 s (14 steps at 0.21 s); without a budget both train their 60 steps
    assert steps == {0.1: (60, 228), 0.2: (60, 14)}
    assert all(torch.equal(teachers[0.1][k], teachers[0.2][k]) for k in teachers[0.1])


def test_a_killed_run_keeps_its_length_and_does_not_time_again(tmp_path, data, machine) -> None:
    cfg = _cfg(tmp_path, time_budget_min=0.4205)  # 25.23 s: 4.23 s after the probe, 40 steps
    clock = machine(0.1, fail_at=100)
    with pytest.raises(SystemExit):  # killed during the probe: nothing written
        pretrain(cfg, *data)
    assert clock.steps == 100 and not list(tmp_path.rglob("step_*.pt"))

    clock = machine(0.1)
    with pytest.raises(SystemExit):  # times again from scratch; killed after step 20
        pretrain(cfg, *data, stop_after_steps=20)
    assert clock.steps == PROBE + 20
    state = torch.load(next(tmp_path.rglob("step_*20.pt")), weights_only=True)
    assert (state["step"], state["chosen_steps"]) == (20, 40)

    clock = machine(0.2)  # twice as slow: timing again would choose 1 step
    resumed = pretrain(cfg, *data)
    assert clock.steps == 20  # no probe: only the steps after the resume
    assert (resumed.resumed_from_step, resumed.steps, resumed.budget_steps) == (20, 40, 40)
    assert any("chosen before the resume" in note for note in resumed.notes)
    # on the schedules of 40 steps: the cosine ends at min_lr, the cap's is near its peak
    length, _ = schedules_for(cfg, 40, 20, 8)
    cap, _ = schedules_for(cfg, 300, 20, 8)
    assert resumed.final["schedule/lr"] == pytest.approx(float(length.lr[39]))
    assert float(length.lr[39]) < 0.05 * float(cap.lr[39])
    assert [row["step"] for row in _history(tmp_path)] == list(range(1, 41))


def test_a_run_no_longer_than_the_probe_trains_its_cap(tmp_path, data, machine) -> None:
    clock = machine(0.1)
    summary = pretrain(_cfg(tmp_path, epochs=1, time_budget_min=0.01), *data)  # 20 steps, 0.6 s
    assert clock.steps == summary.steps == summary.budget_steps == 20
    assert any("no longer than the 210-step probe" in note for note in summary.notes)


def test_distillation_replays_its_budgeted_length(tmp_path, data, machine) -> None:
    teacher_cfg = _cfg(tmp_path)
    student = build_student(teacher_cfg, 1)
    teacher = FrozenTeacher(student.backbone, student.dino_head)
    params = {
        "teacher": {"source": "unused"},
        "crops": TINY["crops"],
        "backbone": TINY["backbone"],
        "head": {"hidden_dim": 16, "bottleneck_dim": 8},
        "optim": TINY["optim"],
        "train": {**TINY["train"], "run_dir": str(tmp_path / "budget"), "time_budget_min": 0.3875},
    }
    clock = machine(0.1)
    cfg = DistillationConfig.model_validate(params)
    budgeted = distill(cfg, teacher, *data)
    # 23.25 s: 2.25 s after the probe's 21 s, 21 steps at 0.105 s
    assert clock.steps == PROBE + 21 and budgeted.steps == budgeted.budget_steps == 21
    assert budgeted.budget_replay.startswith("distillation.train.time_budget_min=null,")
    replay = OmegaConf.to_container(OmegaConf.from_dotlist(budgeted.budget_replay.split(",")))
    fixed_params = deep_merge(params, replay["distillation"])
    fixed_params["train"]["run_dir"] = str(tmp_path / "fixed")
    fixed = distill(DistillationConfig.model_validate(fixed_params), teacher, *data)
    assert fixed.steps == 21
    a = torch.load(budgeted.student_backbone, weights_only=True)["state_dict"]
    b = torch.load(fixed.student_backbone, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _history(tmp_path / "budget") == _history(tmp_path / "fixed")


def test_the_budget_is_validated() -> None:
    with pytest.raises(ConfigError, match="time_budget_min"):
        validate(PretrainConfig, {"train": {"time_budget_min": 0}}, "pretrain")
