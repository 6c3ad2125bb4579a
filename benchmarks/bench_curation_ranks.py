"""Benchmark (not a test): curation's deduplication and k-means split over torchrun ranks.

    python -m benchmarks.bench_curation_ranks               # 1M x 128: 1 rank, then 2 ranks
    python -m benchmarks.bench_curation_ranks --n 200000    # quicker

The vectors of ``benchmarks.bench_curation.synthetic`` (power-law concepts, 1% near copies) are
written to a ``.npy`` and read memory-mapped, as a curation job reads ``embeddings.npy``. The
same job (near-duplicate search with the IVF index built by blocks and merged on disk,
components, 2-level hierarchical k-means with resampling, balanced sampling) runs as 1 rank
and as 2 ranks of ``torchrun --standalone``, each rank on one core: the ratio of the stages'
seconds is what a second machine buys, on the same cores per rank. Each rank's peak RSS is
given (it counts the pages of the memory-mapped files the rank touched). Results equal across
the rank counts (the pairs, the k-means assignment and the sample: their checksums are given).
Results: ``results/curation_ranks.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "curation_ranks.json"


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def job(args: argparse.Namespace) -> None:
    """One rank: the stages on ``args.vectors``; rank 0 writes ``args.out``."""
    import faiss

    from dinoflow import distributed
    from dinoflow.curation import dedup as dd
    from dinoflow.curation.config import DedupConfig
    from dinoflow.curation.rows import Rows
    from dinoflow.curation.sampling import hierarchical_kmeans, hierarchical_sample

    faiss.omp_set_num_threads(args.threads)
    joined = distributed.init_from_env("gloo")
    rank, world = distributed.world()
    emb = np.load(args.vectors, mmap_mode="r")
    seconds: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        distributed.barrier()
        seconds[name] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    cfg = DedupConfig(index="ivf", ivf_nlist=args.nlist, ivf_nprobe=args.nprobe, query_batch=65536)
    src, dst, _ = dd.similarity_edges(Rows(emb), args.threshold, args.k, cfg, folder=args.index_dir)
    stage("near_duplicate_search", t0)
    t0 = time.perf_counter()
    keep = dd.representatives(dd.connected_components(len(emb), src, dst), np.zeros(len(emb)))
    stage("components", t0)
    t0 = time.perf_counter()
    kept = Rows(emb, np.flatnonzero(keep))
    levels = hierarchical_kmeans(
        kept, args.clusters, [0, args.resampling_steps], [0, 0], niter=args.iters, seed=0
    )
    stage("kmeans", t0)
    t0 = time.perf_counter()
    chosen = hierarchical_sample(levels, args.target, "random", 0)
    stage("sampling", t0)
    rss = distributed.all_gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if rank == 0:
        result = {
            "ranks": world,
            "threads_per_rank": args.threads,
            "seconds": seconds,
            "total_seconds": round(sum(seconds.values()), 2),
            "peak_rss_mb_per_rank": [round(r) for r in rss],
            "edges": len(src),
            "removed": int((~keep).sum()),
            "selected": len(chosen),
            "checksum_pairs": _digest(src, dst),
            "checksum_level1_assignment": _digest(levels[0].assignment),
            "checksum_sample": _digest(chosen),
        }
        Path(args.out).write_text(json.dumps(result))
    if joined:
        distributed.leave()


def _settings(args: argparse.Namespace) -> list[str]:
    """The job's settings as command-line arguments."""
    return ["--threads", str(args.threads), "--threshold", str(args.threshold),
            "--k", str(args.k), "--nlist", str(args.nlist), "--nprobe", str(args.nprobe),
            "--clusters", *map(str, args.clusters), "--resampling-steps", str(args.resampling_steps),
            "--iters", str(args.iters), "--target", str(args.target)]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="cores per rank")
    p.add_argument("--threshold", type=float, default=0.99)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--nlist", type=int, default=2048)
    p.add_argument("--nprobe", type=int, default=4)
    p.add_argument("--clusters", type=int, nargs=2, default=[1000, 100])
    p.add_argument("--resampling-steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--target", type=int, default=500_000)
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--vectors", help=argparse.SUPPRESS)
    p.add_argument("--index-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.job:
        job(args)
        return {}
    from benchmarks.bench_curation import synthetic
    from benchmarks.common import machine_info

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        vectors = Path(tmp) / "vectors.npy"
        np.save(vectors, synthetic(args.n, args.dim, 2000, 0.01, 0))
        for w in args.ranks:
            out = Path(tmp) / f"ranks-{w}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={w}", "-m", "benchmarks.bench_curation_ranks", "--job",
                   "--vectors", str(vectors), "--index-dir", f"{tmp}/index-{w}", "--out", str(out),
                   *_settings(args)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            subprocess.run(cmd, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
            runs.append(json.loads(out.read_text()))
            print(json.dumps(runs[-1]))
    base = runs[0]
    result = {
        **machine_info(args.threads),
        "n": args.n,
        "dim": args.dim,
        "runs": runs,
        "speedup_vs_first": {
            str(r["ranks"]): {k: round(base["seconds"][k] / max(v, 1e-9), 2) for k, v in r["seconds"].items()}
            | {"total": round(base["total_seconds"] / r["total_seconds"], 2)}
            for r in runs
        },
        "same_result": len({(r["checksum_pairs"], r["checksum_sample"]) for r in runs}) == 1,
    }
    print(json.dumps(result["speedup_vs_first"]), "same result:", result["same_result"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
