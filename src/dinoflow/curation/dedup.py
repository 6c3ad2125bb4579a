"""Duplicate detection: exact (pixel sha256) and near (pHash Hamming, embedding cosine, faiss).

Near duplicates form a graph (an edge per pair above threshold among each image's k nearest
neighbours, as DINOv2 does with k = 64); its connected components are duplicate groups, of which
one image is kept. The search is exact (flat) up to ``flat_max`` vectors, an IVF index beyond:
memory stays O(N * D + edges), the query side is batched.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dinoflow.curation.config import DedupConfig


def _as_faiss(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(base: np.ndarray, cfg: DedupConfig, seed: int = 0):
    """A faiss inner-product index over base (N, D) (flat, or IVF per cfg.index / cfg.flat_max)."""
    import faiss

    base = _as_faiss(base)
    n, d = base.shape
    use_ivf = cfg.index == "ivf" or (cfg.index == "auto" and n > cfg.flat_max)
    if not use_ivf:
        index = faiss.IndexFlatIP(d)
        index.add(base)
        return index
    nlist = cfg.ivf_nlist or max(1, int(4 * np.sqrt(n)))
    nlist = max(1, min(nlist, n // 39))  # faiss wants >= 39 training points per list
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    n_train = min(n, 40 * nlist)
    index.train(base[np.sort(rng.choice(n, n_train, replace=False))] if n_train < n else base)
    index.add(base)
    index.nprobe = min(cfg.ivf_nprobe, nlist)
    return index


def similarity_edges(
    queries: np.ndarray,
    threshold: float,
    k: int,
    cfg: DedupConfig,
    base: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, cosine) with cosine >= threshold among each query's k nearest neighbours.

    Self mode (base None): i < j, both indices into queries, each pair once. Cross mode: i into
    queries, j into base. Inputs are L2-normalised (N, D) arrays.
    """
    from tqdm.auto import tqdm

    self_mode = base is None
    base_arr = queries if self_mode else base
    if len(queries) == 0 or len(base_arr) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    index = build_index(base_arr, cfg)
    kk = min(k + (1 if self_mode else 0), len(base_arr))
    src, dst, sim = [], [], []
    bar = tqdm(total=len(queries), desc="neighbour search", unit="img", disable=not progress)
    for start in range(0, len(queries), cfg.query_batch):
        q = _as_faiss(queries[start : start + cfg.query_batch])
        s, j = index.search(q, kk)
        bar.update(len(q))
        i = np.arange(start, start + len(q))[:, None].repeat(kk, axis=1)
        keep = (s >= threshold) & (j >= 0)
        if self_mode:
            keep &= j != i
        src.append(i[keep])
        dst.append(j[keep])
        sim.append(s[keep])
    bar.close()
    src_a, dst_a, sim_a = (
        np.concatenate(src),
        np.concatenate(dst).astype(np.int64),
        np.concatenate(sim),
    )
    if self_mode:
        lo, hi = np.minimum(src_a, dst_a), np.maximum(src_a, dst_a)
        pairs, first = np.unique(np.stack([lo, hi], 1), axis=0, return_index=True)
        return pairs[:, 0], pairs[:, 1], sim_a[first]
    return src_a, dst_a, sim_a


def phash_bytes(hex_hashes: list[str] | pd.Series) -> np.ndarray:
    """64-bit pHash hex strings (imagehash's format) -> (N, 8) uint8 for faiss binary indexes."""
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hex_hashes), dtype=np.uint8).reshape(
        -1, 8
    )


def hamming_edges(
    queries: np.ndarray, max_distance: int, k: int, base: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, distance) with Hamming distance <= max_distance among k nearest (binary).

    queries/base: (N, 8) uint8 packed 64-bit hashes. Self mode as in ``similarity_edges``.
    """
    import faiss

    self_mode = base is None
    base_arr = queries if self_mode else base
    if len(queries) == 0 or len(base_arr) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    index = faiss.IndexBinaryFlat(64)
    index.add(np.ascontiguousarray(base_arr))
    kk = min(k + (1 if self_mode else 0), len(base_arr))
    d, j = index.search(np.ascontiguousarray(queries), kk)
    i = np.arange(len(queries))[:, None].repeat(kk, axis=1)
    keep = (d <= max_distance) & (j >= 0)
    if self_mode:
        keep &= j != i
    src, dst, dist = i[keep], j[keep].astype(np.int64), d[keep].astype(np.int64)
    if self_mode:
        lo, hi = np.minimum(src, dst), np.maximum(src, dst)
        pairs, first = np.unique(np.stack([lo, hi], 1), axis=0, return_index=True)
        return pairs[:, 0], pairs[:, 1], dist[first]
    return src, dst, dist


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
