"""Multi-process pretraining on torch.distributed: torchrun, SLURM (submitit), cluster entry point.

Three ways to run the same training (``dinoflow.training.pretrain``) on several processes:

- ``launch_pretraining(data, cfg, manifest_ids)`` (the pretrain node, ``launcher.type`` torchrun
  or slurm): writes a job spec (JSON), starts the processes with torch's elastic launcher
  (``python -m torch.distributed.run``) or submits a SLURM job through submitit, waits, and
  returns the summary that global rank 0 wrote, the same ``PretrainSummary`` that
  ``jobs.pretrain.run_pretraining`` returns in process.
- ``torchrun --nproc_per_node=8 -m dinoflow.launch --config job.json --output summary.json``
  on clusters that start their own processes; ``main`` is that entry point.

Processes, rendezvous and restarts belong to torch and SLURM; this module only builds their
command lines and reads the result back. Each process joins the group with backend ``auto``
(NCCL on CUDA, Gloo on CPU), binds its GPU from LOCAL_RANK and leaves the group at the end.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from dinoflow import distributed, tracking
from dinoflow.config import DataConfig, PretrainConfig, validate
from dinoflow.files import atomic_write_json
from dinoflow.jobs.pretrain import run_pretraining
from dinoflow.results import PretrainSummary

log = logging.getLogger(__name__)

# The MLflow run of the launching process (the Kedro run); rank 0 of the children logs into it.
MLFLOW_RUN_ENV = "DINOFLOW_MLFLOW_RUN_ID"


# --------------------------------------------------------------------------- the job spec
def write_job_spec(
    data: DataConfig,
    cfg: PretrainConfig,
    manifest_ids: list[str] | None,
    folder: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``job.json`` (data + pretrain settings + manifest path) into a fresh job folder.

    Returns (spec path, summary path): the children read the first, rank 0 writes the second.
    The folder defaults to ``<run_dir>/launch/<UTC time>-<pid>``.
    """
    if folder is None:
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
        folder = Path(cfg.train.run_dir) / "launch" / f"{stamp}-{os.getpid()}"
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = None
    if manifest_ids is not None:
        manifest = folder / "manifest_ids.json"
        atomic_write_json(manifest, list(manifest_ids), indent=None)
    spec = {
        "data": data.model_dump(mode="json"),
        "pretrain": cfg.model_dump(mode="json"),
        "manifest": None if manifest is None else str(manifest),
    }
    spec_path, summary_path = folder / "job.json", folder / "summary.json"
    atomic_write_json(spec_path, spec)
    summary_path.unlink(missing_ok=True)
    return spec_path, summary_path


def read_job_spec(
    path: str | os.PathLike[str],
) -> tuple[DataConfig, PretrainConfig, list[str] | None]:
    """(data config, pretrain config, manifest ids or None) from a ``job.json``."""
    spec = json.loads(Path(path).read_text())
    data = validate(DataConfig, spec.get("data"), "data")
    cfg = validate(PretrainConfig, spec.get("pretrain"), "pretrain")
    manifest = spec.get("manifest")
    ids = None if manifest is None else [str(i) for i in json.loads(Path(manifest).read_text())]
    return data, cfg, ids


# --------------------------------------------------------------------------- one process
def run_job(
    spec_path: str | os.PathLike[str],
    summary_path: str | os.PathLike[str] | None,
    mlflow_experiment: str | None = None,
) -> PretrainSummary | None:
    """One process of a distributed run: join the group, train, rank 0 writes the summary.

    Returns the summary on rank 0, None on the other ranks.
    """
    data, cfg, manifest_ids = read_job_spec(spec_path)
    distributed.log_per_rank()
    device = distributed.resolve_device(cfg.train.device)
    joined = distributed.init_from_env(distributed.backend_for(cfg.launcher.backend, device))
    params = {"pretrain": cfg.model_dump(mode="json")}
    run_id = os.environ.get(MLFLOW_RUN_ENV)
    try:
        with tracking.job_run(mlflow_experiment, "pretrain (torchrun)", params, run_id):
            summary = run_pretraining(data, cfg, manifest_ids)
        if not distributed.is_main_process():
            return None
        if summary_path is not None:
            atomic_write_json(Path(summary_path), summary.to_json_dict())
        return summary
    finally:
        if joined:
            distributed.leave()


