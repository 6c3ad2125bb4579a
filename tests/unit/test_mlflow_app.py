"""``mlflow ui --app-name dinoflow`` (``make ui``): MLflow's own server whose page starts new
browsers in the model-training view (the browser test opens it in Chromium)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from dinoflow.mlflow_app import DEFAULT_WORKFLOW_SCRIPT, WORKFLOW_STORAGE_KEY, index_page


def test_the_page_stores_model_training_only_when_the_browser_has_no_choice():
    from dinoflow.mlflow_app import app, flask_app

    page = flask_app.test_client().get("/").get_data(as_text=True)
    head = page[page.index("<head>"):]
    # first in <head>, so it runs before MLflow's (deferred) script reads the stored choice
    assert head.startswith("<head>" + DEFAULT_WORKFLOW_SCRIPT)
    assert "static-files/static/js/main." in page  # MLflow's own UI, unchanged otherwise
    assert f"localStorage.getItem('{WORKFLOW_STORAGE_KEY}')===null" in DEFAULT_WORKFLOW_SCRIPT
    assert "JSON.stringify('machine_learning')" in DEFAULT_WORKFLOW_SCRIPT  # as the UI stores it
    # the server is MLflow's (the same ASGI app `mlflow ui` serves, every route of it)
    from mlflow.server.fastapi_app import app as mlflow_asgi_app

    assert app is mlflow_asgi_app
    assert flask_app.test_client().get("/health").status_code == 200


def test_a_page_without_head_is_refused_by_name():
    with pytest.raises(RuntimeError, match="no <head>"):
        index_page("<html><body></body></html>")


def test_mlflow_finds_the_app_by_name():
    apps = {e.name: e.value for e in entry_points(group="mlflow.app")}
    assert apps["dinoflow"] == "dinoflow.mlflow_app:app"
    from mlflow.server import _find_app, _is_factory

    assert not _is_factory(_find_app("dinoflow"))  # uvicorn loads the app object as is


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_ui_runs_the_dinoflow_app():
    recipe = subprocess.run(["make", "-n", "ui"], capture_output=True, text=True, check=True,
                            env={"PATH": f"{sys.prefix}/bin:/usr/bin:/bin"}).stdout
    assert "mlflow ui --app-name dinoflow --backend-store-uri sqlite:///mlflow.db" in recipe
