"""Deduplication's searches and the hierarchical k-means on the vectors of ``vectors.npy``, in
this process or as one rank of a torchrun job; rank 0 (or the only process) writes ``out.npz``.

The vectors are read through a memory map (``Rows``), as the curation job reads
``embeddings.npy``. The IVF index is built by blocks into ``<out>.ivf/`` and merged on disk.
"""

import sys

import numpy as np

from dinoflow import distributed
from dinoflow.curation import curation_config, ranks
from dinoflow.curation.dedup import hamming_edges, similarity_edges
from dinoflow.curation.rows import BLOCK_ROWS, Rows
from dinoflow.curation.sampling import hierarchical_kmeans, hierarchical_sample


def main(vectors: str, out: str) -> None:
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # as each rank runs: BLAS's sums depend on its thread count
    try:
        _run(vectors, out)
    finally:
        faiss.omp_set_num_threads(threads)


def _run(vectors: str, out: str) -> None:
    joined = distributed.init_from_env("gloo")
    emb = np.load(vectors, mmap_mode="r")
    n = len(emb)
    pool = Rows(emb, np.arange(0, n - 200))  # the last 200 rows play the evaluation set
    evals = Rows(emb, np.arange(n - 200, n))
    flat = curation_config({"dedup": {"index": "flat", "query_batch": 500}}).dedup
    ivf = curation_config({"dedup": {"index": "ivf", "ivf_nlist": 16, "ivf_nprobe": 3}}).dedup
    i, j, s = similarity_edges(pool, 0.95, 1, flat)
    vi, vj, vs = similarity_edges(pool, 0.95, 1, ivf, folder=f"{out}.ivf")
    ci, cj, cs = similarity_edges(pool, 0.9, 1, flat, base=evals)
    packed = np.packbits(np.asarray(emb[:, :64]) > 0, axis=1)  # (n, 8): a 64-bit code per row
    hi, hj, hd = hamming_edges(packed[: n - 200], 6, 3)
    levels = hierarchical_kmeans(pool, [40, 8], [2, 1], [0, 0], niter=10, seed=3)
    chosen = hierarchical_sample(levels, 6000, "random", seed=3)
    blocks = distributed.all_gather_objects(ranks.block(len(pool), BLOCK_ROWS))
    if distributed.is_main_process():
        np.savez(
            out, i=i, j=j, s=s, vi=vi, vj=vj, vs=vs, ci=ci, cj=cj, cs=cs, hi=hi, hj=hj, hd=hd,
            chosen=chosen, blocks=np.array(blocks),
            **{f"centroids{t}": lvl.centroids for t, lvl in enumerate(levels)},
            **{f"assignment{t}": lvl.assignment for t, lvl in enumerate(levels)},
            **{f"distances{t}": lvl.distances for t, lvl in enumerate(levels)},
        )  # fmt: skip
    if joined:
        distributed.leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
