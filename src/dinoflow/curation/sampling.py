"""Balanced sampling: hierarchical k-means with resampling, then top-down balanced sampling.

Vo et al., 2024, "Automatic Data Curation for Self-Supervised Learning: A Clustering-Based
Approach". Level 1 clusters the embeddings, level t clusters the centroids of level t - 1, so
the top level holds few, coarse concepts. Within a level, each resampling step takes the
``r`` points closest to every centroid, re-runs k-means on that union (each cluster now weighs
the same, so dense regions stop attracting centroids) and re-assigns every point. Sampling is
top-down: a target is split over the top clusters as evenly as their sizes allow (a cluster
smaller than its share gives all it has, the rest goes to the others), recursively down to the
level-1 clusters, which give their quota at random or closest-to-centroid first.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from dinoflow import distributed
from dinoflow.curation import ranks
from dinoflow.curation.rows import BLOCK_ROWS, Rows, as_rows


@dataclass
class Level:
    """One level: centroids (k, D) and the assignment (n_in,) of its input points to them."""

    centroids: np.ndarray
    assignment: np.ndarray
    distances: np.ndarray  # (n_in,) squared L2 distance of each input point to its centroid


def kmeans_pp_init(
    x: np.ndarray | Rows, k: int, rng: np.random.Generator, max_points: int = 100_000
) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) on at most max_points rows: (k, D)."""
    rows = as_rows(x)
    n = len(rows)
    sample = rows.read(slice(0, n) if n <= max_points else rng.choice(n, max_points, replace=False))
    centres = np.empty((k, rows.dim), dtype=np.float32)
    sq = (sample.astype(np.float64) ** 2).sum(1)

    def dist2(c: np.ndarray) -> np.ndarray:  # |s - c|^2 by one mat-vec, no (n, D) temporary
        return np.maximum(sq - 2.0 * (sample @ c) + float(c.astype(np.float64) @ c), 0.0)

    centres[0] = sample[rng.integers(len(sample))]
    d2 = dist2(centres[0])
    for c in range(1, k):
        total = d2.sum()
        # All remaining points coincide with a centre: any choice is as good.
        if total <= 0:
            pick = int(rng.integers(len(sample)))
        else:
            pick = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
            pick = min(pick, len(sample) - 1)
        centres[c] = sample[pick]
        d2 = np.minimum(d2, dist2(centres[c]))
    return centres


def _nearest_centroid_index(centroids: np.ndarray):
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def assign_rows(rows: Rows, centroids: np.ndarray, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid (N,) int64, squared L2 distance (N,)) of every row by exact faiss
    search, a block at a time, each rank of a job assigning its block (``ranks.block``); every
    rank gets the whole labels and distances. ``bar``: a
    progress bar advanced by the rows this rank assigned."""
    index = _nearest_centroid_index(centroids)
    labels, dists = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    start, stop = ranks.block(len(rows), BLOCK_ROWS)
    for _, x in rows.blocks(start, stop):
        d, i = index.search(x, 1)
        labels.append(i[:, 0].astype(np.int64))
        dists.append(d[:, 0])
        if bar is not None:
            bar.update(len(x))
    return tuple(ranks.gather_concat(np.concatenate(labels), np.concatenate(dists)))


FIXED_POINT_BITS = 32


def _fixed_point_scale(x: np.ndarray) -> float:
    """2^e such that the largest |x| over the ranks maps below 2^32: ``round(x * scale)`` as
    int64 sums 2^31 rows without overflow, and the rounding (2^-32 of the largest value) is far
    below float32's precision. x * 2^e is exact in float32, and so is rounding it."""
    local = float(np.abs(x).max()) if x.size else 0.0
    largest = max(distributed.all_gather_objects(local))
    return float(2.0 ** (FIXED_POINT_BITS - (int(np.ceil(np.log2(largest))) if largest > 0 else 0)))


