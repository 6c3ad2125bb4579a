"""Kedro project settings (Kedro reads ``dinoflow.settings``).

The Kedro-facing code lives in ``dinoflow.pipelines`` (the top-level ``pipelines/`` folder);
this module only points Kedro at it, so the library itself never imports Kedro.
"""

import os

# No telemetry leaves the machine, whatever the caller's environment says.
for _var, _value in {
    "DO_NOT_TRACK": "1",
    "KEDRO_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_var, _value)
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")

from dinoflow.pipelines.hooks import (  # noqa: E402
    LineageHooks,
    RunGuardHooks,
    import_kedro_mlflow_models,
)

# before Kedro loads kedro-mlflow's hook and CLI: see import_kedro_mlflow_models for why
import_kedro_mlflow_models()

HOOKS = (
    RunGuardHooks(lock_folder="data"),
    LineageHooks(),
)  # data/.dinoflow.lock: one run at a time
DISABLE_HOOKS_FOR_PLUGINS = ("kedro-telemetry",)

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
    # conf/smoke and conf/gpu override single nested keys of conf/base, not whole groups
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}
