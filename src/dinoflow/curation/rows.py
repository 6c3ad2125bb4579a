"""Vectors read a block at a time, so that no step needs all N of them in memory at once.

A ``Rows`` is rows ``index`` of an (M, D) array, usually the memory-mapped ``embeddings.npy`` of
``curation.work_dir``: ``read(positions)`` copies just those rows, as contiguous float32 (or the
array's own dtype for binary codes). Deduplication and k-means take ``Rows`` and read the block
this rank works on (``ranks.block``), the queries of a batch, or k-means' training sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Rows read, searched or assigned at a time (4 MB of 128-d float32); also the unit in which rows
# are shared among ranks, so that every block is the same whatever the number of ranks.
BLOCK_ROWS = 8192


@dataclass(frozen=True)
class Rows:
    """Rows ``index`` (positions, or None: all) of ``source`` (M, D); sorted positions read a
    memory map in file order."""

    source: np.ndarray
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.source) if self.index is None else len(self.index)

    @property
    def dim(self) -> int:
        return int(self.source.shape[1])

    def read(self, positions: slice | np.ndarray) -> np.ndarray:
        """The rows at ``positions`` (of this view) as a C-contiguous array."""
        rows = self.source[positions] if self.index is None else self.source[self.index[positions]]
        dtype = np.uint8 if self.source.dtype == np.uint8 else np.float32
        return np.ascontiguousarray(rows, dtype=dtype)

    def subset(self, positions: np.ndarray) -> Rows:
        """The view of rows ``positions`` of this one."""
        positions = np.asarray(positions, dtype=np.int64)
        return Rows(self.source, positions if self.index is None else self.index[positions])

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first position, rows) of ``[start, stop)``, ``BLOCK_ROWS`` at a time (``start``: a
        multiple of ``BLOCK_ROWS``, as ``ranks.block(n, BLOCK_ROWS)`` gives)."""
        stop = len(self) if stop is None else stop
        for a in range(start, stop, BLOCK_ROWS):
            yield a, self.read(slice(a, min(stop, a + BLOCK_ROWS)))


def as_rows(x: np.ndarray | Rows) -> Rows:
    return x if isinstance(x, Rows) else Rows(np.asarray(x))
