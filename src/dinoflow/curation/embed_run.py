"""The pipeline's model embeddings (``curation.embedding.kind`` dinoflow / timm): chunk by chunk
on disk, resumable, shared by the ranks of a job.

The rows to embed (pool and evaluation rows, in table order) are cut into chunks of
``curation.embedding.rows_per_chunk``; each is embedded in batches of ``batch_size`` (the same
rows give the same batches, whoever computes them) and written atomically as
``<work_dir>/embed/<start>-<key>.npy``, (rows, D) float32 L2-normalised, ``start`` the position
of its first row among the rows embedded. A chunk's key hashes ``FORMAT``, its rows' positions,
item ids and ingest identity (the metadata's ``sha256`` of the decoded pixels), and the
embedder: the embedding settings (pixel-embedder ones aside), the resolved device type,
precision, normalisation, and the model's weights identity (``weights_identity``: the module's
structure and every tensor's bytes, whatever file or registered version they came from).
A run re-uses the chunks whose key it finds (a run killed by SIGKILL resumes from the chunks it
finished); after a complete run the chunk files of other keys are deleted.

The chunks are assembled into ``<work_dir>/embeddings.npy``, (N, D) float32 with zero rows for
the rows not embedded, returned memory-mapped. Under torch.distributed rank r embeds chunks i
with i % W == r; rank 0 assembles once every rank is done (``dinoflow.curation.ranks``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dinoflow import distributed
from dinoflow.curation import ranks
from dinoflow.curation.config import EmbeddingConfig
from dinoflow.curation.embed import (
    DatasetStats,
    Embedder,
    embed_batches,
    embedder,
    l2_normalise,
)
from dinoflow.files import atomic_path, atomic_write, prune

log = logging.getLogger(__name__)

FORMAT = 1  # bumped when what a chunk holds changes
PIXEL_ONLY = ("pixel_size", "pca_dim", "pca_max_fit")  # settings the model embedders ignore


@dataclass
class EmbedChunk:
    """Rows ``rows`` of the table (positions [start, start + len(rows)) of those embedded)."""

    start: int
    rows: np.ndarray
    path: Path

    def done(self) -> bool:
        return self.path.is_file()


def weights_identity(model) -> str:
    """sha256 (hex) of the module's structure (its repr: layers, shapes) and its tensors
    (``dinoflow.weights.hash_tensors``)."""
    from dinoflow.weights import hash_tensors

    return hash_tensors(hashlib.sha256(repr(model).encode()), model.state_dict()).hexdigest()


def embedder_key(cfg: EmbeddingConfig, emb: Embedder) -> str:
    """sha256 (hex) of everything an embedding depends on besides its image."""
    settings = cfg.model_dump(mode="json", exclude=set(PIXEL_ONLY))
    what = [FORMAT, settings, emb.device.type, emb.precision, emb.mean, emb.std, emb.in_chans]
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    h.update(weights_identity(emb.model).encode())
    return h.hexdigest()


def plan_embed_chunks(
    meta: pd.DataFrame, rows: np.ndarray, key: str, folder: Path, rows_per_chunk: int
) -> list[EmbedChunk]:
    """The chunks of ``rows`` in order, with their keyed paths."""
    ids = meta["item_id"].astype(str).to_numpy()
    sha = meta["sha256"].astype(str).to_numpy()
    chunks = []
    for start in range(0, len(rows), rows_per_chunk):
        part = rows[start : start + rows_per_chunk]
        h = hashlib.sha256(
            json.dumps([key, start, ids[part].tolist(), sha[part].tolist()]).encode()
        )
        chunks.append(EmbedChunk(start, part, folder / f"{start:010d}-{h.hexdigest()[:24]}.npy"))
    return chunks


def _embed_todo(
    emb: Embedder,
    load: Callable[[int], np.ndarray],
    todo: list[EmbedChunk],
    total: int,
    progress: bool,
    on_chunk: Callable[[EmbedChunk], None] | None,
) -> None:
    """Embed and write each chunk not done yet (this process, batch by batch)."""
    from tqdm.auto import tqdm

    initial = total - sum(len(c.rows) for c in todo)
    with tqdm(total=total, initial=initial, desc="embed", unit="img", disable=not progress) as bar:
        for chunk in todo:
            feats = l2_normalise(embed_batches(emb, load, chunk.rows, bar))
            atomic_write(chunk.path, lambda f, x=feats: np.save(f, x, allow_pickle=False))
            if on_chunk is not None:
                on_chunk(chunk)


def assemble_embeddings(chunks: list[EmbedChunk], out: Path, n_total: int) -> None:
    """Write ``out``: (n_total, D) float32, each chunk's rows in place, zeros elsewhere."""
    dim = np.load(chunks[0].path, mmap_mode="r").shape[1] if chunks else 1
    with atomic_path(out) as tmp:
        emb = np.lib.format.open_memmap(tmp, "w+", np.float32, (n_total, dim))  # zero-filled
        for c in chunks:
            emb[c.rows] = np.load(c.path, mmap_mode="r")
        emb.flush()
        del emb


def embed_chunks(
    cfg: EmbeddingConfig,
    load: Callable[[int], np.ndarray],
    meta: pd.DataFrame,
    rows: np.ndarray,
    dataset_stats: DatasetStats,
    work_dir: str | Path | None = None,
    progress: bool = True,
    on_chunk: Callable[[EmbedChunk], None] | None = None,
) -> np.ndarray:
    """(len(meta), D) L2-normalised model embeddings of ``rows`` (others zero), memory-mapped
    from ``<work_dir>/embeddings.npy``; ``work_dir`` None: a temporary folder (no resume, the
    result in memory). ``on_chunk``: called with each chunk this process computed, once written."""
    if work_dir is None:
        ranks.require_shared(work_dir, "curation embedding")
        with tempfile.TemporaryDirectory(prefix="dinoflow-embed-") as tmp:
            out = embed_chunks(cfg, load, meta, rows, dataset_stats, tmp, progress, on_chunk)
            return np.array(out)
    work_dir = Path(work_dir)
    folder, out = work_dir / "embed", work_dir / "embeddings.npy"
    folder.mkdir(parents=True, exist_ok=True)
    with ranks.work_lock(work_dir, "curation embedding"):
        emb = embedder(cfg, dataset_stats)
        chunks = plan_embed_chunks(meta, rows, embedder_key(cfg, emb), folder, cfg.rows_per_chunk)
        mine = ranks.share(chunks)
        todo = [c for c in mine if not c.done()]
        _embed_todo(emb, load, todo, sum(len(c.rows) for c in mine), progress, on_chunk)
        n_todo, computed = ranks.gather_sums(len(todo), sum(len(c.rows) for c in todo))
        if distributed.is_main_process():
            assemble_embeddings(chunks, out, len(meta))
            prune(folder, {c.path for c in chunks})
        distributed.barrier()
    log.info(
        "curation embedding: %d chunks (%d re-used), %d images embedded",
        len(chunks),
        len(chunks) - n_todo,
        computed,
    )
    return np.load(out, mmap_mode="r")
