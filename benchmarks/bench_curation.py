"""Benchmark (not a test): dedup + 2-level hierarchical k-means on N synthetic embeddings.

    python -m benchmarks.bench_curation            # 1M x 128: one JSON line, also results/curation.json
    python -m benchmarks.bench_curation --n 100000 # quicker

Data: a Gaussian mixture with power-law cluster sizes (like web data: a few huge concepts, a long
tail), 1% of the points replaced by near copies of others (cosine ~ 0.999), L2-normalised.
Steps timed: near-duplicate search (faiss IVF, k neighbours, threshold), connected components and
one-per-component selection, hierarchical k-means with resampling, balanced sampling.

Scaling out (what changes beyond one machine): the neighbour search is embarrassingly parallel
over query shards against a shared (or sharded + merged) IVF/IVF-PQ index, GPU faiss gives ~50x;
components are a union-find over the edge list (small: edges are only above-threshold pairs), or
a distributed CC (e.g. Spark GraphFrames) at billions; k-means is the distributed Lloyd of Vo et
al.'s code (each worker assigns its shard, centroids all-reduced), with level 1 split in two
(a first k-means, then each cluster split) as their 10M-cluster ImageNet-scale config does.
Memory is O(N * D) for the vectors plus O(edges): shard the vectors (memory-mapped .npy) beyond RAM.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from dinoflow.curation import dedup as dd
from dinoflow.curation.config import DedupConfig
from dinoflow.curation.sampling import (
    balance_stats,
    hierarchical_kmeans,
    hierarchical_sample,
    top_level_labels,
)


def rss_mb() -> float:
    """Peak resident set size of this process so far (MB; Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(n: int, dim: int, n_concepts: int, dup_fraction: float, seed: int) -> np.ndarray:
    """(n, dim) float32 L2-normalised: power-law mixture plus near-duplicate copies."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_concepts + 1) ** 1.1
    sizes = rng.multinomial(n, weights / weights.sum())
    centres = rng.normal(size=(n_concepts, dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    start = 0
    for c, s in enumerate(sizes):
        x[start : start + s] = centres[c] + 0.6 * rng.standard_normal((s, dim), dtype=np.float32)
        start += s
    n_dup = int(dup_fraction * n)
    src, dst = rng.choice(n, n_dup, replace=False), rng.choice(n, n_dup, replace=False)
    x[dst] = x[src] + 0.01 * rng.standard_normal((n_dup, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run(args: argparse.Namespace) -> dict:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    out: dict = {"n": args.n, "dim": args.dim, "threads": args.threads}
    t = time.perf_counter()
    x = synthetic(args.n, args.dim, args.concepts, args.dup_fraction, args.seed)
    out["data_seconds"] = time.perf_counter() - t
    out["rss_after_data_mb"] = rss_mb()

    t0 = time.perf_counter()
    cfg = DedupConfig(index="ivf", ivf_nlist=args.nlist, ivf_nprobe=args.nprobe, query_batch=65536)
    src, dst, _ = dd.similarity_edges(x, args.threshold, args.k, cfg, progress=args.progress)
    out["dedup_search_seconds"] = time.perf_counter() - t0
    t = time.perf_counter()
    comp = dd.connected_components(len(x), src, dst)
    keep = dd.representatives(comp, np.zeros(len(x)))
    out["dedup_components_seconds"] = time.perf_counter() - t
    out["dedup_edges"] = len(src)
    out["dedup_removed"] = int((~keep).sum())
    out["dedup_seconds"] = time.perf_counter() - t0

    t = time.perf_counter()
    kept = np.flatnonzero(keep)
    levels = hierarchical_kmeans(
        x[kept], args.clusters, [0, args.resampling_steps], [0, 0], niter=args.iters, seed=args.seed,
        progress=args.progress,
    )  # fmt: skip
    out["kmeans_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    chosen = hierarchical_sample(levels, args.target, "random", args.seed)
    out["sampling_seconds"] = time.perf_counter() - t
    top = top_level_labels(levels)
    out["n_clusters_per_level"] = [len(lvl.centroids) for lvl in levels]
    out["selected"] = len(chosen)
    out["balance_before"] = balance_stats(np.bincount(top))
    out["balance_after"] = balance_stats(np.bincount(top[chosen], minlength=len(levels[-1].centroids)))
    out["seconds"] = out["dedup_seconds"] + out["kmeans_seconds"] + out["sampling_seconds"]
    out["peak_rss_mb"] = rss_mb()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--concepts", type=int, default=2000)
    p.add_argument("--dup-fraction", type=float, default=0.01)
    p.add_argument("--threshold", type=float, default=0.99)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--nlist", type=int, default=2048)
    p.add_argument("--nprobe", type=int, default=4)
    p.add_argument("--clusters", type=int, nargs=2, default=[1000, 100])
    p.add_argument("--resampling-steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--target", type=int, default=500_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "curation.json")
    args = p.parse_args(argv)
    result = run(args)
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
