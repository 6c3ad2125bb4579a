"""The pipelines as a graph: ``kedro viz build`` on a copy of the project, the built page served on
loopback and rendered by the system's Chromium (never a downloaded browser; every request that is
not to the local server is aborted). ``DINOFLOW_DOCS_SCREENSHOT=1`` also writes
docs/images/kedro_viz.png for the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, ENV, free_port

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs the system Chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium); the test never downloads a browser"),
]

# the node names each pipeline must show (Kedro's node names, as `kedro registry describe` lists)
EXPECTED = {
    "__default__": {"curation_ingest", "curation_outputs", "pretrain", "evaluate", "register_backbone"},
    "export": {"export_model", "export_summary"},
    "embed": {"embed_images", "curated_manifest", "embed_summary"},
}
# kedro-viz keeps its settings in localStorage: no feature tour over the graph, light theme
_SETTINGS_JS = ("localStorage.setItem('KedroViz', JSON.stringify("
                "{showFeatureHints: false, theme: 'light', isPrettyName: false}));")


@pytest.fixture
def _project_copy(project_copy):
    """The factory ``_project_copy(tmp_path) -> Path``: a copy of the Kedro project at tmp_path / "project"."""

    def _project_copy(tmp_path: Path) -> Path:
        return project_copy(tmp_path / "project")

    return _project_copy


@pytest.fixture
def _serve_static(stop_process_group):
    """The factory ``_serve_static(folder) -> (process, url)``: a static HTTP server on loopback."""

    def _serve_static(folder: Path) -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "-d", str(folder)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/", timeout=2):
                    return proc, url
            except OSError:
                time.sleep(0.2)
        stop_process_group(proc)
        raise RuntimeError(f"static server did not come up on {url}")

    return _serve_static


def test_kedro_viz_build_renders_every_pipeline(tmp_path: Path, _project_copy, _serve_static, stop_process_group) -> None:
    from playwright.sync_api import sync_playwright

    root = _project_copy(tmp_path)
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    kedro = Path(sys.executable).with_name("kedro")
    out = subprocess.run([str(kedro), "viz", "build"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    build = root / "build"
    assert (build / "index.html").is_file()
    for pid in EXPECTED:  # the data the page loads, one file per registered pipeline
        data = json.loads((build / "api" / "pipelines" / pid).read_text())
        assert EXPECTED[pid] <= {n["name"] for n in data["nodes"]}, pid

    proc, url = _serve_static(build)
    shown: dict[str, set[str]] = {}
    outside: list[str] = []
    shot = tmp_path / "kedro_viz.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1000})
                page.add_init_script(_SETTINGS_JS)

                def route(r) -> None:
                    if r.request.url.startswith(url):
                        r.continue_()
                    else:
                        outside.append(r.request.url)
                        r.abort()

                page.route("**/*", route)
                page.set_default_timeout(60_000)
                for pid in EXPECTED:
                    page.goto(f"{url}/?pid={pid}", wait_until="load")
                    page.locator("g.pipeline-node--task").first.wait_for()
                    shown[pid] = set(page.locator("g.pipeline-node").all_text_contents())
                page.goto(f"{url}/?pid=__default__", wait_until="load")
                page.locator("g.pipeline-node--task").first.wait_for()
                page.wait_for_timeout(1500)  # the layout animation settles
                page.screenshot(path=str(shot))
            finally:
                browser.close()
    finally:
        stop_process_group(proc)
    for pid, names in EXPECTED.items():
        assert names <= shown[pid], (pid, shown[pid])
    assert "export_model" not in shown["__default__"]  # each pipeline shows its own graph
    assert all("127.0.0.1" not in u for u in outside)
    assert shot.stat().st_size > 30_000
    if os.environ.get("DINOFLOW_DOCS_SCREENSHOT") == "1":
        (REPO / "docs/images").mkdir(parents=True, exist_ok=True)
        (REPO / "docs/images/kedro_viz.png").write_bytes(shot.read_bytes())
