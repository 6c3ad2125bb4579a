"""Tar shards through the product's commands: `dinoflow-shards write` packs a labelled folder of
real photo crops, then `kedro run --env smoke` runs curation -> pretrain -> evaluation ->
registration with `data.source=shards` and a brace pattern, and the embed pipeline embeds the
curated shard members.

Data: 3 classes, each the crops of one camera photo (Debian wallpaper packages), 40 a class.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _labelled_folder(root: Path, photos: list[Path]) -> None:
    from PIL import Image

    for label, photo in enumerate(photos[:3]):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        with Image.open(photo) as im:
            im.draft("RGB", (im.width // 4, im.height // 4))
            im = im.convert("RGB")
        for k in range(40):
            x, y = (k % 8) * (im.width - 96) // 8, (k // 8) * (im.height - 96) // 5
            im.crop((x, y, x + 96, y + 96)).save(folder / f"crop_{k:02d}.jpg", quality=90)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_shards_run_the_default_pipeline_and_embed(tmp_path: Path, camera_photos, project_copy) -> None:
    _labelled_folder(tmp_path / "photos", camera_photos)
    bin_dir = Path(sys.executable).parent
    root = project_copy(tmp_path / "project")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    out = subprocess.run([str(bin_dir / "dinoflow-shards"), "write", "--from", str(tmp_path / "photos"),
                          "--out", str(tmp_path / "shards" / "shard-%06d.tar"), "--maxcount", "50"],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    assert pattern in out.stdout, out.stdout  # the command prints the data.path to pass
    params = f"data.source=shards,data.path={pattern}"
    for pipelines in ("__default__", "embed"):
        run = subprocess.run([str(bin_dir / "kedro"), "run", "--env", "smoke", f"--pipelines={pipelines}",
                              "--params", params], cwd=root, env=env, capture_output=True, text=True,
                             timeout=840)  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    report = json.loads((root / "data/08_reporting/curation/curation_report.json").read_text())
    assert report["counts"]["kept"] > 0
    metrics = json.loads((root / "data/08_reporting/metrics.json").read_text())
    # 3 classes, each one photo's crops: kNN well above chance (1/3)
    assert metrics["knn_top1"] > 0.6, metrics
    evaluation = json.loads((root / "data/08_reporting/evaluation_report.json").read_text())
    assert evaluation["labelled"] is True and evaluation["data"]["source"] == "shards"
    registration = json.loads((root / "data/08_reporting/registration.json").read_text())
    assert registration["version"] == "1"
    embed = json.loads((root / "data/08_reporting/embed/embed_summary.json").read_text())
    assert embed["n_embedded"] > 0 and not embed["skipped"], embed
