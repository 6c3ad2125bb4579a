"""The MLflow UI server that opens experiments on their training runs: ``mlflow ui --app-name dinoflow``.

Why: MLflow 3.17's UI has two workflows, GenAI and model training, and it takes the one to show
from the ``workflowType`` URL parameter, else from the browser's stored choice
(``localStorage["mlflow.workflowType_v1"]``), else GenAI. It does not read the experiment's
``mlflow.experimentKind`` tag (the code that would sits behind a flag that is always on), so a new
browser opening ``dinoflow`` lands on the GenAI overview (usage charts, traces, an assistant)
instead of the runs table, from any address.

This app is MLflow's own server (its ASGI app, every route and the same UI files) with one
difference: the page it serves stores "model training" as the browser's choice when the browser has
made none. A user's own choice (the sidebar's GenAI / Model training switch) is stored by the UI
itself and kept: it is never overwritten. Registered as the ``mlflow.app`` entry point ``dinoflow``
(pyproject.toml); ``make ui`` runs it.
"""

from __future__ import annotations

import os

from flask import Response
from mlflow.server import app as flask_app
from mlflow.server.fastapi_app import app

WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"  # MLflow's useLocalStorage key: f"{key}_v{version}"
TRAINING_WORKFLOW = "machine_learning"

# Runs before MLflow's own script (deferred): the UI then starts in the model-training workflow.
_KEY = repr(WORKFLOW_STORAGE_KEY)
DEFAULT_WORKFLOW_SCRIPT = (
    f"<script>try{{if(localStorage.getItem({_KEY})===null)"
    f"localStorage.setItem({_KEY},JSON.stringify({TRAINING_WORKFLOW!r}))}}catch(e){{}}</script>"
)

_mlflow_index = flask_app.view_functions["serve"]


def index_page(html: str) -> str:
    """MLflow's index.html with the default-workflow script first in <head>."""
    if "<head>" not in html:
        raise RuntimeError(
            "MLflow's index.html has no <head>: this MLflow is not the one "
            "dinoflow.mlflow_app was written for"
        )
    return html.replace("<head>", "<head>" + DEFAULT_WORKFLOW_SCRIPT, 1)


def serve_index() -> Response:
    """MLflow's page (or its 'UI not built' text) with the model-training default."""
    index = os.path.join(flask_app.static_folder or "", "index.html")
    if not os.path.exists(index):
        return _mlflow_index()
    with open(index, encoding="utf-8") as f:
        return Response(index_page(f.read()), mimetype="text/html")


flask_app.view_functions["serve"] = serve_index

__all__ = ["app", "index_page", "serve_index"]
