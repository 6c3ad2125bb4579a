"""Kedro hooks: the guard every run passes first, and the lineage tags every run carries.

- ``RunGuardHooks`` (first of all hooks, before kedro-mlflow opens its run): every parameter of
  the run validated (``validation.py``), MLflow runs left RUNNING by a process that died ended as
  KILLED, and one ``kedro run`` at a time per project (``.dinoflow.lock`` in the folder settings.py
  gives, ``data/``; a second run is told which process holds it).
- ``LineageHooks``: kedro-mlflow opens one MLflow run per ``kedro run`` (conf/*/mlflow.yml) and
  logs flattened parameters; this hook names the run and tags it (pipeline, env, dataset, git
  commit, DVC hash of the catalog's curated manifest, the process), so runs can be filtered and
  traced from a registered model back to code and data.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

log = logging.getLogger(__name__)

# kedro-mlflow 2.0.3's KedroPipelineModel.predict, as released (no type hint), and with the hint
# that MLflow asks for. pd.DataFrame is what a pyfunc hands a KedroPipelineModel, and one of the
# hints MLflow infers no schema from, so the class behaves exactly as released (no input validation).
_UNHINTED_PREDICT = "    def predict(self, context, model_input, params=None):"
_HINTED_PREDICT = "    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):"
_KEDRO_PIPELINE_MODEL = "kedro_mlflow.mlflow.kedro_pipeline_model"


def import_kedro_mlflow_models() -> None:
    """Import ``kedro_mlflow.mlflow`` with ``KedroPipelineModel.predict`` type-hinted.

    Why: MLflow checks every ``mlflow.pyfunc.PythonModel`` subclass when the class is *defined*
    (``PythonModel.__init_subclass__``) and prints "Add type hints to the `predict` method" for one
    whose ``predict`` input has no hint. kedro-mlflow's ``KedroPipelineModel`` is such a class
    (every release to 2.0.3, and its main branch), and kedro-mlflow's hook and CLI modules import it
    at module level, so Kedro printed the warning for every command. The cause is the missing hint;
    this supplies it: kedro-mlflow's own module is compiled from its own file with the one
    annotation added (``model_input: pd.DataFrame``: the upstream fix, not dinoflow code), under its
    own name, so every later ``from kedro_mlflow.mlflow import KedroPipelineModel`` gets that class
    and MLflow has nothing to warn about. No warning is filtered. Once kedro-mlflow ships a hinted
    ``predict`` (the released line is not in its file), this is a plain import; drop it then.
    dinoflow.settings calls it, before Kedro loads kedro-mlflow's hook and CLI.
    """
    import importlib.util
    import sys

    if "kedro_mlflow.mlflow" in sys.modules:
        return
    import kedro_mlflow  # the top package only: kedro_mlflow.mlflow is not imported by it

    path = Path(kedro_mlflow.__file__).parent / "mlflow" / "kedro_pipeline_model.py"
    source = path.read_text(encoding="utf-8") if path.is_file() else ""
    if _UNHINTED_PREDICT in source and "\nclass KedroPipelineModel(" in source:
        source = source.replace(_UNHINTED_PREDICT, _HINTED_PREDICT, 1).replace(
            "\nclass KedroPipelineModel(", "\nimport pandas as pd  # dinoflow: the hint's type\n\n\n"
            "class KedroPipelineModel(", 1)
        spec = importlib.util.spec_from_file_location(_KEDRO_PIPELINE_MODEL, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_KEDRO_PIPELINE_MODEL] = module
        try:
            exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - kedro-mlflow's file
        except BaseException:
            del sys.modules[_KEDRO_PIPELINE_MODEL]
            raise
    import kedro_mlflow.mlflow  # noqa: F401 - binds KedroPipelineModel from the module above


def git_commit(root: Path = Path(".")) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - not a git checkout: say so rather than fail the run
        return "unknown"


def curated_data_md5(catalog) -> str:
    """The md5 DVC records for the catalog's ``curated_manifest`` file, or "absent"."""
    dataset = catalog.get("curated_manifest") if catalog is not None else None
    return dataset.md5() if hasattr(dataset, "md5") else "absent"


# Catalog inputs that record the MLflow run which made them -> the tag naming that parent run.
# So the evaluation run points at its pretrain run and the registration run at both.
PARENT_RUN_TAGS = {
    "pretrain_summary": "dinoflow.pretrain_run_id",
    "evaluation": "dinoflow.evaluation_run_id",
}


