"""The one process pool: how many workers a setting means, and a map over worker processes.

``resolve_workers("auto" | n, jobs)``: "auto" is the cores this process may run on
(``os.sched_getaffinity``: a Slurm or ``taskset`` share, not the machine's count), never more
than the jobs. ``unordered_map`` / ``ordered_map`` run a picklable function over jobs in worker
processes (in this process when one worker is asked for: no pool, easy to debug and profile).

The workers are started by the "forkserver" method: a clean single-threaded server process
forks them, so a parent that already runs torch / OpenMP / BLAS thread pools, a progress bar's
monitor thread or an MLflow client cannot leave a held lock in a child (a fork of such a process
can hang). ``preload`` names modules the server imports once (about 2 s for torch + PIL +
pandas), so every later pool of the run starts in ~0.05 s, as fast as a plain fork. Each worker
runs torch, OpenMP and BLAS with one thread: the pool is the parallelism.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

_ONE_THREAD = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_share_of_cores() -> int:
    """The usable cores, divided among the processes torchrun started on this host
    (``LOCAL_WORLD_SIZE``) when they all share the whole machine; a process bound to its own
    cores (SLURM ``cpus_per_task``, ``taskset``) keeps its mask."""
    cores, local = usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1 and cores >= (os.cpu_count() or 1):
        return max(1, cores // local)
    return cores


def use_cores(n: int) -> None:
    """Run torch's and faiss's thread pools on ``n`` threads: each library loads its own OpenMP,
    so setting torch's does not reach faiss (nor does OMP_NUM_THREADS once they are loaded)."""
    import torch

    torch.set_num_threads(n)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n)


def resolve_workers(setting: int | str, jobs: int) -> int:
    """Worker processes for a ``workers`` setting ("auto" = the usable cores, this process's
    share of them under torchrun) and ``jobs`` jobs."""
    cores = local_share_of_cores() if setting == "auto" else int(setting)
    return max(1, min(jobs, cores))


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _exit_with(pid: int, interval_s: float = 0.5) -> None:
    """End this worker when process ``pid`` (the pool's owner) is gone. A worker waits on the
    job queue, whose write end every worker holds, and keeps the fork server alive: without
    this, a main process killed by SIGKILL would leave its workers (and its pipes) behind."""
    while _running(pid):
        time.sleep(interval_s)
    os._exit(1)


def _init_worker(owner: int) -> None:
    """Pool initializer: one compute thread per worker (torch, OpenMP, BLAS); the worker ends
    when ``owner`` does."""
    import sys

    threading.Thread(target=_exit_with, args=(owner,), daemon=True).start()
    for name in _ONE_THREAD:
        os.environ[name] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass


def unordered_map(
    fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, preload: Sequence[str] = ()
) -> Iterator[tuple[int, Any]]:
    """(job index, ``fn(job)``) for every job, as the jobs finish. At most ``2 * workers`` jobs
    are handed out at a time, so big job arguments (pixel slices) are not all pickled at once.
    A job's exception is raised here; the jobs not started yet are then cancelled."""
    if workers <= 1:
        for i, job in enumerate(jobs):
            yield i, fn(job)
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(os.getpid(),),
    )
    try:
        running: dict[Future, int] = {}
        todo = iter(enumerate(jobs))
        for i, job in todo:
            running[pool.submit(fn, job)] = i
            if len(running) < 2 * workers:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield running.pop(future), future.result()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield running.pop(future), future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(
    fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, preload: Sequence[str] = ()
) -> Iterator[Any]:
    """``fn(job)`` for every job, in the jobs' order (``unordered_map``, results held back until
    the ones before them are in)."""
    waiting: dict[int, Any] = {}
    next_index = 0
    for i, result in unordered_map(fn, jobs, workers, preload):
        waiting[i] = result
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1
