"""Tuning: search-space validation, pruning, resumption after a kill, MLflow nesting, best params.

The pruning and resumption tests drive a real Optuna study (real storage, sampler, pruner and
MLflow store) with a scripted pretraining function, so the kNN curves are known exactly; one test
runs real tiny pretraining trials, and a slow one runs the Kedro pipelines end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dinoflow.config import ConfigError, DataConfig, OptimConfig, PretrainConfig
from dinoflow.jobs.tune import run_study
from dinoflow.results import PretrainSummary
from dinoflow.schedules import build_schedules
from dinoflow.tuning import (
    PrunerConfig,
    TuningConfig,
    apply_overrides,
    base_values,
    check_tuning_config,
    make_pruner,
    read_best_params,
    write_best_params,
)

REPO = Path(__file__).resolve().parents[2]

TINY_PRETRAIN = {
    "crops": {"global_size": 28, "local_size": 12, "n_local": 2},
    "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                 "drop_path_rate": 0.0},
    "head": {"n_prototypes": 32, "hidden_dim": 32, "bottleneck_dim": 16},
    "optim": {"warmup_epochs": 0.25, "teacher_temp_warmup_epochs": 0.25,
              "freeze_last_layer_epochs": 0},
    "train": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 8, "num_workers": 0,
              "knn_every_epochs": 0.5, "knn_bank_size": 60, "knn_query_size": 40,
              "log_every_steps": 2, "checkpoint_every_steps": 2, "device": "cpu",
              "progress": False},
    "monitor": {"check_after_steps": 1000},
}
SPACE = {
    "optim.momentum_teacher_start": {"type": "float", "low": 0.9, "high": 0.999},
    "optim.momentum_teacher_shape": {"type": "categorical", "choices": ["cosine", "linear"]},
    "optim.teacher_temp_end": {"type": "float", "low": 0.04, "high": 0.08},
}
ENV = {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
       "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}


def tuning_cfg(**overrides) -> TuningConfig:
    d = {"study_name": "test", "storage": "optuna.db", "output_dir": "out",
         "best_params_path": "out/best_params.yml", "n_trials": 2, "seed": 0, "startup_trials": 2,
         "pruner": {"type": "none"}, "space": SPACE, **overrides}
    return TuningConfig.model_validate(d)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One SQLite MLflow store in tmp for the module (never the repo's mlflow.db)."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    # artifacts in tmp too (the default, ./mlruns, would be the repository's)
    mlflow.create_experiment("dinoflow", artifact_location=(folder / "artifacts").as_uri())
    yield uri
    mlflow.set_tracking_uri(old or "")
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


class ScriptedPretrain:
    """Stands in for run_pretraining: reports a given kNN curve per call, like pretrain does."""

    def __init__(self, curves: list[list[float]]):
        self.curves, self.calls, self.reported = curves, [], []

    def __call__(self, data, cfg, manifest_ids=None, on_knn=None) -> PretrainSummary:
        from dinoflow import tracking

        curve = self.curves[len(self.calls)]
        self.calls.append(cfg)
        seen: list[float] = []
        self.reported.append(seen)
        history = []
        for step, value in enumerate(curve):
            tracking.log_metrics({"knn/top1_k20": value}, step=step)
            history.append({"step": step, "knn/top1_k20": value})
            seen.append(value)
            on_knn(step, value)
        return PretrainSummary(run_dir="", teacher_backbone="", teacher_heads="", steps=len(curve),
                               knn_history=history)


# --------------------------------------------------------------------------- config, schedules
def test_linear_and_cosine_momentum_shapes():
    kw = dict(steps_per_epoch=5, base_lr=1e-3, min_lr=0.0, warmup_epochs=0, wd_start=0.04,
              wd_end=0.4, momentum_start=0.9, momentum_end=1.0, teacher_temp_start=0.04,
              teacher_temp_end=0.07, teacher_temp_warmup_epochs=0, freeze_last_layer_epochs=0)
    lin, _ = build_schedules(total_steps=5, momentum_shape="linear", **kw)
    np.testing.assert_allclose(lin.momentum, [0.9, 0.925, 0.95, 0.975, 1.0])
    cos, _ = build_schedules(total_steps=5, **kw)  # the default: the reference cosine
    # 1.0 + 0.5 * (0.9 - 1.0) * (1 + cos(pi * i / 5)), i < 5 (dinov2's CosineScheduler)
    np.testing.assert_allclose(cos.momentum, 1.0 - 0.05 * (1 + np.cos(np.pi * np.arange(5) / 5)),
                               rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="momentum_shape"):
        build_schedules(total_steps=5, momentum_shape="step", **kw)
    assert OptimConfig().momentum_teacher_shape == "cosine"


def test_search_space_paths_are_checked_before_any_trial():
    base = PretrainConfig.model_validate(TINY_PRETRAIN)
    with pytest.raises(ConfigError, match=r"optim\.momentum_teacher_startt"):
        check_tuning_config(base, tuning_cfg(space={**SPACE, "optim.momentum_teacher_startt":
                                                    {"type": "float", "low": 0.9, "high": 1.0}}))
    with pytest.raises(ConfigError, match=r"'optim' is a group"):
        check_tuning_config(base, tuning_cfg(space={"optim": {"type": "float", "low": 0, "high": 1}}))
    with pytest.raises(ConfigError, match=r"tuning\.budget.*trian\.epochs"):
        check_tuning_config(base, tuning_cfg(budget={"trian.epochs": 1}))
    # the range's high end is no valid momentum (<= 1): caught from the corner values
    with pytest.raises(ConfigError, match=r"tuning\.space\.optim\.momentum_teacher_start"):
        check_tuning_config(base, tuning_cfg(space={"optim.momentum_teacher_start":
                                                    {"type": "float", "low": 0.9, "high": 1.2}}))
    with pytest.raises(ConfigError, match=r"tuning\.space\.optim\.momentum_teacher_shape"):
        check_tuning_config(base, tuning_cfg(space={"optim.momentum_teacher_shape":
                                                    {"type": "categorical", "choices": ["cosine", "sqrt"]}}))
    with pytest.raises(ValueError, match="both fixed in 'budget' and searched"):
        tuning_cfg(budget={"optim.teacher_temp_end": 0.05})
    check_tuning_config(base, tuning_cfg(budget={"train.epochs": 2}))  # a valid one passes
    cfg = apply_overrides(base, {"optim.teacher_temp_end": 0.05, "train.max_steps": 3})
    assert (cfg.optim.teacher_temp_end, cfg.train.max_steps, cfg.optim.teacher_temp_start) == (0.05, 3, 0.04)


def test_pruner_by_name():
    import optuna

    median = make_pruner(PrunerConfig(type="median", n_startup_trials=4, n_warmup_steps=7))
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert (median._n_startup_trials, median._n_warmup_steps) == (4, 7)
    hyper = make_pruner(PrunerConfig(type="hyperband", min_resource=5, reduction_factor=2))
    assert isinstance(hyper, optuna.pruners.HyperbandPruner)
    assert (hyper._min_resource, hyper._reduction_factor) == (5, 2)
    assert isinstance(make_pruner(PrunerConfig(type="none")), optuna.pruners.NopPruner)


def test_best_params_file_round_trip(tmp_path):
    params = {"optim.momentum_teacher_start": 0.9951, "optim.momentum_teacher_shape": "linear",
              "train.batch_size": 48}
    path = write_best_params(tmp_path / "best.yml", params, "line one\nline two")
    text = path.read_text()
    assert text.startswith("# line one\n# line two\n")
    assert yaml.safe_load(text) == {"run": {"params": {"pretrain": {
        "optim": {"momentum_teacher_start": 0.9951, "momentum_teacher_shape": "linear"},
        "train": {"batch_size": 48}}}}}
    assert read_best_params(path) == params
    cfg = apply_overrides(PretrainConfig.model_validate(TINY_PRETRAIN), read_best_params(path))
    assert (cfg.optim.momentum_teacher_start, cfg.optim.momentum_teacher_shape, cfg.train.batch_size) == (0.9951, "linear", 48)


# --------------------------------------------------------------------------- pruning
def test_trial_with_bad_intermediate_values_is_pruned(tmp_path, mlflow_store):
    import mlflow
    import optuna

    good0, good1 = [0.30, 0.40, 0.50, 0.60], [0.30, 0.42, 0.52, 0.62]
    bad, good3 = [0.30, 0.10, 0.12, 0.14], [0.30, 0.45, 0.55, 0.65]
    fake = ScriptedPretrain([good0, good1, bad, good3])
    tuning = tuning_cfg(study_name="prune", storage="study.log", n_trials=4,
                        pruner={"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0})
    summary = run_study(DataConfig(val_size=200), PretrainConfig.model_validate(TINY_PRETRAIN),
                        tuning, pretrain_fn=fake, root=tmp_path)

    assert [t["state"] for t in summary["trials"]] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    # trial 2 at step 1: its best so far, 0.30, is below the median of trials 0 and 1 at step 1
    # (0.40 + 0.42) / 2 = 0.41: stopped there. Trial 3 stays above the median (0.45 > 0.41,
    # 0.55 > 0.51, 0.65 > 0.61) and runs to the end.
    assert fake.reported == [good0, good1, bad[:2], good3]
    study = optuna.load_study(study_name="prune", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log"))))
    assert study.trials[2].intermediate_values == {0: 0.30, 1: 0.10}
    assert summary["best_trial"] == 3 and summary["best_value"] == 0.65
    assert read_best_params(tmp_path / "out/best_params.yml") == study.trials[3].params

    client = mlflow.MlflowClient()
    pruned = client.get_run(study.trials[2].user_attrs["mlflow_run_id"])
    assert pruned.data.tags["optuna.state"] == "PRUNED" and pruned.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(pruned.info.run_id, "knn/top1_k20")] == bad[:2]
    assert "tuning/value" not in pruned.data.metrics
    parent = client.get_run(pruned.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["tuning/n_pruned"] == 1 and parent.data.metrics["tuning/best_value"] == 0.65
    assert parent.data.params["best.pretrain.optim.teacher_temp_end"] == str(study.trials[3].params["optim.teacher_temp_end"])


# --------------------------------------------------------------------------- resumption
KILLER = """
import json, os, signal, sys
from dinoflow.config import DataConfig, PretrainConfig
from dinoflow.jobs.tune import run_study
from dinoflow.results import PretrainSummary
from dinoflow.tuning import TuningConfig

