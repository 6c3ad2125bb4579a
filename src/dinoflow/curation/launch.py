"""Curation on several processes or machines: ``torchrun -m dinoflow.curation.launch``.

``torchrun --nproc_per_node=N [--nnodes ...] -m dinoflow.curation.launch --config job.json
--output DIR [--mlflow-experiment NAME]`` (or the same command in a SLURM job step, one task per
process) runs the curation pipeline of ``dinoflow.curation.curate`` with the ranks sharing its
heavy steps:

- ingest and model embedding: rank r of W computes the chunks i with i % W == r into the shared
  ``curation.work_dir`` (which every rank must see); rank 0, the only one holding the work
  folder's lock, assembles ``thumbnails.npy`` and ``embeddings.npy`` once every rank is done
  (a barrier over Gloo) and the others read them. Each rank's ingest pool gets its share of the
  host's cores (``curation.workers: auto``), and its torch threads likewise.
- quality filters run on every rank (cheap, deterministic: each rank needs the rows to embed).
- deduplication and the k-means run on every rank, their heavy parts split by rank: each rank
  searches its share of the queries against the whole index (an IVF index is built by all the
  ranks on disk), trains and assigns its share of the k-means points (``dedup._knn_edges``,
  ``dedup.build_index``, ``sampling.kmeans``, ``sampling.assign_rows``). The vectors are read a
  block at a time from the memory-mapped embeddings, so no rank holds all of them; every rank
  ends with the same table.
- the Great Expectations suite and the report run on rank 0 only, which writes ``DIR``:
  ``metadata.parquet``, ``curated_manifest.csv``, ``quarantine.csv``, ``curation_report.json``.

job.json: ``{"data": {...}, "curation": {...}}``, the parameters of
``conf/*/parameters_{data,curation}.yml`` as JSON (``write_job_spec``). The result equals a
one-process run's (tests/e2e/test_distributed_curation.py). The Kedro pipeline ``curation``
stays the one-machine path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from dinoflow import distributed, tracking
from dinoflow.config import DataConfig, validate
from dinoflow.curation import curate, ranks
from dinoflow.curation.config import CurationConfig, curation_config
from dinoflow.files import atomic_write, atomic_write_json
from dinoflow.parallel import local_share_of_cores, use_cores

log = logging.getLogger(__name__)


def write_job_spec(data: DataConfig, cfg: CurationConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``job.json`` (data + curation settings) at ``path``."""
    spec = {"data": data.model_dump(mode="json"), "curation": cfg.model_dump(mode="json")}
    return atomic_write_json(Path(path), spec)


def read_job_spec(path: str | os.PathLike[str]) -> tuple[DataConfig, CurationConfig]:
    spec = json.loads(Path(path).read_text())
    return validate(DataConfig, spec.get("data"), "data"), curation_config(spec.get("curation"))


def curate_job(data: DataConfig, cfg: CurationConfig, output: Path) -> dict | None:
    """The pipeline's steps on this rank; rank 0 writes ``output`` and returns the report."""
    splits = curate.load_splits(data)
    meta, thumbs = curate.ingest(splits, cfg)
    n_classes = len(splits["train"].class_names)
    # rank 0 validates; a must-hold failure stops every rank, not only rank 0
    validation = ranks.from_main(lambda: curate.validate(meta, n_classes, cfg))
    meta = curate.quality(meta, cfg)
    emb, embed_timing = curate.embed(meta, thumbs, splits, cfg)
    meta = curate.deduplicate(meta, emb, cfg)
    meta, balance = curate.balanced_sampling(meta, emb, cfg)
    if not distributed.is_main_process():
        return None
    manifest, quarantine, report = curate.outputs(
        meta, validation, balance, splits, embed_timing, cfg
    )
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(output / "metadata.parquet", lambda f: meta.to_parquet(f, index=False))
    atomic_write(output / "curated_manifest.csv", lambda f: manifest.to_csv(f, index=False))
    atomic_write(output / "quarantine.csv", lambda f: quarantine.to_csv(f, index=False))
    atomic_write_json(output / "curation_report.json", report)
    return report


def run_job(
    spec_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    mlflow_experiment: str | None = None,
) -> dict | None:
    """One process of the job: join the group (Gloo: barriers and small objects only, whatever
    device embeds), curate, leave. Returns the report on rank 0, None elsewhere. With
    ``mlflow_experiment``, rank 0 tracks the job as a run of that experiment (the tracking URI
    from ``MLFLOW_TRACKING_URI``); the report logs its counts, timings and pictures into it."""
    data, cfg = read_job_spec(spec_path)
    distributed.log_per_rank()
    use_cores(local_share_of_cores())  # torchrun sets OMP_NUM_THREADS=1
    joined = distributed.init_from_env("gloo")
    params = {"data": data.model_dump(mode="json"), "curation": cfg.model_dump(mode="json")}
    try:
        with tracking.job_run(mlflow_experiment, "curation (torchrun)", params, training=False):
            tracking.set_tags({"dinoflow.world_size": distributed.world()[1]})
            return curate_job(data, cfg, Path(output))
    finally:
        if joined:
            distributed.leave()


def main(argv: list[str] | None = None) -> None:
    """``torchrun -m dinoflow.curation.launch --config job.json --output DIR``."""
    parser = argparse.ArgumentParser(prog="dinoflow.curation.launch", description=main.__doc__)
    parser.add_argument("--config", required=True, help="job spec JSON (data, curation)")
    parser.add_argument("--output", required=True, help="where rank 0 writes the results")
    parser.add_argument(
        "--mlflow-experiment", default=None, help="rank 0 tracks the job as a run of it"
    )
    args = parser.parse_args(argv)
    run_job(args.config, args.output, args.mlflow_experiment)


if __name__ == "__main__":
    main()
