"""Duplicate detection: exact (pixel sha256) and near (pHash Hamming, embedding cosine, faiss).

Near duplicates form a graph (an edge per pair above threshold among each image's k nearest
neighbours, as DINOv2 does with k = 64); its connected components are duplicate groups, of which
one image is kept. The search is exact (flat) up to ``flat_max`` vectors, an IVF index beyond
(built by blocks, its lists on disk when given a folder: ``build_index``); the queries are read
and searched a batch at a time, split among the ranks of a job (``_knn_edges``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinoflow import distributed
from dinoflow.curation import ranks
from dinoflow.curation.config import DedupConfig
from dinoflow.curation.rows import BLOCK_ROWS, Rows, as_rows
from dinoflow.curation.sampling import kmeans
from dinoflow.files import FolderLock, prune


def build_index(base: np.ndarray | Rows, cfg: DedupConfig, folder: Path | None = None):
    """A faiss inner-product index over base (N, D): flat, or IVF per cfg.index / cfg.flat_max.

    Every rank of a job gets the same index. Flat (up to ``flat_max`` vectors): built in memory
    by each rank. IVF: the ranks train the coarse quantizer together (``sampling.kmeans``); with
    ``folder``, each rank adds its block of the vectors to a shard file there, rank 0 merges the
    shards' inverted lists into one file on disk (faiss ``merge_ondisk``), and every rank opens
    it memory-mapped: no process holds the N vectors. Without ``folder`` (one process only): in
    memory. The lists hold the vectors in row order either way, so the searches are the same.
    """
    import faiss

    base = as_rows(base)
    n, d = len(base), base.dim
    use_ivf = cfg.index == "ivf" or (cfg.index == "auto" and n > cfg.flat_max)
    if not use_ivf:
        index = faiss.IndexFlatIP(d)
        for _, block in base.blocks():
            index.add(block)
        return index
    nlist = cfg.ivf_nlist or max(1, int(4 * np.sqrt(n)))
    nlist = max(1, min(nlist, n // 39))  # faiss wants >= 39 training points per list
    # The coarse quantizer: k-means (split over the ranks) on 40 vectors per list, its centroids
    # normalised for the inner product, as faiss trains an IVF index for it.
    centroids = kmeans(base, nlist, niter=10, init="random", max_points_per_centroid=40)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    empty = faiss.serialize_index(
        faiss.IndexIVFFlat(quantizer, d, len(centroids), faiss.METRIC_INNER_PRODUCT)
    )
    if folder is None:
        ranks.require_shared(None, "an IVF index")
        index = faiss.deserialize_index(empty)
        for a, block in base.blocks():
            index.add_with_ids(block, np.arange(a, a + len(block), dtype=np.int64))
    else:
        index = _merged_on_disk(empty, base, folder)
    index.nprobe = min(cfg.ivf_nprobe, nlist)
    return index


def _merged_on_disk(empty: np.ndarray, base: Rows, folder: Path):
    """The trained, empty IVF index ``empty`` (serialised) filled with ``base``: each rank adds
    its block into ``folder/shard-<rank>.index``, rank 0 merges them into ``folder/lists.ivfdata``
    (``folder/merged.index`` names it by its absolute path), every rank reads it memory-mapped."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    rank, world = distributed.world()
    shard = faiss.deserialize_index(empty)
    start, stop = ranks.block(len(base), BLOCK_ROWS)
    for a, block in base.blocks(start, stop):
        shard.add_with_ids(block, np.arange(a, a + len(block), dtype=np.int64))
    shard_path = folder / f"shard-{rank}.index"
    faiss.write_index(shard, str(shard_path))
    del shard
    distributed.barrier()
    merged, lists = folder / "merged.index", folder / "lists.ivfdata"
    if distributed.is_main_process():
        target = faiss.deserialize_index(empty)
        shards = [str(folder / f"shard-{r}.index") for r in range(world)]
        merge_ondisk(target, shards, str(lists))
        faiss.write_index(target, str(merged))
        del target
    distributed.barrier()
    shard_path.unlink(missing_ok=True)
    return faiss.read_index(str(merged))  # its lists: the memory-mapped lists.ivfdata


