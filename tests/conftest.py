"""Shared test settings: the test machine has 2 cores shared with other workers."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# No telemetry leaves the machine, in tests as everywhere.
for _var, _value in {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                     "GX_ANALYTICS_ENABLED": "false"}.items():
    os.environ[_var] = _value

# The venv's console scripts (kedro, dvc, mlflow) are found even when pytest runs as
# `.venv/bin/python -m pytest` without an activated venv (as `make test` and CI do).
_bin = str(Path(sys.executable).parent)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory, monkeypatch):
    """Every test gets its own MLflow store: the repo's mlflow.db and mlruns/ stay untouched."""
    import mlflow

    store = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    yield
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def seed() -> int:
    """Seed torch and numpy globally; returns the seed."""
    torch.manual_seed(0)
    np.random.seed(0)
    return 0


@pytest.fixture(scope="session")
def fmnist_splits():
    """The real Fashion-MNIST splits (from the Debian package or data/01_raw)."""
    from dinoflow.data import load_splits

    return load_splits(allow_download=False)
