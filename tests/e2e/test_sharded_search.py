"""Deduplication's searches and the k-means split over 2 torchrun ranks equal one process.

18,000 vectors in 6,000 groups of near copies (cosine about 0.97 within a group). Each rank
searches its share of the queries (flat index; IVF index whose quantizer the ranks train
together, whose lists they add by shares and rank 0 merges on disk), and trains and assigns its
share of the k-means points. The pairs found, the evaluation matches, the pHash pairs, every
level's centroids, assignments and distances and the balanced sample equal those of the same
calls in one process, exactly (one faiss thread per process in both: BLAS's float sums depend
on its thread count); the on-disk IVF index finds what one built in memory finds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import dinoflow
from dinoflow.curation import curation_config
from dinoflow.curation.dedup import similarity_edges
from tests.e2e.jobs import sharded_search_job


def _vectors(path: Path) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6000, 96)).astype(np.float32)
    x = np.repeat(centres, 3, axis=0) + 0.15 * rng.standard_normal((18000, 96)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(path, x[rng.permutation(18000)])
    return path


def test_two_ranks_search_and_cluster_like_one_process(tmp_path) -> None:
    vectors = _vectors(tmp_path / "vectors.npy")
    src = str(Path(dinoflow.__file__).resolve().parents[1])
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.e2e.jobs.sharded_search_job", str(vectors), str(tmp_path / "two.npz")]  # fmt: skip
    run = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    sharded_search_job.main(str(vectors), str(tmp_path / "one.npz"))
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    # in whole blocks of 8,192 rows: the same blocks, so the same sums, on 1 or 2 ranks
    assert two["blocks"].tolist() == [[0, 8192], [8192, 17800]] and one["blocks"].tolist() == [[0, 17800]]
    assert len(one["i"]) > 10000 and len(one["ci"]) > 100 and len(one["hi"]) > 0  # copies found
    # the lists were built on disk there (shards merged), searched, then removed: scratch
    assert [p.name for p in (tmp_path / "two.npz.ivf").iterdir()] == [".dinoflow.lock"]
    for key in one.files:
        if key != "blocks":
            assert one[key].shape == two[key].shape and np.array_equal(one[key], two[key]), key
    # the IVF index on disk searches like one in memory; with 3 of 16 lists probed it finds
    # most but not all of the exact search's pairs
    emb = np.load(vectors)[:17800]
    ivf = curation_config({"dedup": {"index": "ivf", "ivf_nlist": 16, "ivf_nprobe": 3}}).dedup
    vi, vj, _ = similarity_edges(emb, 0.95, 1, ivf)
    assert np.array_equal(vi, one["vi"]) and np.array_equal(vj, one["vj"])
    exact = set(zip(one["i"].tolist(), one["j"].tolist(), strict=True))
    assert 0.5 * len(exact) < len(exact & set(zip(vi.tolist(), vj.tolist(), strict=True))) < len(exact)