def kmeans(
    x: np.ndarray | Rows,
    k: int,
    niter: int = 25,
    seed: int = 0,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
) -> np.ndarray:
    """Lloyd's k-means (L2) on x (N, D): centroids (min(k, N), D), float32.

    Trained on at most ``max_points_per_centroid * k`` rows (a random sample beyond: the only
    rows read, so the memory is the sample's whatever N), as faiss's k-means does, and split
    over the ranks of a job: rank 0 seeds (k-means++ or k random rows), each rank assigns its
    block of the training rows to the centroids (faiss, exact), the per-centroid sums and
    counts are summed over the ranks, and an empty cluster takes half of a large one (faiss's
    rule, ``faiss.contrib.clustering.reassign_centroids``). The sums are of fixed-point integers
    (``_fixed_point``): exact, so the same in any order, and the centroids do not depend on the
    number of ranks. faiss.Kmeans itself runs in one process only, hence this loop.
    """
    from faiss.contrib.clustering import reassign_centroids

    rows = as_rows(x)
    k = min(k, len(rows))
    rng = np.random.default_rng(seed)
    n_train = max_points_per_centroid * k
    train = rows
    if len(rows) > n_train:
        sample = np.random.default_rng([seed, 1]).choice(len(rows), n_train, replace=False)
        train = rows.subset(np.sort(sample))

    def seeds() -> np.ndarray:
        if init == "kmeans++":
            return kmeans_pp_init(train, k, rng)
        return train.read(np.sort(rng.choice(len(train), k, replace=False)))

    centroids = ranks.from_main(seeds)
    start, stop = ranks.block(len(train), BLOCK_ROWS)
    mine = train.read(slice(start, stop))
    scale = _fixed_point_scale(mine)
    split_rng = np.random.RandomState(seed)
    for _ in range(niter):
        sums, counts = _cluster_sums(mine, scale, centroids)
        means = sums / scale / np.maximum(counts, 1)[:, None]
        centroids = np.where(counts[:, None] > 0, means, centroids).astype(np.float32)
        reassign_centroids(counts.copy(), centroids, split_rng)
    return np.ascontiguousarray(centroids)


