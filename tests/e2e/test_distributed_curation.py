"""Curation on 2 processes (``torchrun --standalone``, Gloo, CPU) gives what 1 process gives.

40 crops of real photos in two class folders, ingested in chunks of 4 files (about 10 chunks) and
embedded by a tiny dinoflow ViT (32 px) in chunks of 4 rows: rank r computes chunks i with
i % 2 == r of both steps into the shared work folder and rank 0 assembles; the searches and
k-means of deduplication and sampling are split between the ranks; rank 0 alone validates and
writes the report. The metadata (final table), thumbnails, embeddings and manifest equal those
of the same job run in this process, exactly; rank 0 tracked the job in MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import dinoflow
from dinoflow.config import DataConfig
from dinoflow.curation import curation_config
from dinoflow.curation.launch import run_job, write_job_spec


def _folder(root: Path, real_photo) -> Path:
    for c, (w, h) in enumerate([(640, 480), (480, 640)]):
        photo = real_photo(w, h)
        (root / f"class_{c}").mkdir(parents=True)
        for k in range(20):
            crop = photo.crop((17 * k, 11 * k, 17 * k + 56 + 4 * (k % 3), 11 * k + 48 + 4 * (k % 4)))
            crop.save(root / f"class_{c}" / f"img_{k:02d}.jpg", quality=90)
    return root


def _spec(tmp: Path, name: str) -> Path:
    data = DataConfig(source="image_folder", path=str(tmp / "photos"), val_size=4, test_fraction=0.1)
    cfg = curation_config({
        "work_dir": str(tmp / name / "work"), "workers": 1, "show_progress": False,
        "ingest": {"files_per_chunk": 4},
        "validation": {"enabled": False},
        "embedding": {"kind": "dinoflow", "checkpoint": str(tmp / "teacher.pt"), "image_size": 32,
                      "batch_size": 3, "rows_per_chunk": 4, "device": "cpu", "precision": "fp32"},
        "sampling": {"target_size": 20, "n_clusters": [6, 2], "kmeans_iters": 5},
        "report": {"dir": str(tmp / name / "report")},
    })  # fmt: skip
    return write_job_spec(data, cfg, tmp / name / "job.json")


def test_two_ranks_curate_like_one_process(tmp_path, real_photo) -> None:
    import torch

    from dinoflow.models.vit import DinoVisionTransformer, save_backbone

    _folder(tmp_path / "photos", real_photo)
    torch.manual_seed(0)
    save_backbone(DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                  tmp_path / "teacher.pt")  # fmt: skip
    src = str(Path(dinoflow.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dinoflow.curation.launch", "--config", str(_spec(tmp_path, "two")),
           "--output", str(tmp_path / "two" / "out"), "--mlflow-experiment", "curation-job"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]
    one = run_job(_spec(tmp_path, "one"), tmp_path / "one" / "out")
    two = json.loads((tmp_path / "two" / "out" / "curation_report.json").read_text())
    # each rank ran its ingest in one worker: 2 workers over the job, every chunk computed
    assert one["timings_s"]["ingest"]["workers"] == 1 and two["timings_s"]["ingest"]["workers"] == 2
    assert two["timings_s"]["ingest"]["chunks"] >= 10 and two["timings_s"]["ingest"]["chunks_reused"] == 0
    a, b = (pd.read_parquet(tmp_path / k / "out" / "metadata.parquet") for k in ("one", "two"))
    assert a.equals(b) and len(a) == 40
    for name in ("curated_manifest.csv", "quarantine.csv"):
        assert (tmp_path / "one" / "out" / name).read_text() == (tmp_path / "two" / "out" / name).read_text()
    for name in ("thumbnails.npy", "embeddings.npy"):
        a, b = (np.load(tmp_path / k / "work" / name) for k in ("one", "two"))
        assert a.shape[0] == 40 and np.array_equal(a, b), name
        if name == "embeddings.npy":  # each rank embedded several chunks of 4 rows
            embedded = int(np.abs(b).sum(axis=1).astype(bool).sum())
            chunks = list((tmp_path / "two" / "work" / "embed").iterdir())
            assert len(chunks) == -(-embedded // 4) >= 4, (len(chunks), embedded)
    assert one["counts"] == two["counts"]
    # rank 0 tracked the job: one finished run with the counts, each stage's seconds, the report
    import mlflow

    runs = mlflow.search_runs(experiment_names=["curation-job"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics, params = runs[0].data.metrics, runs[0].data.params
    assert metrics["curation_kept"] == two["counts"]["kept"] and metrics["curation_seconds_ingest"] > 0
    assert params["curation.embedding.kind"] == "dinoflow" and runs[0].data.tags["dinoflow.world_size"] == "2"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "curation")}
    assert "curation/curation_report.json" in artifacts
