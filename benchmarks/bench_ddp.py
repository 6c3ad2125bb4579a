"""Benchmark (not a test): dinoflow's pretraining step as conf/base runs it on the local machine,
several DDP processes (torch.distributed, gloo) of a few threads each, each with its share of the
global batch.

Started by ``run_all.py`` when conf/base's launcher is torchrun, or by hand; rank 0 writes one
JSON object:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m benchmarks.bench_ddp \
        --out ddp.json --batch-per-process 32 --threads 1

The step is ``dinoflow.training.Trainer.step`` on a ``DistributedDataParallel`` student, exactly as
``dinoflow.training.pretrain`` runs it under torchrun (gradient all-reduce, Sinkhorn-Knopp and
center all-reduces, KoLeo on each process's own images). Each timed step starts and ends at a
barrier, so the time is the slowest process's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from benchmarks.bench_step import DinoflowStep, make_batches
from benchmarks.common import ROOT, median
from dinoflow.config import PretrainConfig


def per_process_config(batch: int | None = None, threads: int | None = None) -> PretrainConfig:
    """conf/base's pretrain parameters (batch_size and threads are per process), or overridden."""
    params = yaml.safe_load((ROOT / "conf/base/parameters_pretrain.yml").read_text())["pretrain"]
    params["train"]["device"] = "cpu"
    if batch:
        params["train"]["batch_size"] = batch
    if threads:
        params["train"]["threads"] = threads
    return PretrainConfig.model_validate(params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-per-process", type=int, default=None, help="conf/base's by default")
    ap.add_argument("--threads", type=int, default=None, help="per process; conf/base's by default")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = per_process_config(args.batch_per_process, args.threads)
    threads = cfg.train.threads or int(os.environ.get("OMP_NUM_THREADS", 1))
    torch.set_num_threads(threads)
    step = DinoflowStep(cfg, channels=1, world_size=world)
    batches = make_batches(cfg, 1, n=4, seed=100 + rank)  # each process its own images
    for i in range(args.warmup):
        step(batches[i % 4], i)
    times, cpu = [], []
    for r in range(args.repeats):
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        step(batches[r % 4], args.warmup + r)
        dist.barrier()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if rank == 0:
        global_batch = cfg.train.batch_size * world
        args.out.write_text(json.dumps({
            "processes": world, "threads_per_process": threads, "batch_per_process": cfg.train.batch_size,
            "global_batch": global_batch, "step_s_median": median(times), "step_s_all": times,
            "rank0_step_cpu_s_median": median(cpu), "images_per_s": global_batch / median(times),
        }, indent=1))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
