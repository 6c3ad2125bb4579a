"""The Kedro project as a user meets it: every registered pipeline listed, and no MLflow warning
about kedro-mlflow's untyped ``KedroPipelineModel.predict`` on every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kedro_lists_every_pipeline_without_the_type_hint_warning(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "COLUMNS": "200"}  # fmt: skip
    kedro = Path(sys.executable).with_name("kedro")
    out = subprocess.run([str(kedro), "registry", "list"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    listed = {line.strip("- ").strip() for line in out.stdout.splitlines() if line.startswith("- ")}
    assert listed == {"__default__", "curation", "pretrain", "evaluation", "registration", "tuning",
                      "export", "embed", "distillation"}  # fmt: skip
    text = out.stdout + out.stderr
    assert "type hints" not in text and "predict" not in text, text[-3000:]


def test_kedro_mlflow_imported_quietly_keeps_other_warnings() -> None:
    """The import helper drops exactly MLflow's type-hint warning; the class is still there."""
    script = (
        "import warnings, sys\n"
        "warnings.simplefilter('always')\n"
        "from dinoflow.pipelines.hooks import import_kedro_mlflow_models\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import_kedro_mlflow_models()\n"
        "from kedro_mlflow.mlflow import KedroPipelineModel\n"
        "import mlflow.pyfunc\n"
        "assert issubclass(KedroPipelineModel, mlflow.pyfunc.PythonModel)\n"
        "print([str(w.message)[:60] for w in seen if 'type hints' in str(w.message)])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "Add type hints" not in out.stderr