def main(argv: list[str] | None = None) -> None:
    """``torchrun -m dinoflow.launch --config job.json [--output summary.json]``.

    job.json: {"data": {...}, "pretrain": {...}, "manifest": path of a JSON list of item ids
    or null}, the parameters of ``conf/*/parameters_*.yml`` as JSON.
    """
    parser = argparse.ArgumentParser(prog="dinoflow.launch", description=main.__doc__)
    parser.add_argument("--config", required=True, help="job spec JSON (data, pretrain, manifest)")
    parser.add_argument(
        "--output", default=None, help="where global rank 0 writes the summary JSON"
    )
    parser.add_argument(
        "--mlflow-experiment",
        default=None,
        help="log to a new MLflow run in this experiment (rank 0; MLFLOW_TRACKING_URI)",
    )
    args = parser.parse_args(argv)
    run_job(args.config, args.output, args.mlflow_experiment)


# --------------------------------------------------------------------------- launchers
def _free_port(preferred: int) -> int:
    """``preferred`` when nothing listens there, else a free port the OS picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1")


def _child_env() -> dict[str, str]:
    """The launcher's environment plus where rank 0 logs (the active MLflow run, if any)."""
    env = dict(os.environ)
    try:
        import mlflow

        run = mlflow.active_run()
        if run is not None:
            env[MLFLOW_RUN_ENV] = run.info.run_id
            env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    except ImportError:
        pass
    return env


def _reopen_mlflow_run(env: dict[str, str]) -> None:
    """The children ended the shared run when they exited; the launching run goes on."""
    run_id = env.get(MLFLOW_RUN_ENV)
    if run_id:
        from mlflow.tracking import MlflowClient

        MlflowClient().update_run(run_id, status="RUNNING")


def torchrun_command(cfg: PretrainConfig, spec_path: Path, summary_path: Path) -> list[str]:
    """``python -m torch.distributed.run ... -m dinoflow.launch --config .. --output ..`` (one node)."""
    lc = cfg.launcher
    if lc.nnodes != 1:
        raise ValueError(
            f"pretrain.launcher.nnodes={lc.nnodes} with type=torchrun: the pipeline starts one node. "
            "For several nodes use launcher.type=slurm, or run `torchrun --nnodes ... -m "
            "dinoflow.launch --config job.json` on every node (docs/distributed.md)"
        )
    port = _free_port(lc.master_port)
    if port != lc.master_port:
        log.warning("port %d is taken; the rendezvous uses port %d", lc.master_port, port)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--node_rank=0",
        f"--nproc_per_node={lc.nproc_per_node}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "dinoflow.launch",
        "--config",
        str(spec_path),
        "--output",
        str(summary_path),
    ]


def launch_torchrun(
    data: DataConfig, cfg: PretrainConfig, manifest_ids: list[str] | None
) -> PretrainSummary:
    """Run ``nproc_per_node`` processes on the local host through torch's elastic launcher."""
    spec_path, summary_path = write_job_spec(data, cfg, manifest_ids)
    cmd = torchrun_command(cfg, spec_path, summary_path)
    env = _child_env()
    log.info("starting %d processes: %s", cfg.launcher.nproc_per_node, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, env=env, check=False)
    finally:
        _reopen_mlflow_run(env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"distributed pretraining failed (exit code {proc.returncode}); "
            f"job spec {spec_path}; the ranks' errors are printed above"
        )
    return _read_summary(summary_path)


