"""Eval-set decontamination: pool images too close to any val/test image (DINOv2's "relative
deduplication"), found by exact pixel hash, pHash and embedding cosine at a stricter threshold
than self-dedup; the pipeline then removes each hit with its whole duplicate component.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinoflow.curation.config import DecontamConfig, DedupConfig
from dinoflow.curation.dedup import hamming_edges, phash_bytes, similarity_edges
from dinoflow.curation.rows import Rows


def eval_matches(
    pool_sha: list[str],
    eval_sha: list[str],
    pool_emb: np.ndarray | Rows | None,
    eval_emb: np.ndarray | Rows | None,
    pool_phash: list[str] | None,
    eval_phash: list[str] | None,
    cfg: DecontamConfig,
    search: DedupConfig,
    index_folder: str | Path | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(matched eval index per pool row, -1 if none; how each was found).

    pool_phash/eval_phash: hex hashes, "" where pHash is not meaningful (small images); None
    turns that test off. Exact matches win over pHash, pHash over cosine. ``index_folder``: where
    an IVF index over many evaluation vectors is built (``dedup.build_index``).
    """
    n = len(pool_sha)
    match = np.full(n, -1, dtype=np.int64)
    how = [""] * n
    if pool_emb is not None and eval_emb is not None and len(eval_emb):
        i, j, s = similarity_edges(
            pool_emb, cfg.cosine_threshold, 1, search, base=eval_emb, folder=index_folder
        )
        for a, b, v in zip(i, j, s, strict=True):
            match[a], how[a] = b, f"cosine {v:.4f} >= {cfg.cosine_threshold}"
    if pool_phash is not None and eval_phash is not None:
        p_rows = np.array([k for k, h in enumerate(pool_phash) if h], dtype=np.int64)
        e_rows = np.array([k for k, h in enumerate(eval_phash) if h], dtype=np.int64)
        if len(p_rows) and len(e_rows):
            pb = phash_bytes([pool_phash[k] for k in p_rows])
            eb = phash_bytes([eval_phash[k] for k in e_rows])
            i, j, d = hamming_edges(pb, cfg.phash_max_distance, 1, base=eb)
            for a, b, v in zip(i, j, d, strict=True):
                match[p_rows[a]] = e_rows[b]
                how[p_rows[a]] = f"pHash distance {v} <= {cfg.phash_max_distance}"
    if cfg.exact:
        first: dict[str, int] = {}
        for k, h in enumerate(eval_sha):
            if h:
                first.setdefault(h, k)
        for a, h in enumerate(pool_sha):
            if h in first:
                match[a], how[a] = first[h], "same pixels"
    return match, how


def expand_to_components(hit: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Mask (N,) of rows whose component holds at least one hit."""
    bad = np.unique(components[hit])
    return np.isin(components, bad)
