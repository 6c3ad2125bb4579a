"""The ranks of one torch.distributed job sharing curation's chunks in one work folder.

Outside a process group (the Kedro node, a notebook) every helper is the one-process identity.
Inside one (``torchrun -m dinoflow.curation.launch``, a SLURM job), rank r of W computes the
chunks i with ``i % W == r`` of a step's plan (ingest, model embedding), all ranks writing to the
shared ``curation.work_dir``; then rank 0 assembles and the others read what it assembled.
Searches and k-means assignments split rows into one contiguous block per rank (``block``) and
gather the results on every rank (``gather_concat``); what only rank 0 computes (the Great
Expectations suite, a k-means seeding) it shares with the others (``from_main``).
Only rank 0 takes the work folder's ``FolderLock`` (the other ranks work under it: the lock keeps
other jobs out, not this job's ranks); every rank waits until it holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np

from dinoflow import distributed
from dinoflow.files import FolderLock

T = TypeVar("T")


def share(items: Sequence[T]) -> list[T]:
    """This rank's share of a plan: items i with i % world_size == rank (all of them alone)."""
    rank, world = distributed.world()
    return [item for i, item in enumerate(items) if i % world == rank]


def require_shared(work_dir: str | Path | None, what: str) -> None:
    """Several ranks need one work folder they all see (a temporary folder is per process)."""
    if work_dir is None and distributed.world()[1] > 1:
        raise ValueError(
            f"{what} on {distributed.world()[1]} processes needs curation.work_dir: a folder "
            "every rank can read and write (a shared file system across nodes)"
        )


@contextmanager
def work_lock(work_dir: str | Path, what: str) -> Iterator[None]:
    """Rank 0 holds ``FolderLock(work_dir, what)`` for the block; the others wait until it does
    (if it cannot, it raises and the launcher stops the others)."""
    if not distributed.is_main_process():
        distributed.barrier()
        yield
        return
    with FolderLock(work_dir, what):
        distributed.barrier()
        yield


def gather_sums(*counts: int) -> list[int]:
    """Each count summed over the ranks (a barrier: every rank has finished its share)."""
    return [sum(values) for values in zip(*distributed.all_gather_objects(counts), strict=True)]


def block(n: int, unit: int = 1) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n rows, in whole units of ``unit`` rows
    (the ranks' shares follow each other in row order). A computation done unit by unit then
    sees the same units, so gives the same numbers, whatever the number of ranks."""
    rank, world = distributed.world()
    units = -(-n // unit)
    return min(n, units * rank // world * unit), min(n, units * (rank + 1) // world * unit)


def from_main(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its result on every rank (one process: just ``compute()``).
    When it raises on rank 0, every rank raises (the others name rank 0's error) instead of
    waiting at the next collective for a rank that is gone."""
    if distributed.world()[1] == 1:
        return compute()
    result, error = None, None
    if distributed.is_main_process():
        try:
            result = compute()
        except Exception as exc:
            error = exc
    shared = distributed.broadcast_object_from_main(
        (result, None if error is None else f"{type(error).__name__}: {error}")
    )
    if error is not None:
        raise error
    if shared[1] is not None:
        raise RuntimeError(f"rank 0 failed: {shared[1]}")
    return shared[0]


def gather_concat(*parts: np.ndarray) -> list[np.ndarray]:
    """Each array concatenated over the ranks in rank order (every rank gets them all)."""
    if distributed.world()[1] == 1:
        return list(parts)
    gathered = distributed.all_gather_objects(parts)
    return [np.concatenate([g[i] for g in gathered]) for i in range(len(parts))]
