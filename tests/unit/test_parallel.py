"""``dinoflow.parallel``: how many workers a setting means, alone and among torchrun's ranks."""

from __future__ import annotations

import os

from dinoflow import parallel


def test_auto_workers_are_this_rank_share_of_a_shared_host(monkeypatch) -> None:
    monkeypatch.setattr(parallel, "usable_cores", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert parallel.resolve_workers("auto", 100) == 8 and parallel.resolve_workers("auto", 3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 ranks on this host's 8 cores
    assert parallel.resolve_workers("auto", 100) == 4 and parallel.resolve_workers(6, 100) == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert parallel.resolve_workers("auto", 100) == 1
    # a process bound to its own cores (SLURM cpus_per_task, taskset) keeps its mask
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert parallel.resolve_workers("auto", 100) == 8
