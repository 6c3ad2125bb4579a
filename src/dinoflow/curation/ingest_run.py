"""The pipeline's ingest: every core, streamed to disk, resumable.

The items of every split (train, val, test) are cut into chunks (``curation.ingest.
files_per_chunk`` files, ``arrays_per_chunk`` in-memory images); worker processes
(``curation.workers``, ``dinoflow.parallel``) each describe a chunk
(``dinoflow.curation.ingest.describe_split``) and write it under ``<work_dir>/ingest/<split>/``:
``<start>-<key>.npy`` (its thumbnails), then ``<start>-<key>.parquet`` (its metadata rows, the
mark that the chunk is done), both atomically. A worker is sent the chunk's paths, or the
chunk's slice of an in-memory array (never the whole array).

A chunk's key is a hash of what its result depends on: the split name, the item range, the
items' ids and labels, the files' paths, sizes and mtimes (in-memory images: their pixel bytes),
the ingest settings and ``FORMAT``. A run re-uses the chunks whose key it finds (a run killed
by SIGKILL resumes from the chunks it finished) and computes the others; a changed file or
setting changes its chunks' keys, so nothing stale is read. After a complete run the chunk files
of other keys (stale ones, half-written temp files) are deleted.

Under torch.distributed (``dinoflow.curation.launch``) rank r of W computes the chunks i with
i % W == r into the shared work folder, rank 0 (the one holding the FolderLock) assembles once
every rank is done, and the others read what it assembled (``dinoflow.curation.ranks``).

The chunks are then assembled in item order, whatever order they finished in: the metadata
table (small: a row per item, in memory) and ``<work_dir>/thumbnails.npy`` (N, s, s, 3) uint8,
filled chunk by chunk through ``numpy.lib.format.open_memmap`` and returned memory-mapped. The
result is the same for any worker count or chunk completion order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dinoflow import distributed
from dinoflow.curation import ranks
from dinoflow.curation.ingest import COLUMNS, DTYPES, describe_split
from dinoflow.data import Split
from dinoflow.data.cache import file_stat
from dinoflow.files import atomic_path, atomic_write, prune
from dinoflow.parallel import resolve_workers, unordered_map

log = logging.getLogger(__name__)

FORMAT = 1  # bumped when what a chunk holds changes: every older chunk is then recomputed
SPLIT_ORDER = ("train", "val", "test")
# what the fork server imports once, so that a pool's workers start with it (scipy via imagehash
# and pyarrow take about a second to import in every new worker otherwise)
PRELOAD = (__name__, "imagehash", "scipy.fftpack", "PIL.Image", "pyarrow.parquet")


@dataclass(frozen=True)
class IngestSettings:
    """What a chunk's result depends on besides its items (part of every chunk key)."""

    thumb_size: int
    max_pixels: int
    compute_phash: bool = True
    phash_min_side: int = 0
    decode_min_side: int | None = None  # reduced JPEG decoding (``describe_split``)


@dataclass
class Chunk:
    """One job: items [start, start + len(split)) of split ``name``, written as ``stem``.*"""

    split: Split
    name: str
    start: int
    settings: IngestSettings
    stem: Path

    @property
    def parquet(self) -> Path:
        return self.stem.with_suffix(".parquet")

    @property
    def npy(self) -> Path:
        return self.stem.with_suffix(".npy")

    def done(self) -> bool:
        return self.parquet.is_file() and self.npy.is_file()


@dataclass
class IngestStats:
    """What one ingest did (the report's ``timings_s.ingest``)."""

    seconds: float = 0.0
    workers: int = 1  # worker processes (1: this process; 0: every chunk was re-used)
    images: int = 0
    chunks: int = 0
    chunks_reused: int = 0
    images_reused: int = 0
    images_per_s: float = 0.0  # images computed (not re-used) per second of the whole ingest
    work_dir: str = ""
    per_split: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def chunk_key(chunk: Split, name: str, start: int, settings: IngestSettings) -> str:
    """sha256 (hex) of everything the chunk's rows and thumbnails depend on."""
    h = hashlib.sha256(json.dumps([FORMAT, asdict(settings), name, start, len(chunk)]).encode())
    h.update(json.dumps([list(map(str, chunk.ids)), np.asarray(chunk.labels).tolist()]).encode())
    if chunk.images is not None:
        images = np.ascontiguousarray(chunk.images)
        h.update(f"{images.dtype.str}{images.shape}".encode())
        h.update(images.tobytes())
    elif chunk.members is not None:
        h.update(json.dumps([chunk.members.identity(i) for i in range(len(chunk))]).encode())
    else:
        h.update(json.dumps([[str(p), *file_stat(Path(p))] for p in chunk.paths]).encode())
    return h.hexdigest()


def plan_chunks(
    splits: dict[str, Split],
    settings: IngestSettings,
    folder: Path,
    files_per_chunk: int,
    arrays_per_chunk: int,
) -> list[Chunk]:
    """Every split's chunks, in item order (train, val, test), with their keyed file stems."""
    chunks = []
    for name in (n for n in SPLIT_ORDER if n in splits):
        split = splits[name]
        size = arrays_per_chunk if split.images is not None else files_per_chunk
        for start in range(0, len(split), size):
            part = split.subset(np.arange(start, min(len(split), start + size)))
            key = chunk_key(part, name, start, settings)[:24]
            chunks.append(Chunk(part, name, start, settings, folder / name / f"{start:010d}-{key}"))
    return chunks


