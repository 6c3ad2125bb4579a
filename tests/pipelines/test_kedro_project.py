"""The Kedro project as a user meets it: every registered pipeline listed, and no MLflow warning
about kedro-mlflow's untyped ``KedroPipelineModel.predict`` on every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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


def test_kedro_mlflow_pipeline_model_is_type_hinted_and_nothing_is_filtered() -> None:
    """The import helper gives KedroPipelineModel.predict its type hint (so MLflow has nothing to
    warn about) and filters no warning: MLflow's check still warns for an untyped class."""
    script = (
        "import warnings\n"
        "from dinoflow.pipelines.hooks import import_kedro_mlflow_models\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import_kedro_mlflow_models()\n"
        "import typing, pandas as pd, mlflow.pyfunc, kedro_mlflow.mlflow.kedro_pipeline_model as m\n"
        "from kedro_mlflow.mlflow import KedroPipelineModel\n"
        "from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook\n"
        "assert KedroPipelineModel is m.KedroPipelineModel\n"
        "assert issubclass(KedroPipelineModel, mlflow.pyfunc.PythonModel)\n"
        "assert typing.get_type_hints(KedroPipelineModel.predict)['model_input'] is pd.DataFrame\n"
        "print(sum('type hints' in str(w.message) for w in seen))\n"
        "with warnings.catch_warnings(record=True) as untyped:\n"
        "    warnings.simplefilter('always')\n"
        "    class Untyped(mlflow.pyfunc.PythonModel):\n"
        "        def predict(self, context, model_input, params=None):\n"
        "            return model_input\n"
        "print(sum('Add type hints' in str(w.message) for w in untyped))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["0", "1"], out.stdout  # (Kedro logs above them)
    assert "Add type hints" not in out.stderr