def similarity_edges(
    queries: np.ndarray | Rows,
    threshold: float,
    k: int,
    cfg: DedupConfig,
    base: np.ndarray | Rows | None = None,
    progress: bool = False,
    folder: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, cosine) with cosine >= threshold among each query's k nearest neighbours.

    Self mode (base None): i < j, both indices into queries, each pair once. Cross mode: i into
    queries, j into base. Inputs are L2-normalised (N, D) vectors (arrays or ``Rows``).
    ``folder``: where an IVF index is built on disk (``build_index``); needed by a job's ranks.
    The ranks of a job split the queries (``_knn_edges``); the pairs are the same on every rank.
    """

    def search(index_folder: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _knn_edges(
            as_rows(queries),
            None if base is None else as_rows(base),
            lambda rows: build_index(rows, cfg, index_folder),
            k,
            lambda s: s >= threshold,
            batch=cfg.query_batch,
            progress=progress,
        )

    if folder is None:
        return search(None)
    folder = Path(folder).resolve()  # the merged index names its lists by this path
    folder.mkdir(parents=True, exist_ok=True)
    with ranks.work_lock(folder, "curation index"):  # held while the lists are searched
        pairs = search(folder)  # ends with a gather: every rank is done with the index
        if distributed.is_main_process():  # rebuilt by every run: not kept
            prune(folder, keep={FolderLock(folder, "").path})  # the held lock stays
    return pairs


def phash_bytes(hex_hashes: list[str] | pd.Series) -> np.ndarray:
    """64-bit pHash hex strings (imagehash's format) -> (N, 8) uint8 for faiss binary indexes."""
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hex_hashes), dtype=np.uint8).reshape(
        -1, 8
    )


def _binary_index(codes: Rows):
    import faiss

    index = faiss.IndexBinaryFlat(64)
    for _, block in codes.blocks():
        index.add(block)
    return index


def hamming_edges(
    queries: np.ndarray, max_distance: int, k: int, base: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, distance) with Hamming distance <= max_distance among k nearest (binary).

    queries/base: (N, 8) uint8 packed 64-bit hashes. Self mode as in ``similarity_edges``.
    """
    i, j, d = _knn_edges(
        as_rows(queries),
        None if base is None else as_rows(base),
        _binary_index,
        k,
        lambda d: d <= max_distance,
        batch=65_536,
        progress=False,
    )
    return i, j, d.astype(np.int64)


def _knn_edges(
    queries: Rows,
    base: Rows | None,
    make_index: Callable[[Rows], Any],
    k: int,
    close_enough: Callable[[np.ndarray], np.ndarray],
    batch: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's k nearest (self mode: k + 1, itself included, then dropped) that are
    ``close_enough``, as pairs (i, j, score); self mode keeps i < j, each pair once.

    Every rank of a job has the whole index (``make_index``) and searches its block of the
    queries (``ranks.block``), read a batch at a time; the pairs are gathered on every rank. A
    query is searched by one process whatever the number of ranks: the pairs do not depend on it.
    """
    from tqdm.auto import tqdm

    self_mode = base is None
    base = queries if self_mode else base
    kk = min(k + (1 if self_mode else 0), len(base))
    empty = np.zeros(0, dtype=np.int64)
    if len(queries) == 0 or len(base) == 0:
        return empty, empty, np.zeros(0, dtype=np.float32)
    index = make_index(base)
    found_i, found_j, found_s = [empty], [empty], [np.zeros(0, dtype=np.float32)]
    q0, q1 = ranks.block(len(queries), batch)  # whole batches: the same ones on any ranks
    bar = tqdm(total=q1 - q0, desc="neighbour search", unit="img", disable=not progress)
    for start in range(q0, q1, batch):
        q = queries.read(slice(start, min(q1, start + batch)))
        s, j = index.search(q, kk)
        i = np.arange(start, start + len(q))[:, None].repeat(kk, axis=1)
        keep = (j >= 0) & close_enough(s)
        if self_mode:
            keep &= j != i
        found_i.append(i[keep])
        found_j.append(j[keep].astype(np.int64))
        found_s.append(s[keep].astype(np.float32))
        bar.update(len(q))
    bar.close()
    src, dst, score = ranks.gather_concat(
        np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    )
    if not self_mode:
        return src, dst, score
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    pairs, first = np.unique(np.stack([lo, hi], 1), axis=0, return_index=True)
    return pairs[:, 0], pairs[:, 1], score[first]


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label (N,) int64 of each node of the undirected graph (n nodes, edges src-dst)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc

    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, labels = cc(graph, directed=False)
    return labels.astype(np.int64)


def representatives(labels: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Boolean keep mask: per component the node with the lowest priority value."""
    order = np.lexsort((np.arange(len(labels)), priority, labels))
    keep = np.zeros(len(labels), dtype=bool)
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    keep[order[first]] = True
    return keep


def exact_duplicates(hashes: pd.Series, priority: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, index of the kept twin per row) for rows sharing a pixel hash."""
    codes = pd.factorize(hashes)[0].astype(np.int64)
    keep = representatives(codes, priority)
    kept_of_code = np.full(codes.max() + 1 if len(codes) else 0, -1, dtype=np.int64)
    kept_of_code[codes[keep]] = np.flatnonzero(keep)
    return keep, kept_of_code[codes]
