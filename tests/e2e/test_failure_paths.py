"""The failure paths a user meets first, through whole runs: bad keys stop `kedro run` before
its first node, a second `kedro run` is refused and SIGTERM ends the first as killed, and a killed
registration leaves no version without its decision (real processes, killed for real, and real
MLflow stores). The library's failure paths are in tests/unit/test_failure_paths.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1",
                 "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}


@pytest.fixture
def _project(project_copy):
    """The factory ``_project(tmp_path) -> Path``: a copy of the Kedro project in tmp_path."""

    def _project(tmp_path: Path) -> Path:
        return project_copy(tmp_path / "project")

    return _project


def _kedro(root: Path, tmp_path: Path, *args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {**os.environ, **TELEMETRY_OFF, "OMP_NUM_THREADS": "1", "COLUMNS": "120",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    cmd = [str(Path(sys.executable).with_name("kedro")), "run", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=root, env=env, **popen)
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bad_parameters_stop_kedro_run_before_the_first_node_with_one_message(tmp_path, _project) -> None:
    root = _project(tmp_path)
    out = _kedro(root, tmp_path, "--env", "smoke",
                 "--params", "pretrain.optim.base_lrr=0.1,pretrian.train.epochs=5")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    screen = (out.stdout + out.stderr).strip().splitlines()
    assert len(screen) <= 20, "\n".join(screen)
    assert "Traceback" not in out.stdout + out.stderr
    assert "pretrain.optim.base_lrr: unknown key" in out.stderr
    assert "did you mean 'pretrain'?" in out.stderr
    assert not any((root / "data" / "03_primary").iterdir())  # curation did not start
    log = (root / "logs" / "dinoflow-errors.log").read_text()
    assert "Traceback" in log and "ConfigError" in log  # the traceback is kept, in the log


@pytest.mark.slow
def test_a_second_kedro_run_is_refused_and_sigterm_ends_the_first_as_killed(tmp_path, _project) -> None:
    from mlflow import MlflowClient

    root = _project(tmp_path)
    long_run = ("pretrain.train.epochs=100,pretrain.train.knn_every_epochs=1000,"
                "pretrain.train.progress=false")
    first = _kedro(root, tmp_path, "--env", "smoke", "--pipelines=pretrain", "--params", long_run,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the project lock (data/.dinoflow.lock) names its holder once the run has taken it
        lock = root / "data" / ".dinoflow.lock"
        deadline = time.time() + 300
        while f'"pid": {first.pid}' not in (lock.read_text() if lock.exists() else ""):
            assert first.poll() is None, "the first run ended early"
            assert time.time() < deadline, "the first run never took the project lock"
            time.sleep(0.5)
        second = _kedro(root, tmp_path, "--env", "smoke", "--pipelines=pretrain")
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by process {first.pid}" in second.stderr and "kedro run" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 130
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("dinoflow").experiment_id])
    statuses = {r.data.tags.get("dinoflow.pid"): r.info.status for r in runs}
    assert statuses[str(first.pid)] == "KILLED"


# --------------------------------------------------------------------------- registration
REGISTRATION_JOB = """
import os, signal, sys, torch
import dinoflow.registry.store as registry  # the module whose steps register_pretrained calls
from dinoflow.models.vit import DinoVisionTransformer
from dinoflow.registry import RegistrationConfig, register_pretrained

seed, kill_in = int(sys.argv[1]), sys.argv[2]
if kill_in != "none":  # SIGKILL at the start of that step: the state a real kill leaves there
    real = getattr(registry, kill_in)
    def killed(*a, **k):
        if kill_in == "model_card":
            real(*a, **k)  # the alias has moved by now: the card is the next step
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(registry, kill_in, killed)
torch.manual_seed(seed)
vit = DinoVisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1,
                            num_heads=2).eval()
summary = {"teacher_backbone": "", "mean": [0.5], "std": [0.25], "image_size": 8, "channels": 1,
           "data": {"source": "synthetic"}, "steps": 1, "final": {}}
out = register_pretrained(summary, {"knn_top1": 0.5 + seed / 100}, RegistrationConfig(
    embedder_name=None, log_code=False), report={"eval_data_id": "d", "files": {}}, backbone=vit)
print("VERSION", out["version"], out["alias"])
"""


def _register(tmp_path: Path, seed: int, kill_in: str = "none") -> subprocess.CompletedProcess:
    env = {**os.environ, **TELEMETRY_OFF, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    return subprocess.run([sys.executable, "-c", REGISTRATION_JOB, str(seed), kill_in],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kill_in", ["promote", "model_card"])
def test_a_killed_registration_leaves_no_version_without_its_decision(tmp_path, kill_in) -> None:
    from mlflow import MlflowClient

    from dinoflow.pipelines.hooks import end_runs_of_dead_processes

    assert "VERSION 1 champion" in _register(tmp_path, 1).stdout
    killed = _register(tmp_path, 2, kill_in)  # v2 created; killed before / after its alias moved
    assert killed.returncode == -signal.SIGKILL
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    half = client.get_model_version("dinoflow-backbone", "2")
    assert half.tags.get("dinoflow.registration_complete") is None
    if kill_in == "model_card":  # the half-made version had already taken the champion alias
        assert str(client.get_model_version_by_alias("dinoflow-backbone", "champion").version) == "2"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(end_runs_of_dead_processes()) == 1  # the killed registration's run: KILLED
    after = _register(tmp_path, 3)  # the next registration repairs, then registers
    assert "VERSION 3 champion" in after.stdout, after.stderr[-2000:]
    versions = {str(v.version): v for v in client.search_model_versions("name='dinoflow-backbone'")}
    assert sorted(versions) == ["1", "3"]  # the half-made v2 is gone
    for v in versions.values():
        assert v.tags["dinoflow.registration_complete"] == "true" and "dinoflow.decision" in v.tags
    assert versions["3"].tags["dinoflow.decision"].startswith("champion: beats champion v1")