cfg = json.load(open(sys.argv[1]))
calls = []

def pretrain_fn(data, c, manifest_ids=None, on_knn=None):
    calls.append(1)
    for step, value in enumerate([0.3, 0.4 + 0.01 * len(calls), 0.5]):
        on_knn(step, value)
        if len(calls) == 3 and step == 0:  # the third trial: killed mid-trial, no cleanup
            os.kill(os.getpid(), signal.SIGKILL)
    return PretrainSummary(run_dir="", teacher_backbone="", teacher_heads="", steps=3,
                           knn_history=[{"step": 2, "knn/top1_k20": 0.5 + 0.01 * len(calls)}])

run_study(DataConfig.model_validate(cfg["data"]), PretrainConfig.model_validate(cfg["pretrain"]),
          TuningConfig.model_validate(cfg["tuning"]), pretrain_fn=pretrain_fn, root=cfg["root"])
"""


def test_killed_study_resumes_and_completes_its_trial_count(tmp_path, mlflow_store):
    import optuna
    from optuna.trial import TrialState

    data, base = DataConfig(val_size=200), PretrainConfig.model_validate(TINY_PRETRAIN)
    tuning = tuning_cfg(study_name="resume", storage="optuna.db", n_trials=4)
    (tmp_path / "cfg.json").write_text(json.dumps({
        "data": data.model_dump(mode="json"), "pretrain": base.model_dump(mode="json"),
        "tuning": tuning.model_dump(mode="json"), "root": str(tmp_path)}))
    (tmp_path / "killer.py").write_text(KILLER)
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(tmp_path / "cfg.json")],
                          cwd=tmp_path, env={**os.environ, **ENV}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    before = optuna.load_study(study_name="resume", storage=storage).trials
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]
    assert before[2].intermediate_values == {0: 0.3}  # killed inside the trial
    assert not (tmp_path / "out/best_params.yml").exists()

    fake = ScriptedPretrain([[0.3, 0.45, 0.7], [0.3, 0.46, 0.6]])
    summary = run_study(data, base, tuning, pretrain_fn=fake, root=tmp_path)
    after = optuna.load_study(study_name="resume", storage=storage).trials
    assert [t.state for t in after] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL,
                                        TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.value for t in after[:2]] == [before[0].value, before[1].value] == [0.51, 0.52]
    assert after[3].params == before[2].params  # the interrupted point is tried again
    assert after[3].user_attrs["dinoflow.retry_of"] == 2 and summary["retried_trials"] == [2]
    assert len(fake.calls) == 2  # exactly the missing trials: 4 finished in all
    assert summary["states"] == {"complete": 4, "pruned": 0, "fail": 1}
    assert summary["best_trial"] == 3 and read_best_params(tmp_path / "out/best_params.yml") == after[3].params

    again = ScriptedPretrain([])
    run_study(data, base, tuning, pretrain_fn=again, root=tmp_path)  # complete: nothing to run
    assert again.calls == []
    other_space = tuning_cfg(study_name="resume", storage="optuna.db", n_trials=5,
                             space={"optim.teacher_temp_end": SPACE["optim.teacher_temp_end"]})
    with pytest.raises(ConfigError, match="other data, base parameters, budget or search space"):
        run_study(data, base, other_space, pretrain_fn=again, root=tmp_path)


# --------------------------------------------------------------------------- real trials
def test_real_trials_nest_in_mlflow_and_write_usable_best_params(tmp_path, mlflow_store):
    import mlflow
    import optuna

    data, base = DataConfig(val_size=200), PretrainConfig.model_validate(TINY_PRETRAIN)
    summary = run_study(data, base, tuning_cfg(study_name="real", n_trials=2), root=tmp_path)
    study = optuna.load_study(study_name="real", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert summary["states"]["complete"] == 2
    # trial 0 is the base parameters' own schedules (the hand-picked point, on the same budget)
    hand_picked = base_values(base, tuning_cfg().space)
    assert hand_picked and study.trials[0].user_attrs["dinoflow.base"] is True
    assert {k: study.trials[0].params[k] for k in hand_picked} == hand_picked
    assert "dinoflow.base" not in study.trials[1].user_attrs
    client = mlflow.MlflowClient()
    parents = set()
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        parents.add(run.data.tags["mlflow.parentRunId"])
        assert run.info.run_name.startswith(f"tuning trial {t.number} | custom/4 | fashion_mnist | ")
        assert run.data.tags["dinoflow.pipeline"] == "tuning"
        curve = client.get_metric_history(run.info.run_id, "knn/top1_k20")
        # 4 steps, a check every 0.5 epoch = 2 steps, plus the starting point
        assert [m.step for m in curve] == [0, 2, 4]
        assert run.data.metrics["tuning/value"] == curve[-1].value == t.value
        assert t.intermediate_values == {m.step: m.value for m in curve}
        for name, value in t.params.items():
            assert run.data.params[f"pretrain.{name}"] == str(value)
        assert run.data.params["pretrain.train.run_dir"] == str(tmp_path / "out/trials" / f"trial_{t.number:04d}")
        assert (tmp_path / "out/trials" / f"trial_{t.number:04d}" / "teacher_backbone.pt").is_file()
    (parent_id,) = parents
    artifacts = {a.path for a in client.list_artifacts(parent_id, "tuning/plots")}
    assert {"tuning/plots/optimization_history.png", "tuning/plots/intermediate_values.png"} <= artifacts
    best = read_best_params(tmp_path / "out/best_params.yml")
    assert best == study.best_trial.params and set(best) == set(SPACE)
    cfg = apply_overrides(base, best)
    assert cfg.optim.momentum_teacher_start == study.best_trial.params["optim.momentum_teacher_start"]


@pytest.mark.slow
def test_kedro_tuning_then_pretrain_with_the_best_params_file(tmp_path):
    """`kedro run --pipelines=tuning`, then `kedro run --pipelines=pretrain --config <best>`."""
    import mlflow

    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(REPO / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    shutil.copy(REPO / "pyproject.toml", project)
    (project / "src").mkdir()  # the package itself comes from the installed dinoflow
    (project / "conf/local").mkdir()
    (project / "conf/tiny").mkdir()
    (project / "conf/tiny/parameters.yml").write_text(yaml.safe_dump({
        "data": {"val_size": 200}, "pretrain": {**TINY_PRETRAIN, "train": {
            **TINY_PRETRAIN["train"], "run_dir": "data/06_models/tiny"}}}))
    (project / "conf/tiny/parameters_tuning.yml").write_text(yaml.safe_dump({"tuning": {
        "n_trials": 2, "startup_trials": 2, "pruner": {"type": "none"},
        "budget": {"train.epochs": 1, "train.knn_every_epochs": 0.5, "train.knn_bank_size": 60,
                   "train.knn_query_size": 40}}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": uri}
    kedro = str(Path(sys.executable).parent / "kedro")

    def run(*args: str) -> None:
        proc = subprocess.run([kedro, "run", "--env", "tiny", *args], cwd=project, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run("--pipelines=tuning")
    best_file = project / "data/07_model_output/tuning/best_params.yml"
    best = read_best_params(best_file)
    assert set(best) == set(yaml.safe_load((REPO / "conf/base/parameters_tuning.yml").read_text())["tuning"]["space"])
    run("--pipelines=pretrain", "--config", str(best_file.relative_to(project)))

    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name("dinoflow")
        runs = client.search_runs([exp.experiment_id], "tags.`dinoflow.pipeline` = 'tuning'")
        (tuning_run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tuning_run.info.run_id]
        assert len(trials) == 2 and len(runs) == 3
        assert tuning_run.data.tags["dinoflow.env"] == "tiny"
        assert {r.data.tags["dinoflow.env"] for r in trials} == {"tiny"}
        (pretrain_run,) = client.search_runs([exp.experiment_id], "tags.`dinoflow.pipeline` = 'pretrain'")
        used = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=pretrain_run.info.run_id, artifact_path="pretrain/resolved_config.json",
            dst_path=str(tmp_path))).read_text())
    finally:
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))
    for path, value in best.items():  # the config pretrain trained with holds the tuned values
        group, key = path.split(".")
        assert used[group][key] == value
    assert used["train"]["epochs"] == 1 and used["backbone"]["embed_dim"] == 16


def test_the_hand_picked_trial_takes_only_values_inside_the_space():
    base = PretrainConfig.model_validate(TINY_PRETRAIN)
    space = TuningConfig.model_validate({"space": {
        "optim.momentum_teacher_shape": {"type": "categorical", "choices": ["linear"]},
        "optim.teacher_temp_end": {"type": "float", "low": 0.0, "high": 1.0},
        "optim.momentum_teacher_start": {"type": "float", "low": 0.0, "high": 0.5}}}).space
    assert base.optim.momentum_teacher_shape == "cosine" and base.optim.momentum_teacher_start > 0.5
    # outside the space: left to the sampler; inside: the base's own value
    assert base_values(base, space) == {"optim.teacher_temp_end": base.optim.teacher_temp_end}