def _cluster_sums(
    mine: np.ndarray, scale: float, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(per-centroid sums of the rows as fixed-point integers ``round(x * scale)`` (k, D) int64,
    counts (k,)) over all ranks, each rank assigning its rows ``mine`` block by block to the
    nearest centroid. Integer sums are exact: the same in any order, on any number of ranks."""
    import torch
    from scipy.sparse import csr_matrix

    k, index = len(centroids), _nearest_centroid_index(centroids)
    totals = torch.zeros((k, mine.shape[1] + 1), dtype=torch.int64)  # sums, then the count
    for a in range(0, len(mine), BLOCK_ROWS):
        x = mine[a : a + BLOCK_ROWS]
        label = index.search(x, 1)[1][:, 0]
        onehot = csr_matrix((np.ones(len(x), np.int64), (label, np.arange(len(x)))), (k, len(x)))
        fixed = np.rint(x * np.float32(scale)).astype(np.int64)
        totals[:, :-1] += torch.from_numpy(np.asarray(onehot @ fixed, dtype=np.int64))
        totals[:, -1] += torch.from_numpy(np.bincount(label, minlength=k).astype(np.int64))
    distributed.all_reduce_sum(totals)
    return totals[:, :-1].numpy(), totals[:, -1].numpy()


def _compact(centroids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop centroids no point is assigned to and renumber labels 0..k'-1."""
    used = np.unique(labels)
    remap = np.full(len(centroids), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return centroids[used], remap[labels]


def hierarchical_kmeans(
    x: np.ndarray | Rows,
    n_clusters: list[int],
    resampling_steps: list[int],
    resample_sizes: list[int],
    niter: int = 25,
    seed: int = 0,
    init: str = "kmeans++",
    max_points_per_centroid: int = 256,
    progress: bool = False,
) -> list[Level]:
    """Levels finest first. resample_sizes[t] = 0 means half the level's mean cluster size.

    In a torch.distributed job every rank calls it: the k-means and the assignments of the
    points (``assign_rows``) are split over the ranks, and every rank returns the same levels.
    A level's progress bar counts the points this rank assigned."""
    from tqdm.auto import tqdm

    train = partial(kmeans, niter=niter, init=init, max_points_per_centroid=max_points_per_centroid)
    levels: list[Level] = []
    points = as_rows(x)
    for t, k in enumerate(n_clusters):
        lvl_seed = seed + 1000 * t
        steps = resampling_steps[t]
        r = resample_sizes[t] or max(1, len(points) // max(min(k, len(points)), 1) // 2)
        steps = steps if r > 1 else 0  # one point per cluster reproduces the centroids
        share = np.diff(ranks.block(len(points), BLOCK_ROWS))[0]
        bar = tqdm(
            total=int(share) * (steps + 1),
            desc=f"k-means level {t + 1}",
            unit="img" if t == 0 else "centroid",
            disable=not progress,
        )
        cents = train(points, k, seed=lvl_seed)
        labels, dist = assign_rows(points, cents, bar)
        for step in range(steps):
            order = np.lexsort((dist, labels))  # by cluster, closest first
            sorted_labels = labels[order]
            starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
            rank = np.arange(len(order)) - starts
            subset = points.subset(order[rank < r])  # by cluster: k-means++ seeds by order
            cents = train(subset, len(cents), seed=lvl_seed + step + 1)
            labels, dist = assign_rows(points, cents, bar)
        bar.close()
        cents, labels = _compact(cents, labels)
        levels.append(Level(centroids=cents, assignment=labels, distances=dist))
        points = Rows(cents)
    return levels


def split_quota(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Quotas q (len(sizes),) with q <= sizes, sum q = min(target, sum sizes), as even as possible.

    The largest cut c with sum(min(c, sizes)) <= target; the remainder goes one each to random
    clusters still larger than c.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if target >= sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())
    while lo < hi:  # largest c with sum(min(c, sizes)) <= target
        mid = (lo + hi + 1) // 2
        if np.minimum(mid, sizes).sum() <= target:
            lo = mid
        else:
            hi = mid - 1
    quota = np.minimum(lo, sizes)
    remainder = int(target - quota.sum())
    if remainder:
        candidates = np.flatnonzero(sizes > lo)
        quota[rng.choice(candidates, remainder, replace=False)] += 1
    return quota


def hierarchical_sample(
    levels: list[Level], target: int, strategy: str = "random", seed: int = 0
) -> np.ndarray:
    """Indices (sorted) of the data points chosen by top-down balanced sampling."""
    rng = np.random.default_rng(seed)
    sizes = [np.bincount(levels[0].assignment, minlength=len(levels[0].centroids))]
    for lvl in levels[1:]:
        sizes.append(
            np.bincount(lvl.assignment, weights=sizes[-1], minlength=len(lvl.centroids)).astype(
                np.int64
            )
        )
    quota = split_quota(sizes[-1], target, rng)
    for t in range(len(levels) - 1, 0, -1):  # quotas of level t's children (level t - 1 clusters)
        child_quota = np.zeros(len(levels[t - 1].centroids), dtype=np.int64)
        parent = levels[t].assignment
        for c in np.flatnonzero(quota):
            children = np.flatnonzero(parent == c)
            child_quota[children] = split_quota(sizes[t - 1][children], int(quota[c]), rng)
        quota = child_quota
    labels, dist = levels[0].assignment, levels[0].distances
    order = np.lexsort((dist, labels))
    bounds = np.searchsorted(labels[order], np.arange(len(quota) + 1))
    chosen = []
    for c in np.flatnonzero(quota):
        members = order[bounds[c] : bounds[c + 1]]  # closest to the centroid first
        q = int(quota[c])
        chosen.append(
            members[:q] if strategy == "closest" else rng.choice(members, q, replace=False)
        )
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def top_level_labels(levels: list[Level]) -> np.ndarray:
    """The top-level cluster (N,) of each data point (composition of the level assignments)."""
    labels = levels[0].assignment
    for lvl in levels[1:]:
        labels = lvl.assignment[labels]
    return labels


def balance_stats(sizes: np.ndarray) -> dict[str, float]:
    """Balance of cluster sizes: imbalance factor (max / min non-zero), entropy (nats),
    normalised entropy (entropy / ln K, 1 = uniform), Gini (0 = equal sizes), K and empties."""
    sizes = np.asarray(sizes, dtype=np.float64)
    k = len(sizes)
    nz = sizes[sizes > 0]
    total = sizes.sum()
    if k == 0 or total == 0:
        return {
            "n_clusters": k,
            "n_empty": k,
            "imbalance_factor": float("nan"),
            "entropy": 0.0,
            "normalized_entropy": float("nan"),
            "gini": float("nan"),
            "total": 0.0,
        }
    p = nz / total
    entropy = float(-(p * np.log(p)).sum())
    xs = np.sort(sizes)
    i = np.arange(1, k + 1)
    gini = float(((2 * i - k - 1) * xs).sum() / (k * total))
    return {
        "n_clusters": k,
        "n_empty": int(k - len(nz)),
        "imbalance_factor": float(nz.max() / nz.min()),
        "entropy": entropy,
        "normalized_entropy": float(entropy / np.log(k)) if k > 1 else 1.0,
        "gini": gini,
        "total": float(total),
    }