def ingest_chunk(chunk: Chunk) -> int:
    """Describe one chunk and write its two files (a worker's job): the items described."""
    s = chunk.settings
    frame, thumbs = describe_split(
        chunk.split,
        chunk.name,
        s.thumb_size,
        s.max_pixels,
        s.compute_phash,
        s.phash_min_side,
        chunk.start,
        s.decode_min_side,
    )
    atomic_write(chunk.npy, lambda f: np.save(f, thumbs, allow_pickle=False))
    atomic_write(chunk.parquet, lambda f: frame.to_parquet(f, index=False))  # the "done" mark
    return len(frame)


def _run_chunks(
    todo: list[Chunk],
    total: int,
    workers: int,
    progress: bool,
    on_chunk: Callable[[Chunk], None] | None,
) -> None:
    """``ingest_chunk`` over the chunks not done yet, with a progress bar (images/s, ETA)."""
    from tqdm.auto import tqdm

    done_before = total - sum(len(c.split) for c in todo)
    with tqdm(
        total=total,
        initial=done_before,
        desc=f"ingest ({workers} processes)",
        unit="img",
        disable=not progress,
        mininterval=1.0,
        smoothing=0.1,
    ) as bar:
        for i, n in unordered_map(ingest_chunk, todo, workers, PRELOAD):
            bar.update(n)
            if on_chunk is not None:
                on_chunk(todo[i])


def _rows(chunks: list[Chunk]) -> pd.DataFrame:
    """The chunks' metadata rows in item order."""
    frames = [pd.read_parquet(c.parquet) for c in chunks]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    return frame.astype(DTYPES)


def assemble(chunks: list[Chunk], out: Path, thumb_size: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The chunks' rows and thumbnails in item order: (table, (N, s, s, 3) memmap of ``out``)."""
    n = sum(len(c.split) for c in chunks)
    with atomic_path(out) as tmp:
        thumbs = np.lib.format.open_memmap(tmp, "w+", np.uint8, (n, thumb_size, thumb_size, 3))
        at = 0
        for c in chunks:
            thumbs[at : at + len(c.split)] = np.load(c.npy, mmap_mode="r")
            at += len(c.split)
        thumbs.flush()
        del thumbs
    return _rows(chunks), np.load(out, mmap_mode="r")


def _assemble_on_main(
    chunks: list[Chunk], work_dir: Path, thumb_size: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """Rank 0 assembles (and prunes); the other ranks then read what it wrote."""
    out = work_dir / "thumbnails.npy"
    if distributed.is_main_process():
        meta, thumbs = assemble(chunks, out, thumb_size)
        _prune(work_dir / "ingest", chunks)
    distributed.barrier()
    if not distributed.is_main_process():
        meta, thumbs = _rows(chunks), np.load(out, mmap_mode="r")
    return meta, thumbs


def _prune(folder: Path, chunks: list[Chunk]) -> None:
    """Delete the chunk files of other keys (stale, or temp files of a killed write)."""
    keep = {p for c in chunks for p in (c.parquet, c.npy)}
    for name in {c.name for c in chunks}:
        prune(folder / name, keep)


def ingest_splits(
    splits: dict[str, Split],
    settings: IngestSettings,
    work_dir: str | Path | None = None,
    workers: int | str = "auto",
    files_per_chunk: int = 256,
    arrays_per_chunk: int = 4096,
    progress: bool = True,
    on_chunk: Callable[[Chunk], None] | None = None,
) -> tuple[pd.DataFrame, np.ndarray, IngestStats]:
    """All splits stacked (train, val, test): metadata table, thumbnails memory-mapped from
    ``<work_dir>/thumbnails.npy``, and what the run did. ``work_dir`` None: a temporary folder,
    removed at the end (no resume; the thumbnails are returned in memory). ``on_chunk``: called
    with each chunk this run computed, when its files are written."""
    ranks.require_shared(work_dir, "curation ingest")
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="dinoflow-ingest-") as tmp:
            meta, thumbs, stats = ingest_splits(
                splits,
                settings,
                tmp,
                workers,
                files_per_chunk,
                arrays_per_chunk,
                progress,
                on_chunk,
            )
            thumbs = np.array(thumbs)
        stats.work_dir = ""
        return meta, thumbs, stats
    t0, work_dir = time.perf_counter(), Path(work_dir)
    (work_dir / "ingest").mkdir(parents=True, exist_ok=True)
    with ranks.work_lock(work_dir, "curation ingest"):
        chunks = plan_chunks(
            splits, settings, work_dir / "ingest", files_per_chunk, arrays_per_chunk
        )
        mine = ranks.share(chunks)  # all of them on one process
        todo = [c for c in mine if not c.done()]
        n_workers = resolve_workers(workers, len(todo))
        _run_chunks(todo, sum(len(c.split) for c in mine), n_workers, progress, on_chunk)
        n_todo, computed, workers_used = ranks.gather_sums(
            len(todo), sum(len(c.split) for c in todo), n_workers if todo else 0
        )
        meta, thumbs = _assemble_on_main(chunks, work_dir, settings.thumb_size)
    total, seconds = len(meta), time.perf_counter() - t0
    stats = IngestStats(
        seconds=round(seconds, 3),
        workers=workers_used,  # over all ranks; 0: every chunk was re-used
        images=total,
        chunks=len(chunks),
        chunks_reused=len(chunks) - n_todo,
        images_reused=total - computed,
        images_per_s=round(computed / max(seconds, 1e-9), 1),
        work_dir=str(work_dir),
        per_split={n: len(s) for n, s in splits.items()},
    )
    log.info("curation ingest: %s", stats.as_dict())
    return meta, thumbs, stats
