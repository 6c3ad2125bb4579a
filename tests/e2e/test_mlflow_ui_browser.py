"""The MLflow comparison a user makes, in a real browser: two tuning trials side by side; and the
landing: the address ``make ui`` prints opens the dinoflow experiment on its training runs.

Playwright drives the system's Chromium (Debian package ``chromium``; never a downloaded browser)
against ``mlflow ui`` on loopback over a tmp store holding a real tiny tuning study. Every request
that is not to the local server is aborted, so nothing leaves the machine.
``DINOFLOW_DOCS_SCREENSHOT=1`` also writes the screenshot to docs/images/mlflow_compare.png.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dinoflow.config import DataConfig, PretrainConfig
from dinoflow.jobs.tune import run_study
from dinoflow.tracking import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND, ui_landing_url
from dinoflow.tuning import TuningConfig
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, ENV, free_port

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs the system Chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium); the test never downloads a browser"),
]

TINY_PRETRAIN = {
    "crops": {"global_size": 28, "local_size": 12, "n_local": 2},
    "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                 "drop_path_rate": 0.0},
    "head": {"n_prototypes": 32, "hidden_dim": 32, "bottleneck_dim": 16},
    "optim": {"warmup_epochs": 0.25, "teacher_temp_warmup_epochs": 0.25, "freeze_last_layer_epochs": 0},
    "train": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 8, "num_workers": 0,
              "knn_every_epochs": 0.5, "knn_bank_size": 60, "knn_query_size": 40,
              "log_every_steps": 2, "checkpoint_every_steps": 2, "device": "cpu", "progress": False},
}
SPACE = {
    "optim.momentum_teacher_start": {"type": "float", "low": 0.9, "high": 0.999},
    "optim.teacher_temp_end": {"type": "float", "low": 0.04, "high": 0.08},
}

# the value cells of the metric named `name` in the compare page's virtualised metrics grid
_METRIC_CELLS_JS = """(name) => {
  const link = [...document.querySelectorAll('a[title="Plot chart"]')]
    .find(a => a.textContent.trim() === name);
  if (!link) return null;
  const top = link.parentElement.style.top;
  const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
  const values = grids[grids.indexOf(link.closest('.ReactVirtualized__Grid')) + 1];
  return [...values.querySelectorAll('div')].filter(d => d.style.top === top && d.style.left)
    .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left))
    .map(d => d.textContent.trim());
}"""


@pytest.fixture
def start_mlflow_ui(stop_process_group):
    """The factory ``start_mlflow_ui(store_uri, cwd) -> (process, url)``."""

    def start_mlflow_ui(store_uri: str, cwd: Path) -> tuple[subprocess.Popen, str]:
        """``mlflow ui --app-name dinoflow`` (as ``make ui``) on loopback, in its own process group (so
        the workers stop with it); its base URL."""
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--app-name", "dinoflow", "--backend-store-uri", store_uri,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            # no background job runner (its workers are of no use to a UI check)
            cwd=cwd, env={**os.environ, **ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, url
            except OSError:
                time.sleep(1)
            if proc.poll() is not None:
                break
        stop_process_group(proc)
        raise RuntimeError(f"mlflow ui did not come up on {url}")

    return start_mlflow_ui




def compare_in_browser(url: str, parent_prefix: str, run_names: list[str], screenshot: Path) -> dict:
    """Open the dinoflow experiment, expand the tuning run, tick two trials, Compare.

    Returns {"run_ids": [...], "params": {name: [v1, v2]}, "metrics": {name: [v1, v2]}, "text"}.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                       else route.abort())
            page.set_default_timeout(60_000)
            page.goto(url + "/", wait_until="load")  # a fresh browser: no workflow chosen yet
            page.get_by_role("link", name="dinoflow", exact=True).first.click()
            parent = page.locator('div[role="row"]', has_text=parent_prefix).first
            parent.wait_for()
            close = page.locator('button[data-component-id^="mlflow.assistant"][aria-label="Close"]')
            if close.count():  # the assistant side panel only narrows the page
                close.first.click()
            parent.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # expand
            for name in run_names:
                row = page.locator('div[role="row"]', has_text=name).first
                row.wait_for()
                row.locator('input[type="checkbox"]').first.check()
            page.get_by_role("button", name="Compare", exact=True).click()
            page.get_by_text("Run details").wait_for()
            page.get_by_text("knn/top1_k20", exact=True).first.wait_for()
            rows = [r.split("\t") for r in page.locator("tr").all_inner_texts()]
            run_ids = next(r[1:] for r in rows if r[0].strip() == "Run ID:")
            params = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows if len(r) == 3}
            metrics = {m: page.evaluate(_METRIC_CELLS_JS, m) for m in ("knn/top1_k20", "tuning/value")}
            text = page.inner_text("body")
            # the screenshot: the plot, run details, the parameters that differ (the tuned ones)
            # and the metrics, in one tall view
            page.get_by_role("switch").first.click()
            page.set_viewport_size({"width": 1400, "height": 2000})
            page.get_by_text("Comparing 2 Runs").first.scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return {"run_ids": [r.strip() for r in run_ids], "params": params, "metrics": metrics, "text": text}


