"""Batch embeddings: a folder of images (or the curated training set) -> parquet + faiss index.

- ``embeddings.parquet``: one row per image, columns ``id`` (str: the path relative to the folder,
  or the split item id), ``path`` (str: the image file; empty for in-memory sources such as
  Fashion-MNIST, whose id names the item) and ``vector`` (list of float32, length D: the
  backbone's CLS embedding by default, or the mean patch token).
- ``embeddings.faiss``: a flat inner-product index over the L2-normalised vectors (cosine
  similarity, as the kNN evaluation compares features); faiss id i is parquet row i.
- a picture of a few query images beside their nearest neighbours (cosine similarities shown).

Images are decoded by the project's one decoder and preprocessed as evaluation does (through
``dinoflow.serving.preprocess_images``, the embedding service's own path), so a vector here
equals the one ``dinoflow-embedder`` returns for the same file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from dinoflow.config import Strict

log = logging.getLogger(__name__)

__all__ = [
    "EmbedConfig",
    "ImageSet",
    "embed_image_set",
    "folder_image_set",
    "load_embeddings",
    "nearest_neighbours",
    "neighbours_figure",
    "run_embedding",
    "split_image_set",
]


class EmbedConfig(Strict):
    """``params:embed`` (conf/base/parameters_embed.yml)."""

    model: str = "models:/dinoflow-backbone@champion"  # a models:/ or runs:/ URI
    folder: str | None = None  # a folder of images; None: the curated training set
    embedding: Literal["cls", "patch_mean"] = "cls"
    batch_size: int = Field(64, ge=1)
    device: str = "auto"  # auto: the training device (the GPU when one is visible)
    limit: int | None = Field(None, ge=1)  # embed only the first N images (quick runs)
    skip_unreadable: bool = True  # folder: skip (and list) files that do not decode; else stop
    parquet_path: str = "data/07_model_output/embeddings.parquet"
    index_path: str = "data/07_model_output/embeddings.faiss"
    report_dir: str = "data/08_reporting/embed"
    n_queries: int = Field(4, ge=0)
    n_neighbours: int = Field(5, ge=1)
    seed: int = 0  # which rows are the picture's queries
    progress: bool = True
    log_to_mlflow: bool = True


@dataclass
class ImageSet:
    """What to embed: ids, file paths ("" for in-memory items, ``<shard>#<member>`` for shards)
    and the split that loads them when they are not paths."""

    ids: list[str]
    paths: list[str]
    source: str
    images: Any = None  # a Split of in-memory images or shard members, or None for files

    def __len__(self) -> int:
        return len(self.ids)


def folder_image_set(folder: str | Path, limit: int | None = None) -> ImageSet:
    """Every image under ``folder`` (recursive, sorted, hidden entries skipped), as curation lists."""
    from dinoflow.data import list_image_folder

    root = Path(folder)
    paths, _, _ = list_image_folder(root)
    if not paths:
        raise ValueError(f"embed.folder: no images under {root}")
    paths = paths[:limit] if limit else paths
    return ImageSet(
        ids=[p.relative_to(root).as_posix() for p in paths],
        paths=[str(p) for p in paths],
        source=f"folder:{root}",
    )


def split_image_set(split, source: str, limit: int | None = None) -> ImageSet:
    """A data split (e.g. the curated train split): in-memory images or image files."""
    n = min(len(split), limit) if limit else len(split)
    split = split.subset(np.arange(n))
    return ImageSet(
        ids=list(split.ids),
        paths=[split.location(i) for i in range(n)],
        source=source,
        # in-memory images and shard members are loaded by the split (paths go through the service)
        images=split if split.paths is None else None,
    )


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, mininterval=1.0)


def _preprocessed(model: torch.nn.Module, images: ImageSet, i: int) -> torch.Tensor:
    """Row i as the model's input (1, C, S, S): a file or a shard member's bytes through the
    service's ``preprocess_images``, an in-memory image through ``model.preprocess``."""
    from dinoflow.serving import preprocess_images

    split = images.images
    if split is None:
        return preprocess_images(model, [images.paths[i]], [images.paths[i]])
    if split.members is not None:
        return preprocess_images(model, [split.file(i)], [split.location(i)])
    return model.preprocess(split.load(i).unsqueeze(0))


def embed_image_set(
    model: torch.nn.Module,
    images: ImageSet,
    embedding: str = "cls",
    batch_size: int = 64,
    skip_unreadable: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Embed every image: (vectors float32 (M, D), kept row indices, [(path, error)] skipped).

    ``model``: a RegisteredBackbone. Files go through ``preprocess_images`` (the service's path);
    in-memory items through ``model.preprocess``. Unreadable files are skipped (and returned)
    when ``skip_unreadable``, else the first one stops the run with its name.
    """
    from dinoflow.serving import embed_images

    vectors: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    with _progress(len(images), "embed", progress) as bar:
        for start in range(0, len(images), batch_size):
            rows = list(range(start, min(start + batch_size, len(images))))
            tensors, good = [], []
            for i in rows:
                try:
                    tensors.append(_preprocessed(model, images, i))
                    good.append(i)
                except ValueError as exc:  # DataError too: a shard member unreadable
                    if not skip_unreadable:
                        raise
                    skipped.append((images.paths[i], str(exc)))
                    log.warning("embed: skipping %s", exc)
            x = torch.cat(tensors) if tensors else None
            if x is not None and len(good):
                vectors.append(embed_images(model, x, embedding, batch_size))
                kept += good
            bar.update(len(rows))
    if not kept:
        raise ValueError(
            f"embed: no image could be decoded ({len(skipped)} skipped, "
            f"first: {skipped[0][0] if skipped else '-'})"
        )
    return np.concatenate(vectors).astype(np.float32), kept, skipped


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def write_embeddings(
    ids: Sequence[str],
    paths: Sequence[str],
    vectors: np.ndarray,
    parquet_path: str | Path,
    index_path: str | Path,
) -> None:
    """The parquet table (id, path, vector) and the cosine faiss index, each written atomically."""
    import faiss
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_path, index_path = Path(parquet_path), Path(index_path)
    for p in (parquet_path, index_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    d = int(vectors.shape[1])
    table = pa.Table.from_pandas(
        pd.DataFrame({"id": list(ids), "path": list(paths)}), preserve_index=False
    ).append_column(
        "vector",
        pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), pa.float32()), d
        ),
    )
    tmp = parquet_path.with_name(f".{parquet_path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, parquet_path)
    index = faiss.IndexFlatIP(d)
    index.add(_normalised(vectors))
    tmp = index_path.with_name(f".{index_path.name}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, index_path)


def load_embeddings(parquet_path: str | Path) -> tuple[Any, np.ndarray]:
    """(DataFrame with id and path, vectors float32 (N, D)) from ``embeddings.parquet``."""
    import pandas as pd

    frame = pd.read_parquet(parquet_path)
    vectors = np.stack(frame.pop("vector").to_numpy()).astype(np.float32)
    return frame, vectors


def nearest_neighbours(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss search of the L2-normalised ``queries`` (Q, D): (cosine similarities, rows) (Q, k)."""
    return index.search(_normalised(queries), k)


def _display_image(images: ImageSet, row: int) -> np.ndarray:
    """Row ``row`` as an (H, W) or (H, W, 3) uint8 array for the picture."""
    if images.images is not None:
        t = images.images.load(row)
    else:
        from dinoflow.data.decode import decode_image

        t = decode_image(images.paths[row], 3)
    a = t.numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def neighbours_figure(
    images: ImageSet,
    queries: Sequence[int],
    neighbours: np.ndarray,
    scores: np.ndarray,
    path: str | Path,
) -> Path:
    """One row per query: the query image, then its neighbours with their cosine similarity."""
    from dinoflow.evaluation.pictures import new_figure, save_figure

    k = neighbours.shape[1]
    fig, axes = new_figure(len(queries), k + 1, (1.7 * (k + 1), 1.9 * len(queries)))
    for r, q in enumerate(queries):
        cells = [(q, "query")] + [
            (int(n), f"{s:.3f}") for n, s in zip(neighbours[r], scores[r], strict=True)
        ]
        for c, (row, title) in enumerate(cells):
            ax = axes[r, c]
            image = _display_image(images, row)
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
            label = images.ids[row]
            ax.set_title(f"{title}\n{label if len(label) <= 18 else '…' + label[-17:]}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                for side in ax.spines.values():
                    side.set_edgecolor("tab:red")
                    side.set_linewidth(2.5)
    fig.suptitle(
        "query (left) and its nearest neighbours (cosine similarity of embeddings)", fontsize=9
    )
    return save_figure(fig, path)


def _add_neighbours(
    summary: dict[str, Any],
    cfg: EmbedConfig,
    kept_set: ImageSet,
    vectors: np.ndarray,
    n_queries: int,
    k: int,
    report_dir: Path,
) -> None:
    """Random queries' k nearest neighbours in the written index: the picture and the
    summary's queries (ids and cosine similarities)."""
    import faiss

    ids = kept_set.ids
    index = faiss.read_index(cfg.index_path)  # what was written, read back
    queries = sorted(
        np.random.default_rng(cfg.seed).choice(len(ids), n_queries, replace=False).tolist()
    )
    scores, rows = nearest_neighbours(index, vectors[queries], k + 1)
    # drop each query itself (its own best match); keep k others
    neighbours = np.array(
        [[r for r in row if r != q][:k] for q, row in zip(queries, rows, strict=True)]
    )
    sims = np.array(
        [
            [s for r, s in zip(row, sc, strict=True) if r != q][:k]
            for q, row, sc in zip(queries, rows, scores, strict=True)
        ]
    )
    picture = neighbours_figure(kept_set, queries, neighbours, sims, report_dir / "neighbours.png")
    summary["files"]["picture"] = str(picture)
    summary["queries"] = [
        {
            "id": ids[q],
            "neighbours": [ids[int(n)] for n in nb],
            "similarity": [round(float(s), 6) for s in sm],
        }
        for q, nb, sm in zip(queries, neighbours, sims, strict=True)
    ]


def run_embedding(
    model: torch.nn.Module, images: ImageSet, cfg: EmbedConfig, model_uri: str = ""
) -> dict[str, Any]:
    """Embed ``images``, write the parquet, the faiss index and the neighbours picture.

    Returns the summary: counts, dimension, files, skipped files, and each query's neighbours
    (ids and cosine similarities).
    """
    vectors, kept, skipped = embed_image_set(
        model, images, cfg.embedding, cfg.batch_size, cfg.skip_unreadable, cfg.progress
    )
    ids = [images.ids[i] for i in kept]
    paths = [images.paths[i] for i in kept]
    write_embeddings(ids, paths, vectors, cfg.parquet_path, cfg.index_path)
    kept_set = ImageSet(
        ids=ids,
        paths=paths,
        source=images.source,
        images=None if images.images is None else images.images.subset(kept),
    )
    report_dir = Path(cfg.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "model": model_uri,
        "source": images.source,
        "embedding": cfg.embedding,
        "n_images": len(images),
        "n_embedded": len(ids),
        "dim": int(vectors.shape[1]),
        "skipped": [{"path": p, "error": e} for p, e in skipped],
        "files": {"parquet": cfg.parquet_path, "index": cfg.index_path},
        "queries": [],
    }
    n_queries = min(cfg.n_queries, len(ids))
    k = min(cfg.n_neighbours, len(ids) - 1)
    if n_queries and k >= 1:
        _add_neighbours(summary, cfg, kept_set, vectors, n_queries, k, report_dir)
    log.info(
        "embedded %d images (%d skipped) -> %s, %s",
        len(ids),
        len(skipped),
        cfg.parquet_path,
        cfg.index_path,
    )
    return summary
