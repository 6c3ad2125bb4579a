"""The pretrain pipeline: in-memory catalog, the NaN guard, collapse warnings, the Kedro CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinoflow.monitor import TrainingDiverged, collapse_warning

REPO = Path(__file__).resolve().parents[2]


def tiny_params(run_dir: Path, **train) -> dict:
    return {
        "crops": {"global_size": 16, "local_size": 8, "n_local": 2},
        "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                     "drop_path_rate": 0.0},
        "head": {"n_prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16},
        "train": {"epochs": 1, "steps_per_epoch": 6, "batch_size": 16, "num_workers": 0,
                  "checkpoint_every_steps": 2, "log_every_steps": 1, "progress": False,
                  "knn_bank_size": 200, "knn_query_size": 100, "run_dir": str(run_dir), **train},
    }


DATA = {"val_size": 200, "train_limit": 256, "test_limit": 100}


def test_pipeline_on_an_in_memory_catalog(tmp_path):
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner

    from dinoflow.pipelines.pretrain import create_pipeline

    manifest = __import__("pandas").DataFrame({"item_id": [f"train/{i:06d}" for i in range(60000)]})
    catalog = DataCatalog({
        "params:data": MemoryDataset(DATA),
        "params:pretrain": MemoryDataset(tiny_params(tmp_path)),
        "curated_manifest": MemoryDataset(manifest),
        "pretrain_summary": MemoryDataset(),
    })
    SequentialRunner().run(create_pipeline(), catalog)
    summary = catalog.load("pretrain_summary")
    assert summary.steps == 6 and summary.n_train_images == 256
    assert [h["step"] for h in summary.knn_history] == [0, 6]  # the starting point and the end
    assert all(0.1 < h["knn/top1_k20"] <= 1 for h in summary.knn_history)  # real data, 10 classes
    # raw pixels on the same bank and queries, once: the reference the features have to beat
    assert 0.3 < summary.knn_history[0]["knn/raw_pixels_top1_k20"] <= 1
    assert "knn/raw_pixels_top1_k20" not in summary.knn_history[1]
    saved = torch.load(summary.teacher_backbone, weights_only=True)
    assert saved["kwargs"]["embed_dim"] == 32
    from dinoflow.artifacts import load_model

    backbone = load_model(summary.teacher_backbone).backbone  # what evaluation and registration load
    assert backbone.embed_dim == 32
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, saved["state_dict"][key]), key
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert not list((tmp_path / "checkpoints").rglob("*.pt"))  # a finished run leaves no checkpoint


def test_bad_parameter_stops_before_any_work(tmp_path):
    from dinoflow.config import ConfigError
    from dinoflow.pipelines.pretrain.nodes import pretrain

    params = tiny_params(tmp_path)
    params["optim"] = {"base_lr": -1, "warmup_epoch": 3}
    with pytest.raises(ConfigError) as err:
        pretrain(DATA, params, None)
    assert "pretrain.optim.base_lr" in str(err.value) and "pretrain.optim.warmup_epoch: unknown key" in str(err.value)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_nan_loss_names_step_and_term_and_keeps_checkpoint(tmp_path, monkeypatch):
    from dinoflow.losses.koleo import KoLeoLoss
    from dinoflow.pipelines.pretrain.nodes import pretrain

    calls = {"n": 0}
    original = KoLeoLoss.forward

    def poisoned(self, x):
        calls["n"] += 1
        value = original(self, x)
        return value * float("nan") if calls["n"] > 8 else value  # 2 views a step: step 4 (0-based)

    monkeypatch.setattr(KoLeoLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged) as err:
        pretrain(DATA, tiny_params(tmp_path, knn_every_epochs=100), None)
    text = str(err.value)
    assert "step 4: non-finite loss in koleo" in text and "total" in text
    assert "last good checkpoint is kept" in text
    kept = torch.load(max((tmp_path / "checkpoints").rglob("step_*.pt")), weights_only=True)
    assert kept["step"] == 4  # steps 0..3 done, checkpoint every 2


def test_collapse_warnings_name_the_kind():
    import math

    assert "uniform collapse" in collapse_warning(0.99 * math.log(1024), 1024)
    assert "one-hot collapse" in collapse_warning(0.01, 1024)
    assert collapse_warning(0.5 * math.log(1024), 1024) is None


@pytest.fixture
def _project_copy(project_copy):
    """The factory ``_project_copy(tmp_path) -> Path``: a copy of the Kedro project at tmp_path / "project"."""

    def _project_copy(tmp_path: Path) -> Path:
        return project_copy(tmp_path / "project")

    return _project_copy


@pytest.mark.parametrize("flag", ["--pipelines=pretrain", "--pipeline=pretrain"])
def test_kedro_cli_both_spellings(tmp_path, flag, _project_copy):
    root = _project_copy(tmp_path)
    params = ("pretrain.train.max_steps=2,pretrain.train.knn_every_epochs=100,"
              "pretrain.train.progress=false")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    kedro = Path(sys.executable).with_name("kedro")
    out = subprocess.run([str(kedro), "run", "--env", "smoke", flag, "--params", params],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads((root / "data/06_models/pretrain_summary.json").read_text())
    assert summary["steps"] == 2 and summary["mlflow_run_id"]
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["mlflow_run_id"])
    assert run.data.tags["dinoflow.pipeline"] == "pretrain" and run.data.tags["dinoflow.env"] == "smoke"
    assert run.data.params["pretrain.train.batch_size"] == "32"  # flattened params
    assert "loss/dino" in run.data.metrics