class DistributedTask:
    """The callable submitit runs once per SLURM task: set torch's env from SLURM's, then train.

    On preemption or timeout SLURM requeues the same task (``checkpoint``); the run continues
    from its last checkpoint because ``pretrain`` resumes by itself.
    """

    def __init__(self, spec_path: str, summary_path: str, env: dict[str, str]):
        self.spec_path, self.summary_path, self.env = spec_path, summary_path, env

    def __call__(self) -> PretrainSummary | None:
        import submitit

        os.environ.update(self.env)
        # CUDA_VISIBLE_DEVICES stays as SLURM set it; LOCAL_RANK picks the GPU
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        return run_job(self.spec_path, self.summary_path)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def slurm_executor(cfg: PretrainConfig, cluster: str | None = None):
    """A submitit executor for ``launcher``: nodes x tasks (one per GPU), partition, time limit.

    ``cluster=None`` lets submitit detect SLURM; ``"local"`` runs the tasks on the local host
    (same code path; used by the tests and to try a job spec before queueing it).
    """
    import submitit

    lc = cfg.launcher
    executor = submitit.AutoExecutor(
        folder=Path(lc.slurm_folder).absolute() / "%j", cluster=cluster
    )
    tasks = lc.gpus_per_node or lc.nproc_per_node  # one process per GPU (or per CPU slot)
    params: dict[str, Any] = {
        "name": "dinoflow-pretrain",
        "nodes": lc.nnodes,
        "tasks_per_node": tasks,
        "cpus_per_task": lc.cpus_per_task,
        "gpus_per_node": lc.gpus_per_node,
        "timeout_min": lc.timeout_min,
    }
    if lc.partition:
        params["slurm_partition"] = lc.partition
    if executor.cluster == "local":  # one node, and only the keys the local executor knows
        params = {k: params[k] for k in ("tasks_per_node", "gpus_per_node", "timeout_min")}
    executor.update_parameters(**params)
    return executor


def launch_slurm(
    data: DataConfig,
    cfg: PretrainConfig,
    manifest_ids: list[str] | None,
    cluster: str | None = None,
) -> PretrainSummary:
    """Submit the run to SLURM through submitit, wait for it and return rank 0's summary."""
    spec_path, summary_path = write_job_spec(data, cfg, manifest_ids)
    env = _child_env()
    executor = slurm_executor(cfg, cluster)
    job = executor.submit(
        DistributedTask(
            str(spec_path),
            str(summary_path),
            {k: v for k, v in env.items() if k == MLFLOW_RUN_ENV or k.startswith("MLFLOW_")},
        )
    )
    log.info(
        "submitted job %s (%d nodes); logs in %s",
        job.job_id,
        cfg.launcher.nnodes,
        Path(cfg.launcher.slurm_folder) / str(job.job_id),
    )
    try:
        job.results()  # waits; raises with the failing task's traceback
    finally:
        _reopen_mlflow_run(env)
    return _read_summary(summary_path)


def _read_summary(path: Path) -> PretrainSummary:
    if not path.is_file():
        raise RuntimeError(f"the distributed run ended without writing its summary {path}")
    return PretrainSummary.model_validate_json(path.read_text())


def resolve_processes(cfg: PretrainConfig) -> PretrainConfig:
    """``launcher.nproc_per_node: auto`` -> the visible GPUs when training on CUDA, else 1; on
    CPU each of several processes gets its share of the cores as torch threads. Warns when a
    GPU-sized recipe is about to train on a CPU."""
    lc, t = cfg.launcher, cfg.train
    device = distributed.resolve_device(t.device)
    n = lc.nproc_per_node
    if n == "auto":
        n = max(1, distributed.visible_gpus()) if device.type == "cuda" else 1
    train_update: dict[str, Any] = {}
    if device.type == "cpu" and n > 1 and t.threads is None:
        train_update["threads"] = max(1, (os.cpu_count() or 1) // n)
    if device.type == "cpu" and (
        cfg.crops.global_size >= 112 or (cfg.backbone.embed_dim or 384) >= 384
    ):
        log.warning(
            "pretraining a %s at %d px on the CPU: expect seconds to minutes per step "
            "(conf/base is the CPU profile; conf/gpu is meant for GPU nodes)",
            cfg.backbone.arch,
            cfg.crops.global_size,
        )
    return cfg.model_copy(
        update={
            "launcher": lc.model_copy(update={"nproc_per_node": n}),
            "train": t.model_copy(update=train_update),
        }
    )


def launch_pretraining(
    data: DataConfig, cfg: PretrainConfig, manifest_ids: list[str] | None
) -> PretrainSummary:
    """Run pretraining with ``cfg.launcher`` (in this process, torchrun or SLURM)."""
    cfg = resolve_processes(cfg)
    kind = cfg.launcher.type
    if kind == "torchrun" and cfg.launcher.nproc_per_node == 1 and cfg.launcher.nnodes == 1:
        log.info("launcher.type=torchrun with one process: training in this process")
        kind = "local"
    if kind == "torchrun":
        return launch_torchrun(data, cfg, manifest_ids)
    if kind == "slurm":
        return launch_slurm(data, cfg, manifest_ids)
    return run_pretraining(data, cfg, manifest_ids)


if __name__ == "__main__":
    main()