def tag_parent_runs(inputs: dict[str, Any]) -> dict[str, str]:
    """Tag the active MLflow run with the runs its node inputs came from; returns the tags set."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return {}
    tags = {}
    for name, tag in PARENT_RUN_TAGS.items():
        value = inputs.get(name)
        run_id = value.get("mlflow_run_id") if isinstance(value, dict) else getattr(value, "mlflow_run_id", None)
        if run_id:
            tags[tag] = str(run_id)
    if tags:
        mlflow.set_tags(tags)
    return tags


def process_tags() -> dict[str, str]:
    """Which process a run belongs to: the next run ends it when that process is gone."""
    return {"dinoflow.pid": str(os.getpid()), "dinoflow.host": socket.gethostname()}


def end_runs_of_dead_processes(experiment: str = "dinoflow") -> list[str]:
    """MLflow runs left RUNNING by a process of this host that no longer exists -> KILLED.

    Returns the ids of the runs it ended. A store that cannot be read is left alone.
    """
    from dinoflow.files import pid_alive

    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'",
                                  max_results=500)
    except Exception:  # noqa: BLE001 - tracking is best effort here; the run itself will report
        return []
    host, ended = socket.gethostname(), []
    for run in runs:
        tags = run.data.tags
        pid = tags.get("dinoflow.pid")
        if not pid or tags.get("dinoflow.host") != host or pid_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "dinoflow.ended_by",
                       f"a later kedro run: process {pid} was gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    if ended:
        log.warning("ended %d MLflow run(s) left RUNNING by a process that died: %s", len(ended),
                    ", ".join(r[:8] for r in ended))
    return ended


class RunGuardHooks:
    """Runs first (``tryfirst``): nothing starts unless the whole run can. ``lock_folder``: where
    the project's run lock lives (relative to the project)."""

    def __init__(self, lock_folder: str | Path = "data") -> None:
        self._lock, self._lock_folder = None, Path(lock_folder)

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        from dinoflow.files import FolderLock
        from dinoflow.pipelines.validation import sections_used, validate_run_parameters

        validate_run_parameters(catalog.load("parameters"), sections_used(pipeline))
        lock = FolderLock(self._lock_folder, "kedro run")
        lock.__enter__()  # raises LockedError naming the holder
        self._lock = lock
        end_runs_of_dead_processes()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._release()


class LineageHooks:
    def __init__(self) -> None:
        self._run_params: dict[str, Any] = {}
        self._tagged = False
        self._catalog = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._run_params, self._tagged, self._catalog = run_params, False, catalog
        import mlflow

        if mlflow.active_run() is not None:  # kedro-mlflow's run, opened just before
            mlflow.set_tags(process_tags())

    def _param(self, key: str) -> Any:
        try:
            return self._catalog.load(f"params:{key}")
        except Exception:  # noqa: BLE001 - a pipeline may run without that parameter group
            return None

    def run_tags(self) -> dict[str, str]:
        rp = self._run_params
        pipelines = rp.get("pipeline_names") or [rp.get("pipeline_name") or "__default__"]
        data = self._param("data") or {}
        pretrain = self._param("pretrain") or {}
        arch = (pretrain.get("backbone") or {}).get("arch", "vit")
        patch = (pretrain.get("backbone") or {}).get("patch_size", "")
        dataset = data.get("source", "fashion_mnist")
        if data.get("path"):
            dataset += f":{Path(str(data['path'])).name}"
        return {
            "dinoflow.pipeline": "+".join(p or "__default__" for p in pipelines),
            "dinoflow.env": str(rp.get("env") or "local"),
            "dinoflow.dataset": dataset,
            "dinoflow.model": f"{arch}/{patch}",
            "dinoflow.git_commit": git_commit(),
            "dinoflow.curated_data_md5": curated_data_md5(self._catalog),
            "dinoflow.kedro_session": str(rp.get("session_id", "")),
        }

    @hook_impl
    def before_node_run(self, node, catalog, inputs) -> None:
        tag_parent_runs(inputs)
        import mlflow

        run = mlflow.active_run()
        if run is None:
            return
        if self._tagged:
            if "curated_manifest" in inputs:
                # the default pipeline curates in the same run: tag the data it actually trains on
                mlflow.set_tag("dinoflow.curated_data_md5", curated_data_md5(catalog))
            return
        from dinoflow.tracking import mark_training_experiment

        # an experiment without mlflow.yml's tag (made by other code): model training too
        mark_training_experiment(run.info.experiment_id)
        tags = self.run_tags()
        pipeline = tags["dinoflow.pipeline"].replace("__default__", "default")
        name = f"{pipeline} | {tags['dinoflow.model']} | {tags['dinoflow.dataset']} | {run.info.run_id[:6]}"
        mlflow.set_tags({**tags, "mlflow.runName": name})
        self._tagged = True