def landing_in_browser(url: str, run_prefix: str, stored_workflow: str | None = None) -> dict:
    """A fresh browser opens ``url``: with no stored GenAI / model-training choice, or with
    ``stored_workflow`` stored as the user's own choice (as the UI's sidebar switch stores it).

    Returns {"url": where it landed, "runs": the rows naming ``run_prefix``, "text": the page}.
    """
    import json

    from playwright.sync_api import sync_playwright

    from dinoflow.mlflow_app import WORKFLOW_STORAGE_KEY

    base = url.split("/#")[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                       else route.abort())
            page.set_default_timeout(60_000)
            if stored_workflow:
                page.add_init_script(f"localStorage.setItem({json.dumps(WORKFLOW_STORAGE_KEY)}, "
                                     f"{json.dumps(json.dumps(stored_workflow))})")
            page.goto(url, wait_until="load")
            rows = page.locator('div[role="row"]', has_text=run_prefix)
            if stored_workflow in (None, "machine_learning"):
                rows.first.wait_for()
            else:
                page.wait_for_url(f"**workflowType={stored_workflow}**")
                page.wait_for_timeout(2000)
            return {"url": page.url, "runs": rows.count(), "text": page.inner_text("body")}
        finally:
            browser.close()


def test_compare_two_tuning_trials_in_the_mlflow_ui(tmp_path, start_mlflow_ui, stop_process_group):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.create_experiment("dinoflow", artifact_location=(tmp_path / "artifacts").as_uri())
        tuning = TuningConfig.model_validate({
            "study_name": "browser", "storage": "optuna.db", "output_dir": "out",
            "best_params_path": "out/best_params.yml", "n_trials": 2, "startup_trials": 2,
            "pruner": {"type": "none"}, "space": SPACE})
        summary = run_study(DataConfig(val_size=200), PretrainConfig.model_validate(TINY_PRETRAIN),
                            tuning, root=tmp_path)
        client = mlflow.MlflowClient()
        trials = {t["mlflow_run_id"]: client.get_run(t["mlflow_run_id"]) for t in summary["trials"]}
    finally:
        mlflow.set_tracking_uri(old or "")
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    assert len({r.data.tags["mlflow.parentRunId"] for r in trials.values()}) == 1  # one tuning run
    names = [r.info.run_name for r in trials.values()]
    # the experiment was made without a kind tag: the tuning run tagged it
    experiment = mlflow.MlflowClient(uri).get_experiment_by_name("dinoflow")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND

    proc, url = start_mlflow_ui(uri, tmp_path)
    try:
        shot = tmp_path / "mlflow_compare.png"
        page = compare_in_browser(url, "tuning | custom/4 | fashion_mnist |", names, shot)
        prefix = "tuning | custom/4 | fashion_mnist |"
        printed = landing_in_browser(ui_landing_url(url, uri), prefix)  # the address make ui prints
        plain = landing_in_browser(f"{url}/#/experiments/{experiment.experiment_id}", prefix)
        chosen = landing_in_browser(f"{url}/#/experiments/{experiment.experiment_id}", prefix,
                                    stored_workflow="genai")
    finally:
        stop_process_group(proc)
    # the runs table, not MLflow 3's GenAI overview (usage charts, traces, an assistant), from the
    # experiment's plain address too (a bookmark, a link in a run's page)
    for landing in (printed, plain):
        assert f"/experiments/{experiment.experiment_id}/runs" in landing["url"], landing["url"]
        assert "workflowType=machine_learning" in landing["url"]
        assert landing["runs"] >= 1
        for genai in ("Usage", "Tool calls", "Token Usage"):
            assert genai not in landing["text"], genai
    # a user who chose GenAI in the sidebar keeps that choice: the default never overwrites it
    assert "workflowType=genai" in chosen["url"], chosen["url"]

    assert sorted(page["run_ids"]) == sorted(trials)
    for column, run_id in enumerate(page["run_ids"]):
        run = trials[run_id]
        for name in (f"pretrain.{p}" for p in SPACE):  # the tuned params of both runs, as logged
            assert page["params"][name][column] == run.data.params[name]
        for metric in ("knn/top1_k20", "tuning/value"):
            shown = float(page["metrics"][metric][column])
            assert abs(shown - run.data.metrics[metric]) < 5e-4, (metric, shown)
    assert "Comparing 2 Runs" in page["text"]
    assert shot.stat().st_size > 20_000
    if os.environ.get("DINOFLOW_DOCS_SCREENSHOT") == "1":
        (REPO / "docs/images").mkdir(parents=True, exist_ok=True)
        (REPO / "docs/images/mlflow_compare.png").write_bytes(shot.read_bytes())
