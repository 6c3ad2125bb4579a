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

from dinoflow import distributed
from dinoflow.config import DataConfig, validate
from dinoflow.curation import curate
from dinoflow.curation.config import CurationConfig, curation_config
from dinoflow.data import Split, load_data
from dinoflow.data.sources import get_source
from dinoflow.files import atomic_write, atomic_write_json
from dinoflow.parallel import local_share_of_cores

log = logging.getLogger(__name__)


def write_job_spec(data: DataConfig, cfg: CurationConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``job.json`` (data + curation settings) at ``path``."""
    spec = {"data": data.model_dump(mode="json"), "curation": cfg.model_dump(mode="json")}
    return atomic_write_json(Path(path), spec)


def read_job_spec(path: str | os.PathLike[str]) -> tuple[DataConfig, CurationConfig]:
    spec = json.loads(Path(path).read_text())
    return validate(DataConfig, spec.get("data"), "data"), curation_config(spec.get("curation"))


def load_splits(data: DataConfig) -> dict[str, Split]:
    """The splits, with the folder whose skipped files the quarantine lists (as the pipeline's
    ``load_curation_splits``)."""
    splits = load_data(data)
    root = data.path if get_source(data.source).reads_files else None
    for split in splits.values():
        split.extra.update(root=root, follow_out_of_root=data.follow_symlinks_out_of_root)
    return splits


def curate_job(data: DataConfig, cfg: CurationConfig, output: Path) -> dict | None:
    """The pipeline's steps on this rank; rank 0 writes ``output`` and returns the report."""
    main = distributed.is_main_process()
    splits = load_splits(data)
    meta, thumbs = curate.ingest(splits, cfg)
    validation = curate.validate(meta, len(splits["train"].class_names), cfg) if main else {}
    meta = curate.quality(meta, cfg)
    emb, _ = curate.embed(meta, thumbs, splits, cfg)
    meta = curate.deduplicate(meta, emb, cfg)
    meta, balance = curate.balanced_sampling(meta, emb, cfg)
    if not main:
        return None
    from dinoflow.curation.report import build_report

    manifest = curate.manifest_of(meta)
    train = splits["train"]
    quarantine = curate.quarantine_of(
        meta, train.extra.get("root"), train.extra.get("follow_out_of_root", False)
    )
    report = build_report(meta, quarantine, validation, balance, splits, cfg)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(output / "metadata.parquet", lambda f: meta.to_parquet(f, index=False))
    atomic_write(output / "curated_manifest.csv", lambda f: manifest.to_csv(f, index=False))
    atomic_write(output / "quarantine.csv", lambda f: quarantine.to_csv(f, index=False))
    atomic_write_json(output / "curation_report.json", report)
    return report


def _start_mlflow(data: DataConfig, cfg: CurationConfig, experiment: str | None) -> bool:
    """Rank 0 with ``experiment``: a new MLflow run there, with the job's parameters; the report
    logs its counts, balance and pictures into it (``report.log_to_mlflow``)."""
    if not experiment:
        return False
    import mlflow

    from dinoflow.tracking import flatten, use_experiment

    use_experiment(experiment)
    mlflow.start_run(run_name="curation (torchrun)")
    mlflow.log_params(
        flatten({"data": data.model_dump(mode="json"), "curation": cfg.model_dump(mode="json")})
    )
    mlflow.set_tags({"dinoflow.world_size": distributed.world()[1]})
    return True


def _log_timings(report: dict) -> None:
    """Each stage's seconds as ``curation_seconds_<stage>`` in the active run."""
    import mlflow

    mlflow.log_metrics(
        {
            f"curation_seconds_{stage}": float(t["seconds"])
            for stage, t in report.get("timings_s", {}).items()
            if isinstance(t, dict) and "seconds" in t
        }
    )


def run_job(
    spec_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    mlflow_experiment: str | None = None,
) -> dict | None:
    """One process of the job: join the group (Gloo: barriers and small objects only, whatever
    device embeds), curate, leave. Returns the report on rank 0, None elsewhere. With
    ``mlflow_experiment``, rank 0 tracks the job as a run of that experiment (the tracking URI
    from ``MLFLOW_TRACKING_URI``)."""
    data, cfg = read_job_spec(spec_path)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        import torch

        torch.set_num_threads(local_share_of_cores())  # torchrun sets OMP_NUM_THREADS=1
    joined = distributed.init_from_env("gloo")
    tracked = distributed.is_main_process() and _start_mlflow(data, cfg, mlflow_experiment)
    status = "FAILED"
    try:
        report = curate_job(data, cfg, Path(output))
        if tracked:
            _log_timings(report)
        status = "FINISHED"
        return report
    finally:
        if tracked:
            import mlflow

            mlflow.end_run(status=status)
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
