"""Hierarchical k-means with resampling and balanced sampling (Vo et al., 2024), on numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinoflow.curation.sampling import (
    balance_stats,
    hierarchical_kmeans,
    hierarchical_sample,
    split_quota,
    top_level_labels,
)


def test_split_quota_water_filling() -> None:
    rng = np.random.default_rng(0)
    # sum(min(c, sizes)) = 400 -> c + c + 100 + 20 = 400 -> c = 140
    assert split_quota(np.array([2000, 500, 100, 20]), 400, rng).tolist() == [140, 140, 100, 20]
    q = split_quota(np.array([5, 5, 5]), 10, rng)  # cut 3, one extra to a random cluster
    assert sorted(q.tolist()) == [3, 3, 4]
    assert split_quota(np.array([3, 4]), 100, rng).tolist() == [3, 4]  # target above the total


def test_balance_stats_by_hand() -> None:
    s = balance_stats(np.array([1, 3]))
    assert s["imbalance_factor"] == 3.0
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert s["entropy"] == pytest.approx(h)
    assert s["normalized_entropy"] == pytest.approx(h / math.log(2))
    assert s["gini"] == pytest.approx(0.25)  # ((2*1-3)*1 + (2*2-3)*3) / (2 * 4)
    even = balance_stats(np.array([7, 7, 7]))
    assert even["gini"] == pytest.approx(0.0) and even["normalized_entropy"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Four well separated Gaussian blobs in 8-D of sizes 2000, 500, 100, 20."""
    rng = np.random.default_rng(0)
    sizes = [2000, 500, 100, 20]
    centres = np.eye(8)[:4] * 40.0
    x = np.concatenate([c + rng.normal(size=(n, 8)) for c, n in zip(centres, sizes, strict=True)])
    y = np.repeat(np.arange(4), sizes)
    return x.astype(np.float32), y


def test_hierarchical_sampling_balances_very_different_clusters(blobs) -> None:
    x, y = blobs
    levels = hierarchical_kmeans(x, [20, 4], [0, 3], [0, 0], niter=20, seed=0)
    assert [len(lvl.centroids) for lvl in levels] == [20, 4]
    top = top_level_labels(levels)
    # the top level recovers the blobs (one cluster per blob)
    for b in range(4):
        assert len(np.unique(top[y == b])) == 1
    chosen = hierarchical_sample(levels, 400, "random", seed=0)
    assert len(chosen) == 400 and len(np.unique(chosen)) == 400
    counts = np.bincount(y[chosen], minlength=4)
    assert counts.tolist() == [140, 140, 100, 20]
    before, after = balance_stats(np.bincount(y)), balance_stats(counts)
    assert before["imbalance_factor"] == 100.0 and after["imbalance_factor"] == 7.0
    assert before["normalized_entropy"] == pytest.approx(0.4935, abs=1e-4)
    assert after["normalized_entropy"] == pytest.approx(0.8881, abs=1e-4)
    assert before["gini"] == pytest.approx(0.6050, abs=1e-4)
    assert after["gini"] == pytest.approx(0.25)


def test_closest_strategy_takes_points_nearest_the_centroid(blobs) -> None:
    x, y = blobs
    levels = hierarchical_kmeans(x, [20, 4], [0, 3], [0, 0], niter=20, seed=0)
    chosen = hierarchical_sample(levels, 400, "closest", seed=0)
    assert np.bincount(y[chosen], minlength=4).tolist() == [140, 140, 100, 20]
    lab, dist = levels[0].assignment, levels[0].distances
    for c in range(len(levels[0].centroids)):
        members = np.flatnonzero(lab == c)
        picked = np.intersect1d(members, chosen)
        # the chosen of each finest cluster are exactly its points closest to the centroid
        assert set(picked) == set(members[np.argsort(dist[members], kind="stable")[: len(picked)]])


def test_resampling_spreads_centroids_over_sparse_regions() -> None:
    """1-D: 5000 points around 0, 100 spread uniformly on [5, 25]. Plain k-means spends most
    centroids on the dense mass; resampling (k-means on the 5 closest points of every cluster)
    moves centroids to the sparse region (seeds 0, 1, 2: 5, 4, 3 -> 7, 7, 6 of 10 beyond 4)."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, 5000), rng.uniform(5, 25, 100)])[:, None].astype(np.float32)
    for seed in range(3):
        plain = hierarchical_kmeans(x, [10], [0], [0], niter=30, seed=seed)[0].centroids[:, 0]
        resampled = hierarchical_kmeans(x, [10], [5], [5], niter=30, seed=seed)[0].centroids[:, 0]
        assert (resampled > 4).sum() >= (plain > 4).sum() + 2


def test_kmeans_reaches_faiss_objective_and_sums_exactly() -> None:
    """The k-means loop (split over ranks in a job) ends where faiss.Kmeans ends on the same
    seeds, and its fixed-point sums give the float64 mean to float32 precision."""
    import faiss

    from dinoflow.curation.rows import Rows
    from dinoflow.curation.sampling import _fixed_point_scale, assign_rows, kmeans, kmeans_pp_init

    rng = np.random.default_rng(1)
    x = (rng.normal(size=(30, 16)) * 5)[rng.integers(0, 30, 6000)] + rng.normal(size=(6000, 16))
    x = x.astype(np.float32)
    ours = kmeans(x, 30, niter=20, seed=2)
    ref = faiss.Kmeans(16, 30, niter=20, seed=2, max_points_per_centroid=256)
    ref.train(x, init_centroids=kmeans_pp_init(x, 30, np.random.default_rng(2)))

    def objective(c: np.ndarray) -> float:
        return float(assign_rows(Rows(x), c)[1].sum())

    assert objective(ours) == pytest.approx(objective(ref.centroids), rel=1e-3)
    scale = _fixed_point_scale(x[:100])
    fixed = np.rint(x[:100] * np.float32(scale)).astype(np.int64)
    exact = x[:100].astype(np.float64).mean(axis=0)
    mean = fixed.sum(axis=0) / scale / 100
    assert np.abs(mean - exact).max() < 1e-7 * np.abs(x).max()
    assert np.array_equal(fixed[:50].sum(0) + fixed[50:].sum(0), fixed.sum(0))


def test_kmeans_bars_count_the_points_assigned(blobs, capsys) -> None:
    """Level 1's bar counts images (each assignment pass over all of them), level 2's centroids."""
    x, _ = blobs
    hierarchical_kmeans(x, [20, 4], [0, 3], [0, 0], niter=5, seed=0, progress=True)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "k-means level 1: 100%" in err and f"{len(x)}/{len(x)}" in err and "img/s" in err
    assert "k-means level 2: 100%" in err and "80/80" in err  # 20 centroids, 1 + 3 passes
